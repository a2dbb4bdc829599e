// A prepared statement switched to its generic plan, with nothing changed in the
// database. The jobs table is skewed: 'pending' is a few dozen rows of 200 000.
// The application asks for the next pending jobs with a named prepared statement.
// While its sessions are short (at most five executions each, all 'pending'), every
// execution gets a custom plan: the status index, a few rows sorted (fast). Then a
// deploy keeps sessions open and first runs the statement five times for 'done':
// with plan_cache_mode = auto the server then prefers the generic plan (walk the
// primary key expecting 20 matches at once), which for 'pending' reads half the
// table (slow). The incident's cause must be that switch, and the plan pgwarden
// recorded must be the generic one; the short sessions alone (the control) open
// nothing.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { causeDetection, expectNoIncidentFor, waitForIncident, warmShape } from '../harness/causes.ts';

const TABLE = 'pgw_generic_jobs';
const ROWS = 200_000;
const TEXT = `select id from ${TABLE} where status = $1 order by id limit 20`;
const SESSIONS = 3;

describe('a prepared statement switched to its generic plan', { timeout: 150_000 }, () => {
  let pgw: TestApp;
  let running = true;
  /** 'short': sessions of five 'pending' executions; 'long': five 'done', then 'pending' for good. */
  let mode: 'short' | 'long' = 'short';
  let loops: Promise<void>[] = [];
  const errors: string[] = [];

  async function session(): Promise<void> {
    while (running) {
      const client = new pg.Client({ connectionString: pgw.url(), application_name: 'pgwarden-test-jobs' });
      client.on('error', () => undefined);
      try {
        await client.connect();
        const long = mode === 'long';
        for (let i = 0; running && (long ? mode === 'long' : i < 5); i++) {
          const status = long && i < 5 ? 'done' : 'pending';
          // A named statement: node-postgres sends Parse once per connection, then Bind/Execute.
          await client.query({ name: 'next_jobs', text: TEXT, values: [status] });
          await new Promise((resolve) => setTimeout(resolve, 3));
        }
      } catch (err) {
        if (errors.length < 5) errors.push((err as Error).message);
        await new Promise((resolve) => setTimeout(resolve, 50));
      } finally {
        await client.end().catch(() => undefined);
      }
    }
  }

  before(async () => {
    await withClient(async (c) => {
      await c.query(`drop table if exists ${TABLE}`);
      await c.query(
        `create table ${TABLE} (id int primary key, status text not null, pad text not null) with (autovacuum_enabled = false, parallel_workers = 0)`,
      );
      await c.query(
        `insert into ${TABLE} select g, case when g % 5000 = 0 then 'pending' else 'done' end, repeat('p', 40) from generate_series(1, ${ROWS}) g`,
      );
      await c.query(`create index ${TABLE}_status_idx on ${TABLE} (status)`);
      await c.query(`analyze ${TABLE}`);
    });
    pgw = await startTestApp(causeDetection());
    loops = Array.from({ length: SESSIONS }, () => session());
  });

  after(async () => {
    running = false;
    await Promise.all(loops);
    await pgw?.stop();
    await withClient((c) => c.query(`drop table if exists ${TABLE}`));
  });

  test('the server itself switches this statement to the generic plan after five executions for a common value', async () => {
    // Ground truth, straight on the database: what the incident below must be about.
    await withClient(async (c) => {
      await c.query(`prepare pgw_truth(text) as ${TEXT}`);
      for (let i = 0; i < 5; i++) await c.query(`execute pgw_truth('done')`);
      const { rows } = await c.query(`explain (format json) execute pgw_truth('pending')`);
      const counts = await c.query(
        `select generic_plans, custom_plans from pg_prepared_statements where name = 'pgw_truth'`,
      );
      await c.query('deallocate pgw_truth');
      assert.match(JSON.stringify(rows[0]['QUERY PLAN']), new RegExp(`${TABLE}_pkey`));
      assert.equal(Number(counts.rows[0].generic_plans), 1);
      assert.equal(Number(counts.rows[0].custom_plans), 5);
    });
  });

  test('the switch to the generic plan is the named cause; short sessions alone open nothing', async () => {
    const fingerprint = await warmShape(pgw, `from ${TABLE} where status`, 45_000, /status_idx/);
    const { body: warm } = await pgw.api(`/api/shapes/${fingerprint}`);
    assert.equal(warm.plans.current.kind, 'custom', JSON.stringify(warm.plans.current));
    await expectNoIncidentFor(pgw, 10_000);
    assert.deepEqual(errors, []);

    const switchedAt = Date.now();
    mode = 'long';
    const incident = await waitForIncident(
      pgw,
      fingerprint,
      (i) => i.attributed && i.causes.some((c) => c.type === 'generic_plan' && c.conclusive === true),
      45_000,
      'an incident attributed to the switch to the generic plan',
    );
    console.log(`# sessions kept open -> attributed incident: ${((Date.now() - switchedAt) / 1000).toFixed(1)} s`);
    console.log(`# ${incident.summary}`);
    assert.match(
      incident.summary,
      /cause: prepared statement switched to its generic plan after 5 executions \(custom plans before\): .*status_idx.* -> .*_pkey/,
    );
    assert.match(
      incident.summary,
      /the server switched this prepared statement to its generic plan after 5 executions/,
    );
    assert.ok(!incident.causes.some((c) => c.type === 'ddl' || c.type === 'schema_change'), 'no DDL involved');

    // The plan pgwarden recorded is the generic one, and says how it knows.
    const { body: detail } = await pgw.api(`/api/shapes/${fingerprint}`);
    const generic = detail.plans.history.find((r: { kind: string }) => r.kind === 'generic');
    assert.ok(generic, JSON.stringify(detail.plans.history));
    assert.ok(
      generic.nodes.some((n: string) => n.includes(`${TABLE}_pkey`)),
      generic.nodes.join(' / '),
    );
    assert.match(generic.kind_reason, /the server's choice .* replayed with the values of its first 5 executions/);
    assert.equal(generic.plan_cache_mode, 'auto');
    const cause = incident.causes.find((c) => c.type === 'generic_plan')!;
    assert.equal(cause.evidence?.kind_before, 'custom');
    assert.equal(cause.evidence?.kind_after, 'generic');
  });
});
