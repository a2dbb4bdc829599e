// ShapeCollector's deferred path (src/shapes/collector.ts): what the proxy calls.
// Completions are copied out of the proxy's reused object and recorded in a batch
// after the event loop's I/O, in order, exactly as if observed one by one.

import assert from 'node:assert/strict';
import { setImmediate as nextTurn } from 'node:timers/promises';
import { describe, test } from 'node:test';
import pino from 'pino';
import { ManualClock } from '../../src/clock.ts';
import type { QueryCompletion, SessionInfo } from '../../src/proxy/seam.ts';
import type { ShapeStats } from '../../src/shapes/registry.ts';
import { ShapeCollector } from '../../src/shapes/collector.ts';
import { ShapeFinder } from '../../src/shapes/fingerprint.ts';
import { ShapeRegistry } from '../../src/shapes/registry.ts';

const SESSION: SessionInfo = {
  id: 1,
  user: 'app',
  database: 'shop',
  applicationName: 'web',
  clientAddress: '127.0.0.1',
  replication: false,
  settings: new Map(),
};

async function setup() {
  const clock = new ManualClock();
  const finder = await ShapeFinder.create({ cacheEntries: 100, maxTextBytes: 10_000 });
  const make = () =>
    new ShapeCollector(
      finder,
      new ShapeRegistry({ maxShapes: 100, clock, series: { bucketMs: 10_000, buckets: 360, sketchBuckets: 6 } }),
      { slowQueryMs: 1e9, logQueryValues: false, log: pino({ level: 'silent' }) },
    );
  return { deferred: make(), direct: make() };
}

/** What a registry holds, comparable across two collectors. */
function contents(all: ShapeStats[]) {
  return all
    .map((s) => ({
      fp: s.fingerprint,
      calls: s.calls,
      errors: s.errors,
      rows: s.rows,
      totalMs: s.totalMs,
      p50: s.quantile(0.5),
      users: [...s.users],
    }))
    .sort((a, b) => a.fp.localeCompare(b.fp));
}

describe('ShapeCollector.deferred', { timeout: 20_000 }, () => {
  test('records copies of reused completion objects after this turn, the same as observing each at once', async () => {
    const { deferred, direct } = await setup();
    const seen: string[] = [];
    deferred.onShape((_stats, shape, c) => seen.push(`${shape.command}:${c.rows}`));
    // One object reused for every completion, as the proxy does.
    const c = {
      session: SESSION,
      text: '',
      statement: null,
      statementIndex: 0,
      bind: null,
      execution: 0,
      startedAt: 0,
      durationMs: 0,
      rows: 0,
      sqlstate: null,
      upstream: 'primary',
      refused: false,
    } as { -readonly [K in keyof QueryCompletion]: QueryCompletion[K] };
    for (let i = 0; i < 10_000; i++) {
      // More than one queue's worth, so a full queue is processed on the spot too.
      c.text = i % 3 === 0 ? `select * from orders where id = ${i}` : `update items set n = ${i} where id = ${i % 7}`;
      c.durationMs = 0.5 + (i % 40);
      c.rows = i % 5;
      c.sqlstate = i % 97 === 0 ? '57014' : null;
      direct.observe(c);
      deferred.deferred(c);
    }
    assert.ok(deferred.queries < 10_000, 'not all recorded synchronously');
    await nextTurn();
    assert.equal(deferred.queries, 10_000);
    assert.deepEqual(contents(deferred.registry.all()), contents(direct.registry.all()));
    assert.equal(seen.length, 10_000);
    assert.deepEqual(
      seen.slice(0, 3),
      ['SELECT:0', 'UPDATE:1', 'UPDATE:2'],
      'listeners see each completion in order, with its own fields',
    );
    assert.deepEqual(Object.fromEntries(deferred.errorsByClass), Object.fromEntries(direct.errorsByClass));
  });

  test('a listener that throws loses neither the rest of the batch nor later batches', async () => {
    const { deferred } = await setup();
    let calls = 0;
    deferred.onShape(() => {
      calls++;
      if (calls === 2) throw new Error('listener bug');
    });
    const c: QueryCompletion = {
      session: SESSION,
      text: 'select 1',
      statement: null,
      statementIndex: 0,
      bind: null,
      execution: 0,
      startedAt: 0,
      durationMs: 1,
      rows: 1,
      sqlstate: null,
      upstream: 'primary',
      refused: false,
    };
    for (let i = 0; i < 3; i++) deferred.deferred(c);
    await nextTurn();
    deferred.deferred(c);
    await nextTurn();
    assert.equal(calls, 4);
    assert.equal(deferred.queries, 4);
  });
});
