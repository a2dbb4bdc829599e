// The monitor URL names one database, the application uses another. The catalog and
// statistics watches must follow the traffic: an index dropped straight on the
// application's database (not through the proxy) is a schema_change event naming
// that database and the cause of the incident. The monitor URL's database holds the
// same table and index names, as a second copy of an application would: its own
// ANALYZE and its own drop of the same index, made just before, must not be taken
// for causes of a shape that never ran there.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { causeDetection, expectNoIncidentFor, waitForIncident, warmShape } from '../harness/causes.ts';
import { startWorkload, type RunningWorkload } from '../harness/workload.ts';

const OTHER_DB = 'pgw_other_db';
const TABLE = 'pgw_odb_users';
const INDEX = `${TABLE}_email_idx`;
const PROBE = 'pgw_odb_probe';
const ROWS = 100_000;

interface ApiEvent {
  id: number;
  type: string;
  summary: string;
  details?: Record<string, unknown>;
}

function otherUrl(): string {
  const url = new URL(testDatabase().url);
  url.pathname = `/${OTHER_DB}`;
  return url.toString();
}

async function createTable(url?: string): Promise<void> {
  await withClient(async (c) => {
    await c.query(`drop table if exists ${TABLE}`);
    await c.query(
      `create table ${TABLE} (id int primary key, email text not null, pad text not null) with (autovacuum_enabled = false, parallel_workers = 0)`,
    );
    await c.query(
      `insert into ${TABLE} select g, 'user' || g || '@example.com', repeat('p', 60) from generate_series(1, ${ROWS}) g`,
    );
    await c.query(`create index ${INDEX} on ${TABLE} (email)`);
    await c.query(`analyze ${TABLE}`);
  }, url);
}

/** Events of `type` whose details name `database` and whose summary matches. */
async function eventsIn(pgw: TestApp, type: string, database: string, summary: RegExp): Promise<ApiEvent[]> {
  const { body } = await pgw.api(`/api/events?type=${type}&limit=200`);
  return (body as ApiEvent[]).filter((e) => e.details?.database === database && summary.test(e.summary));
}

describe('a change made directly in a database other than the monitor URL names', { timeout: 150_000 }, () => {
  let pgw: TestApp;
  let workload: RunningWorkload;
  const defaultDb = testDatabase().database;

  before(async () => {
    await withClient(async (c) => {
      await c.query(`drop database if exists ${OTHER_DB} with (force)`);
      await c.query(`create database ${OTHER_DB}`);
    });
    await createTable();
    await createTable(otherUrl());
    // Monitor URL on the default database; the traffic only on the other one.
    pgw = await startTestApp(causeDetection({ schema_check_interval_s: 2 }));
    const lookup = (i: number) => ({
      text: `select id, pad from ${TABLE} where email = $1`,
      values: [`user${1 + ((i * 7919) % ROWS)}@example.com`],
    });
    workload = await startWorkload(pgw.url(undefined, OTHER_DB), [
      { next: lookup, pauseMs: 3 },
      { next: lookup, pauseMs: 3 },
    ]);
  });

  after(async () => {
    await workload?.stop();
    await pgw?.stop();
    await withClient(async (c) => {
      await c.query(`drop database if exists ${OTHER_DB} with (force)`);
      await c.query(`drop table if exists ${TABLE}`);
    });
  });

  test('its index drop is the cause; the same names changed in the monitor URL database are not', async () => {
    // The other database is watched once traffic reached it: a table created there
    // shows up with its database (retried: the first may predate the watch's baseline).
    await waitFor(
      async () => {
        await withClient((c) => c.query(`drop table if exists ${PROBE}; create table ${PROBE} (id int)`), otherUrl());
        return (await eventsIn(pgw, 'schema_change', OTHER_DB, new RegExp(PROBE))).length > 0;
      },
      { timeoutMs: 30_000, intervalMs: 2500, what: `a schema_change in ${OTHER_DB}` },
    );
    // And so are its statistics (a table seen once by the watch, then analyzed).
    await waitFor(
      async () => {
        await withClient((c) => c.query(`analyze ${PROBE}`), otherUrl());
        return (await eventsIn(pgw, 'statistics_change', OTHER_DB, new RegExp(PROBE))).length > 0;
      },
      { timeoutMs: 30_000, intervalMs: 2500, what: `a statistics_change in ${OTHER_DB}` },
    );
    assert.ok(
      pgw.logLines.some((l) => l.database === OTHER_DB && /watching the catalog and statistics/.test(String(l.msg))),
      'the new watch is logged',
    );

    const fingerprint = await warmShape(pgw, `from ${TABLE} where email`, 45_000, new RegExp(INDEX));
    const { body: shape } = await pgw.api(`/api/shapes/${fingerprint}`);
    assert.deepEqual(shape.databases, [OTHER_DB]);
    await expectNoIncidentFor(pgw, 8_000);

    // The monitor URL's database: the same table analyzed and the same index dropped,
    // seen by its own watches, and no plan of the shape changes.
    await withClient((c) => c.query(`analyze ${TABLE}; drop index ${INDEX}`));
    const decoy = await waitFor(
      async () => {
        const drops = await eventsIn(pgw, 'schema_change', defaultDb, new RegExp(`index ${INDEX} .*dropped`));
        const analyzed = await eventsIn(pgw, 'statistics_change', defaultDb, new RegExp(TABLE));
        return drops.length > 0 && analyzed.length > 0 && [...drops, ...analyzed];
      },
      { timeoutMs: 20_000, intervalMs: 250, what: `the drop and the ANALYZE in ${defaultDb} on the timeline` },
    );
    const decoyIds = new Set(decoy.map((e) => e.id));

    const droppedAt = Date.now();
    await withClient((c) => c.query(`drop index ${INDEX}`), otherUrl());
    const incident = await waitForIncident(
      pgw,
      fingerprint,
      (i) => i.attributed && i.causes.some((c) => c.type === 'schema_change'),
      45_000,
      `an incident attributed to the drop in ${OTHER_DB}`,
    );
    console.log(
      `# DROP INDEX in ${OTHER_DB} -> attributed incident: ${((Date.now() - droppedAt) / 1000).toFixed(1)} s`,
    );
    console.log(`# ${incident.summary}`);
    assert.match(
      incident.summary,
      new RegExp(`plan changed Index Scan using ${INDEX} on (public\\.)?${TABLE} -> Seq Scan`),
    );
    assert.match(incident.summary, new RegExp(`the catalog showed: index ${INDEX} on public\\.${TABLE} dropped`));
    assert.doesNotMatch(incident.summary, /statistics changed/);

    // Every timeline cause is an event of the shape's database; none is the decoy's.
    const { body: all } = await pgw.api('/api/events?limit=500');
    const byId = new Map((all as ApiEvent[]).map((e) => [e.id, e]));
    const timelineCauses = incident.causes.filter((c) =>
      ['schema_change', 'ddl', 'statistics_change', 'setting_change'].includes(c.type),
    ) as { type: string; summary: string; event_id?: number }[];
    assert.ok(timelineCauses.length > 0);
    for (const c of timelineCauses) {
      assert.ok(!decoyIds.has(c.event_id!), `a change in ${defaultDb} named as a cause: ${c.type}: ${c.summary}`);
      assert.equal(byId.get(c.event_id!)?.details?.database, OTHER_DB, `${c.type}: ${c.summary}`);
    }
    assert.ok(!incident.causes.some((c) => c.type === 'statistics_change'), 'the decoy ANALYZE is no cause');
  });
});
