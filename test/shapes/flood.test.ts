// A flood of distinct statement texts (an ORM gone wrong, a client inlining ids
// into identifiers) must not exhaust pgwarden: the shape cap folds the excess into
// the overflow shape without losing a call, memory stays bounded, and /metrics
// keeps a bounded number of per-shape series throughout. The client runs in a
// child process (flood-client.ts), so the memory measured here is pgwarden's.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import v8 from 'node:v8';
import vm from 'node:vm';
import { after, before, describe, test } from 'node:test';
import { fingerprintSync, normalizeSync } from 'libpg-query';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { waitFor } from '../harness/database.ts';
import { parsePrometheusText } from './prometheus.ts';

const STATEMENTS = 100_000;
const MAX_SHAPES = 500;
const TOP_SHAPES = 20;
const CONNECTIONS = 4;
const IN_FLIGHT = 2_000; // statements queued at once in the client, pipelined over its connections
const RSS_BOUND_MB = 150;
const LIVE_BOUND_MB = 64;
/** Distinct texts parsed before measuring (see before()). */
const PARSER_WARMUP = 60_000;

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

v8.setFlagsFromString('--expose-gc');
const gc = vm.runInNewContext('gc') as () => void;

/** RSS after a full collection, in MB. */
function settledRssMb(): number {
  gc();
  return process.memoryUsage().rss / 2 ** 20;
}

/** What is still reachable after a full collection: V8 heap plus ArrayBuffer backing stores, in MB. */
function liveMb(): number {
  gc();
  const { heapUsed, arrayBuffers } = process.memoryUsage();
  return (heapUsed + arrayBuffers) / 2 ** 20;
}

interface FloodResult {
  seconds: number;
  rssStartMb: number;
  rssBeforeMb: number;
  rssPeakMb: number;
  rssAfterMb: number;
  liveBeforeMb: number;
  /** Number of pgwarden_shape_calls_total series in each scrape taken while the flood ran. */
  seriesDuring: number[];
}

