// Per-shape summaries: what a proxy worker tells the one process that owns the
// statistics (with `--workers N`), and what an instance publishes to the control
// database for the fleet view. A summary covers one batch window of one shape:
// counters, a mergeable latency sketch (DDSketch), the newest latencies (for the
// regression detector's recent window) and a few executions copied out whole
// (exemplars: text, Bind parameters, session) for EXPLAIN sampling and the DDL
// timeline. Everything is plain JSON, so it crosses IPC and jsonb unchanged.
//
// The batcher runs on the worker's query path: per completion it does the cached
// shape lookup, a map access and counter updates, like the collector it replaces
// there; exemplars are copied at most once a second per shape.

import type { DDSketch } from '@datadog/sketches-js';
import { LRUCache } from 'lru-cache';
import type { Clock } from '../clock.ts';
import type { QueryCompletion, QueryObserver, SessionInfo } from '../proxy/seam.ts';
import type { ShapeFinder, StatementShape } from './fingerprint.ts';
import { LATENCY_BUCKETS_MS, latencyBucket, OVERFLOW_FINGERPRINT, OVERFLOW_QUERY } from './buckets.ts';
import { newSketch } from './series.ts';

/**
 * A DDSketch as JSON: [zeroCount, count, sum, min, max, firstKey, ...binCounts].
 * All sketches share one relative accuracy (series.ts), hence one key mapping, so
 * the bins alone rebuild it. (The library's own toProto needs protobufjs, which it
 * does not install.)
 */
export type SketchJson = number[];

/** One execution copied out of the (reused) completion event. */
export interface Exemplar {
  readonly text: string;
  /** The prepared statement's text and declared parameter types, or null for a simple Query. */
  readonly statement: { readonly text: string; readonly paramTypes: readonly number[] } | null;
  readonly statementIndex: number;
  /** Which Bind of its prepared statement this was (QueryCompletion.execution); absent from older workers. */
  readonly execution?: number;
  /** The raw Bind message, base64, or null. Held in memory only, never logged or stored. */
  readonly bind: string | null;
  readonly user: string;
  readonly database: string;
  readonly applicationName: string;
  readonly clientAddress: string;
  /** The session's settings (startup parameters, search_path...), so EXPLAIN plans as that session would. */
  readonly settings: Readonly<Record<string, string>>;
  readonly startedAt: number;
  readonly durationMs: number;
  readonly rows: number;
  readonly sqlstate: string | null;
  readonly upstream: string;
}

export interface ShapeSummary {
  readonly fingerprint: string;
  readonly query: string;
  readonly command: string;
  readonly fallback: boolean;
  /** The parse tree's statement kind and whether it is transaction/session control (the policy never sheds those). */
  readonly kind?: string;
  readonly control?: boolean;
  readonly calls: number;
  /** Calls that ran (not refused by a rule): the ones with a latency. */
  readonly timed: number;
  readonly errors: number;
  readonly errorsByClass: Readonly<Record<string, number>>;
  readonly rows: number;
  readonly totalMs: number;
  readonly sketch: SketchJson | null;
  /** Timed calls per latency bucket (LATENCY_BUCKETS_MS, then +Inf), for the Prometheus histogram. */
  readonly buckets?: readonly number[];
  /** The newest latencies of the window (ms), oldest first, at most BatcherOptions.maxRecent. */
  readonly recent: readonly number[];
  readonly users: readonly string[];
  readonly databases: readonly string[];
  readonly applications: readonly string[];
  readonly exemplars: readonly Exemplar[];
}

export function sketchToJson(sketch: DDSketch): SketchJson | null {
  if (sketch.count === 0) return null;
  const store = sketch.store;
  const out: number[] = [sketch.zeroCount, sketch.count, sketch.sum, sketch.min, sketch.max];
  if (store.count === 0) return out;
  out.push(store.minKey);
  for (let key = store.minKey; key <= store.maxKey; key++) out.push(store.bins[key - store.offset] ?? 0);
  return out;
}

export function sketchFromJson(json: SketchJson): DDSketch {
  const sketch = newSketch();
  if (!Array.isArray(json) || json.length < 5 || !json.every((n) => typeof n === 'number' && Number.isFinite(n))) {
    throw new Error('not a sketch: expected [zeroCount, count, sum, min, max, firstKey, ...bins]');
  }
  const [zeroCount, count, sum, min, max, firstKey] = json;
  for (let i = 6; i < json.length; i++) if (json[i] > 0) sketch.store.add(firstKey + i - 6, json[i]);
  sketch.zeroCount = zeroCount;
  sketch.count = count;
  sketch.sum = sum;
  sketch.min = min;
  sketch.max = max;
  return sketch;
}

