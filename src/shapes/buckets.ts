// Constants every shape summary shares, below the registry and the worker
// summaries that both use them: the overflow shape's identity and the latency
// histogram's buckets.

/** Fingerprint of the shape that absorbs evicted shapes. */
export const OVERFLOW_FINGERPRINT = 'overflow';
/**
 * Upper bounds (ms) of the per-shape latency histogram buckets, exported to
 * Prometheus as pgwarden_shape_latency_seconds (so rate() windows and fleet sums
 * work, which a lifetime quantile cannot). A last, implicit bucket is +Inf.
 */
export const LATENCY_BUCKETS_MS: readonly number[] = [
  0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000,
];

/** Index into a latency bucket array (LATENCY_BUCKETS_MS, then +Inf) for a duration in ms. */
export function latencyBucket(ms: number): number {
  let b = 0;
  while (b < LATENCY_BUCKETS_MS.length && ms > LATENCY_BUCKETS_MS[b]) b++;
  return b;
}

export const OVERFLOW_QUERY = '(shapes evicted by the shape cap)';
