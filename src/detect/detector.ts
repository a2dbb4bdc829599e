// The regression detector: a shape's recent latencies against its own baseline.
//
// Designed against noisy latency. With enough history the baseline is the median,
// over the last ten minutes of 10 s buckets (excluding the recent window), of each
// bucket's p50 and p95: one slow bucket cannot move it. A young shape (fewer such
// buckets) gets its baseline from its calls instead: the merged latencies of its
// complete buckets once they hold >= minBaselineCalls calls, so a hot shape has one
// within seconds of pgwarden starting, not after a minute. The recent window is the shape's calls of
// the last 5 s (at most the last 512): short, because a regressed hot shape gets
// slower and so sends fewer calls, and a long window would stay dominated by its
// fast calls from before. A shape counts as regressed only when, at once,
//   - it has a baseline (see above) and enough recent calls (>= 20),
//   - its recent p50 is >= 2x the baseline p50 (the typical call is slower, not
//     just the tail: jitter and bursts move the tail, a plan flip moves everything),
//   - its recent p95 is >= 3x the baseline p95 and >= 10 ms slower in absolute terms
//     (sub-millisecond shapes doubling is noise, not an incident);
// and a per-shape incident opens after 5 consecutive such evaluations (2 s apart,
// so a burst shorter than ~8 s never opens one), or at the first one when the
// shape's plan is confirmed to have changed (then a p95 jump suffices: the plan
// change is the evidence the run of evaluations stands in for). It resolves after
// 3 consecutive evaluations with p95 back under 1.5x the baseline frozen at onset.
// How shapes that slow down together become one incident is incidents.ts's job.

import type { SeriesPoint } from '../shapes/series.ts';

export interface DetectorOptions {
  readonly recentWindowMs: number;
  readonly baselineWindowMs: number;
  readonly minBaselineBuckets: number;
  readonly minBucketCalls: number;
  /** Calls in complete buckets that make a young shape's baseline. */
  readonly minBaselineCalls: number;
  readonly minRecentSamples: number;
  readonly p50Ratio: number;
  readonly p95Ratio: number;
  readonly absoluteMs: number;
  readonly openAfter: number;
  readonly resolveRatio: number;
  readonly resolveAfter: number;
}

export const DEFAULT_DETECTOR_OPTIONS: DetectorOptions = {
  recentWindowMs: 5_000,
  baselineWindowMs: 600_000,
  minBaselineBuckets: 6,
  minBucketCalls: 5,
  minBaselineCalls: 200,
  minRecentSamples: 20,
  p50Ratio: 2,
  p95Ratio: 3,
  absoluteMs: 10,
  openAfter: 5,
  resolveRatio: 1.5,
  resolveAfter: 3,
};

export interface Percentiles {
  readonly p50_ms: number;
  readonly p95_ms: number;
  readonly p99_ms: number;
  /** Calls per second. */
  readonly rate: number;
  readonly samples: number;
}

const RING = 512;

/** The newest calls of one shape: when they ran and how long they took. */
export class RecentCalls {
  private readonly at = new Float64Array(RING);
  private readonly ms = new Float32Array(RING);
  private next = 0;
  private count = 0;

  add(at: number, durationMs: number): void {
    this.at[this.next] = at;
    this.ms[this.next] = durationMs;
    this.next = (this.next + 1) % RING;
    if (this.count < RING) this.count++;
  }

  /** Calls at or after `since`, oldest first. */
  since(since: number): { at: number[]; ms: number[] } {
    const at: number[] = [];
    const ms: number[] = [];
    for (let i = 0; i < this.count; i++) {
      const slot = (this.next - this.count + i + RING) % RING;
      if (this.at[slot] >= since) {
        at.push(this.at[slot]);
        ms.push(this.ms[slot]);
      }
    }
    return { at, ms };
  }
}

function quantileOfSorted(sorted: number[], q: number): number {
  if (sorted.length === 0) return 0;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1));
  return sorted[i];
}

function median(values: number[]): number {
  return quantileOfSorted(
    [...values].sort((a, b) => a - b),
    0.5,
  );
}

/** Latency quantiles of a young shape's complete buckets merged (their sketches). */
export interface MergedLatency {
  readonly count: number;
  quantile(q: number): number;
  /** When the shape was first seen (epoch ms): its first bucket is partial, and the rate counts from here. */
  readonly firstSeen?: number;
}

/**
 * The shape's normal behaviour from its series, or null without enough history.
 * `merged` (the same buckets' latencies merged) stands in while there are fewer
 * than minBaselineBuckets usable buckets but at least minBaselineCalls calls.
 */