/** The shape of a completed statement (the collector's lookup, for the batcher). */
export function shapeOfCompletion(finder: ShapeFinder, c: QueryCompletion): StatementShape {
  if (c.statement !== null) return finder.shapeOfStatement(c.statement);
  const shapes = finder.shapesOfText(c.text);
  return shapes[Math.min(c.statementIndex, shapes.length - 1)];
}

export function exemplarOf(c: QueryCompletion): Exemplar {
  const s: SessionInfo = c.session;
  return {
    text: c.text,
    statement: c.statement === null ? null : { text: c.statement.text, paramTypes: [...c.statement.paramTypes] },
    statementIndex: c.statementIndex,
    execution: c.execution,
    bind: c.bind === null ? null : c.bind.toString('base64'),
    user: s.user,
    database: s.database,
    applicationName: s.applicationName,
    clientAddress: s.clientAddress,
    settings: Object.fromEntries(s.settings),
    startedAt: c.startedAt,
    durationMs: c.durationMs,
    rows: c.rows,
    sqlstate: c.sqlstate,
    upstream: c.upstream,
  };
}

export interface BatcherOptions {
  readonly clock: Clock;
  /** Latencies kept per shape and window for the detector (the newest). */
  readonly maxRecent?: number;
  /** One exemplar per shape at most this often (ms). */
  readonly exemplarIntervalMs?: number;
  /** Commands whose every successful execution is an exemplar (DDL: each one is an event). */
  readonly everyExecutionOf?: ReadonlySet<string>;
  /** Exemplars of such commands kept per shape and window. */
  readonly maxEveryExecution?: number;
  /**
   * Distinct shapes per window (default 5000); further ones are counted under the
   * overflow shape, so a flood of distinct texts cannot swell a report without bound.
   */
  readonly maxShapes?: number;
}

const MAX_NAMES = 32;

/** One shape's totals for the current window. */
class Pending {
  calls = 0;
  timed = 0;
  errors = 0;
  errorsByClass: Record<string, number> | null = null;
  rows = 0;
  totalMs = 0;
  readonly sketch = newSketch();
  readonly buckets = new Float64Array(LATENCY_BUCKETS_MS.length + 1);
  readonly recent: Float64Array;
  recentNext = 0;
  recentCount = 0;
  readonly users = new Set<string>();
  readonly databases = new Set<string>();
  readonly applications = new Set<string>();
  lastSession: SessionInfo | null = null;
  lastApplication = '';
  readonly exemplars: Exemplar[] = [];

  constructor(
    readonly shape: StatementShape,
    maxRecent: number,
  ) {
    this.recent = new Float64Array(maxRecent);
  }
}

/** Accumulates completions into per-shape summaries until drained (the worker's side). */
export class SummaryBatcher {
  private pending = new Map<string, Pending>();
  private readonly lastExemplar: LRUCache<string, number>;
  private readonly maxRecent: number;
  private readonly exemplarIntervalMs: number;
  private readonly everyExecutionOf: ReadonlySet<string>;
  private readonly maxEveryExecution: number;
  private readonly maxShapes: number;
  private static readonly overflowShape: StatementShape = {
    fingerprint: OVERFLOW_FINGERPRINT,
    query: OVERFLOW_QUERY,
    command: '',
    fallback: true,
  };

  constructor(
    private readonly finder: ShapeFinder,
    private readonly options: BatcherOptions,
  ) {
    this.maxRecent = options.maxRecent ?? 128;
    this.exemplarIntervalMs = options.exemplarIntervalMs ?? 1000;
    this.everyExecutionOf = options.everyExecutionOf ?? new Set();
    this.maxEveryExecution = options.maxEveryExecution ?? 16;
    this.maxShapes = options.maxShapes ?? 5000;
    this.lastExemplar = new LRUCache({ max: 10_000 });
  }

