// The captured workload (docs/api.md, Workload): every shape pgwarden has seen,
// with its normalized text, volume, latency and current plan, heaviest first,
// for `pgwarden check-migration` to replay as EXPLAINs against a staging
// database. Literal values leave pgwarden only as the samples the operator
// opted into (workload_sample_params); everything else is normalized text.

import type { Clock } from '../clock.ts';
import type { PlanSampler } from '../plans/sampler.ts';
import { OVERFLOW_FINGERPRINT, type ShapeRegistry, type ShapeStats } from '../shapes/registry.ts';
import { WORKLOAD_FORMAT, type Workload, type WorkloadShape } from './format.ts';
import { parameterCount, sampleValues } from './values.ts';
import { bareName } from '../plans/relations.ts';

export interface WorkloadSources {
  readonly registry: ShapeRegistry;
  /** Plans and samples; null when pgwarden runs without a monitoring connection. */
  readonly sampler: PlanSampler | null;
  readonly clock: Clock;
  /** workload_sample_params: include the samples the sampler kept. */
  readonly sampleParams: boolean;
}

const round = (ms: number) => Math.round(ms * 1000) / 1000;

export function buildWorkload(sources: WorkloadSources): Workload {
  const shapes = sources.registry
    .all()
    .filter((s) => !s.fallback && s.fingerprint !== OVERFLOW_FINGERPRINT)
    .sort((a, b) => b.totalMs - a.totalMs)
    .map((s) => shapeJson(s, sources));
  return { format: WORKLOAD_FORMAT, generated_at: new Date(sources.clock.now()).toISOString(), shapes };
}

function shapeJson(s: ShapeStats, sources: WorkloadSources): WorkloadShape {
  const plans = sources.sampler?.plansOf(s.fingerprint);
  const current = plans?.current?.summary ?? null;
  const shape: WorkloadShape = {
    fingerprint: s.fingerprint,
    query: s.query,
    command: s.command,
    databases: [...s.databases],
    calls: s.calls,
    total_ms: round(s.totalMs),
    mean_ms: round(s.meanMs),
    p50_ms: round(s.quantile(0.5)),
    p95_ms: round(s.quantile(0.95)),
    p99_ms: round(s.quantile(0.99)),
    plan_fingerprint: current?.fingerprint ?? null,
    plan: current ? current.nodes.map((n) => n.description) : null,
    param_types: plans?.paramTypes ? [...plans.paramTypes] : null,
    plan_cost: current?.totalCost ?? null,
    // Bare names, as the workload format has them (the lock analysis matches them to a migration's).
    relations: current ? [...new Set(current.relations.map(bareName))] : null,
    first_seen: new Date(s.firstSeen).toISOString(),
    last_seen: new Date(s.lastSeen).toISOString(),
    calls_per_s: callsPerSecond(s, sources.clock.now()),
  };
  if (sources.sampleParams) shape.samples = samplesOf(s.query, plans?.samples ?? []);
  return shape;
}

/**
 * The shape's rate over the last hour its series covers, or since it was first
 * seen if that is later: what check-migration weighs a lock against.
 */
function callsPerSecond(s: ShapeStats, now: number): number {
  const since = Math.max(s.firstSeen, now - RATE_WINDOW_MS);
  const calls = s.series.points(now, since).reduce((sum, p) => sum + p.calls, 0);
  const seconds = Math.max((now - since) / 1000, 1);
  return Math.round((calls / seconds) * 1000) / 1000;
}

const RATE_WINDOW_MS = 3_600_000;

/** The kept executions as values for $1..$n of the shape's query; those that do not fit are left out. */
function samplesOf(
  query: string,
  kept: readonly { text: string; params: readonly (string | null)[] }[],
): (string | null)[][] {
  let count: number;
  try {
    count = parameterCount(query);
  } catch {
    return [];
  }
  if (count === 0) return [];
  const out: (string | null)[][] = [];
  for (const sample of kept) {
    const values = sampleValues(sample.text, sample.params);
    if (values !== null && values.length === count) out.push(values);
  }
  return out;
}