export function baselineOf(
  points: readonly SeriesPoint[],
  bucketMs: number,
  options: DetectorOptions,
  merged?: MergedLatency | null,
): Percentiles | null {
  // Buckets are judged by the calls that ran: refused ones have no latency.
  const usable = points.filter((p) => p.timed >= options.minBucketCalls);
  if (usable.length < options.minBaselineBuckets) {
    if (!merged || merged.count < options.minBaselineCalls || points.length === 0) return null;
    const from = Math.max(points[0].t, merged.firstSeen ?? points[0].t);
    const span = Math.max(1, (points[points.length - 1].t + bucketMs - from) / 1000);
    return {
      p50_ms: merged.quantile(0.5),
      p95_ms: merged.quantile(0.95),
      p99_ms: merged.quantile(0.99),
      rate: points.reduce((sum, p) => sum + p.calls, 0) / span,
      samples: merged.count,
    };
  }
  return {
    p50_ms: median(usable.map((p) => p.p50_ms)),
    p95_ms: median(usable.map((p) => p.p95_ms)),
    p99_ms: median(usable.map((p) => p.p99_ms)),
    rate: median(usable.map((p) => p.calls)) / (bucketMs / 1000),
    samples: usable.reduce((sum, p) => sum + p.timed, 0),
  };
}

/** Percentiles of the recent calls (durations with their times). */
export function recentOf(calls: { at: number[]; ms: number[] }, now: number, windowMs: number): Percentiles {
  const sorted = [...calls.ms].sort((a, b) => a - b);
  const span = calls.at.length > 1 ? Math.max(now - calls.at[0], 1000) : windowMs;
  return {
    p50_ms: quantileOfSorted(sorted, 0.5),
    p95_ms: quantileOfSorted(sorted, 0.95),
    p99_ms: quantileOfSorted(sorted, 0.99),
    rate: (calls.ms.length / span) * 1000,
    samples: calls.ms.length,
  };
}

/** Whether recent latencies are a regression against the baseline. */
export function isRegressed(recent: Percentiles, baseline: Percentiles, options: DetectorOptions): boolean {
  return (
    recent.samples >= options.minRecentSamples &&
    recent.p50_ms >= baseline.p50_ms * options.p50Ratio &&
    recent.p95_ms >= baseline.p95_ms * options.p95Ratio &&
    recent.p95_ms - baseline.p95_ms >= options.absoluteMs
  );
}

/**
 * A latency jump: p95 over the ratio and the absolute bar, without the p50 test.
 * Enough to open an incident at once when the shape's plan is known to have changed.
 */
export function isJump(recent: Percentiles, baseline: Percentiles, options: DetectorOptions): boolean {
  return (
    recent.samples >= options.minRecentSamples &&
    recent.p95_ms >= baseline.p95_ms * options.p95Ratio &&
    recent.p95_ms - baseline.p95_ms >= options.absoluteMs
  );
}

/** Slowed (a victim's test): p95 clearly above the baseline, short of a regression. */
export function isSlowed(recent: Percentiles, baseline: Percentiles, options: DetectorOptions): boolean {
  return (
    recent.samples >= options.minRecentSamples &&
    recent.p95_ms > Math.max(baseline.p95_ms * 1.5, baseline.p95_ms + options.absoluteMs / 2)
  );
}

/** Whether recent latencies are back to normal against the baseline frozen at onset. */
export function isRecovered(recent: Percentiles, baseline: Percentiles, options: DetectorOptions): boolean {
  return (
    recent.samples > 0 &&
    recent.p95_ms < Math.max(baseline.p95_ms * options.resolveRatio, baseline.p95_ms + options.absoluteMs / 2)
  );
}

/**
 * When the regression began: the first slow call after the last run of three
 * normal ones (slow = over the midpoint between baseline p95 and the regression bar).
 */
export function onsetOf(
  calls: { at: number[]; ms: number[] },
  baseline: Percentiles,
  options: DetectorOptions,
): number | null {
  const slowAbove = Math.max(baseline.p95_ms * options.p50Ratio, baseline.p95_ms + options.absoluteMs / 2);
  let onset: number | null = null;
  let normalRun = 0;
  for (let i = 0; i < calls.ms.length; i++) {
    if (calls.ms[i] > slowAbove) {
      if (onset === null || normalRun >= 3) onset = calls.at[i];
      normalRun = 0;
    } else normalRun++;
  }
  return normalRun >= 3 ? null : onset;
}

/** Per-shape hysteresis state. */
export class ShapeWatch {
  readonly recent = new RecentCalls();
  over = 0;
  under = 0;
  /** Consecutive evaluations found slowed (a victim needs two). */
  slowedRun = 0;
  /** Onset estimated at the first regressed evaluation, while the flip is still in the ring. */
  onset: number | null = null;
  /**
   * The baseline held while the shape is slowed (from its first slowed evaluation),
   * so its own slow calls do not leak into it, and frozen while it is in an incident.
   */
  frozenBaseline: Percentiles | null = null;
  /** Where that baseline came from. */
  baselineFrom: BaselineSource | null = null;
  /** The incident this shape is the root or a victim of. */
  incidentId: string | null = null;
  constructor(readonly fingerprint: string) {}
}

/** series: 10 minutes of buckets; recent_calls: a young shape's calls; restored: saved before a restart. */
export type BaselineSource = 'series' | 'recent_calls' | 'restored';
