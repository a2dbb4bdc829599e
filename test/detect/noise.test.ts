// Two minutes of noisy but healthy load through pgwarden (random latency jitter,
// bursts of concurrency, rare slow outliers) must open no incident. The length can
// be shortened for local runs with PGWARDEN_NOISE_SECONDS; CI runs the full two minutes.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { testDatabase } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { startWorkload, type RunningWorkload, type Stream } from '../harness/workload.ts';

const SECONDS = Number(process.env.PGWARDEN_NOISE_SECONDS ?? 120);

/** Latency from jitter: usually a few ms, sometimes 10x. */
function jitteredSleep(baseMs: number): Stream['next'] {
  return () => {
    const outlier = Math.random() < 0.02 ? 10 : 1;
    const ms = baseMs * Math.exp((Math.random() - 0.5) * 1.5) * outlier;
    return { text: 'select pg_sleep($1::float8 / 1000), $2::text as kind', values: [ms.toFixed(3), `base-${baseMs}`] };
  };
}

describe('noisy but healthy load', { timeout: (SECONDS + 90) * 1000 }, () => {
  let pgw: TestApp;
  const workloads: RunningWorkload[] = [];

  before(async () => {
    pgw = await startTestApp({
      monitor_url: testDatabase().url,
      series_bucket_s: 2, // baselines after ~15 s, so nearly the whole run is judged
      detect_evaluate_ms: 1000,
      slow_query_ms: 60_000,
    });
  });

  after(async () => {
    await Promise.all(workloads.map((w) => w.stop()));
    await pgw.stop();
  });

  test(`${SECONDS} s of jitter and bursts open no incident`, async () => {
    const steady: Stream[] = [
      { next: jitteredSleep(1) },
      { next: jitteredSleep(3), pauseMs: 5 },
      { next: jitteredSleep(8), pauseMs: 10 },
      { next: (i) => ({ text: 'select count(*) from generate_series(1, $1::int)', values: [1000 + (i % 5000)] }), pauseMs: 2 },
    ];
    workloads.push(await startWorkload(pgw.url(), steady));
    const end = Date.now() + SECONDS * 1000;
    let bursts = 0;
    while (Date.now() < end) {
      // Every ~15 s, a burst: four extra connections hammer the same shapes for 3 s.
      await new Promise((resolve) => setTimeout(resolve, Math.min(12_000 + Math.random() * 6000, Math.max(end - Date.now(), 0))));
      if (Date.now() >= end - 3000) break;
      const burst = await startWorkload(pgw.url(), [steady[0], steady[1], steady[0], steady[3]]);
      await new Promise((resolve) => setTimeout(resolve, 3000));
      await burst.stop();
      bursts++;
    }
    const { body: incidents } = await pgw.api('/api/incidents');
    const { body: shapes } = await pgw.api('/api/shapes?sort=calls&limit=10');
    const calls = (shapes as { calls: number }[]).reduce((sum, s) => sum + s.calls, 0);
    console.log(`# ${SECONDS} s, ${bursts} bursts, ${calls} calls, incidents: ${(incidents as unknown[]).length}`);
    assert.ok(bursts >= Math.floor(SECONDS / 25), 'bursts happened');
    assert.deepEqual(incidents, []);
  });
});
