// A shape's latency over time: fixed buckets (10 s by default) in a ring covering
// the last hour, for charts and for the regression detector. The bucket being
// filled keeps a sketch; the last few keep theirs so windows can be merged exactly;
// older buckets keep only their summary, which bounds memory per shape.

import { DDSketch } from '@datadog/sketches-js';

export const SKETCH_ACCURACY = 0.01;

export function newSketch(): DDSketch {
  return new DDSketch({ relativeAccuracy: SKETCH_ACCURACY });
}

export interface SeriesPoint {
  /** Bucket start, epoch ms. */
  t: number;
  calls: number;
  /** Calls that ran (refused ones excluded): the latency figures describe these. */
  timed: number;
  errors: number;
  rows: number;
  mean_ms: number;
  p50_ms: number;
  p95_ms: number;
  p99_ms: number;
}

export interface SeriesOptions {
  readonly bucketMs: number;
  readonly buckets: number;
  /** How many of the newest buckets keep their sketch. */
  readonly sketchBuckets: number;
}

export class ShapeSeries {
  private readonly index: Float64Array; // absolute bucket number held by each slot (-1 empty)
  private readonly calls: Float64Array;
  private readonly timed: Float64Array; // calls with a latency sample
  private readonly errors: Float64Array;
  private readonly rows: Float64Array;
  private readonly totalMs: Float64Array;
  private readonly quantiles: Float32Array; // p50, p95, p99 per slot, once the bucket is closed
  private readonly sketches = new Map<number, DDSketch>();
  // The bucket being filled, so the common case skips the map lookup.
  private currentBucket = -1;
  private currentSketch: DDSketch | null = null;

  constructor(private readonly options: SeriesOptions) {
    const n = options.buckets;
    this.index = new Float64Array(n).fill(-1);
    this.calls = new Float64Array(n);
    this.timed = new Float64Array(n);
    this.errors = new Float64Array(n);
    this.rows = new Float64Array(n);
    this.totalMs = new Float64Array(n);
    this.quantiles = new Float32Array(n * 3);
  }

  /** Counts a call; `timed` false leaves it out of the latency figures (a refused query). */
  add(at: number, durationMs: number, failed: boolean, rows: number, timed = true): void {
    const bucket = Math.floor(at / this.options.bucketMs);
    const slot = bucket % this.options.buckets;
    if (this.index[slot] !== bucket) this.open(slot, bucket);
    this.calls[slot]++;
    if (failed) this.errors[slot]++;
    this.rows[slot] += rows;
    if (!timed) return;
    this.timed[slot]++;
    this.totalMs[slot] += durationMs;
    if (bucket !== this.currentBucket) {
      let sketch = this.sketches.get(bucket);
      if (sketch === undefined) {
        sketch = newSketch();
        this.sketches.set(bucket, sketch);
      }
      this.currentBucket = bucket;
      this.currentSketch = sketch;
    }
    this.currentSketch!.accept(Math.max(durationMs, 0));
  }

  /**
   * Adds a batch of calls summarized elsewhere (a worker's window, see summary.ts)
   * to the bucket holding `at`; `sketch` holds the timed calls' latencies.
   */
  merge(at: number, calls: number, timed: number, errors: number, rows: number, totalMs: number, sketch: DDSketch | null): void {
    const bucket = Math.floor(at / this.options.bucketMs);
    const slot = bucket % this.options.buckets;
    if (this.index[slot] !== bucket) this.open(slot, bucket);
    this.calls[slot] += calls;
    this.errors[slot] += errors;
    this.rows[slot] += rows;
    if (timed === 0 || sketch === null) return;
    this.timed[slot] += timed;
    this.totalMs[slot] += totalMs;
    let target = this.sketches.get(bucket);
    if (target === undefined) {
      target = newSketch();
      this.sketches.set(bucket, target);
    }
    target.merge(sketch);
  }

  /** Non-empty buckets from `since` (epoch ms) on, oldest first. */
  points(now: number, since = 0): SeriesPoint[] {
    const { bucketMs, buckets } = this.options;
    const last = Math.floor(now / bucketMs);
    const first = Math.max(last - buckets + 1, Math.floor(since / bucketMs));
    const out: SeriesPoint[] = [];
    for (let bucket = first; bucket <= last; bucket++) {
      const slot = bucket % buckets;
      if (this.index[slot] !== bucket || this.calls[slot] === 0) continue;
      const sketch = this.sketches.get(bucket);
      const timed = this.timed[slot];
      const q = (i: number, quantile: number) => (timed === 0 ? 0 : sketch ? sketch.getValueAtQuantile(quantile) : this.quantiles[slot * 3 + i]);
      out.push({
        t: bucket * bucketMs,
        calls: this.calls[slot],
        timed,
        errors: this.errors[slot],
        rows: this.rows[slot],
        mean_ms: this.timed[slot] === 0 ? 0 : this.totalMs[slot] / this.timed[slot],
        p50_ms: q(0, 0.5),
        p95_ms: q(1, 0.95),
        p99_ms: q(2, 0.99),
      });
    }
    return out;
  }

  /** Calls in the buckets from `from` to `to` (epoch ms, inclusive). */
  callsBetween(from: number, to: number): number {
    const { bucketMs, buckets } = this.options;
    let calls = 0;
    for (let bucket = Math.max(Math.floor(from / bucketMs), Math.floor(to / bucketMs) - buckets + 1); bucket <= Math.floor(to / bucketMs); bucket++) {
      const slot = bucket % buckets;
      if (this.index[slot] === bucket) calls += this.calls[slot];
    }
    return calls;
  }

  /**
   * The latencies of the buckets from `from` to `to` (epoch ms, inclusive) merged
   * into one sketch, using only buckets that still keep theirs; null if none.
   */
  window(from: number, to: number): DDSketch | null {
    const { bucketMs } = this.options;
    let merged: DDSketch | null = null;
    for (let bucket = Math.floor(from / bucketMs); bucket <= Math.floor(to / bucketMs); bucket++) {
      const sketch = this.sketches.get(bucket);
      if (!sketch) continue;
      merged ??= newSketch();
      merged.merge(sketch);
    }
    return merged;
  }

  private open(slot: number, bucket: number): void {
    this.index[slot] = bucket;
    this.calls[slot] = 0;
    this.timed[slot] = 0;
    this.errors[slot] = 0;
    this.rows[slot] = 0;
    this.totalMs[slot] = 0;
    // Close buckets that fall out of the sketch horizon: keep their quantiles only.
    for (const [old, sketch] of this.sketches) {
      if (old > bucket - this.options.sketchBuckets) continue;
      const oldSlot = old % this.options.buckets;
      if (this.index[oldSlot] === old) {
        this.quantiles[oldSlot * 3] = sketch.getValueAtQuantile(0.5);
        this.quantiles[oldSlot * 3 + 1] = sketch.getValueAtQuantile(0.95);
        this.quantiles[oldSlot * 3 + 2] = sketch.getValueAtQuantile(0.99);
      }
      this.sketches.delete(old);
      if (old === this.currentBucket) {
        this.currentBucket = -1;
        this.currentSketch = null;
      }
    }
  }
}
