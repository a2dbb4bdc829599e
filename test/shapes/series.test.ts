// ShapeSeries (src/shapes/series.ts) driven by a ManualClock: fixed buckets in a
// ring, per-bucket latency quantiles, windows merged from the sketches still kept,
// and summaries that outlive the sketches they came from.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ManualClock } from '../../src/clock.ts';
import { ShapeSeries, SKETCH_ACCURACY, type SeriesOptions } from '../../src/shapes/series.ts';

const BUCKET_MS = 10_000;

function setup(options: Partial<SeriesOptions> = {}) {
  const clock = new ManualClock(); // 2026-01-01T00:00:00Z, a bucket boundary
  const series = new ShapeSeries({ bucketMs: BUCKET_MS, buckets: 6, sketchBuckets: 2, ...options });
  return { clock, series, start: clock.now() };
}

/** Within the sketch's relative accuracy (plus float32 rounding for closed buckets). */
function assertNear(actual: number, expected: number, what: string): void {
  const tolerance = expected * (SKETCH_ACCURACY * 2);
  assert.ok(Math.abs(actual - expected) <= tolerance, `${what}: ${actual} is not within ${tolerance} of ${expected}`);
}

describe('ShapeSeries', { timeout: 10_000 }, () => {
  test('calls within one bucket become one point with their totals', () => {
    const { clock, series, start } = setup();
    series.add(clock.now(), 10, false, 1);
    clock.advance(1_000);
    series.add(clock.now(), 20, true, 0);
    clock.advance(8_999);
    series.add(clock.now(), 30, false, 5);
    assert.deepEqual(
      series.points(clock.now()).map(({ t, calls, errors, rows, mean_ms }) => ({ t, calls, errors, rows, mean_ms })),
      [{ t: start, calls: 3, errors: 1, rows: 6, mean_ms: 20 }],
    );
  });

  test('each bucket gets its own point, oldest first, and empty buckets none', () => {
    const { clock, series, start } = setup();
    series.add(clock.now(), 1, false, 0);
    clock.advance(2 * BUCKET_MS);
    series.add(clock.now(), 1, false, 0);
    series.add(clock.now(), 1, false, 0);
    assert.deepEqual(
      series.points(clock.now()).map((p) => [p.t, p.calls]),
      [
        [start, 1],
        [start + 2 * BUCKET_MS, 2],
      ],
    );
  });

  test('points since a time leave out the buckets before it', () => {
    const { clock, series, start } = setup();
    for (let i = 0; i < 3; i++) {
      series.add(clock.now(), 1, false, 0);
      clock.advance(BUCKET_MS);
    }
    assert.deepEqual(
      series.points(clock.now(), start + BUCKET_MS).map((p) => p.t),
      [start + BUCKET_MS, start + 2 * BUCKET_MS],
    );
  });

  test('buckets older than the ring are no longer reported', () => {
    const { clock, series, start } = setup({ buckets: 6 });
    series.add(clock.now(), 1, false, 0);
    clock.advance(6 * BUCKET_MS);
    assert.deepEqual(series.points(clock.now()), [], 'the ring no longer covers the first bucket');
    series.add(clock.now(), 2, false, 0); // reuses the first bucket's slot
    assert.deepEqual(
      series.points(clock.now()).map((p) => [p.t, p.calls, p.mean_ms]),
      [[start + 6 * BUCKET_MS, 1, 2]],
    );
  });

  test("a point's latency quantiles come from its own bucket", () => {
    const { clock, series } = setup({ sketchBuckets: 6 });
    for (let i = 0; i < 100; i++) series.add(clock.now(), 10, false, 0);
    clock.advance(BUCKET_MS);
    for (let i = 0; i < 100; i++) series.add(clock.now(), 100, false, 0);
    const [first, second] = series.points(clock.now());
    assertNear(first.p50_ms, 10, 'first bucket p50');
    assertNear(first.p99_ms, 10, 'first bucket p99');
    assertNear(second.p50_ms, 100, 'second bucket p50');
  });

  test('window() merges the sketches of the buckets in range', () => {
    const { clock, series, start } = setup({ sketchBuckets: 6 });
    for (let i = 0; i < 100; i++) series.add(clock.now(), 10, false, 0);
    clock.advance(BUCKET_MS);
    for (let i = 0; i < 100; i++) series.add(clock.now(), 100, false, 0);
    clock.advance(BUCKET_MS);
    for (let i = 0; i < 100; i++) series.add(clock.now(), 1000, false, 0);

    const both = series.window(start, start + BUCKET_MS + 1);
    assert.ok(both !== null, 'the first two buckets keep their sketches');
    assert.equal(both.count, 200);
    assertNear(both.getValueAtQuantile(0.25), 10, 'merged p25');
    assertNear(both.getValueAtQuantile(0.75), 100, 'merged p75');
    assertNear(both.max, 100, 'merged max');

    const last = series.window(clock.now(), clock.now());
    assert.equal(last?.count, 100);
  });

  test('window() is null when no bucket in range keeps a sketch', () => {
    const { clock, series, start } = setup();
    series.add(clock.now(), 5, false, 0);
    assert.equal(series.window(start + BUCKET_MS, start + 3 * BUCKET_MS), null);
  });

  test('a bucket past the sketch horizon drops its sketch but keeps its quantiles', () => {
    const { clock, series, start } = setup({ sketchBuckets: 2 });
    for (let ms = 1; ms <= 100; ms++) series.add(clock.now(), ms, false, 0);
    clock.advance(3 * BUCKET_MS);
    series.add(clock.now(), 1, false, 0); // opening this bucket closes the first one

    assert.equal(series.window(start, start), null, 'the first bucket no longer has a sketch');
    const [first] = series.points(clock.now());
    assert.equal(first.t, start);
    assert.equal(first.calls, 100);
    assertNear(first.p50_ms, 50, 'kept p50');
    assertNear(first.p95_ms, 95, 'kept p95');
    assertNear(first.p99_ms, 99, 'kept p99');
  });

  test('the bucket being filled keeps collecting after older sketches are dropped', () => {
    const { clock, series } = setup({ sketchBuckets: 1 });
    series.add(clock.now(), 7, false, 0);
    clock.advance(BUCKET_MS);
    series.add(clock.now(), 70, false, 0); // closes the previous bucket, which was the one being filled
    series.add(clock.now(), 70, false, 0);
    const window = series.window(clock.now(), clock.now());
    assert.equal(window?.count, 2);
    assertNear(window!.getValueAtQuantile(0.5), 70, 'current bucket p50');
    const points = series.points(clock.now());
    assert.deepEqual(
      points.map((p) => p.calls),
      [1, 2],
    );
    assertNear(points[0].p50_ms, 7, 'closed bucket p50');
  });

  test('memory grows with the buckets that saw calls, up to the configured number, and old buckets are reused', () => {
    const { clock, series, start } = setup({ buckets: 8 });
    series.add(clock.now(), 1, false, 0);
    const one = series.bytes;
    assert.ok(one <= 2 * 9 * 8, `a shape run once holds ${one} bytes`);
    for (let i = 1; i < 100; i++) {
      clock.advance(BUCKET_MS);
      series.add(clock.now(), i, false, 0);
    }
    assert.equal(series.bytes, 8 * 9 * 8, 'full size: 8 buckets of 9 numbers');
    const points = series.points(clock.now());
    assert.deepEqual(
      points.map((p) => [p.t, p.calls]),
      Array.from({ length: 8 }, (_, k) => [start + (92 + k) * BUCKET_MS, 1]),
      'the last 8 buckets, oldest first',
    );
    assert.equal(series.callsBetween(start, clock.now()), 8);
    assertNear(points[0].p50_ms, 92, 'a reused bucket keeps its own quantile');
  });

  test('a bucket with one timed call holds its latency without a sketch, and a second call gets both into one', () => {
    const { clock, series, start } = setup({ sketchBuckets: 2 });
    series.add(clock.now(), 12.5, false, 0);
    assert.equal(series.window(start, start)?.count, 1, 'the held latency is in the window');
    assertNear(series.window(start, start)!.getValueAtQuantile(0.5), 12.5, 'held latency');
    assert.equal(series.points(clock.now())[0].p95_ms, 12.5);
    clock.advance(BUCKET_MS);
    series.add(clock.now(), 3, false, 0);
    series.add(clock.now(), 40, false, 0);
    const window = series.window(start, clock.now());
    assert.equal(window?.count, 3, 'the held latency, then both of the second bucket');
    assertNear(window!.getValueAtQuantile(1), 40, 'max');
    clock.advance(2 * BUCKET_MS);
    series.add(clock.now(), 1, false, 0);
    assert.equal(series.window(start, start), null, 'past the sketch horizon, a held latency leaves the window too');
    assert.equal(series.points(clock.now())[0].p50_ms, 12.5, "but stays the bucket's quantile");
  });
});
