// The incident replay with the mitigation policy on enforce: the regressed hot
// shape is shed automatically (its executions limited, the excess refused with
// 53400), the other shapes keep their latency, and the rule is lifted once the
// index is back and the shape recovers.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { createUsersTable, dropUsersTable, fastDetection } from '../harness/incident.ts';
import { p95Between, startWorkload, type RunningWorkload } from '../harness/workload.ts';

const TABLE = 'pgw_mitigate_users';
const INDEX = 'pgw_mitigate_users_email_idx';
const ROWS = 300_000;

interface Rule {
  id: string;
  action: string;
  fingerprint: string;
  created_by: string;
  max_concurrent: number;
}

describe('mitigation policy: enforce', { timeout: 240_000 }, () => {
  let pgw: TestApp;
  let workload: RunningWorkload;

  before(async () => {
    await createUsersTable(TABLE, INDEX, ROWS);
    pgw = await startTestApp({
      ...fastDetection(),
      mitigation: 'enforce',
      mitigation_max_concurrent: 1,
      mitigation_queue_timeout_ms: 20,
      // The hot shape is most of this workload's calls: let the policy cover it.
      mitigation_max_traffic_share: 1,
    });
    let n = 0;
    const email = () => `user${1 + ((n++ * 7919) % ROWS)}@example.com`;
    const hot = { next: () => ({ text: `select id, name from ${TABLE} where email = $1`, values: [email()] }) };
    workload = await startWorkload(pgw.url(), [
      hot,
      hot,
      hot,
      {
        next: (i: number) => ({ text: `select email from ${TABLE} where id = $1`, values: [1 + ((i * 31) % ROWS)] }),
        pauseMs: 2,
      },
    ]);
  });

  after(async () => {
    await workload?.stop();
    await pgw?.stop();
    await dropUsersTable(TABLE);
  });

  test('the regressed shape is shed automatically, others keep their latency, and the rule lifts on recovery', async () => {
    const fingerprint = await waitFor(
      async () => {
        const { body } = await pgw.api('/api/shapes?sort=calls&limit=50');
        const hot = (body as { fingerprint: string; query: string }[]).find((s) =>
          s.query.includes(`from ${TABLE} where email`),
        );
        if (!hot) return undefined;
        const { body: detail } = await pgw.api(`/api/shapes/${hot.fingerprint}`);
        return detail.plans?.current && detail.series.length >= 8 ? hot.fingerprint : undefined;
      },
      { timeoutMs: 60_000, intervalMs: 500, what: 'a baseline for the hot shape' },
    );
    const migratedAt = Date.now();
    await withClient((c) => c.query(`drop index ${INDEX}`));

    const rule = await waitFor(
      async () => {
        const { body } = await pgw.api('/api/rules');
        return (body as Rule[]).find((r) => r.fingerprint === fingerprint && r.created_by === 'policy');
      },
      { timeoutMs: 40_000, intervalMs: 250, what: 'the policy to shed the hot shape' },
    );
    const shedAt = Date.now();
    console.log(`# migration -> automatic shed rule: ${((shedAt - migratedAt) / 1000).toFixed(1)} s`);
    assert.equal(rule.action, 'shed');
    assert.equal(rule.max_concurrent, 1);
    const { body: incidents } = await pgw.api('/api/incidents?status=active');
    const incident = (incidents as { fingerprint: string; mitigation?: { rule_id: string } }[]).find(
      (i) => i.fingerprint === fingerprint,
    );
    assert.equal(incident?.mitigation?.rule_id, rule.id, 'the incident says what was done');

    // Let the shed take hold, then compare the other shape with its own baseline.
    await waitFor(() => Date.now() >= shedAt + 10_000 || undefined, {
      timeoutMs: 15_000,
      intervalMs: 200,
      what: '10 s of shedding',
    });
    const baseline = p95Between(workload.latencies[3], migratedAt - 15_000, migratedAt);
    const during = p95Between(workload.latencies[3], shedAt + 3_000, shedAt + 10_000);
    console.log(
      `# other shape p95: ${baseline.toFixed(2)} ms before, ${during.toFixed(2)} ms while the hot shape is shed`,
    );
    assert.ok(
      during <= Math.max(baseline * 2, baseline + 2),
      `other shape p95 ${during.toFixed(2)} ms vs baseline ${baseline.toFixed(2)} ms`,
    );
    assert.ok(workload.errors.slice(0, 3).reduce((a, b) => a + b, 0) > 0, 'the hot shape was refused some executions');
    assert.match(workload.lastError.slice(0, 3).find((e) => e) ?? '', /pgwarden: query shed by rule/);

    await withClient((c) => c.query(`create unique index ${INDEX} on ${TABLE} (email)`));
    await waitFor(
      async () => {
        const { body } = await pgw.api('/api/rules');
        return !(body as Rule[]).some((r) => r.id === rule.id);
      },
      { timeoutMs: 60_000, intervalMs: 500, what: 'the policy to lift its rule after recovery' },
    );
    const { body: events } = await pgw.api(`/api/events?type=mitigation`);
    assert.ok((events as { summary: string }[]).some((e) => e.summary.includes(`lifted rule ${rule.id}`)));
  });
});
