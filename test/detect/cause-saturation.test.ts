// Saturation by sessions that bypass the proxy: a CPU-heavy report job connects to
// the database directly, with more sessions than the host has cores, and the proxied
// shapes slow down with their plans unchanged. The incident must say the database is
// saturated, name the consumers outside the proxy (user, application, shape) and
// mitigate nothing. The same proxied load with no job (the control) opens nothing.

import assert from 'node:assert/strict';
import os from 'node:os';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { testDatabase, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { causeDetection, expectNoIncidentFor, waitForIncident, warmShape } from '../harness/causes.ts';
import { startWorkload, type RunningWorkload } from '../harness/workload.ts';

// A share of the CPU is what the hogs take from the proxied sessions: on a host that
// is already busy (other work keeps `load` processes runnable) they need to outnumber
// that work to slow the proxied shapes past the detector's 3x, so their number
// follows the load average (bounded).
const HOGS = Math.min(64, Math.max(16, Math.ceil(2.5 * os.loadavg()[0])));

describe('saturation from outside the proxy', { timeout: 90_000 }, () => {
  let pgw: TestApp;
  let workload: RunningWorkload;
  const hogs: pg.Client[] = [];
  let hogging = true;
  const loops: Promise<void>[] = [];

  before(async () => {
    pgw = await startTestApp(causeDetection());
    workload = await startWorkload(pgw.url(), [
      {
        next: () => ({ text: 'select count(*) from generate_series(1, $1::int) as cpu_bound', values: [100_000] }),
        pauseMs: 5,
      },
      {
        next: () => ({ text: 'select count(*) from generate_series(1, $1::int) as cpu_bound', values: [100_000] }),
        pauseMs: 5,
      },
      { next: () => ({ text: 'select sum(g) from generate_series(1, $1::int) as g', values: [50_000] }), pauseMs: 10 },
    ]);
  });

  after(async () => {
    hogging = false;
    // From a connection of its own: the hogs' connections are busy with their queries.
    await withClient((c) =>
      c.query('select pg_cancel_backend(pid) from pg_stat_activity where application_name = $1', ['nightly-report']),
    );
    await Promise.all(loops);
    await Promise.all(hogs.map((c) => c.end().catch(() => undefined)));
    await workload?.stop();
    await pgw?.stop();
  });

  test('the incident names the load outside the proxy and mitigates nothing', async () => {
    await warmShape(pgw, 'as cpu_bound');
    await expectNoIncidentFor(pgw, 12_000);

    const startedAt = Date.now();
    for (let i = 0; i < HOGS; i++) {
      const client = new pg.Client({ connectionString: testDatabase().url, application_name: 'nightly-report' });
      client.on('error', () => undefined);
      await client.connect();
      hogs.push(client);
      loops.push(
        (async () => {
          while (hogging)
            await client
              .query('select count(*) from generate_series(1, 2000) a, generate_series(1, 10000) b')
              .catch(() => undefined);
        })(),
      );
    }
    const incident = await waitForIncident(
      pgw,
      null,
      (i) => i.attributed && i.causes.some((c) => c.type === 'saturation' && c.conclusive === true),
      45_000,
      'an incident attributed to saturation',
    ).catch(async (err) => {
      console.log(
        `# incidents: ${JSON.stringify((await pgw.api('/api/incidents')).body.map((i: { summary: string }) => i.summary))}`,
      );
      for (const s of (await pgw.api('/api/shapes?sort=calls&limit=5')).body) {
        const { body } = await pgw.api(`/api/shapes/${s.fingerprint}?since_s=120`);
        console.log(
          `# ${s.query}: ${body.series.map((p: { p50_ms: number; p95_ms: number; timed: number }) => `${p.timed}:${Math.round(p.p50_ms)}/${Math.round(p.p95_ms)}`).join(' ')}`,
        );
      }
      throw err;
    });
    console.log(
      `# ${HOGS} CPU hogs outside the proxy -> attributed incident: ${((Date.now() - startedAt) / 1000).toFixed(1)} s`,
    );
    console.log(`# ${incident.summary}`);
    const cause = incident.causes.find((c) => c.type === 'saturation')!;
    assert.match(
      cause.summary,
      /the database is saturated: [\d.]+ active sessions on average since the onset vs [\d.]+ before \(CPU \d+%/,
    );
    assert.match(
      cause.summary,
      /the top consumer bypasses the proxy \([\d.]+ sessions of user \w+, application nightly-report, running `select count\(\*\) from generate_series\(\$1, \$2\) a, generate_series\(\$3, \$4\) b`\); the load is outside the proxy, so nothing is mitigated/,
    );
    assert.equal(cause.mitigable, false);
    assert.ok(cause.evidence!.sessions_outside_proxy >= 2, JSON.stringify(cause.evidence));
    assert.match(
      incident.mitigation?.note ?? '',
      /no mitigation: .*(nothing is mitigated|database-wide|not a shape through the proxy)/,
    );
    assert.ok(!incident.causes.some((c) => c.type === 'plan_change'), 'no plan changed');
  });
});
