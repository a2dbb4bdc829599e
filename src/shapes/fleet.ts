// The fleet view of shapes: what each instance publishes to the control database
// (its top shapes, cumulative since it started, with the latency sketch as JSON)
// and how the rows of every live instance are merged back: counters summed,
// sketches merged, so fleet percentiles are true percentiles of all calls (within
// the sketch's 1% relative accuracy), not averages of per-instance ones.

import type { DDSketch } from '@datadog/sketches-js';
import type { ShapeStats } from './registry.ts';
import { newSketch } from './series.ts';
import { sketchFromJson, sketchToJson, type SketchJson } from './summary.ts';

export interface PublishedShape {
  readonly fingerprint: string;
  readonly query: string;
  readonly command: string;
  readonly fallback: boolean;
  readonly calls: number;
  readonly timed: number;
  readonly errors: number;
  readonly errorsByClass: Readonly<Record<string, number>>;
  readonly rows: number;
  readonly totalMs: number;
  readonly sketch: SketchJson | null;
  readonly firstSeen: number;
  readonly lastSeen: number;
  readonly users: readonly string[];
  readonly databases: readonly string[];
  readonly applications: readonly string[];
}

export function publishedOf(s: ShapeStats): PublishedShape {
  return {
    fingerprint: s.fingerprint,
    query: s.query,
    command: s.command,
    fallback: s.fallback,
    calls: s.calls,
    timed: s.timedCalls,
    errors: s.errors,
    errorsByClass: Object.fromEntries(s.errorsByClass),
    rows: s.rows,
    totalMs: s.totalMs,
    sketch: sketchToJson(s.sketch),
    firstSeen: s.firstSeen,
    lastSeen: s.lastSeen,
    users: [...s.users],
    databases: [...s.databases],
    applications: [...s.applications],
  };
}

/** One shape over the fleet. */
export class FleetShape {
  calls = 0;
  timed = 0;
  errors = 0;
  readonly errorsByClass = new Map<string, number>();
  rows = 0;
  totalMs = 0;
  readonly sketch: DDSketch = newSketch();
  firstSeen = Infinity;
  lastSeen = 0;
  readonly users = new Set<string>();
  readonly databases = new Set<string>();
  readonly applications = new Set<string>();
  /** Per instance: its name and calls. */
  readonly instances: Array<{ instance: string; calls: number; p95_ms: number }> = [];

  constructor(
    readonly fingerprint: string,
    readonly query: string,
    readonly command: string,
    readonly fallback: boolean,
  ) {}

  get meanMs(): number {
    return this.timed === 0 ? 0 : this.totalMs / this.timed;
  }

  quantile(q: number): number {
    return this.sketch.count === 0 ? 0 : this.sketch.getValueAtQuantile(q);
  }

  add(instance: string, p: PublishedShape): void {
    this.calls += p.calls;
    this.timed += p.timed;
    this.errors += p.errors;
    for (const [k, v] of Object.entries(p.errorsByClass))
      this.errorsByClass.set(k, (this.errorsByClass.get(k) ?? 0) + v);
    this.rows += p.rows;
    this.totalMs += p.totalMs;
    const sketch = p.sketch === null ? null : sketchFromJson(p.sketch);
    if (sketch !== null && sketch.count > 0) this.sketch.merge(sketch);
    this.firstSeen = Math.min(this.firstSeen, p.firstSeen);
    this.lastSeen = Math.max(this.lastSeen, p.lastSeen);
    for (const n of p.users) this.users.add(n);
    for (const n of p.databases) this.databases.add(n);
    for (const n of p.applications) this.applications.add(n);
    this.instances.push({
      instance,
      calls: p.calls,
      p95_ms: sketch && sketch.count > 0 ? sketch.getValueAtQuantile(0.95) : 0,
    });
  }
}

/** Merges the rows read from the control database; rows that are not summaries are skipped (and counted). */
export function mergeFleet(rows: ReadonlyArray<{ instance: string; summary: unknown }>): {
  shapes: FleetShape[];
  skipped: number;
} {
  const byFingerprint = new Map<string, FleetShape>();
  let skipped = 0;
  for (const row of rows) {
    const p = row.summary as PublishedShape;
    if (!isPublished(p)) {
      skipped++;
      continue;
    }
    let shape = byFingerprint.get(p.fingerprint);
    if (shape === undefined) {
      shape = new FleetShape(p.fingerprint, p.query, p.command, p.fallback);
      byFingerprint.set(p.fingerprint, shape);
    }
    try {
      shape.add(row.instance, p);
    } catch {
      skipped++;
    }
  }
  return { shapes: [...byFingerprint.values()], skipped };
}

function isPublished(p: unknown): p is PublishedShape {
  if (typeof p !== 'object' || p === null) return false;
  const o = p as Record<string, unknown>;
  return (
    typeof o.fingerprint === 'string' &&
    typeof o.query === 'string' &&
    typeof o.calls === 'number' &&
    typeof o.timed === 'number' &&
    typeof o.totalMs === 'number' &&
    typeof o.errorsByClass === 'object' &&
    Array.isArray(o.users) &&
    Array.isArray(o.databases) &&
    Array.isArray(o.applications)
  );
}
