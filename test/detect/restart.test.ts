// A restart is not blind: pgwarden saves its baselines and its incident history
// (here in the state file), and a new process on the same file judges shapes
// against the saved baselines before it has any history of its own, and still
// lists the incidents of before.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { waitFor } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { startWorkload, type RunningWorkload } from '../harness/workload.ts';
import type { Incident } from '../../src/detect/record.ts';

describe('a restart', { timeout: 120_000 }, () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-restart-'));
  const stateFile = path.join(dir, 'state.json');
  let pgw: TestApp | null = null;
  let workload: RunningWorkload | null = null;
  let sleepMs = 0.5;

  after(async () => {
    await workload?.stop();
    await pgw?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function shape(): Promise<{ fingerprint: string; detector?: { baseline_from: string | null } } | undefined> {
    const { body } = await pgw!.api('/api/shapes?sort=calls&limit=20');
    const found = (body as { fingerprint: string; query: string }[]).find((s) => s.query.includes('pg_sleep'));
    return found ? (await pgw!.api(`/api/shapes/${found.fingerprint}`)).body : undefined;
  }

  test('keeps baselines and the incident history', async () => {
    pgw = await startTestApp({ state_file: stateFile, slow_query_ms: 60_000 });
    const stream = { next: () => ({ text: 'select pg_sleep($1::float8 / 1000)', values: [sleepMs] }), pauseMs: 1 };
    workload = await startWorkload(pgw.url(), [stream, stream]);
    await waitFor(async () => (await shape())?.detector?.baseline_from ?? undefined, {
      timeoutMs: 30_000,
      intervalMs: 250,
      what: 'a baseline from the first run',
    });
    // A regression of its own (no plan, no other shape): a per-shape incident after the usual run.
    sleepMs = 40;
    const incident = await waitFor(async () => ((await pgw!.api('/api/incidents')).body as Incident[])[0], {
      timeoutMs: 30_000,
      intervalMs: 250,
      what: 'an incident in the first run',
    });
    sleepMs = 0.5;
    await waitFor(
      async () => ((await pgw!.api(`/api/incidents/${incident.id}`)).body as Incident).status === 'resolved',
      {
        timeoutMs: 30_000,
        intervalMs: 250,
        what: 'the incident to resolve',
      },
    );
    await workload.stop();
    await pgw.stop();
    const saved = JSON.parse(fs.readFileSync(stateFile, 'utf8'));
    assert.ok(saved.detector.baselines.length >= 1, 'baselines saved at stop');
    assert.deepEqual(saved.rules, [], 'the rules part is untouched');

    pgw = await startTestApp({ state_file: stateFile, slow_query_ms: 60_000 });
    workload = await startWorkload(pgw.url(), [stream, stream]);
    const restored = await waitFor(async () => (await shape())?.detector?.baseline_from ?? undefined, {
      timeoutMs: 10_000,
      intervalMs: 100,
      what: 'a baseline after the restart',
    });
    assert.equal(restored, 'restored', 'the first baseline after a restart is the saved one');
    const { body: history } = await pgw.api('/api/incidents?status=resolved');
    const kept = (history as Incident[]).find((i) => i.id === incident.id);
    assert.ok(kept, 'the resolved incident is still listed');
    assert.ok(kept.peak.p95_ms >= 30, `its peak is kept: ${kept.peak.p95_ms} ms`);
  });
});
