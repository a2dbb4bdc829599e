// A shape's latency over time: fixed buckets (10 s by default) covering the last
// hour, for charts and for the regression detector. The bucket being filled keeps a
// sketch; the last few keep theirs so windows can be merged exactly; older buckets
// keep only their summary, which bounds memory per shape.
//
// Only buckets that saw calls take memory, in arrays that grow (doubling) up to the
// configured number of buckets: most shapes of a flood of distinct texts run once or
// a few times, and a full hour's arrays (360 buckets x 9 numbers, ~22 KiB) for each
// of them was most of the shape registry's memory.

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

/** Fields per bucket entry in ShapeSeries.data. */
const BUCKET = 0;
const CALLS = 1;
const TIMED = 2; // calls with a latency sample
const ERRORS = 3;
const ROWS = 4;
const TOTAL_MS = 5;
const P50 = 6; // p50, p95, p99, once the bucket is closed (or its one latency, see add)
const FIELDS = 9;
/** Read-only stand-in for a series' sketch map until it needs one (a Map is ~200 bytes). */
const NO_SKETCHES: Map<number, DDSketch> = new Map();
/** Entries allocated for a new shape; doubled as needed up to SeriesOptions.buckets. */
const INITIAL_ENTRIES = 2;

export class ShapeSeries {
  /** FIELDS numbers per entry. Entries are in no particular order. */
  private data: Float64Array;
  private entries = 0; // entries in use (data[0, entries * FIELDS))
  /** Sketches of the newest buckets, by bucket; NO_SKETCHES (shared) until the first one. */
  private sketches: Map<number, DDSketch> = NO_SKETCHES;
  // The bucket being filled and its entry, so the common case skips the search.
  private lastBucket = -1;
  private lastEntry = -1;
  // The bucket being filled's sketch, so the common case skips the map lookup.
  private currentBucket = -1;
  private currentSketch: DDSketch | null = null;

  constructor(private readonly options: SeriesOptions) {
    this.data = new Float64Array(Math.min(INITIAL_ENTRIES, options.buckets) * FIELDS);
  }

  /** Bytes held by the bucket array (the sketches come on top). */
  get bytes(): number {
    return this.data.byteLength;
  }

  /** Counts a call; `timed` false leaves it out of the latency figures (a refused query). */
  add(at: number, durationMs: number, failed: boolean, rows: number, timed = true): void {
    const bucket = Math.floor(at / this.options.bucketMs);
    const e = (bucket === this.lastBucket ? this.lastEntry : this.entryOf(bucket)) * FIELDS;
    const data = this.data;
    data[e + CALLS]++;
    if (failed) data[e + ERRORS]++;
    data[e + ROWS] += rows;
    if (!timed) return;
    const ms = Math.max(durationMs, 0);
    data[e + TIMED]++;
    data[e + TOTAL_MS] += durationMs;
    if (bucket !== this.currentBucket || this.currentSketch === null) {
      let sketch = this.sketches.get(bucket);
      if (sketch === undefined) {
        if (data[e + TIMED] === 1) {
          // A bucket's first latency is held as its quantiles, without a sketch
          // (~2 KiB each): most shapes of a flood never get a second call.
          data[e + P50] = data[e + P50 + 1] = data[e + P50 + 2] = ms;
          this.currentBucket = bucket;
          this.currentSketch = null;
          return;
        }
        sketch = newSketch();
        sketch.accept(data[e + P50]); // the held first latency
        this.keepSketch(bucket, sketch);
      }
      this.currentBucket = bucket;
      this.currentSketch = sketch;
    }
    this.currentSketch.accept(ms);
  }

  /**
   * Adds a batch of calls summarized elsewhere (a worker's window, see summary.ts)
   * to the bucket holding `at`; `sketch` holds the timed calls' latencies.
   */
  merge(
    at: number,
    calls: number,
    timed: number,
    errors: number,
    rows: number,
    totalMs: number,
    sketch: DDSketch | null,
  ): void {
    const bucket = Math.floor(at / this.options.bucketMs);
    const e = (bucket === this.lastBucket ? this.lastEntry : this.entryOf(bucket)) * FIELDS;
    const data = this.data;
    data[e + CALLS] += calls;
    data[e + ERRORS] += errors;
    data[e + ROWS] += rows;
    if (timed === 0 || sketch === null) return;
    const held = data[e + TIMED] === 1 && !this.sketches.has(bucket);
    data[e + TIMED] += timed;
    data[e + TOTAL_MS] += totalMs;
    let target = this.sketches.get(bucket);
    if (target === undefined) {
      target = newSketch();
      if (held) target.accept(data[e + P50]);
      this.keepSketch(bucket, target);
      if (bucket === this.currentBucket) this.currentSketch = target;
    }
    target.merge(sketch);
  }

