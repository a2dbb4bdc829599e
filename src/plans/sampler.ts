// EXPLAIN sampling: picks executions of each shape to explain (on first sight,
// periodically, and at once when asked: a latency jump, a schema change touching
// the shape's tables), runs them through the monitoring connection at a bounded
// rate, keeps each shape's plan history and records a plan-change event with a
// readable diff whenever the plan fingerprint changes. A failure here is logged
// and never reaches the query path.
//
// Two things make one shape have several plans at once without anything having
// changed, and neither must read as a plan change:
// - Tenants: sessions whose search_path points at different schemas run the same
//   query on different tables. Plans name their schemas (see plan.ts), and a
//   shape's current plan is kept per schema context (the schemas its plan reads),
//   so a plan is only ever compared with the previous plan of the same tenant.
//   Contexts are bounded (MAX_CONTEXTS, least recently sampled forgotten: its next
//   sample is a new baseline, not a change). Which tenant an execution belongs to
//   is only known once explained, but its session's search_path (and user, where
//   the path names "$user") says where its names resolve: the first execution from
//   each search_path is sampled, and a fresh plan wanted of a shape (a schema
//   change, a latency jump) is taken from each search_path seen.
// - Prepared statements: an execution gets a custom or the generic plan (see
//   explain.ts). The kind is recorded with the plan, and a plan change that comes
//   with a switch from custom to generic says so: that switch is its cause.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { EventLog } from '../events/timeline.ts';
import { decodeBindParameters } from '../protocol/frontend.ts';
import type { PreparedStatement, QueryCompletion } from '../proxy/seam.ts';
import type { StatementShape } from '../shapes/fingerprint.ts';
import type { ShapeStats } from '../shapes/registry.ts';
import { CUSTOM_PLANS_FIRST, explainExecution, NotSampled, type Explained, type PlanKind } from './explain.ts';
import type { MonitorPool } from './monitor.ts';
import { parametersAsText } from './params.ts';
import { describeEstimates, describePlan, diffPlans, summarizePlan, type PlanDiff, type PlanSummary } from './plan.ts';
import { RelationSet } from './relations.ts';

