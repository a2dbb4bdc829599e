// ShapeRegistry (src/shapes/registry.ts) driven by a ManualClock: per-shape
// counters, who ran a shape, and the cap that folds the least recently seen shape
// into the overflow shape without losing a single call.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ManualClock } from '../../src/clock.ts';
import type { QueryCompletion, SessionInfo } from '../../src/proxy/seam.ts';
import type { StatementShape } from '../../src/shapes/fingerprint.ts';
import { OVERFLOW_FINGERPRINT, ShapeRegistry } from '../../src/shapes/registry.ts';

function shape(n: number): StatementShape {
  return {
    fingerprint: n.toString(16).padStart(16, '0'),
    query: `select $1 from t${n}`,
    fallback: false,
    command: 'SELECT',
  };
}

function session(overrides: Partial<SessionInfo> = {}): SessionInfo & { applicationName: string } {
  return {
    id: 1,
    user: 'app',
    database: 'shop',
    applicationName: 'web',
    clientAddress: '127.0.0.1',
    replication: false,
    settings: new Map(),
    ...overrides,
  };
}

function completion(overrides: Partial<QueryCompletion> = {}): QueryCompletion {
  return {
    session: session(),
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
    ...overrides,
  };
}

function setup(maxShapes = 100) {
  const clock = new ManualClock();
  const registry = new ShapeRegistry({
    maxShapes,
    clock,
    series: { bucketMs: 10_000, buckets: 360, sketchBuckets: 6 },
  });
  return { clock, registry };
}

const sum = (values: number[]) => values.reduce((a, b) => a + b, 0);

