// The scene of the index-drop incident (the demo's and the README's), shared by the tests that replay it: a users
// table with a unique index on email (the hot lookup's), and the pgwarden settings
// that let a baseline form in seconds instead of a minute.

import type { Config } from '../../src/config.ts';
import { testDatabase, withClient } from './database.ts';

/**
 * Creates `table` with `rows` users and `index` on email; with `events`, also
 * `<table>_events`. With `parallel`, scans may use parallel workers as on any
 * default PostgreSQL (the seq scan then starves the other shapes too).
 */
export async function createUsersTable(
  table: string,
  index: string,
  rows: number,
  options: { events?: boolean; parallel?: boolean } = {},
): Promise<void> {
  await withClient(async (c) => {
    await c.query(`drop table if exists ${table}, ${table}_events`);
    await c.query(
      `create table ${table} (id bigserial primary key, email text not null, name text not null, bio text not null)`,
    );
    await c.query(
      `insert into ${table} (email, name, bio) select 'user' || g || '@example.com', 'name ' || (g % 1000), repeat('x', 200) from generate_series(1, ${rows}) g`,
    );
    await c.query(`create unique index ${index} on ${table} (email)`);
    // One core per scan: on a 2-core test machine parallel scans would starve every
    // other shape too, which is a different incident from the one replayed here.
    if (!options.parallel) await c.query(`alter table ${table} set (parallel_workers = 0)`);
    if (options.events)
      await c.query(
        `create table ${table}_events (id bigserial primary key, user_id bigint, at timestamptz default now())`,
      );
    await c.query(`analyze ${table}`);
  });
}

export async function dropUsersTable(table: string): Promise<void> {
  await withClient((c) => c.query(`drop table if exists ${table}, ${table}_events`));
}

/**
 * pgwarden with a monitoring connection and fast detection: baselines from 2 s
 * buckets (~15 s of history, not a minute), catalog checks and evaluations often.
 */
export function fastDetection(): Partial<Config> {
  return {
    monitor_url: testDatabase().url,
    series_bucket_s: 2,
    schema_check_interval_s: 2,
    detect_evaluate_ms: 1000,
    slow_query_ms: 10_000,
  };
}
