// Which plan a prepared statement's execution gets, as the monitor reproduces it:
// custom plans for the first five executions, then the server's own choice,
// replayed with the values of those first five (PREPARE + EXPLAIN EXECUTE), and
// plan_cache_mode honoured. The table is skewed: 'done' is nearly every row,
// 'pending' a handful, so a custom plan for 'pending' reads the status index and
// sorts the few rows, while the generic plan (costed for "any value": half the
// table) walks the primary key expecting 20 matches at once, which for 'pending'
// means reading most of the table.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { explainExecution, planChoice } from '../../src/plans/explain.ts';
import type { MonitorPool } from '../../src/plans/monitor.ts';
import { summarizePlan } from '../../src/plans/plan.ts';
import { testDatabase, withClient } from '../harness/database.ts';
import { singleConnectionMonitor } from '../harness/monitor.ts';

const TABLE = 'pgw_prepared_jobs';
const PG_VERSION = Number(process.env.PGWARDEN_TEST_PG_VERSION ?? 0);
const TEXT = `select id from ${TABLE} where status = $1 order by id limit 20`;
/** Without the LIMIT, the generic plan's cost (half the table) is well above a rare value's custom plan. */
const PLAIN = `select id from ${TABLE} where status = $1`;
const DONE = ['done'];
const PENDING = ['pending'];

