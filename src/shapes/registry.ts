// Per-shape statistics: counters, a latency sketch, the time series and who ran
// the shape. The number of tracked shapes is capped; the least recently seen are
// folded into one overflow shape, so a flood of distinct texts cannot exhaust memory.

import type { DDSketch } from '@datadog/sketches-js';
import { LRUCache } from 'lru-cache';
import type { Clock } from '../clock.ts';
import type { QueryCompletion } from '../proxy/seam.ts';
import type { StatementShape } from './fingerprint.ts';
import type { ShapeSummary } from './summary.ts';
import { LATENCY_BUCKETS_MS, latencyBucket, OVERFLOW_FINGERPRINT, OVERFLOW_QUERY } from './buckets.ts';
import { newSketch, ShapeSeries, type SeriesOptions, type SeriesPoint } from './series.ts';

export { LATENCY_BUCKETS_MS, latencyBucket, OVERFLOW_FINGERPRINT, OVERFLOW_QUERY } from './buckets.ts';
const BUCKET_COUNT = LATENCY_BUCKETS_MS.length;

/** How many distinct users, databases and application names are kept per shape. */
export const MAX_NAMES_PER_SHAPE = 32;
const MAX_NAMES = MAX_NAMES_PER_SHAPE;

export class ShapeStats {
  calls = 0;
  /** Calls that ran (not refused by a rule), the ones with a latency. */
  timedCalls = 0;
  errors = 0;
  rows = 0;
  totalMs = 0;
  // The lifetime latency sketch (~2 KiB) is made at the second timed call: until
  // then the one latency is held as a number, so a shape run once (most shapes of
  // a flood of distinct texts) costs no sketch.
  private lifetime: DDSketch | null = null;
  private held = Number.NaN;
  /** Timed calls per latency bucket (LATENCY_BUCKETS_MS, then +Inf); not cumulative. */
  readonly latencyBuckets = new Float64Array(BUCKET_COUNT + 1);
  readonly series: ShapeSeries;
  // Arrays (at most MAX_NAMES, usually one name), not Sets: a Set and its table
  // cost ~200 bytes each, for every shape of a flood.
  readonly users: string[] = [];
  readonly databases: string[] = [];
  readonly applications: string[] = [];
  /** Made at the first error: most shapes never fail. */
  private errorClasses: Map<string, number> | null = null;
  /** The parse tree's statement kind ('' when unknown) and whether it is transaction/session control. */
  kind = '';
  control = false;
  firstSeen: number;
  lastSeen: number;
  // Who ran the shape last: most calls come from the same session, so the name
  // sets are only consulted when it changes.
  private lastSession: QueryCompletion['session'] | null = null;
  private lastApplication = '';

  constructor(
    readonly fingerprint: string,
    readonly query: string,
    readonly command: string,
    readonly fallback: boolean,
    now: number,
    seriesOptions: SeriesOptions,
  ) {
    this.firstSeen = now;
    this.lastSeen = now;
    this.series = new ShapeSeries(seriesOptions);
  }

  /** Failed calls per SQLSTATE class. */
  get errorsByClass(): ReadonlyMap<string, number> {
    return this.errorClasses ?? NO_ERRORS;
  }

  private countErrors(errorClass: string, n: number): void {
    this.errorClasses ??= new Map();
    this.errorClasses.set(errorClass, (this.errorClasses.get(errorClass) ?? 0) + n);
  }

  get meanMs(): number {
    return this.timedCalls === 0 ? 0 : this.totalMs / this.timedCalls;
  }

  /** The latencies of all timed calls (made on first use; callers may merge into it). */
  get sketch(): DDSketch {
    if (this.lifetime === null) {
      this.lifetime = newSketch();
      if (!Number.isNaN(this.held)) this.lifetime.accept(this.held);
      this.held = Number.NaN;
    }
    return this.lifetime;
  }

  quantile(q: number): number {
    if (this.lifetime === null) return Number.isNaN(this.held) ? 0 : this.held;
    return this.lifetime.count === 0 ? 0 : this.lifetime.getValueAtQuantile(q);
  }

  record(c: QueryCompletion, now: number): void {
    this.calls++;
    this.rows += c.rows;
    if (!c.refused) {
      this.timedCalls++;
      this.totalMs += c.durationMs;
      this.latencyBuckets[latencyBucket(c.durationMs)]++;
    }
    this.lastSeen = now;
    const failed = c.sqlstate !== null;
    if (failed) {
      this.errors++;
      this.countErrors(c.sqlstate!.slice(0, 2), 1);
    }
    // A query the gate refused never ran: it counts as a call and an error, but its
    // (tiny) duration would fake a recovery in the latency figures.
    if (!c.refused) {
      const ms = Math.max(c.durationMs, 0);
      if (this.lifetime === null && Number.isNaN(this.held)) this.held = ms;
      else this.sketch.accept(ms);
    }
    this.series.add(now, c.durationMs, failed, c.rows, !c.refused);
    const session = c.session;
    if (session !== this.lastSession || session.applicationName !== this.lastApplication) {
      // Sessions of one application interleave (a pool): the same names, already listed.
      const known =
        this.lastSession !== null &&
        session.user === this.lastSession.user &&
        session.database === this.lastSession.database &&
        session.applicationName === this.lastApplication;
      this.lastSession = session;
      this.lastApplication = session.applicationName;
      if (!known) {
        addName(this.users, session.user);
        addName(this.databases, session.database);
        addName(this.applications, session.applicationName);
      }
    }
  }