/** Statements EXPLAIN can describe; everything else is never sampled. */
const EXPLAINABLE = new Set(['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'WITH', 'VALUES', 'TABLE', 'MERGE']);
const MAX_HISTORY = 10;
/** Schema contexts (tenants) whose current plan a shape remembers. */
const MAX_CONTEXTS = 64;
/** Search paths (with users, where the path names "$user") whose executions a shape tracks. */
const MAX_PATHS = 64;
/** PostgreSQL 18 made search_path a reported (ParameterStatus) setting. */
const SEARCH_PATH_REPORTED_SINCE = 18;

export interface PlanRecord {
  readonly summary: PlanSummary;
  readonly firstSeen: number;
  lastSeen: number;
  samples: number;
  /** Custom or generic plan of a prepared statement, as last sampled; null for a simple Query or no parameters. */
  kind: PlanKind | null;
  /** Why that kind (explain.ts's reason), or null. */
  kindReason: string | null;
  /** The session's plan_cache_mode when last sampled. */
  planCacheMode: string | null;
}

export interface PlanChange {
  readonly at: number;
  readonly from: string;
  readonly to: string;
  readonly diff: PlanDiff;
}

/**
 * One execution's values, kept for the workload export only when the operator
 * allows it (workload_sample_params): the text as run, whose literals are values
 * too, and the Bind parameters as text ([] for a simple Query).
 */
export interface ParamSample {
  readonly text: string;
  readonly params: readonly (string | null)[];
}

export class ShapePlans {
  current: PlanRecord | null = null;
  readonly history: PlanRecord[] = [];
  readonly changes: PlanChange[] = [];
  /** The current plan per schema context (the schemas its plan reads, e.g. "tenant_b"), most recent last. */
  readonly contexts = new Map<string, PlanRecord>();
  lastSampledAt = 0;
  inFlight = false;
  /** Samples wanted at the next executions, whatever the period says. */
  wanted = 1;
  /** Search path -> user ('' when the path does not name "$user") -> a fresh sample is wanted. */
  private readonly paths = new Map<string, Map<string, boolean>>();
  private pathCount = 0;

  /** Whether an execution from this search path is due: never sampled, or wanted again. */
  pathDue(path: string, user: string): boolean {
    const wanted = this.paths.get(path)?.get(user);
    if (wanted === undefined) return this.pathCount < MAX_PATHS;
    return wanted;
  }

  /** An execution from this search path was just sampled. */
  pathSampled(path: string, user: string): void {
    let users = this.paths.get(path);
    if (users === undefined) {
      if (this.pathCount >= MAX_PATHS) return;
      users = new Map();
      this.paths.set(path, users);
    }
    if (!users.has(user)) {
      if (this.pathCount >= MAX_PATHS) return;
      this.pathCount++;
    }
    users.set(user, false);
  }

  /** A fresh plan is wanted from every search path seen. */
  wantEveryPath(): void {
    for (const users of this.paths.values()) for (const user of users.keys()) users.set(user, true);
  }
  /** Why the last attempt failed, if it did. */
  lastError: string | null = null;
  /** Why the last sample was refused without being planned ("not sampled: ..."), if it was. */
  notSampled: string | null = null;
  /** Parameter type OIDs declared in Parse (0: undeclared); null until an extended-protocol execution is seen. */
  paramTypes: readonly number[] | null = null;
  /** Recent distinct executions' values, only with SamplerOptions.keepSamples. */
  readonly samples: ParamSample[] = [];
  /** When the last sample was kept: until there are enough, at most one a second. */
  lastKeptAt = 0;

  /** Indexes used by any plan this shape has had (schema-qualified when the plan said). */
  indexes(): RelationSet {
    const out = new RelationSet();
    for (const record of this.history) for (const name of record.summary.indexes) out.add(name);
    return out;
  }

  /** Tables and indexes of every plan this shape has had. */
  objects(): RelationSet {
    const out = new RelationSet();
    for (const record of this.history)
      for (const name of [...record.summary.relations, ...record.summary.indexes]) out.add(name);
    return out;
  }
}

export interface SamplerOptions {
  readonly monitor: MonitorPool;
  readonly events: EventLog;
  readonly clock: Clock;
  readonly log: Logger;
  /** Re-sample each shape at least this often. */
  readonly periodMs: number;
  /** Upper bound on EXPLAINs per second across all shapes. */
  readonly maxPerSecond: number;
  /** Samples waiting beyond this are dropped (the next period retries). */
  readonly queueLimit: number;
  readonly concurrency: number;
  /** Parameter sets kept per shape for the workload export; 0 (the default) keeps none. */
  readonly keepSamples?: number;
}

interface Sample {
  readonly shape: string;
  readonly database: string;
  readonly user: string;
  /** The session's settings when it ran (startup packet, reported search_path). */
  readonly settings: readonly (readonly [string, string])[];
  /** Settings the session changed with SET statements the sampler saw. */
  readonly changed: readonly (readonly [string, string])[];
  readonly text: string;
  readonly params: (string | null)[] | null;
  readonly paramCount: number;
  /** Which Bind of its prepared statement the execution was (0 for a simple Query). */
  readonly execution: number;
  readonly paramTypes: readonly number[];
  /** The values of the statement's first executions, as far as seen (null: not seen, or not renderable). */
  readonly firstValues: (string | null)[][] | null;
}

export class PlanSampler {
  private readonly shapes = new Map<string, ShapePlans>();
  private readonly queue: Sample[] = [];
  private running = 0;
  private tokens: number;
  private lastRefill: number;
  private serverVersion: Promise<number> | null = null;
  /** Per session, settings it changed with a plain SET (see trackSet). */
  private readonly sessionSets = new WeakMap<object, Map<string, string>>();
  /**
   * The Bind messages of each named statement's first executions (CUSTOM_PLANS_FIRST
   * of them): the values the server costed its custom plans with before it chose
   * between them and the generic plan. Bind messages are copies the proxy made for
   * the completion observers, so keeping them costs no copy; a statement's entry
   * goes with the statement (a new Parse, the session's end).
   */
  private readonly firstBinds = new WeakMap<PreparedStatement, Buffer[]>();
  private timer: NodeJS.Timeout | null = null;
  explained = 0;
  failed = 0;
  /** Samples refused because planning could run code the monitor must not run. */
  refused = 0;

  constructor(private readonly options: SamplerOptions) {
    this.tokens = options.maxPerSecond;
    this.lastRefill = options.clock.now();
  }

  /** Subscribed to the shape collector: decides whether this execution is sampled. */
  readonly observe = (_stats: ShapeStats, shape: StatementShape, c: QueryCompletion): void => {
    if ((shape.command === 'SET' || shape.command === 'RESET') && c.sqlstate === null) this.trackSet(c);
    if (shape.fallback || !EXPLAINABLE.has(shape.command)) return;
    // A failed execution was planned too: it counts among the server's first custom plans.
    // Named statements only: drivers parse the unnamed one afresh for each execution,
    // and remembering its Bind would cost an allocation per query for nothing.
    if (
      c.execution >= 1 &&
      c.execution <= CUSTOM_PLANS_FIRST &&
      c.bind !== null &&
      c.statement !== null &&
      c.statement.name !== ''
    )
      this.rememberBind(c.statement, c.execution, c.bind);
    if (c.sqlstate !== null) return;
    let plans = this.shapes.get(shape.fingerprint);
    if (plans === undefined) {
      plans = new ShapePlans();
      this.shapes.set(shape.fingerprint, plans);
    }
    const now = this.options.clock.now();
    if (plans.paramTypes === null && c.statement !== null) plans.paramTypes = [...c.statement.paramTypes];
    // Until the shape has its samples, one execution a second; then one per EXPLAIN sample.
    const keep = this.options.keepSamples ?? 0;
    if (keep > 0 && plans.samples.length < keep && now - plans.lastKeptAt >= 1000) this.keepSample(plans, c, keep, now);
    if (plans.inFlight) return;
    // Where the session's names resolve (no allocation: looked up, not built).
    const path = c.session.settings.get('search_path') ?? this.sessionSets.get(c.session)?.get('search_path') ?? '';
    const user = path === '' || path.includes('$user') ? c.session.user : '';
    if (plans.wanted === 0 && !plans.pathDue(path, user) && now - plans.lastSampledAt < this.options.periodMs) return;
    if (this.queue.length >= this.options.queueLimit) return;
    const sample = this.capture(shape.fingerprint, c);
    if (sample === null) return;
    plans.inFlight = true;
    plans.wanted = Math.max(0, plans.wanted - 1);
    plans.pathSampled(path, user);
    plans.lastSampledAt = now;
    if (keep > 0 && (sample.params !== null || c.statement === null))
      this.keepSample(plans, c, keep, now, sample.params ?? []);
    this.queue.push(sample);
    this.pump();
  };

  /** Asks for a fresh plan of `fingerprint` at its next execution, and at the next from each search path seen. */
  resample(fingerprint: string): void {
    const plans = this.shapes.get(fingerprint);
    if (!plans) return;
    plans.wanted = 1;
    plans.wantEveryPath();
  }

  /**
   * Asks for fresh plans of every shape whose plans touch one of `objects` (all
   * shapes if empty), among those `only` accepts (all if absent: the caller knows
   * which shapes a change can concern, e.g. those of its database).
   */
  resampleTouching(objects: readonly string[], only?: (fingerprint: string) => boolean): number {
    let count = 0;
    for (const [fingerprint, plans] of this.shapes) {
      if (only !== undefined && !only(fingerprint)) continue;
      const known = objects.length === 0 ? null : plans.objects();
      const touches = known === null || objects.some((o) => known.has(o));
      if (touches || plans.current === null) {
        this.resample(fingerprint);
        count++;
      }
    }
    return count;
  }

  plansOf(fingerprint: string): ShapePlans | undefined {
    return this.shapes.get(fingerprint);
  }

  /** Forgets shapes the registry no longer tracks. */
  retain(isTracked: (fingerprint: string) => boolean): void {
    for (const fingerprint of this.shapes.keys()) if (!isTracked(fingerprint)) this.shapes.delete(fingerprint);
  }

  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.queue.length = 0;
  }

  /** Keeps the Bind of execution `n` (1-based) of `statement`, in order: a gap (a sample missed) stops the list. */
  private rememberBind(statement: PreparedStatement, n: number, bind: Buffer): void {
    let binds = this.firstBinds.get(statement);
    if (binds === undefined) {
      if (n !== 1) return;
      binds = [];
      this.firstBinds.set(statement, binds);
    }
    if (binds.length === n - 1) binds.push(bind);
  }

  /** The first executions' values as text, or null when none was seen or one cannot be rendered. */
  private firstValuesOf(statement: PreparedStatement): (string | null)[][] | null {
    const binds = this.firstBinds.get(statement);
    if (binds === undefined || binds.length === 0) return null;
    const out: (string | null)[][] = [];
    for (const bind of binds) {
      const values = parametersAsText(bind, statement.paramTypes);
      if (values === null) return null;
      out.push(values);
    }
    return out;
  }

  /** Keeps this execution's values (distinct from those kept, newest last). */
  private keepSample(
    plans: ShapePlans,
    c: QueryCompletion,
    keep: number,
    now: number,
    rendered?: (string | null)[],
  ): void {
    plans.lastKeptAt = now;
    let params = rendered ?? [];
    if (rendered === undefined && c.statement !== null && c.bind !== null) {
      try {
        const values = parametersAsText(c.bind, c.statement.paramTypes);
        if (values === null) return;
        params = values;
      } catch {
        return;
      }
    }
    const text = c.statement?.text ?? c.text;
    const same = plans.samples.findIndex(
      (s) => s.text === text && s.params.length === params.length && s.params.every((v, i) => v === params[i]),
    );
    if (same !== -1) plans.samples.splice(same, 1);
    plans.samples.push({ text, params });
    if (plans.samples.length > keep) plans.samples.shift();
  }

  /**
   * Remembers `SET [SESSION] search_path|plan_cache_mode ...` and `RESET` of them,
   * run as a statement of its own, so later samples of the session plan with them.
   * search_path is also reported by the server (PostgreSQL 18+), which wins; SET
   * LOCAL, a SET rolled back with its transaction or one inside a multi-statement
   * Query are not followed.
   */
  private trackSet(c: QueryCompletion): void {
    const set = /^\s*set\s+(?:session\s+)?(search_path|plan_cache_mode)\s*(?:=|\bto\b)\s*([^;]*?)\s*;?\s*$/i.exec(
      c.text,
    );
    const reset = /^\s*reset\s+(search_path|plan_cache_mode|all)\s*;?\s*$/i.exec(c.text);
    if (set === null && reset === null) return;
    let sets = this.sessionSets.get(c.session);
    if (sets === undefined) {
      sets = new Map();
      this.sessionSets.set(c.session, sets);
    }
    if (reset !== null) {
      if (reset[1].toLowerCase() === 'all') sets.clear();
      else sets.delete(reset[1].toLowerCase());
      return;
    }
    const name = set![1].toLowerCase();
    // SET takes 'quoted' items or identifiers; set_config takes the list as text,
    // where a name that must keep its case or spaces is "double-quoted".
    const value = set![2]
      .split(',')
      .map((item) => {
        const quoted = /^'(.*)'$/s.exec(item.trim());
        if (quoted === null) return item.trim();
        const text = quoted[1].replace(/''/g, "'");
        return name === 'search_path' ? `"${text.replace(/"/g, '""')}"` : text;
      })
      .join(', ');
    if (/^default$/i.test(value)) sets.delete(name);
    else sets.set(name, value);
  }

  /** Copies what the EXPLAIN needs out of the (reused) completion event. */
  private capture(shape: string, c: QueryCompletion): Sample | null {
    const who = {
      user: c.session.user,
      settings: [...(c.session.settings ?? [])],
      changed: [...(this.sessionSets.get(c.session) ?? [])],
    };
    if (c.statement === null) {
      return {
        shape,
        database: c.session.database,
        ...who,
        text: c.text,
        params: null,
        paramCount: 0,
        execution: 0,
        paramTypes: [],
        firstValues: null,
      };
    }
    let params: (string | null)[] | null = null;
    let paramCount = 0;
    let firstValues: (string | null)[][] | null = null;
    if (c.bind !== null) {
      try {
        paramCount = decodeBindParameters(c.bind).values.length;
        params = parametersAsText(c.bind, c.statement.paramTypes);
        if (c.execution > CUSTOM_PLANS_FIRST) firstValues = this.firstValuesOf(c.statement);
      } catch {
        return null;
      }
    }
    return {
      shape,
      database: c.session.database,
      ...who,
      text: c.statement.text,
      params,
      paramCount,
      execution: c.execution,
      paramTypes: [...c.statement.paramTypes],
      firstValues,
    };
  }

  private pump(): void {
    const now = this.options.clock.now();
    this.tokens = Math.min(
      this.options.maxPerSecond,
      this.tokens + ((now - this.lastRefill) / 1000) * this.options.maxPerSecond,
    );
    this.lastRefill = now;
    while (this.queue.length > 0 && this.running < this.options.concurrency && this.tokens >= 1) {
      this.tokens -= 1;
      this.running++;
      void this.run(this.queue.shift()!);
    }
    if (this.queue.length > 0 && this.timer === null) {
      // Out of tokens or slots: try again shortly.
      this.timer = setTimeout(() => {
        this.timer = null;
        this.pump();
      }, 100);
      this.timer.unref();
    }
  }

  private async run(sample: Sample): Promise<void> {
    const plans = this.shapes.get(sample.shape);
    try {
      this.serverVersion ??= this.options.monitor.serverMajorVersion();
      const version = await this.serverVersion;
      // From PostgreSQL 18 the server reports search_path itself: that beats a SET we parsed.
      const reported =
        version >= SEARCH_PATH_REPORTED_SINCE && sample.settings.some(([name]) => name === 'search_path');
      const settings = [
        ...sample.settings,
        ...sample.changed.filter(([name]) => !(reported && name === 'search_path')),
      ];
      const explained = await explainExecution(this.options.monitor, { ...sample, settings }, version);
      this.explained++;
      if (plans) {
        plans.lastError = null;
        plans.notSampled = null;
        this.record(sample.shape, plans, summarizePlan(explained.plan), explained);
      }
    } catch (err) {
      if (err instanceof NotSampled) {
        this.refused++;
        if (plans) plans.notSampled = err.message;
        this.options.log.debug({ fingerprint: sample.shape, reason: err.message }, 'statement not sampled');
        return;
      }
      this.failed++;
      if (this.serverVersion && (err as Error).message.includes('connect')) this.serverVersion = null;
      if (plans) plans.lastError = (err as Error).message;
      this.options.log.debug({ err, fingerprint: sample.shape }, 'EXPLAIN sample failed');
    } finally {
      if (plans) plans.inFlight = false;
      this.running--;
      this.pump();
    }
  }

  private record(shape: string, plans: ShapePlans, summary: PlanSummary, explained: Explained): void {
    const now = this.options.clock.now();
    const context = summary.schemas.join(',');
    const previous = plans.contexts.get(context) ?? null;
    const previousKind = previous?.kind ?? null;
    let record = plans.history.find((r) => r.summary.fingerprint === summary.fingerprint);
    if (record === undefined) {
      record = {
        summary,
        firstSeen: now,
        lastSeen: now,
        samples: 1,
        kind: null,
        kindReason: null,
        planCacheMode: null,
      };
      plans.history.push(record);
      if (plans.history.length > MAX_HISTORY) plans.history.shift();
    } else {
      record.lastSeen = now;
      record.samples++;
    }
    record.kind = explained.kind;
    record.kindReason = explained.reason;
    record.planCacheMode = explained.planCacheMode;
    plans.current = record;
    // Most recently sampled context last, so the first is the one to forget.
    plans.contexts.delete(context);
    plans.contexts.set(context, record);
    if (plans.contexts.size > MAX_CONTEXTS) plans.contexts.delete(plans.contexts.keys().next().value as string);
    // The first plan of a context is its baseline, not a change.
    if (previous === null || previous.summary.fingerprint === summary.fingerprint) return;
    const diff = diffPlans(previous.summary, summary);
    const change: PlanChange = { at: now, from: previous.summary.fingerprint, to: summary.fingerprint, diff };
    plans.changes.push(change);
    if (plans.changes.length > MAX_HISTORY) plans.changes.shift();
    const before = [...previous.summary.relations, ...previous.summary.indexes].map((o) => o.toLowerCase());
    const after = [...summary.relations, ...summary.indexes].map((o) => o.toLowerCase());
    const switched = kindSwitch(previousKind, record.kind, explained.planCacheMode);
    const headline = diff.headline || `${describePlan(previous.summary)} -> ${describePlan(summary)}`;
    this.options.events.add({
      type: 'plan_change',
      fingerprint: shape,
      summary: switched === null ? headline : `${headline} (${switched})`,
      objects: [...new Set([...before, ...after])],
      details: {
        from: change.from,
        to: change.to,
        removed: diff.removed,
        added: diff.added,
        before: describePlan(previous.summary),
        after: describePlan(summary),
        estimates_before: describeEstimates(previous.summary),
        estimates_after: describeEstimates(summary),
        // Tables and indexes the old plan used and the new one does not: what a DDL must have touched.
        removed_objects: before.filter((o) => !after.includes(o)),
        schemas: summary.schemas,
        kind_before: previousKind,
        kind_after: record.kind,
        kind_reason: record.kindReason,
        plan_cache_mode: explained.planCacheMode,
        ...(switched === null ? {} : { kind_switch: switched }),
      },
    });
    this.options.log.info(
      {
        fingerprint: shape,
        from: change.from,
        to: change.to,
        diff: diff.headline,
        kind: record.kind,
        previousKind,
      },
      'plan changed',
    );
  }
}

/** Why a plan changed when its kind did: the server's switch to the generic plan, or a setting forcing one. */
export function kindSwitch(before: PlanKind | null, after: PlanKind | null, planCacheMode: string): string | null {
  if (before === null || after === null || before === after) return null;
  if (after === 'generic') {
    return planCacheMode === 'force_generic_plan'
      ? 'plan_cache_mode = force_generic_plan: the server now uses the generic plan of this prepared statement'
      : `the server switched this prepared statement to its generic plan after ${CUSTOM_PLANS_FIRST} executions`;
  }
  return planCacheMode === 'force_custom_plan'
    ? 'plan_cache_mode = force_custom_plan: the server now plans each execution of this prepared statement'
    : 'the server plans each execution of this prepared statement again (custom plans)';
}