describe('prepared statements: custom or generic plan', () => {
  let monitor: MonitorPool;
  let database: string;
  const user = testDatabase().user;
  const sample = (execution: number, params: string[], firstValues: string[][] | null = null) => ({
    database,
    user,
    text: TEXT,
    params,
    paramCount: 1,
    execution,
    paramTypes: [25],
    firstValues,
  });
  const scan = (plan: unknown) => summarizePlan(plan).nodes.find((n) => n.nodeType.endsWith('Scan'))!.description;

  before(async () => {
    // One connection: a prepared statement left behind would be seen by the next test.
    monitor = singleConnectionMonitor();
    database = monitor.defaultDatabase;
    await withClient(async (c) => {
      await c.query(`drop table if exists ${TABLE}`);
      await c.query(
        `create table ${TABLE} (id int primary key, status text not null) with (autovacuum_enabled = false)`,
      );
      await c.query(
        `insert into ${TABLE} select g, case when g % 5000 = 0 then 'pending' else 'done' end from generate_series(1, 20000) g`,
      );
      await c.query(`create index ${TABLE}_status_idx on ${TABLE} (status)`);
      await c.query(`analyze ${TABLE}`);
    });
  });

  after(async () => {
    await monitor.close();
    await withClient((c) => c.query(`drop table if exists ${TABLE}`));
  });

  async function leftBehind(): Promise<number> {
    // The pool's one connection: the one every replay ran on.
    const { rows } = await monitor.query<{ n: string }>(
      "select count(*) as n from pg_prepared_statements where name like 'pgwarden_replay%'",
    );
    return Number(rows[0].n);
  }

  test('the first five executions get a custom plan for their values', async () => {
    const explained = await explainExecution(monitor, sample(3, PENDING), PG_VERSION);
    assert.equal(explained.kind, 'custom');
    assert.match(explained.reason!, /execution 3: the first 5 executions/);
    assert.match(scan(explained.plan), new RegExp(`${TABLE}_status_idx`));
  });

  test('after five executions with a common value, the server keeps the generic plan for a rare one', {
    skip: PG_VERSION < 14 && `PostgreSQL ${PG_VERSION} has no pg_prepared_statements.generic_plans`,
  }, async () => {
    const explained = await explainExecution(monitor, sample(9, PENDING, [DONE, DONE, DONE, DONE, DONE]), PG_VERSION);
    assert.equal(explained.kind, 'generic');
    assert.equal(explained.planCacheMode, 'auto');
    assert.match(
      explained.reason!,
      /execution 9: the server's choice .* replayed with the values of its first 5 executions/,
    );
    assert.equal(scan(explained.plan), `Index Scan using ${TABLE}_pkey on ${TABLE}`);
    // EXPLAIN EXECUTE of the generic plan shows the parameter, not the value.
    assert.match(JSON.stringify(explained.plan), /status = \$1/);
    assert.equal(await leftBehind(), 0);
  });

  test('when the generic plan costs more than the first executions did, custom plans go on', {
    skip: PG_VERSION < 14 && `PostgreSQL ${PG_VERSION}`,
  }, async () => {
    const first = [PENDING, PENDING, PENDING, PENDING, PENDING];
    const explained = await explainExecution(monitor, { ...sample(9, PENDING, first), text: PLAIN }, PG_VERSION);
    assert.equal(explained.kind, 'custom');
    assert.match(scan(explained.plan), /status_idx/);
    assert.equal(await leftBehind(), 0);
  });

  test('without the first values, the sampled values stand in for them and the reason says so', {
    skip: PG_VERSION < 14 && `PostgreSQL ${PG_VERSION}`,
  }, async () => {
    const explained = await explainExecution(monitor, sample(40, DONE, null), PG_VERSION);
    assert.match(explained.reason!, /standing in for its first 5 \(not seen\)/);
    assert.equal(explained.kind, 'generic');
  });

  test('plan_cache_mode = force_generic_plan gives the generic plan from the first execution', async () => {
    const explained = await explainExecution(
      monitor,
      { ...sample(1, PENDING), settings: [['plan_cache_mode', 'force_generic_plan']] },
      PG_VERSION,
    );
    assert.equal(explained.planCacheMode, 'force_generic_plan');
    assert.equal(explained.kind, 'generic');
    assert.equal(scan(explained.plan), `Index Scan using ${TABLE}_pkey on ${TABLE}`);
    assert.equal(await leftBehind(), 0);
  });

  test('plan_cache_mode = force_custom_plan plans every execution for its values', async () => {
    const explained = await explainExecution(
      monitor,
      { ...sample(50, PENDING, [DONE, DONE, DONE, DONE, DONE]), settings: [['plan_cache_mode', 'force_custom_plan']] },
      PG_VERSION,
    );
    assert.equal(explained.kind, 'custom');
    assert.match(scan(explained.plan), /status_idx/);
  });

  test('values with quotes and backslashes reach the replay intact', {
    skip: PG_VERSION < 14 && `PostgreSQL ${PG_VERSION}`,
  }, async () => {
    const odd = ["O'Brien \\'); drop table x; --"];
    const explained = await explainExecution(
      monitor,
      { ...sample(7, odd, [odd, odd, odd, odd, odd]), text: PLAIN },
      PG_VERSION,
    );
    assert.equal(explained.kind, 'custom');
    assert.ok(
      JSON.stringify(explained.plan).includes("O''Brien \\\\''); drop table x; --"),
      JSON.stringify(explained.plan),
    );
    assert.equal(await leftBehind(), 0);
  });

  test('a replay that fails leaves no prepared statement and no transaction behind', async () => {
    await assert.rejects(
      explainExecution(
        monitor,
        {
          ...sample(8, ['x'], [['x'], ['x'], ['x'], ['x'], ['x']]),
          text: `select id from ${TABLE} where id = $1`,
          paramTypes: [],
        },
        PG_VERSION,
      ),
      /invalid input syntax for type integer/,
    );
    assert.equal(await leftBehind(), 0);
    const explained = await explainExecution(monitor, sample(2, PENDING), PG_VERSION);
    assert.equal(explained.kind, 'custom');
  });

  test('a simple Query or a statement without parameters has no plan kind', () => {
    assert.deepEqual(planChoice(sample(0, []), [], 'auto'), { replay: null, kind: null, reason: null });
    assert.equal(planChoice({ ...sample(7, []), paramCount: 0 }, [], 'auto').kind, null);
  });
});
