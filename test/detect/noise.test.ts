// Noisy but healthy load through pgwarden, with its DEFAULT detector settings
// (random latency jitter, bursts of concurrency, rare slow outliers), and then a
// noisy neighbour: processes spinning on every core of the host. Neither may open
// a per-shape incident; host contention is at most one database-wide incident.
// The length can be changed with PGWARDEN_NOISE_SECONDS (default 45: 15 s of
// warm-up, then half jitter alone, half jitter beside the CPU hog).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { testDatabase } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { startCpuHog, type CpuHog } from '../harness/hog.ts';
import { startWorkload, type RunningWorkload, type Stream } from '../harness/workload.ts';
import type { Incident } from '../../src/detect/record.ts';

const SECONDS = Number(process.env.PGWARDEN_NOISE_SECONDS ?? 45);
const WARM_UP_S = 15;

/** Latency from jitter: usually a few ms, sometimes 10x. */
function jitteredSleep(baseMs: number): Stream['next'] {
  return () => {
    const outlier = Math.random() < 0.02 ? 10 : 1;
    const ms = baseMs * Math.exp((Math.random() - 0.5) * 1.5) * outlier;
    return { text: 'select pg_sleep($1::float8 / 1000), $2::text as kind', values: [ms.toFixed(3), `base-${baseMs}`] };
  };
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, Math.max(ms, 0)));

describe('noisy but healthy load, then a noisy neighbour', { timeout: (SECONDS + 60) * 1000 }, () => {
  let pgw: TestApp;
  let hog: CpuHog | null = null;
  const workloads: RunningWorkload[] = [];

  before(async () => {
    pgw = await startTestApp({ monitor_url: testDatabase().url, slow_query_ms: 60_000 });
  });

  after(async () => {
    await hog?.stop();
    await Promise.all(workloads.map((w) => w.stop()));
    await pgw.stop();
  });

  test(`${SECONDS} s of jitter and bursts, then a CPU hog on every core, open no per-shape incident`, async () => {
    const steady: Stream[] = [
      { next: jitteredSleep(1) },
      { next: jitteredSleep(3), pauseMs: 5 },
      { next: jitteredSleep(8), pauseMs: 10 },
      {
        next: (i) => ({ text: 'select count(*) from generate_series(1, $1::int)', values: [1000 + (i % 5000)] }),
        pauseMs: 2,
      },
    ];
    const started = Date.now();
    workloads.push(await startWorkload(pgw.url(), steady));
    const end = started + SECONDS * 1000;
    const hogAt = started + (WARM_UP_S + (SECONDS - WARM_UP_S) / 2) * 1000;
    let bursts = 0;
    while (Date.now() < end - 4000) {
      // Every ~6-10 s, a burst: four extra connections hammer the same shapes for 3 s.
      await sleep(Math.min(6000 + Math.random() * 4000, end - 4000 - Date.now()));
      if (hog === null && Date.now() >= hogAt) hog = startCpuHog();
      if (Date.now() >= end - 4000) break;
      const burst = await startWorkload(pgw.url(), [steady[0], steady[1], steady[0], steady[3]]);
      await sleep(3000);
      await burst.stop();
      bursts++;
    }
    hog ??= startCpuHog();
    await sleep(end - Date.now());
    const hogSeconds = (Date.now() - hogAt) / 1000;
    await hog.stop();
    const { body } = await pgw.api('/api/incidents');
    const incidents = body as Incident[];
    const { body: shapes } = await pgw.api('/api/shapes?sort=calls&limit=10');
    const calls = (shapes as { calls: number }[]).reduce((sum, s) => sum + s.calls, 0);
    console.log(
      `# ${SECONDS} s, ${bursts} bursts, CPU hog for ${hogSeconds.toFixed(0)} s, ${calls} calls, incidents: ${incidents.map((i) => `${i.kind}: ${i.summary}`).join(' | ') || 'none'}`,
    );
    assert.ok(bursts >= 2, 'bursts happened');
    assert.deepEqual(
      incidents.filter((i) => i.kind === 'shape').map((i) => i.summary),
      [],
      'no per-shape incident',
    );
    assert.ok(incidents.length <= 1, 'host contention is at most one database-wide incident');
    for (const i of incidents)
      assert.ok(
        i.evidence && i.evidence.slowed >= 2,
        `a database-wide incident carries its evidence: ${JSON.stringify(i.evidence)}`,
      );
  });
});