  readonly observe: QueryObserver = (c) => {
    if (c.session.replication) return; // replication commands are not SQL shapes
    let shape = shapeOfCompletion(this.finder, c);
    let p = this.pending.get(shape.fingerprint);
    if (p === undefined) {
      if (this.pending.size >= this.maxShapes) {
        shape = SummaryBatcher.overflowShape;
        p = this.pending.get(shape.fingerprint);
      }
      if (p === undefined) {
        p = new Pending(shape, this.maxRecent);
        this.pending.set(shape.fingerprint, p);
      }
    }
    p.calls++;
    p.rows += c.rows;
    if (c.sqlstate !== null) {
      p.errors++;
      const errorClass = c.sqlstate.slice(0, 2);
      p.errorsByClass ??= {};
      p.errorsByClass[errorClass] = (p.errorsByClass[errorClass] ?? 0) + 1;
    }
    if (!c.refused) {
      const ms = Math.max(c.durationMs, 0);
      p.timed++;
      p.totalMs += c.durationMs;
      p.sketch.accept(ms);
      p.buckets[latencyBucket(ms)]++;
      p.recent[p.recentNext] = ms;
      p.recentNext = (p.recentNext + 1) % p.recent.length;
      if (p.recentCount < p.recent.length) p.recentCount++;
    }
    const session = c.session;
    if (session !== p.lastSession || session.applicationName !== p.lastApplication) {
      p.lastSession = session;
      p.lastApplication = session.applicationName;
      addName(p.users, session.user);
      addName(p.databases, session.database);
      addName(p.applications, session.applicationName);
    }
    if (c.sqlstate === null && !c.refused && shape !== SummaryBatcher.overflowShape) this.maybeExemplar(p, c);
  };

  /** Whether anything waits to be drained. */
  get size(): number {
    return this.pending.size;
  }

  /** The summaries of the window now ending; the next window starts empty. */
  drain(): ShapeSummary[] {
    const out: ShapeSummary[] = [];
    for (const p of this.pending.values()) {
      const recent: number[] = [];
      for (let i = 0; i < p.recentCount; i++)
        recent.push(p.recent[(p.recentNext - p.recentCount + i + p.recent.length) % p.recent.length]);
      out.push({
        fingerprint: p.shape.fingerprint,
        query: p.shape.query,
        command: p.shape.command,
        fallback: p.shape.fallback,
        kind: p.shape.kind ?? '',
        control: p.shape.control ?? false,
        calls: p.calls,
        timed: p.timed,
        errors: p.errors,
        errorsByClass: p.errorsByClass ?? {},
        rows: p.rows,
        totalMs: p.totalMs,
        sketch: sketchToJson(p.sketch),
        buckets: Array.from(p.buckets),
        recent,
        users: [...p.users],
        databases: [...p.databases],
        applications: [...p.applications],
        exemplars: p.exemplars,
      });
    }
    this.pending = new Map();
    return out;
  }

  private maybeExemplar(p: Pending, c: QueryCompletion): void {
    if (this.everyExecutionOf.has(p.shape.command)) {
      if (p.exemplars.length < this.maxEveryExecution) p.exemplars.push(exemplarOf(c));
      return;
    }
    if (p.exemplars.length > 0) return;
    const now = this.options.clock.now();
    const last = this.lastExemplar.get(p.shape.fingerprint);
    if (last !== undefined && now - last < this.exemplarIntervalMs) return;
    this.lastExemplar.set(p.shape.fingerprint, now);
    p.exemplars.push(exemplarOf(c));
  }
}

function addName(names: Set<string>, name: string): void {
  if (name !== '' && names.size < MAX_NAMES) names.add(name);
}

/**
 * A completion rebuilt from an exemplar, for the listeners of the process that
 * owns the statistics (EXPLAIN sampling, the DDL timeline). Session ids are local
 * to each worker, so the rebuilt session has id -1.
 */
export function completionOfExemplar(e: Exemplar): QueryCompletion {
  return {
    session: {
      id: -1,
      user: e.user,
      database: e.database,
      applicationName: e.applicationName,
      clientAddress: e.clientAddress,
      replication: false,
      settings: new Map(Object.entries(e.settings ?? {})),
    },
    text: e.text,
    statement: e.statement === null ? null : { name: '', text: e.statement.text, paramTypes: e.statement.paramTypes },
    statementIndex: e.statementIndex,
    execution: e.execution ?? 0,
    bind: e.bind === null ? null : Buffer.from(e.bind, 'base64'),
    startedAt: e.startedAt,
    durationMs: e.durationMs,
    rows: e.rows,
    sqlstate: e.sqlstate,
    upstream: e.upstream,
    refused: false,
  };
}