describe('a flood of distinct statements', { timeout: 240_000 }, () => {
  let pgw: TestApp;
  let flood: FloodResult;

  async function shapeCallSeries(): Promise<number> {
    const { status, body } = await pgw.api('/metrics');
    assert.equal(status, 200);
    const family = parsePrometheusText(body as string).get('pgwarden_shape_calls_total');
    assert.ok(family, 'pgwarden_shape_calls_total is exported');
    return family.samples.length;
  }

  async function totalCalls(): Promise<number> {
    const { status, body } = await pgw.api('/api/shapes?limit=10000');
    assert.equal(status, 200);
    return (body as { calls: number }[]).reduce((n, s) => n + s.calls, 0);
  }

  before(async () => {
    pgw = await startTestApp({ max_shapes: MAX_SHAPES, metrics_top_shapes: TOP_SHAPES, slow_query_ms: 60_000 });
    // libpg_query's WebAssembly heap (one per process, shared with the proxy) is
    // touched page by page as varied texts are parsed, up to its fixed size, and
    // never handed back. Any long-running proxy has paid that; the flood's own
    // growth is measured after it.
    const rssStartMb = settledRssMb();
    for (let i = 0; i < PARSER_WARMUP; i++) {
      const text = `select w${i} from (select ${i} as w${i}) s`;
      fingerprintSync(text);
      normalizeSync(text);
    }
    const rssBeforeMb = settledRssMb();
    const liveBeforeMb = liveMb();
    let rssPeakMb = rssBeforeMb;
    const sampler = setInterval(() => (rssPeakMb = Math.max(rssPeakMb, process.memoryUsage().rss / 2 ** 20)), 50);
    const seriesDuring: number[] = [];
    const scrapes: Promise<void>[] = [];

    const child = spawn(
      process.execPath,
      [
        '--import',
        'tsx',
        'test/shapes/flood-client.ts',
        pgw.url(),
        String(STATEMENTS),
        String(CONNECTIONS),
        String(IN_FLIGHT),
      ],
      {
        cwd: root,
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let stderr = '';
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
    let seconds = NaN;
    let batches = 0;
    try {
      for await (const line of readline.createInterface({ input: child.stdout })) {
        const progress = JSON.parse(line) as { sent?: number; done?: number; seconds?: number };
        if (progress.done !== undefined) seconds = progress.seconds!;
        if (progress.sent === undefined) continue;
        // Scrape while the client keeps sending.
        if (++batches % 5 === 3) scrapes.push(shapeCallSeries().then((n) => void seriesDuring.push(n)));
      }
      const code = await exited;
      assert.equal(code, 0, `flood client exited with ${code}: ${stderr}`);
      await Promise.all(scrapes);
    } finally {
      clearInterval(sampler);
      if (child.exitCode === null) child.kill();
    }

    // The client is done once each ReadyForQuery reached it; the completions were recorded before.
    await waitFor(async () => (await totalCalls()) >= STATEMENTS, {
      what: 'all statements counted',
      timeoutMs: 30_000,
    });
    flood = { seconds, rssStartMb, rssBeforeMb, rssPeakMb, rssAfterMb: settledRssMb(), liveBeforeMb, seriesDuring };
  });

  after(async () => {
    await pgw?.stop();
  });

  test('100,000 distinct statements go through in under a minute', (t) => {
    t.diagnostic(
      `${STATEMENTS} statements in ${flood.seconds.toFixed(1)} s (${Math.round(STATEMENTS / flood.seconds)}/s)`,
    );
    assert.ok(flood.seconds < 60, `${flood.seconds.toFixed(1)} s`);
  });

  test('the registry holds at most max_shapes shapes plus the overflow shape', async () => {
    const { body } = await pgw.api('/api/shapes?limit=10000');
    const shapes = body as { fingerprint: string; calls: number }[];
    assert.ok(shapes.length <= MAX_SHAPES + 1, `${shapes.length} shapes listed`);
    assert.equal(shapes.filter((s) => s.fingerprint === 'overflow').length, 1, 'the overflow shape is listed');
    assert.ok(pgw.app.collector!.registry.size <= MAX_SHAPES, `${pgw.app.collector!.registry.size} shapes tracked`);
  });

  test('the calls over all shapes add up to the statements sent', async () => {
    assert.equal(await totalCalls(), STATEMENTS);
  });

  test(`process RSS grows by less than ${RSS_BOUND_MB} MB`, (t) => {
    const growth = flood.rssAfterMb - flood.rssBeforeMb;
    t.diagnostic(
      `RSS at start ${flood.rssStartMb.toFixed(1)} MB, after parser warm-up ${flood.rssBeforeMb.toFixed(1)} MB, ` +
        `peak ${flood.rssPeakMb.toFixed(1)} MB, after the flood ${flood.rssAfterMb.toFixed(1)} MB (+${growth.toFixed(1)} MB)`,
    );
    assert.ok(growth < RSS_BOUND_MB, `RSS grew by ${growth.toFixed(1)} MB`);
  });

  test(`live memory (heap and ArrayBuffers) grows by less than ${LIVE_BOUND_MB} MB`, async (t) => {
    // Backing stores of dead ArrayBuffers are freed by a background sweeper, so poll.
    let live = liveMb();
    try {
      await waitFor(() => (live = liveMb()) - flood.liveBeforeMb < LIVE_BOUND_MB, {
        what: 'dead ArrayBuffers freed',
        timeoutMs: 15_000,
        intervalMs: 200,
      });
    } finally {
      t.diagnostic(
        `live memory before ${flood.liveBeforeMb.toFixed(1)} MB, after ${live.toFixed(1)} MB (+${(live - flood.liveBeforeMb).toFixed(1)} MB)`,
      );
    }
  });

  test('/metrics has at most metrics_top_shapes + 1 shape call series during and after the flood', async (t) => {
    const afterwards = await shapeCallSeries();
    t.diagnostic(`series during: ${flood.seriesDuring.join(', ')}; after: ${afterwards}`);
    assert.ok(flood.seriesDuring.length >= 5, `${flood.seriesDuring.length} scrapes during the flood`);
    for (const n of [...flood.seriesDuring, afterwards]) assert.ok(n <= TOP_SHAPES + 1, `${n} series`);
    assert.equal(afterwards, TOP_SHAPES + 1, 'the top shapes and "other"');
  });
});
