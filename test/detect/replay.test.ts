// The index-drop incident (the demo's and the README's), replayed on a real PostgreSQL with pgwarden's
// DEFAULT detector settings, 20 s after pgwarden started: a hot lookup by an
// indexed column under mixed load, then an out-of-band migration drops the index
// and creates one that does not match the query. Parallel workers are allowed, as
// on any default PostgreSQL, so the hot shape's seq scans starve the other shapes
// too. pgwarden must open exactly one incident, naming the hot shape as its root
// and the shapes it slowed as victims; restoring the index must resolve it, the
// record keeping its peak and showing the fix as its resolution.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { createUsersTable, dropUsersTable } from '../harness/incident.ts';
import { startWorkload, type RunningWorkload } from '../harness/workload.ts';
import type { Incident } from '../../src/detect/record.ts';
import { runIncidents } from '../../src/cli/incidents.ts';

const TABLE = 'pgw_replay_users';
const INDEX = 'pgw_replay_users_email_idx';
const WRONG_INDEX = 'pgw_replay_users_name_idx';
const ROWS = 300_000;

describe('the incident replay, 20 s after start, default settings', { timeout: 180_000 }, () => {
  let pgw: TestApp;
  let workload: RunningWorkload;
  let startedAt = 0;
  let incident: Incident;

  before(async () => {
    await createUsersTable(TABLE, INDEX, ROWS, { events: true, parallel: true });
    startedAt = Date.now();
    pgw = await startTestApp({ monitor_url: testDatabase().url, slow_query_ms: 60_000 });
    let n = 0;
    const email = () => `user${1 + ((n++ * 7919) % ROWS)}@example.com`;
    const hot = { next: () => ({ text: `select id, name from ${TABLE} where email = $1`, values: [email()] }) };
    workload = await startWorkload(pgw.url(), [
      hot,
      hot,
      hot,
      { next: (i) => ({ text: `select email from ${TABLE} where id = $1`, values: [1 + (i % ROWS)] }), pauseMs: 2 },
      { next: (i) => ({ text: `insert into ${TABLE}_events (user_id) values ($1)`, values: [i] }), pauseMs: 5 },
    ]);
  });

  after(async () => {
    await workload?.stop();
    await pgw?.stop();
    await dropUsersTable(TABLE);
  });

  async function hotFingerprint(): Promise<string | undefined> {
    const { body } = await pgw.api('/api/shapes?sort=calls&limit=50');
    return (body as { fingerprint: string; query: string }[]).find((s) => s.query.includes(`from ${TABLE} where email`))
      ?.fingerprint;
  }

  test('an index dropped 20 s after start is one attributed incident naming the root and listing its victims', async () => {
    const fingerprint = await waitFor(
      async () => {
        const fp = await hotFingerprint();
        if (!fp) return undefined;
        const { body } = await pgw.api(`/api/shapes/${fp}`);
        return body.plans?.current?.nodes?.some((n: string) => n.includes(INDEX)) ? fp : undefined;
      },
      { timeoutMs: 20_000, intervalMs: 250, what: 'the hot shape to have its index plan' },
    );
    await waitFor(() => Date.now() >= startedAt + 20_000, {
      timeoutMs: 25_000,
      intervalMs: 100,
      what: '20 s after start',
    });
    assert.deepEqual((await pgw.api('/api/incidents')).body, [], 'no incident before the migration');

    const migratedAt = Date.now();
    await withClient(async (c) => {
      await c.query(`drop index ${INDEX}`);
      await c.query(`create index ${WRONG_INDEX} on ${TABLE} (name)`);
    });
    incident = await waitFor(
      async () => {
        const { body } = await pgw.api('/api/incidents?status=active');
        return (body as Incident[]).find((i) => i.root === fingerprint && i.attributed);
      },
      { timeoutMs: 40_000, intervalMs: 100, what: 'an attributed incident rooted at the hot shape' },
    );
    const attributedS = (Date.now() - migratedAt) / 1000;
    console.log(
      `# 20 s after start, default settings: migration -> attributed incident ${attributedS.toFixed(1)} s (detected ${((Date.parse(incident.detected_at) - migratedAt) / 1000).toFixed(1)} s)`,
    );
    console.log(`# ${incident.summary}`);
    assert.equal(incident.kind, 'shape');
    assert.equal(incident.fingerprint, fingerprint, 'fingerprint stays the root for old consumers');
    assert.match(incident.summary, new RegExp(`plan changed .*-> .*Seq Scan on ${TABLE}`));
    assert.ok(
      incident.causes.some(
        (c) => c.kind !== 'plan_change' && c.objects.includes(INDEX) && /dropped|DROP/.test(c.summary),
      ),
      'the dropped index is a named cause',
    );
    assert.ok(incident.attributed_at && incident.attribution_s !== null);

    // The seq scans starve the other shapes: they join as victims, not incidents of their own.
    const withVictims = await waitFor(
      async () => {
        const { body } = await pgw.api(`/api/incidents/${incident.id}`);
        return (body as Incident).victims.length > 0 ? (body as Incident) : undefined;
      },
      { timeoutMs: 20_000, intervalMs: 250, what: 'victims listed on the incident' },
    );
    console.log(
      `# victims: ${withVictims.victims.map((v) => `${v.query.slice(0, 40)} p95 ${v.baseline_p95_ms} -> ${v.peak_p95_ms} ms`).join('; ')}`,
    );
    assert.ok(withVictims.victims.every((v) => v.fingerprint !== fingerprint));
    assert.ok(withVictims.impact.shapes >= 2 && withVictims.impact.share_of_calls > 0);
    assert.deepEqual(withVictims.impact.applications, ['pgwarden-test-workload']);
    const all = (await pgw.api('/api/incidents')).body as Incident[];
    assert.equal(all.length, 1, `exactly one incident: ${all.map((i) => i.summary).join(' | ')}`);
    const { body: metrics } = await pgw.api('/metrics');
    assert.match(metrics as string, /^pgwarden_incidents_active 1$/m, 'metrics count incidents, not shapes');
  });

  test('restoring the index resolves the incident, which keeps its peak and shows the fix as its resolution', async () => {
    assert.ok(incident, 'the previous test opened the incident');
    await withClient((c) => c.query(`create unique index ${INDEX} on ${TABLE} (email)`));
    const resolved = await waitFor(
      async () => {
        const { body } = await pgw.api(`/api/incidents/${incident.id}`);
        return (body as Incident).status === 'resolved' ? (body as Incident) : undefined;
      },
      { timeoutMs: 60_000, intervalMs: 500, what: 'the incident to resolve after the index is restored' },
    );
    console.log(`# resolution: ${resolved.resolution?.summary}`);
    assert.equal(resolved.resolution?.reason, 'recovered');
    assert.ok(
      resolved.peak.p95_ms >= resolved.baseline.p95_ms * 3,
      `peak ${resolved.peak.p95_ms} ms vs baseline ${resolved.baseline.p95_ms} ms`,
    );
    assert.ok(resolved.peak.p95_ms > resolved.current.p95_ms, 'the peak outlives the recovery');
    // The catalog watch may see the new index only after the latency recovered: changes
    // found within 30 s of the resolution join it (RESOLUTION_GRACE_MS), so poll for it.
    const withFix = await waitFor(
      async () => {
        const { body } = await pgw.api(`/api/incidents/${incident.id}`);
        const events = (body as Incident).resolution?.events ?? [];
        return events.some((e) => e.summary.includes(INDEX) && e.type !== 'plan_change')
          ? (body as Incident)
          : undefined;
      },
      { timeoutMs: 40_000, intervalMs: 500, what: 'the re-created index in the resolution' },
    ).catch(() => resolved);
    assert.ok(
      withFix.resolution!.events.some((e) => e.summary.includes(INDEX) && e.type !== 'plan_change'),
      `the re-created index is the resolution: ${JSON.stringify(withFix.resolution)}`,
    );
    const attributedAt = Date.parse(resolved.attributed_at!);
    assert.ok(
      resolved.causes.every((c) => Date.parse(c.at) <= attributedAt),
      'no cause newer than the attribution',
    );
    assert.ok(
      !resolved.causes.some((c) => c.kind !== 'plan_change' && /created/.test(c.summary) && c.objects.includes(INDEX)),
      'the fix is not a cause',
    );

    const { body: page } = await pgw.api('/api/incidents?status=resolved&limit=1&offset=0');
    assert.deepEqual(
      (page as Incident[]).map((i) => i.id),
      [incident.id],
    );
    assert.equal((await pgw.api('/api/incidents?status=bogus')).status, 400);
    assert.equal((await pgw.api('/api/incidents?limit=0')).status, 400);
    const { status, body: markdown } = await pgw.api(`/api/incidents/${incident.id}/postmortem`);
    assert.equal(status, 200);
    assert.match(markdown as string, new RegExp(`^# Incident ${incident.id}: shape ${incident.root} regressed`, 'm'));
    for (const section of [
      '## Impact',
      '## Timeline',
      '## Causes (as attributed)',
      '## Checked',
      '## Victims',
      '## Mitigation',
      '## Resolution',
    ]) {
      assert.ok((markdown as string).includes(section), `postmortem has ${section}`);
    }
    assert.match(markdown as string, /\| [\d:.]+ \| attributed \|/);
    assert.equal((await pgw.api('/api/incidents/nope/postmortem')).status, 404);

    // The same through the CLI, as the person on call runs it.
    const cli = async (...args: string[]) => {
      let out = '';
      let err = '';
      const code = await runIncidents(
        [...args, '--admin', `127.0.0.1:${pgw.app.adminPort}`, '--token', pgw.config.admin_token!],
        { write: (t: string) => (out += t) },
        { write: (t: string) => (err += t) },
      );
      return { code, out, err };
    };
    const list = await cli('list', '--status', 'resolved');
    assert.equal(list.code, 0, list.err);
    assert.match(
      list.out,
      new RegExp(`^${incident.id}  resolved .* root ${incident.root} \\+\\d+ victims? .* attributed$`, 'm'),
    );
    const postmortem = await cli('postmortem', incident.id);
    assert.equal(postmortem.code, 0, postmortem.err);
    assert.equal(postmortem.out, markdown);
    const missing = await cli('show', 'inc-nope');
    assert.equal(missing.code, 1);
    assert.match(missing.err, /no incident 'inc-nope' \(HTTP 404\)/);
    assert.equal((await cli('postmortem')).code, 2, 'the ID is required');
  });
});
