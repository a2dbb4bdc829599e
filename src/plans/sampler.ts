// EXPLAIN sampling: picks executions of each shape to explain (on first sight,
// periodically, and at once when asked: a latency jump, a schema change touching
// the shape's tables), runs them through the monitoring connection at a bounded
// rate, keeps each shape's plan history and records a plan-change event with a
// readable diff whenever the plan fingerprint changes. A failure here is logged
// and never reaches the query path.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { EventLog } from '../events/timeline.ts';
import { decodeBindParameters } from '../protocol/frontend.ts';
import type { QueryCompletion } from '../proxy/seam.ts';
import type { StatementShape } from '../shapes/fingerprint.ts';
import type { ShapeStats } from '../shapes/registry.ts';
import { explainSample, NotSampled } from './explain.ts';
import type { MonitorPool } from './monitor.ts';
import { parametersAsText } from './params.ts';
import { describeEstimates, describePlan, diffPlans, summarizePlan, type PlanDiff, type PlanSummary } from './plan.ts';

/** Statements EXPLAIN can describe; everything else is never sampled. */
const EXPLAINABLE = new Set(['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'WITH', 'VALUES', 'TABLE', 'MERGE']);
const MAX_HISTORY = 10;
/** PostgreSQL 18 made search_path a reported (ParameterStatus) setting. */
const SEARCH_PATH_REPORTED_SINCE = 18;

export interface PlanRecord {
  readonly summary: PlanSummary;
  readonly firstSeen: number;
  lastSeen: number;
  samples: number;
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
  lastSampledAt = 0;
  inFlight = false;
  /** A sample is wanted at the next execution, whatever the period says. */
  wanted = true;
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

  /** Indexes used by any plan this shape has had. */
  indexes(): Set<string> {
    const out = new Set<string>();
    for (const record of this.history) for (const name of record.summary.indexes) out.add(name.toLowerCase());
    return out;
  }

  /** Tables and indexes of every plan this shape has had. */
  objects(): Set<string> {
    const out = new Set<string>();
    for (const record of this.history)
      for (const name of [...record.summary.relations, ...record.summary.indexes]) out.add(name.toLowerCase());
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
    if (shape.fallback || !EXPLAINABLE.has(shape.command) || c.sqlstate !== null) return;
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
    if (plans.inFlight || (!plans.wanted && now - plans.lastSampledAt < this.options.periodMs)) return;
    if (this.queue.length >= this.options.queueLimit) return;
    const sample = this.capture(shape.fingerprint, c);
    if (sample === null) return;
    plans.inFlight = true;
    plans.wanted = false;
    plans.lastSampledAt = now;
    if (keep > 0 && (sample.params !== null || c.statement === null))
      this.keepSample(plans, c, keep, now, sample.params ?? []);
    this.queue.push(sample);
    this.pump();
  };

  /** Asks for a fresh plan of `fingerprint` at its next execution. */
  resample(fingerprint: string): void {
    const plans = this.shapes.get(fingerprint);
    if (plans) plans.wanted = true;
  }

  /** Asks for fresh plans of every shape whose plans touch one of `objects` (all shapes if empty). */
  resampleTouching(objects: readonly string[]): number {
    let count = 0;
    const wanted = new Set(objects.map((o) => o.toLowerCase()));
    for (const [fingerprint, plans] of this.shapes) {
      const touches = wanted.size === 0 || [...plans.objects()].some((o) => wanted.has(o));
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
      return { shape, database: c.session.database, ...who, text: c.text, params: null, paramCount: 0 };
    }
    let params: (string | null)[] | null = null;
    let paramCount = 0;
    if (c.bind !== null) {
      try {
        paramCount = decodeBindParameters(c.bind).values.length;
        params = parametersAsText(c.bind, c.statement.paramTypes);
      } catch {
        return null;
      }
    }
    return { shape, database: c.session.database, ...who, text: c.statement.text, params, paramCount };
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
      const json = await explainSample(this.options.monitor, { ...sample, settings }, version);
      this.explained++;
      if (plans) {
        plans.lastError = null;
        plans.notSampled = null;
        this.record(sample.shape, plans, summarizePlan(json));
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

  private record(shape: string, plans: ShapePlans, summary: PlanSummary): void {
    const now = this.options.clock.now();
    const previous = plans.current;
    if (previous !== null && previous.summary.fingerprint === summary.fingerprint) {
      previous.lastSeen = now;
      previous.samples++;
      return;
    }
    let record = plans.history.find((r) => r.summary.fingerprint === summary.fingerprint);
    if (record === undefined) {
      record = { summary, firstSeen: now, lastSeen: now, samples: 1 };
      plans.history.push(record);
      if (plans.history.length > MAX_HISTORY) plans.history.shift();
    } else {
      record.lastSeen = now;
      record.samples++;
    }
    plans.current = record;
    if (previous === null) return; // the first plan is the baseline, not a change
    const diff = diffPlans(previous.summary, summary);
    const change: PlanChange = { at: now, from: previous.summary.fingerprint, to: summary.fingerprint, diff };
    plans.changes.push(change);
    if (plans.changes.length > MAX_HISTORY) plans.changes.shift();
    const objects = new Set(
      [...previous.summary.relations, ...previous.summary.indexes, ...summary.relations, ...summary.indexes].map((o) =>
        o.toLowerCase(),
      ),
    );
    this.options.events.add({
      type: 'plan_change',
      fingerprint: shape,
      summary: diff.headline || `${describePlan(previous.summary)} -> ${describePlan(summary)}`,
      objects: [...objects],
      details: {
        from: change.from,
        to: change.to,
        removed: diff.removed,
        added: diff.added,
        before: describePlan(previous.summary),
        after: describePlan(summary),
        estimates_before: describeEstimates(previous.summary),
        estimates_after: describeEstimates(summary),
      },
    });
    this.options.log.info(
      { fingerprint: shape, from: change.from, to: change.to, diff: diff.headline },
      'plan changed',
    );
  }
}
