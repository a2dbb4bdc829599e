// A table lock taken outside the proxy (LOCK TABLE in an open transaction, as a
// forgotten migration session would) stalls every call of the hot shape: none of them
// completes while the lock is held, so only the in-flight tracking can see it. The
// incident must open while the lock is still held, name the blocking session (pid,
// user, application, its statement as a shape, how long its transaction has been
// open), mitigate nothing, and the blocker can be terminated through the admin API.
// The same load with no lock (the control, before the fault) opens nothing.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { causeDetection, expectNoIncidentFor, waitForIncident, warmShape } from '../harness/causes.ts';
import { createUsersTable, dropUsersTable } from '../harness/incident.ts';
import { startWorkload, type RunningWorkload } from '../harness/workload.ts';

const TABLE = 'pgw_lock_users';
const OTHER = 'pgw_lock_other';
const ROWS = 20_000;

describe('a lock held outside the proxy', { timeout: 150_000 }, () => {
  let pgw: TestApp;
  let workload: RunningWorkload;
  let locker: pg.Client | null = null;

  before(async () => {
    await createUsersTable(TABLE, `${TABLE}_email_idx`, ROWS);
    await createUsersTable(OTHER, `${OTHER}_email_idx`, 1000);
    pgw = await startTestApp(causeDetection());
    const lookup = (i: number) => ({
      text: `select id, name from ${TABLE} where email = $1`,
      values: [`user${1 + ((i * 7919) % ROWS)}@example.com`],
    });
    workload = await startWorkload(pgw.url(), [
      { next: lookup, pauseMs: 2 },
      { next: lookup, pauseMs: 2 },
      { next: lookup, pauseMs: 2 },
      { next: (i) => ({ text: `select name from ${OTHER} where id = $1`, values: [1 + (i % 1000)] }), pauseMs: 2 },
    ]);
  });

  after(async () => {
    await locker?.end().catch(() => undefined);
    await workload?.stop();
    await pgw?.stop();
    await dropUsersTable(TABLE);
    await dropUsersTable(OTHER);
  });

  test('the incident names the blocking session while the lock is held, and the blocker can be terminated', async () => {
    const fingerprint = await warmShape(pgw, `from ${TABLE} where email`);
    await expectNoIncidentFor(pgw, 12_000);

    locker = new pg.Client({ connectionString: testDatabase().url, application_name: 'forgotten-migration' });
    locker.on('error', () => undefined); // terminated below
    await locker.connect();
    const { rows } = await locker.query<{ pid: number }>('select pg_backend_pid() as pid');
    const pid = rows[0].pid;
    await locker.query('begin');
    await locker.query(`lock table ${TABLE} in access exclusive mode`);
    const lockedAt = Date.now();

    // The catalog watch and EXPLAIN must not queue behind the lock: a full snapshot
    // (pg_get_indexdef) settles quickly, failing on lock_timeout if it has to wait.
    const snapshotStarted = Date.now();
    await pgw.app.schema!.snapshot().catch(() => undefined);
    assert.ok(Date.now() - snapshotStarted < 4000, `catalog snapshot settled in ${Date.now() - snapshotStarted} ms`);

    const incident = await waitForIncident(
      pgw,
      fingerprint,
      (i) => i.attributed && i.causes.some((c) => c.type === 'lock_wait' && c.evidence?.blockers?.[0]?.pid === pid),
      25_000,
      'an incident attributed to the lock',
    );
    const attributedS = (Date.now() - lockedAt) / 1000;
    console.log(`# lock -> attributed incident: ${attributedS.toFixed(1)} s`);
    console.log(`# ${incident.summary}`);
    const cause = incident.causes.find((c) => c.type === 'lock_wait')!;
    assert.match(
      incident.summary,
      new RegExp(
        `held by pid ${pid} \\(user ${testDatabase().user}, application forgotten-migration, idle in transaction`,
      ),
    );
    assert.match(cause.summary, new RegExp(`last ran \`lock table ${TABLE} in access exclusive mode\``, 'i'));
    assert.match(cause.summary, /AccessExclusiveLock on pgw_lock_users/);
    assert.match(cause.summary, /in its transaction for \d+ s/);
    assert.equal(cause.mitigable, false);
    assert.match(
      incident.mitigation?.note ?? '',
      /no mitigation: the cause is not a shape through the proxy \(lock_wait\)/,
    );
    assert.ok(!JSON.stringify(incident).includes('@example.com'), 'no literal value in the incident');
    assert.equal(
      (await pgw.api('/api/incidents')).body.filter((i: { fingerprint: string }) => i.fingerprint !== fingerprint)
        .length,
      0,
      'the other shape opened nothing',
    );

    // The admin action: refused without the token and for a backend that blocks no one.
    assert.equal(
      (await pgw.api(`/api/backends/${pid}/terminate`, { method: 'POST', body: {}, token: null })).status,
      401,
    );
    const ownPid = await withClient(
      async (c) => (await c.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0].pid,
    );
    assert.equal((await pgw.api(`/api/backends/${ownPid}/cancel`, { method: 'POST', body: {} })).status, 409);
    const terminated = await pgw.api(`/api/backends/${pid}/terminate`, {
      method: 'POST',
      body: { reason: 'forgotten LOCK TABLE' },
    });
    assert.equal(terminated.status, 200, JSON.stringify(terminated.body));
    assert.ok(Date.now() - lockedAt < 40_000);
    const { body: events } = await pgw.api('/api/events?type=admin_action');
    assert.match(events.at(-1).summary, new RegExp(`terminate backend ${pid} .*forgotten-migration`));
    assert.ok(pgw.logLines.some((l) => l.msg === 'admin action on a blocking backend' && l.pid === pid));

    // With the blocker gone the shape runs again and the incident resolves.
    const calls = workload.calls[0];
    await waitFor(() => workload.calls[0] > calls + 50, { timeoutMs: 10_000, what: 'the hot shape to run again' });
    // Recovery needs a few quiet buckets; on a busy host the p95 comes back down slowly.
    await waitFor(async () => (await pgw.api(`/api/incidents/${incident.id}`)).body.status === 'resolved', {
      timeoutMs: 60_000,
      intervalMs: 500,
      what: 'the incident to resolve',
    });
    const resolved = (await pgw.api(`/api/incidents/${incident.id}`)).body;
    assert.ok(
      resolved.causes.some((c: { type: string }) => c.type === 'lock_wait'),
      'the lock stays on the record after release',
    );
  });
});
