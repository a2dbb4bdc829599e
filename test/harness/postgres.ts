// The throwaway PostgreSQL server lives in src/embedded/ because `pgwarden demo`
// starts one too; tests import it from here.
export * from '../../src/embedded/postgres.ts';