  /** Adds a summary of calls recorded elsewhere (a worker's window); `sketch` is its decoded sketch. */
  merge(summary: ShapeSummary, sketch: DDSketch | null, now: number): void {
    this.calls += summary.calls;
    this.timedCalls += summary.timed;
    this.errors += summary.errors;
    for (const [k, v] of Object.entries(summary.errorsByClass)) this.countErrors(k, v);
    this.rows += summary.rows;
    this.totalMs += summary.totalMs;
    if (sketch !== null && sketch.count > 0) this.sketch.merge(sketch);
    if (summary.buckets !== undefined) {
      for (let b = 0; b <= BUCKET_COUNT && b < summary.buckets.length; b++)
        this.latencyBuckets[b] += summary.buckets[b];
    }
    this.lastSeen = now;
    this.series.merge(now, summary.calls, summary.timed, summary.errors, summary.rows, summary.totalMs, sketch);
    for (const name of summary.users) addName(this.users, name);
    for (const name of summary.databases) addName(this.databases, name);
    for (const name of summary.applications) addName(this.applications, name);
  }

  /** Folds an evicted shape's totals into this one (the overflow shape). */
  absorb(other: ShapeStats): void {
    this.calls += other.calls;
    this.timedCalls += other.timedCalls;
    this.errors += other.errors;
    for (const [k, v] of other.errorsByClass) this.countErrors(k, v);
    this.rows += other.rows;
    this.totalMs += other.totalMs;
    for (let b = 0; b <= BUCKET_COUNT; b++) this.latencyBuckets[b] += other.latencyBuckets[b];
    if (other.lifetime !== null) {
      if (other.lifetime.count > 0) this.sketch.merge(other.lifetime);
    } else if (!Number.isNaN(other.held)) this.sketch.accept(other.held);
    this.firstSeen = Math.min(this.firstSeen, other.firstSeen);
    this.lastSeen = Math.max(this.lastSeen, other.lastSeen);
  }
}

const NO_ERRORS: ReadonlyMap<string, number> = new Map();

function addName(names: string[], name: string): void {
  if (name !== '' && names.length < MAX_NAMES && !names.includes(name)) names.push(name);
}

export interface RegistryOptions {
  readonly maxShapes: number;
  readonly series: SeriesOptions;
  readonly clock: Clock;
}

export class ShapeRegistry {
  private readonly shapes: LRUCache<string, ShapeStats>;
  readonly overflow: ShapeStats;
  /** Shapes folded into the overflow shape so far. */
  evicted = 0;

  constructor(private readonly options: RegistryOptions) {
    const now = options.clock.now();
    this.overflow = new ShapeStats(OVERFLOW_FINGERPRINT, OVERFLOW_QUERY, '', true, now, options.series);
    this.shapes = new LRUCache({
      max: options.maxShapes,
      dispose: (stats, _key, reason) => {
        if (reason !== 'evict') return;
        this.overflow.absorb(stats);
        this.evicted++;
      },
    });
  }

  record(shape: StatementShape, c: QueryCompletion): ShapeStats {
    const now = this.options.clock.now();
    let stats = this.shapes.get(shape.fingerprint);
    if (stats === undefined) {
      stats = new ShapeStats(shape.fingerprint, shape.query, shape.command, shape.fallback, now, this.options.series);
      stats.kind = shape.kind ?? '';
      stats.control = shape.control ?? false;
      this.shapes.set(shape.fingerprint, stats);
    }
    stats.record(c, now);
    return stats;
  }

  /** Records a summary of calls made elsewhere (a worker's window, see summary.ts). */
  ingest(summary: ShapeSummary, sketch: DDSketch | null): ShapeStats {
    const now = this.options.clock.now();
    // A worker's own overflow (its cap per report) joins this registry's overflow shape.
    let stats = summary.fingerprint === OVERFLOW_FINGERPRINT ? this.overflow : this.shapes.get(summary.fingerprint);
    if (stats === undefined) {
      stats = new ShapeStats(
        summary.fingerprint,
        summary.query,
        summary.command,
        summary.fallback,
        now,
        this.options.series,
      );
      stats.kind = summary.kind ?? '';
      stats.control = summary.control ?? false;
      this.shapes.set(summary.fingerprint, stats);
    }
    stats.merge(summary, sketch, now);
    return stats;
  }

  get(fingerprint: string): ShapeStats | undefined {
    if (fingerprint === OVERFLOW_FINGERPRINT) return this.overflow.calls > 0 ? this.overflow : undefined;
    return this.shapes.peek(fingerprint);
  }

  /** Every tracked shape, plus the overflow shape once it holds anything. */
  all(): ShapeStats[] {
    const out = [...this.shapes.values()];
    if (this.overflow.calls > 0) out.push(this.overflow);
    return out;
  }

  get size(): number {
    return this.shapes.size;
  }
}

export type { SeriesPoint };