  /** Non-empty buckets from `since` (epoch ms) on, oldest first. */
  points(now: number, since = 0): SeriesPoint[] {
    const { bucketMs, buckets } = this.options;
    const last = Math.floor(now / bucketMs);
    const first = Math.max(last - buckets + 1, Math.floor(since / bucketMs));
    const found: number[] = [];
    for (let i = 0; i < this.entries; i++) {
      const bucket = this.data[i * FIELDS + BUCKET];
      if (bucket >= first && bucket <= last && this.data[i * FIELDS + CALLS] !== 0) found.push(i);
    }
    found.sort((a, b) => this.data[a * FIELDS] - this.data[b * FIELDS]);
    return found.map((i) => {
      const e = i * FIELDS;
      const bucket = this.data[e + BUCKET];
      const sketch = this.sketches.get(bucket);
      const timed = this.data[e + TIMED];
      const q = (k: number, quantile: number) =>
        timed === 0 ? 0 : sketch ? sketch.getValueAtQuantile(quantile) : this.data[e + P50 + k];
      return {
        t: bucket * bucketMs,
        calls: this.data[e + CALLS],
        timed,
        errors: this.data[e + ERRORS],
        rows: this.data[e + ROWS],
        mean_ms: timed === 0 ? 0 : this.data[e + TOTAL_MS] / timed,
        p50_ms: q(0, 0.5),
        p95_ms: q(1, 0.95),
        p99_ms: q(2, 0.99),
      };
    });
  }

  /** Calls in the buckets from `from` to `to` (epoch ms, inclusive). */
  callsBetween(from: number, to: number): number {
    const { bucketMs, buckets } = this.options;
    const first = Math.max(Math.floor(from / bucketMs), Math.floor(to / bucketMs) - buckets + 1);
    const last = Math.floor(to / bucketMs);
    let calls = 0;
    for (let e = 0; e < this.entries * FIELDS; e += FIELDS) {
      const bucket = this.data[e + BUCKET];
      if (bucket >= first && bucket <= last) calls += this.data[e + CALLS];
    }
    return calls;
  }

  /**
   * The latencies of the buckets from `from` to `to` (epoch ms, inclusive) merged
   * into one sketch, using only buckets that still keep theirs; null if none.
   */
  window(from: number, to: number): DDSketch | null {
    const { bucketMs, sketchBuckets } = this.options;
    const first = Math.floor(from / bucketMs);
    const last = Math.floor(to / bucketMs);
    let merged: DDSketch | null = null;
    for (let i = 0; i < this.entries; i++) {
      const e = i * FIELDS;
      const bucket = this.data[e + BUCKET];
      if (bucket < first || bucket > last) continue;
      const sketch = this.sketches.get(bucket);
      if (sketch !== undefined) {
        merged ??= newSketch();
        merged.merge(sketch);
      } else if (this.data[e + TIMED] === 1 && bucket > this.lastBucket - sketchBuckets) {
        // A single latency held in place of a sketch, for as long as a sketch would be kept.
        merged ??= newSketch();
        merged.accept(this.data[e + P50]);
      }
    }
    return merged;
  }

  /** The entry holding `bucket`, opened (and older buckets retired) if there is none. */
  private entryOf(bucket: number): number {
    const data = this.data;
    let free = -1;
    let oldest = -1;
    const horizon = bucket - this.options.buckets; // buckets at or before it have left the window
    for (let i = 0; i < this.entries; i++) {
      const b = data[i * FIELDS + BUCKET];
      if (b === bucket) return this.remember(bucket, i);
      if (b <= horizon && free === -1) free = i;
      if (b !== -1 && (oldest === -1 || b < data[oldest * FIELDS + BUCKET])) oldest = i;
    }
    let entry = free;
    if (entry === -1) {
      if (this.entries * FIELDS < data.length) entry = this.entries++;
      else if (this.entries < this.options.buckets) {
        this.grow();
        entry = this.entries++;
      } else entry = oldest; // only if the clock went back: drop the oldest bucket
    }
    this.open(entry, bucket);
    return this.remember(bucket, entry);
  }

  private remember(bucket: number, entry: number): number {
    // Only the newest bucket is remembered: a late call for an older one (clock skew) must not stick.
    if (bucket >= this.lastBucket) {
      this.lastBucket = bucket;
      this.lastEntry = entry;
    }
    return entry;
  }

  private grow(): void {
    const data = new Float64Array(Math.min(this.options.buckets, Math.max(1, this.entries) * 2) * FIELDS);
    data.set(this.data);
    this.data = data;
  }

  private keepSketch(bucket: number, sketch: DDSketch): void {
    if (this.sketches === NO_SKETCHES) this.sketches = new Map();
    this.sketches.set(bucket, sketch);
  }

  private open(entry: number, bucket: number): void {
    const e = entry * FIELDS;
    const data = this.data;
    data[e + BUCKET] = bucket;
    data[e + CALLS] = 0;
    data[e + TIMED] = 0;
    data[e + ERRORS] = 0;
    data[e + ROWS] = 0;
    data[e + TOTAL_MS] = 0;
    // Close buckets that fall out of the sketch horizon: keep their quantiles only.
    for (const [old, sketch] of this.sketches) {
      if (old > bucket - this.options.sketchBuckets) continue;
      for (let i = 0; i < this.entries; i++) {
        const q = i * FIELDS + P50;
        if (data[i * FIELDS + BUCKET] !== old) continue;
        data[q] = sketch.getValueAtQuantile(0.5);
        data[q + 1] = sketch.getValueAtQuantile(0.95);
        data[q + 2] = sketch.getValueAtQuantile(0.99);
      }
      this.sketches.delete(old);
      if (old === this.currentBucket) {
        this.currentBucket = -1;
        this.currentSketch = null;
      }
    }
  }
}
