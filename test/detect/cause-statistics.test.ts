// New statistics flip a plan with no DDL at all. The orders table's statistics were
// taken before a batch marked its newest 1% of rows 'x'; the planner believes 'x'
// does not exist and reads them through the kind index (fast). An ANALYZE run on the
// database teaches it that 'x' is 1% of rows, so it now walks the primary key in
// order expecting to meet 5 of them soon; they are all at the far end (slow). The
// incident's cause must be the ANALYZE of that table, with the estimates that moved;
// the same load before it (the control) opens nothing.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { causeDetection, expectNoIncidentFor, waitForIncident, warmShape } from '../harness/causes.ts';
import { startWorkload, type RunningWorkload } from '../harness/workload.ts';

const TABLE = 'pgw_stats_orders';
const ROWS = 200_000;

describe('statistics changed on the database', { timeout: 90_000 }, () => {
  let pgw: TestApp;
  let workload: RunningWorkload;

  before(async () => {
    await withClient(async (c) => {
      await c.query(`drop table if exists ${TABLE}`);
      await c.query(
        `create table ${TABLE} (id bigserial primary key, kind text not null, pad text not null) with (autovacuum_enabled = false, parallel_workers = 0)`,
      );
      await c.query(`insert into ${TABLE} (kind, pad) select 'a', repeat('p', 50) from generate_series(1, ${ROWS})`);
      await c.query(`create index ${TABLE}_kind_idx on ${TABLE} (kind)`);
      await c.query(`analyze ${TABLE}`);
      // After the statistics were taken: the newest 1% become 'x'.
      await c.query(`update ${TABLE} set kind = 'x' where id > ${ROWS - ROWS / 100}`);
    });
    pgw = await startTestApp(causeDetection());
    workload = await startWorkload(pgw.url(), [
      {
        next: () => ({ text: `select id from ${TABLE} where kind = $1 order by id limit 5`, values: ['x'] }),
        pauseMs: 2,
      },
      {
        next: () => ({ text: `select id from ${TABLE} where kind = $1 order by id limit 5`, values: ['x'] }),
        pauseMs: 2,
      },
      { next: (i) => ({ text: `select kind from ${TABLE} where id = $1`, values: [1 + (i % ROWS)] }), pauseMs: 5 },
    ]);
  });

  after(async () => {
    await workload?.stop();
    await pgw?.stop();
    await withClient((c) => c.query(`drop table if exists ${TABLE}`));
  });

  test('an ANALYZE of the table is the named cause of the plan flip', async () => {
    const fingerprint = await warmShape(pgw, `from ${TABLE} where kind`, 45_000, /pgw_stats_orders_kind_idx/);
    await expectNoIncidentFor(pgw, 10_000);
    const analyzedAt = Date.now();
    await withClient((c) => c.query(`analyze ${TABLE}`));
    const incident = await waitForIncident(
      pgw,
      fingerprint,
      (i) => i.attributed && i.causes.some((c) => c.type === 'statistics_change' && c.conclusive === true),
      40_000,
      'an incident attributed to the ANALYZE',
    );
    console.log(`# ANALYZE -> attributed incident: ${((Date.now() - analyzedAt) / 1000).toFixed(1)} s`);
    console.log(`# ${incident.summary}`);
    assert.match(incident.summary, /cause: statistics changed: ANALYZE of public\.pgw_stats_orders at \d{4}-/);
    assert.match(
      incident.summary,
      /estimates: .*pgw_stats_orders_kind_idx.*\(est\. \d+ rows\).* -> .*pgw_stats_orders_pkey/,
    );
    assert.ok(!incident.causes.some((c) => c.type === 'ddl' || c.type === 'schema_change'), 'no DDL involved');
  });
});