describe('ShapeRegistry', { timeout: 10_000 }, () => {
  test('a recorded statement shows up under its shape with its counters', () => {
    const { clock, registry } = setup();
    const start = clock.now();
    registry.record(shape(1), completion({ durationMs: 4, rows: 3 }));
    clock.advance(5_000);
    registry.record(shape(1), completion({ durationMs: 6, rows: 0, sqlstate: '22012' }));
    registry.record(shape(1), completion({ durationMs: 2, rows: 0, sqlstate: '23505' }));

    const stats = registry.get(shape(1).fingerprint);
    assert.ok(stats, 'the shape is tracked');
    assert.equal(stats.query, 'select $1 from t1');
    assert.equal(stats.calls, 3);
    assert.equal(stats.rows, 3);
    assert.equal(stats.errors, 2);
    assert.deepEqual(Object.fromEntries(stats.errorsByClass), { '22': 1, '23': 1 });
    assert.equal(stats.totalMs, 12);
    assert.equal(stats.meanMs, 4);
    assert.equal(stats.firstSeen, start);
    assert.equal(stats.lastSeen, start + 5_000);
  });

  test("a shape's quantiles come from all its calls", () => {
    const { registry } = setup();
    for (let ms = 1; ms <= 100; ms++) registry.record(shape(1), completion({ durationMs: ms }));
    const stats = registry.get(shape(1).fingerprint)!;
    assert.ok(Math.abs(stats.quantile(0.5) - 50) <= 1, `p50 ${stats.quantile(0.5)}`);
    assert.ok(Math.abs(stats.quantile(0.99) - 99) <= 2, `p99 ${stats.quantile(0.99)}`);
  });

  test('users, databases and application names are collected, including a changed application_name', () => {
    const { registry } = setup();
    const s = session({ applicationName: 'web' });
    registry.record(shape(1), completion({ session: s }));
    s.applicationName = 'worker'; // SET application_name in the same session
    registry.record(shape(1), completion({ session: s }));
    registry.record(
      shape(1),
      completion({ session: session({ id: 2, user: 'report', database: 'dw', applicationName: 'bi' }) }),
    );
    const stats = registry.get(shape(1).fingerprint)!;
    assert.deepEqual([...stats.users].sort(), ['app', 'report']);
    assert.deepEqual([...stats.databases].sort(), ['dw', 'shop']);
    assert.deepEqual([...stats.applications].sort(), ['bi', 'web', 'worker']);
  });

  test('the overflow shape is not listed while the cap has not been reached', () => {
    const { registry } = setup(3);
    for (let n = 1; n <= 3; n++) registry.record(shape(n), completion());
    assert.equal(registry.all().length, 3);
    assert.equal(registry.get(OVERFLOW_FINGERPRINT), undefined);
    assert.equal(registry.evicted, 0);
  });

  test('the cap folds the least recently seen shape into the overflow shape', () => {
    const { clock, registry } = setup(3);
    registry.record(shape(1), completion({ rows: 10, durationMs: 5 }));
    clock.advance(1);
    registry.record(shape(2), completion({ rows: 20, durationMs: 7, sqlstate: '22012' }));
    registry.record(shape(2), completion({ rows: 0, durationMs: 9 }));
    clock.advance(1);
    registry.record(shape(3), completion());
    clock.advance(1);
    registry.record(shape(1), completion()); // shape 2 is now the least recently seen
    clock.advance(1);
    registry.record(shape(4), completion());

    assert.equal(registry.get(shape(2).fingerprint), undefined, 'shape 2 was evicted');
    assert.ok(registry.get(shape(1).fingerprint), 'shape 1 stays');
    const overflow = registry.get(OVERFLOW_FINGERPRINT);
    assert.ok(overflow, 'the overflow shape is listed once it holds something');
    assert.equal(overflow.calls, 2);
    assert.equal(overflow.rows, 20);
    assert.equal(overflow.errors, 1);
    assert.deepEqual(Object.fromEntries(overflow.errorsByClass), { '22': 1 });
    assert.equal(overflow.totalMs, 16);
    assert.equal(overflow.sketch.count, 2);
    assert.equal(registry.evicted, 1);
    assert.deepEqual(
      registry
        .all()
        .map((s) => s.fingerprint)
        .sort(),
      [shape(1).fingerprint, shape(3).fingerprint, shape(4).fingerprint, OVERFLOW_FINGERPRINT].sort(),
    );
  });

  test('looking a shape up does not count as seeing it', () => {
    const { registry } = setup(2);
    registry.record(shape(1), completion());
    registry.record(shape(2), completion());
    registry.get(shape(1).fingerprint); // the API reading it
    registry.record(shape(3), completion());
    assert.equal(registry.get(shape(1).fingerprint), undefined);
    assert.ok(registry.get(shape(2).fingerprint));
  });

  test('calls, rows and errors are conserved however many shapes are folded', () => {
    const { clock, registry } = setup(50);
    let calls = 0;
    let rows = 0;
    let errors = 0;
    for (let i = 0; i < 10_000; i++) {
      const n = (i * 7919) % 3_000; // revisits shapes, some after they were evicted
      const failed = i % 13 === 0;
      registry.record(shape(n), completion({ rows: i % 5, sqlstate: failed ? '57014' : null }));
      calls++;
      rows += i % 5;
      if (failed) errors++;
      clock.advance(3);
    }
    const all = registry.all();
    assert.ok(all.length <= 51, `${all.length} shapes listed`);
    assert.equal(registry.size, 50);
    assert.equal(sum(all.map((s) => s.calls)), calls);
    assert.equal(sum(all.map((s) => s.rows)), rows);
    assert.equal(sum(all.map((s) => s.errors)), errors);
    assert.equal(registry.overflow.sketch.count, registry.overflow.calls);
  });

  test('a shape run once reports its one latency as every quantile, and its sketch holds it', () => {
    const { registry } = setup();
    const stats = registry.record(shape(7), completion({ durationMs: 8.25 }));
    assert.equal(stats.quantile(0.5), 8.25);
    assert.equal(stats.quantile(0.99), 8.25);
    assert.equal(stats.sketch.count, 1);
    registry.record(shape(7), completion({ durationMs: 100 }));
    assert.equal(stats.sketch.count, 2);
    assert.ok(Math.abs(stats.quantile(1) - 100) <= 2, `max ${stats.quantile(1)}`);
  });
});
