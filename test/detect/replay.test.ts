// The index-drop incident (the demo's and the README's), replayed on a real PostgreSQL: a hot lookup by an
// indexed column under mixed load, then an out-of-band migration drops the index
// and creates one that does not match the query. pgwarden must open an incident
// for the hot shape within 30 s whose causes name the plan change (to a Seq Scan)
// and the dropped index, and whose ruled-out list covers traffic and other shapes;
// restoring the index must resolve it.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { createUsersTable, dropUsersTable, fastDetection } from '../harness/incident.ts';
import { startWorkload, type RunningWorkload } from '../harness/workload.ts';

const TABLE = 'pgw_replay_users';
const INDEX = 'pgw_replay_users_email_idx';
const WRONG_INDEX = 'pgw_replay_users_name_idx';
const ROWS = 300_000;

interface Cause {
  type: string;
  summary: string;
  objects: string[];
  diff?: { headline: string };
}
interface Incident {
  id: string;
  fingerprint: string;
  status: string;
  attributed: boolean;
  summary: string;
  causes: Cause[];
  ruled_out: { check: string }[];
  detected_at: string;
}

describe('the incident replay', { timeout: 240_000 }, () => {
  let pgw: TestApp;
  let workload: RunningWorkload;

  before(async () => {
    await createUsersTable(TABLE, INDEX, ROWS, { events: true });
    pgw = await startTestApp(fastDetection());
    let n = 0;
    const email = () => `user${1 + ((n++ * 7919) % ROWS)}@example.com`;
    workload = await startWorkload(pgw.url(), [
      { next: () => ({ text: `select id, name from ${TABLE} where email = $1`, values: [email()] }) },
      { next: (i) => ({ text: `select email from ${TABLE} where id = $1`, values: [1 + (i % ROWS)] }), pauseMs: 2 },
      { next: (i) => ({ text: `insert into ${TABLE}_events (user_id) values ($1)`, values: [i] }), pauseMs: 5 },
    ]);
  });

  after(async () => {
    await workload?.stop();
    await pgw?.stop();
    await dropUsersTable(TABLE);
  });

  async function hotFingerprint(): Promise<string> {
    const { body } = await pgw.api('/api/shapes?sort=calls&limit=50');
    const hot = (body as { fingerprint: string; query: string }[]).find((s) => s.query.includes(`from ${TABLE} where email`));
    assert.ok(hot, 'hot shape recorded');
    return hot.fingerprint;
  }

  test('a dropped index is attributed within 30 s, and restoring it resolves the incident', async () => {
    // Warm-up: the hot shape has a plan and enough history for a baseline.
    const fingerprint = await waitFor(
      async () => {
        const fp = await hotFingerprint();
        const { body } = await pgw.api(`/api/shapes/${fp}`);
        return body.plans?.current?.nodes?.some((n: string) => n.includes(INDEX)) && body.series.length >= 8 ? fp : undefined;
      },
      { timeoutMs: 60_000, intervalMs: 500, what: 'the hot shape to have an index plan and a baseline' },
    );
    const { body: before } = await pgw.api('/api/incidents');
    assert.deepEqual(before, [], 'no incident before the migration');

    const migratedAt = Date.now();
    await withClient(async (c) => {
      await c.query(`drop index ${INDEX}`);
      await c.query(`create index ${WRONG_INDEX} on ${TABLE} (name)`);
    });

    const incident = await waitFor(
      async () => {
        const { body } = await pgw.api('/api/incidents?status=active');
        const found = (body as Incident[]).find((i) => i.fingerprint === fingerprint);
        if (!found) return undefined;
        const plan = found.causes.find((c) => c.type === 'plan_change' && /Seq Scan on pgw_replay_users/.test(c.summary));
        const dropped = found.causes.find((c) => c.type !== 'plan_change' && c.objects.includes(INDEX) && /dropped|DROP/.test(c.summary));
        const ruledOut = found.ruled_out.map((r) => r.check);
        return plan && dropped && ruledOut.includes('traffic') && ruledOut.includes('other_shapes') ? found : undefined;
      },
      { timeoutMs: 30_000, intervalMs: 250, what: 'an attributed incident for the hot shape' },
    );
    const attributedAfterMs = Date.now() - migratedAt;
    console.log(`# migration -> attributed incident: ${(attributedAfterMs / 1000).toFixed(1)} s (detected_at ${((Date.parse(incident.detected_at) - migratedAt) / 1000).toFixed(1)} s)`);
    console.log(`# ${incident.summary}`);
    assert.equal(incident.attributed, true);
    assert.match(incident.summary, /plan changed .*-> Seq Scan on pgw_replay_users/);
    assert.match(incident.summary, /pgw_replay_users_email_idx on public.pgw_replay_users dropped/, 'the dropped index is the named suspect');

    const others = (await pgw.api('/api/incidents')).body as Incident[];
    assert.equal(others.filter((i) => i.fingerprint !== fingerprint).length, 0, 'no other shape opened an incident');

    await withClient((c) => c.query(`create unique index ${INDEX} on ${TABLE} (email)`));
    await waitFor(
      async () => {
        const { body } = await pgw.api(`/api/incidents/${incident.id}`);
        return body.status === 'resolved';
      },
      { timeoutMs: 60_000, intervalMs: 500, what: 'the incident to resolve after the index is restored' },
    );
    const { body: events } = await pgw.api(`/api/events?fingerprint=${fingerprint}`);
    const types = (events as { type: string }[]).map((e) => e.type);
    assert.ok(types.includes('plan_change') && types.includes('incident_opened') && types.includes('incident_resolved'), types.join(','));
    assert.ok(workload.calls.every((n) => n > 0), `every stream ran: ${workload.calls.join(',')}; errors ${workload.lastError.join(' | ')}`);
  });
});
