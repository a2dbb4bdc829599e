// A database of its own with the incident's table (users, with users_email_idx),
// and a real pgwarden in front of it capturing a small workload: lookups by
// email and by id, a count by name sent as a simple Query with a literal, and
// an insert. Values that must never leave pgwarden unless allowed are marked.

import { randomBytes } from 'node:crypto';
import pg from 'pg';
import type { Config } from '../../src/config.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';

/** Appears in the inserted rows' emails: must not be in a workload without samples. */
export const SECRET = 'pgw-secret-7f3a';
/** The literal of the simple-Query count. */
export const NAME_LITERAL = 'name 77';

export const QUERIES = {
  byEmail: 'select id, name from users where email = $1',
  byId: 'select email, created_at from users where id = $1',
  countByName: `select count(*) from users where name = '${NAME_LITERAL}'`,
  insert: 'insert into users (email, name) values ($1, $2)',
} as const;

export interface WorkloadDatabase {
  readonly name: string;
  readonly url: string;
  drop(): Promise<void>;
}

export async function createWorkloadDatabase(): Promise<WorkloadDatabase> {
  const name = `pgw_workload_${randomBytes(4).toString('hex')}`;
  await withClient((c) => c.query(`create database ${name}`));
  const url = new URL(testDatabase().url);
  url.pathname = `/${name}`;
  await withClient(async (c) => {
    await c.query(
      'create table users (id bigserial primary key, email text not null, name text not null, created_at timestamptz not null default now())',
    );
    await c.query(
      `insert into users (email, name) select 'user' || g || '@example.com', 'name ' || (g % 500) from generate_series(1, 20000) g`,
    );
    await c.query('create index users_email_idx on users (email)');
    await c.query('analyze users');
  }, url.toString());
  return {
    name,
    url: url.toString(),
    drop: () => withClient((c) => c.query(`drop database if exists ${name} with (force)`)).then(() => undefined),
  };
}

export interface CapturedWorkload {
  readonly pgw: TestApp;
  /** The body of GET /api/workload once every shape has a plan (and samples, if on). */
  readonly workload: { format: string; shapes: WorkloadShapeJson[] };
}

export interface WorkloadShapeJson {
  fingerprint: string;
  query: string;
  command: string;
  databases: string[];
  calls: number;
  total_ms: number;
  p95_ms: number;
  plan_fingerprint: string | null;
  plan: string[] | null;
  param_types: number[] | null;
  samples?: (string | null)[][];
}

/** Starts pgwarden in front of `db`, runs the workload through it and waits for its plans. */
export async function captureWorkload(
  db: WorkloadDatabase,
  overrides: Partial<Config> = {},
): Promise<CapturedWorkload> {
  const pgw = await startTestApp({ monitor_url: db.url, mitigation: 'off', ...overrides });
  const client = new pg.Client({ connectionString: pgw.url(undefined, db.name) });
  await client.connect();
  try {
    for (let i = 1; i <= 30; i++) {
      await client.query(QUERIES.byEmail, [`user${i}@example.com`]);
      await client.query(QUERIES.byId, [i]);
      await client.query(QUERIES.countByName);
      if (i <= 5) await client.query(QUERIES.insert, [`${SECRET}-${i}@example.org`, 'inserted']);
    }
    await client.query('selec 1').catch(() => undefined); // a fallback shape: never exported
  } finally {
    await client.end();
  }
  const wanted = Object.values(QUERIES).length;
  const samples = overrides.workload_sample_params === true;
  const workload = await waitFor(
    async () => {
      const { body } = await pgw.api('/api/workload');
      const shapes = (body as CapturedWorkload['workload']).shapes;
      const ready = shapes.filter((s) => s.plan_fingerprint !== null && (!samples || (s.samples?.length ?? 0) > 0));
      return ready.length >= wanted ? (body as CapturedWorkload['workload']) : undefined;
    },
    { timeoutMs: 20_000, intervalMs: 100, what: 'a plan (and samples) for every shape of the workload' },
  );
  return { pgw, workload };
}

/** Indexes, tables and columns of the public schema, one line each: compared before and after a check. */
export function catalogOf(url: string): Promise<string[]> {
  return withClient(async (c) => {
    const { rows } = await c.query<{ line: string }>(`
      select 'index ' || pg_get_indexdef(i.indexrelid) as line
        from pg_index i join pg_class t on t.oid = i.indrelid join pg_namespace n on n.oid = t.relnamespace
       where n.nspname = 'public'
      union all
      select 'column ' || table_name || '.' || column_name || ' ' || data_type
        from information_schema.columns where table_schema = 'public'
      union all
      select 'relation ' || c.relname || ' ' || c.relkind::text
        from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = 'public'
      order by 1`);
    return rows.map((r) => r.line);
  }, url);
}
