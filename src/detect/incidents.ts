// Regression incidents, one per cause. Every couple of seconds each busy shape is
// compared with its own baseline (detector.ts), then the shapes found slow are
// grouped before anything opens:
//   - a shape whose plan is confirmed to have changed and whose p95 jumped is a
//     root: its incident opens at once, and shapes that slow down beside it with no
//     plan change of their own are its victims (a seq scan starving the others);
//   - most shapes slowing together with no plan change is one database-wide
//     incident (the database or its host is saturated), never one per shape;
//   - a shape regressed on its own for the usual run of evaluations, with the
//     others and the proxy-to-database round trip normal, is a root too.
// An incident names its suspected causes (attribution.ts, plus any CauseProvider),
// freezes them once attributed, keeps its peak, and records what ended it (the fix,
// the plan flipping back) as its resolution. Baselines and the incident history are
// saved through a DetectorStateStore, so a restarted pgwarden is not blind.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import { RelationSet } from '../plans/relations.ts';
import type { PlanSampler } from '../plans/sampler.ts';
import type { QueryCompletion } from '../proxy/seam.ts';
import type { StatementShape } from '../shapes/fingerprint.ts';
import type { ShapeRegistry, ShapeStats } from '../shapes/registry.ts';
import {
  isAttributed,
  NEARBY_MS,
  round3,
  summaryOf,
  timelineCauses,
  touchedObjects,
  whenOf,
  type PlanKnowledge,
} from './attribution.ts';
import {
  baselineOf,
  isJump,
  isRecovered,
  isRegressed,
  isSlowed,
  onsetOf,
  recentOf,
  ShapeWatch,
  type BaselineSource,
  type DetectorOptions,
  type Percentiles,
} from './detector.ts';
import type { EventLog, TimelineEvent } from '../events/timeline.ts';
import type { Cause, CauseProvider, Check, Incident, IncidentChange, IncidentListener, Victim } from './record.ts';
import type { RoundTripTracker } from './roundtrip.ts';
import type { WebhookSender } from './webhook.ts';
import { CAUSE_LOOKBACK_MS } from './causes.ts';
import { inDatabases, shapeDatabases } from './scope.ts';
import { STUCK_MIN_MS, stuckRegression, withStuck, type InFlightView } from './inflight.ts';

export type { Cause, CauseProvider, Check, Incident, IncidentChange, IncidentListener } from './record.ts';

/** A shape's baseline as saved for the next start. */
export interface SavedBaseline {
  fingerprint: string;
  baseline: Percentiles;
  /** Epoch ms when it was last computed from live traffic. */
  computed_at: number;
}

/** What survives a restart: baselines and the incident history. */
export interface DetectorState {
  version: 1;
  saved_at: string;
  baselines: SavedBaseline[];
  incidents: Incident[];
}

/** Where the detector's state is kept (state file or control database); implemented in src/state/. */
export interface DetectorStateStore {
  loadDetectorState(): Promise<DetectorState | null>;
  saveDetectorState(state: DetectorState): Promise<void>;
}

export interface IncidentOptions {
  readonly registry: ShapeRegistry;
  readonly events: EventLog;
  readonly clock: Clock;
  readonly log: Logger;
  readonly detector: DetectorOptions;
  readonly bucketMs: number;
  readonly evaluateEveryMs: number;
  readonly sampler?: PlanSampler | null;
  readonly roundTrip?: RoundTripTracker | null;
  readonly webhook?: WebhookSender | null;
  /** Extra evidence consulted at attribution (settings, statistics, locks...). */
  readonly causeProviders?: readonly CauseProvider[];
  /** Statements still running, so a shape whose calls are all stuck (on a lock) is judged before any completes. */
  readonly inflight?: InFlightView | null;
  /** Baselines and history kept across restarts; none: memory only. */
  readonly store?: DetectorStateStore | null;
  /** How often the state is saved; default 30 s. */
  readonly saveEveryMs?: number;
}

/** An incident whose shape stops being called resolves after this long. */
const SILENT_RESOLVE_MS = 5 * 60_000;
const MAX_RESOLVED = 200;
/** A saved baseline older than this is not trusted after a restart. */
const RESTORED_MAX_AGE_MS = 24 * 3600_000;
/** After a plan or schema change, an evaluation runs this soon instead of at the next tick. */
const EVALUATE_SOON_MS = 250;
/** The fix usually lands shortly before recovery shows: changes on the root's objects this long before it belong to the resolution. */
const RESOLUTION_LEAD_MS = 10_000;
/**
 * The catalog watch and the re-EXPLAIN see a fix after the latency did: changes found
 * this long after an incident resolved, and made before it resolved (plan changes:
 * found before this ends), are added to its resolution.
 */
const RESOLUTION_GRACE_MS = 30_000;

const rate = (perSecond: number) => (perSecond >= 10 ? Math.round(perSecond) : Math.round(perSecond * 10) / 10);
const iso = (ms: number) => new Date(ms).toISOString();

/** One shape's figures at one evaluation. */
interface Reading {
  readonly fingerprint: string;
  readonly watch: ShapeWatch;
  readonly stats: ShapeStats;
  readonly calls: { at: number[]; ms: number[] };
  readonly recent: Percentiles | null;
  readonly baseline: Percentiles | null;
  readonly baselineFrom: BaselineSource | null;
  readonly regressed: boolean;
  readonly jump: boolean;
  readonly slowed: boolean;
  /** When the oldest of its statements stuck in flight started (null: none stuck). */
  readonly stuckSince: number | null;
}

/** What the manager tracks about an active incident beyond its record. */
interface Tracking {
  /** Whose figures are the incident's: the root, or database-wide the busiest victim. */
  primary: string;
  baseline: Percentiles;
  members: Set<string>;
  under: number;
  recoveringSince: number | null;
}

export class IncidentManager {
  private readonly watches = new Map<string, ShapeWatch>();
  private readonly incidents = new Map<string, Incident>();
  private readonly tracking = new Map<string, Tracking>();
  private readonly restored = new Map<string, SavedBaseline>();
  private readonly listeners: IncidentListener[] = [];
  private timer: NodeJS.Timeout | null = null;
  private saveTimer: NodeJS.Timeout | null = null;
  private soonTimer: NodeJS.Timeout | null = null;
  private nextId = 1;
  private databaseWideRun = 0;
  /** Recently resolved incidents still collecting their fix: id -> end of the grace period. */
  private readonly closing = new Map<string, number>();
  private lastSave: Promise<void> = Promise.resolve();
  opened = 0;

  constructor(private readonly options: IncidentOptions) {
    options.events.onEvent((e) => this.onTimelineEvent(e));
  }

  /** Subscribed to the shape collector: feeds each shape's recent-calls ring. */
  readonly observe = (stats: ShapeStats, _shape: StatementShape, c: QueryCompletion): void => {
    if (c.refused) return; // refused by a rule: not a latency sample
    let watch = this.watches.get(stats.fingerprint);
    if (watch === undefined) {
      // A shape seen fewer times than a judgement needs cannot regress yet: no watch
      // (and no ring buffers) for the long tail of rare or one-off shapes.
      if (stats.calls < this.options.detector.minRecentSamples) return;
      watch = new ShapeWatch(stats.fingerprint);
      this.watches.set(stats.fingerprint, watch);
    }
    watch.recent.add(this.options.clock.now(), c.durationMs);
  };

  /** Applies reloaded detection thresholds; shapes keep their baselines and open incidents. */
  setDetectorOptions(detector: DetectorOptions): void {
    (this.options as { detector: DetectorOptions }).detector = detector;
  }

  onChange(listener: IncidentListener): void {
    this.listeners.push(listener);
  }

  /** Loads saved baselines and history (call before start); a failure is logged, not fatal. */
  async restore(): Promise<void> {
    const store = this.options.store;
    if (!store) return;
    let state: DetectorState | null;
    try {
      state = await store.loadDetectorState();
    } catch (err) {
      this.options.log.warn({ err }, 'saved baselines and incidents could not be read: starting without them');
      return;
    }
    if (state === null) return;
    const now = this.options.clock.now();
    for (const saved of state.baselines ?? []) {
      // A hand-edited or older file may hold anything: keep only what reads as a baseline.
      const valid =
        typeof saved?.fingerprint === 'string' &&
        typeof saved.computed_at === 'number' &&
        typeof saved.baseline?.p95_ms === 'number' &&
        typeof saved.baseline.p50_ms === 'number';
      if (valid && now - saved.computed_at <= RESTORED_MAX_AGE_MS) this.restored.set(saved.fingerprint, saved);
    }
    for (const incident of state.incidents ?? []) {
      if (
        typeof incident?.id !== 'string' ||
        !Array.isArray(incident.timeline) ||
        !Array.isArray(incident.victims) ||
        this.incidents.has(incident.id)
      )
        continue;
      if (incident.status === 'active') {
        // Nobody watched it while pgwarden was down: say so instead of guessing.
        incident.status = 'resolved';
        incident.resolved_at = iso(now);
        incident.resolution ??= {
          reason: 'silent',
          summary: 'pgwarden restarted while the incident was active; not followed since',
          events: [],
        };
        incident.timeline.push({ at: iso(now), what: 'resolved', summary: incident.resolution.summary });
      }
      this.incidents.set(incident.id, incident);
    }
    this.options.log.info(
      { baselines: this.restored.size, incidents: state.incidents?.length ?? 0 },
      'baselines and incident history restored',
    );
  }

  start(): void {
    this.timer = setInterval(() => this.evaluateSafely(), this.options.evaluateEveryMs);
    this.timer.unref();
    if (this.options.store) {
      this.saveTimer = setInterval(() => void this.save(), this.options.saveEveryMs ?? 30_000);
      this.saveTimer.unref();
    }
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    if (this.saveTimer) clearInterval(this.saveTimer);
    if (this.soonTimer) clearTimeout(this.soonTimer);
    this.timer = this.saveTimer = this.soonTimer = null;
  }

  /** Saves baselines and history now (also on a timer); never rejects. */
  save(): Promise<void> {
    const store = this.options.store;
    if (!store) return Promise.resolve();
    const state = this.snapshot();
    this.lastSave = this.lastSave.then(() =>
      store
        .saveDetectorState(state)
        .catch((err: Error) => this.options.log.warn({ err }, 'baselines and incidents could not be saved')),
    );
    return this.lastSave;
  }

  /** Incidents, newest first. */
  list(status?: 'active' | 'resolved'): Incident[] {
    return [...this.incidents.values()]
      .filter((i) => !status || i.status === status)
      .sort((a, b) => Date.parse(b.detected_at) - Date.parse(a.detected_at));
  }

  get(id: string): Incident | undefined {
    return this.incidents.get(id);
  }

  /** The active incident a shape is the root or a victim of. */
  activeFor(fingerprint: string): Incident | undefined {
    const id = this.watches.get(fingerprint)?.incidentId;
    return id ? this.incidents.get(id) : undefined;
  }

  get activeCount(): number {
    let n = 0;
    for (const i of this.incidents.values()) if (i.status === 'active') n++;
    return n;
  }

  /** A shape's baseline (and where it came from) and its recent-window figures, for the shape view. */
  detectorView(
    fingerprint: string,
  ): { baseline: Percentiles | null; baseline_from: BaselineSource | null; recent: Percentiles | null } | null {
    const watch = this.watches.get(fingerprint);
    const stats = this.options.registry.get(fingerprint);
    if (!watch || !stats) return null;
    const now = this.options.clock.now();
    const live = watch.frozenBaseline
      ? { baseline: watch.frozenBaseline, from: watch.baselineFrom }
      : this.baselineFor(stats, now);
    const calls = watch.recent.since(now - this.options.detector.recentWindowMs);
    return {
      baseline: live ? roundPercentiles(live.baseline) : null,
      baseline_from: live?.from ?? null,
      recent: calls.ms.length > 0 ? roundPercentiles(recentOf(calls, now, this.options.detector.recentWindowMs)) : null,
    };
  }

  /** Current p95 over baseline p95 of a shape, or null without a baseline. */
  regressionRatio(fingerprint: string): number | null {
    const watch = this.watches.get(fingerprint);
    const stats = this.options.registry.get(fingerprint);
    if (!watch || !stats) return null;
    const now = this.options.clock.now();
    const baseline = watch.frozenBaseline ?? this.baselineFor(stats, now)?.baseline;
    if (!baseline || baseline.p95_ms <= 0) return null;
    const recent = recentOf(
      watch.recent.since(now - this.options.detector.recentWindowMs),
      now,
      this.options.detector.recentWindowMs,
    );
    return recent.samples === 0 ? null : recent.p95_ms / baseline.p95_ms;
  }

  /** One pass of the detector over every watched shape. */
  evaluate(): void {
    const now = this.options.clock.now();
    const readings = this.read(now);
    let totalCalls = 0;
    for (const r of readings.values()) totalCalls += r.calls.ms.length;

    for (const incident of this.list('active')) this.follow(incident, readings, totalCalls, now);

    const free = [...readings.values()].filter((r) => r.watch.incidentId === null);
    for (const r of free) this.track(r, now);

    // 1. Roots by plan change: a confirmed plan change and a p95 jump open at once
    //    (a victim of a database-wide incident turns it into its own).
    const wideVictims = [...readings.values()].filter(
      (r) => r.watch.incidentId !== null && this.incidents.get(r.watch.incidentId)?.kind === 'database_wide',
    );
    for (const r of wideVictims) if (r.jump && r.watch.onset === null) r.watch.onset = r.calls.at[0] ?? now;
    for (const r of [...free, ...wideVictims]) {
      const wide = r.watch.incidentId !== null && this.incidents.get(r.watch.incidentId)?.kind === 'database_wide';
      if ((r.watch.incidentId !== null && !wide) || !r.jump || !r.baseline) continue;
      const onset = r.watch.onset ?? r.calls.at[0];
      if (this.planChangeSince(r.fingerprint, onset - NEARBY_MS) === null) continue;
      this.openShape(r, onset, totalCalls, now);
    }

    // 2. Victims: slowed shapes with no plan change of their own join an active incident.
    const active = this.list('active');
    const host = active.find((i) => i.kind === 'shape') ?? active.find((i) => i.kind === 'database_wide');
    if (host) {
      for (const r of free) {
        if (r.watch.incidentId !== null || !(r.regressed || (r.slowed && r.watch.slowedRun >= 2))) continue;
        if (this.planChangeSince(r.fingerprint, Date.parse(host.onset) - NEARBY_MS) !== null) continue;
        this.addVictim(host, r, totalCalls, now);
      }
    }

    // 3. Most shapes slow together, no plan change: one database-wide incident.
    const unclaimed = free.filter((r) => r.watch.incidentId === null);
    const compared = [...readings.values()].filter(
      (r) => r.recent !== null && r.baseline !== null && r.recent.samples >= this.options.detector.minRecentSamples,
    ).length;
    const slowed = unclaimed.filter((r) => r.slowed);
    const widespread = compared >= 2 && slowed.length >= Math.max(2, Math.ceil(compared / 2));
    if (widespread && slowed.some((r) => r.regressed) && !active.some((i) => i.kind === 'database_wide')) {
      this.databaseWideRun++;
      if (this.databaseWideRun >= this.options.detector.openAfter)
        this.openDatabaseWide(slowed, compared, totalCalls, now);
    } else {
      this.databaseWideRun = 0;
    }

    // 4. A shape regressed on its own for the usual run, the others and the round trip normal.
    if (!widespread) {
      const candidates = unclaimed.filter(
        (r) => r.watch.incidentId === null && r.watch.over >= this.options.detector.openAfter && r.baseline !== null,
      );
      if (candidates.length > 0) {
        candidates.sort((a, b) => dbTime(b) - dbTime(a));
        const root = candidates[0];
        const onset = root.watch.onset ?? root.calls.at[0];
        if (this.roundTripRose(onset, now)) {
          // The host or the network slowed everything: not this shape's regression.
          root.watch.over = 0;
        } else {
          const incident = this.openShape(root, onset, totalCalls, now);
          for (const other of candidates.slice(1)) this.addVictim(incident, other, totalCalls, now);
        }
      }
    }
    this.options.sampler?.retain((fp) => this.options.registry.get(fp) !== undefined);
  }

  // ------------------------------------------------------------------ readings

  private read(now: number): Map<string, Reading> {
    const d = this.options.detector;
    const readings = new Map<string, Reading>();
    const stuckShapes = this.options.inflight?.stuckByShape(STUCK_MIN_MS) ?? null;
    for (const [fingerprint, watch] of this.watches) {
      const stats = this.options.registry.get(fingerprint);
      if (stats === undefined) {
        if (watch.incidentId === null) this.watches.delete(fingerprint);
        continue;
      }
      const finished = watch.recent.since(now - d.recentWindowMs);
      const live = watch.frozenBaseline
        ? { baseline: watch.frozenBaseline, from: watch.baselineFrom ?? 'series' }
        : this.baselineFor(stats, now);
      // Statements stuck far beyond the baseline (every call of a shape waiting on a
      // lock) are a regression before any of them completes: they count as calls
      // lasting their age so far.
      const stuck = live !== null ? stuckRegression(stuckShapes?.get(fingerprint), live.baseline, d) : null;
      const calls = stuck !== null ? withStuck(finished, stuck, now) : finished;
      const recent = calls.ms.length > 0 ? recentOf(calls, now, d.recentWindowMs) : null;
      const judged = live !== null && recent !== null && (recent.samples >= d.minRecentSamples || stuck !== null);
      readings.set(fingerprint, {
        fingerprint,
        watch,
        stats,
        calls,
        recent,
        baseline: live?.baseline ?? null,
        baselineFrom: live?.from ?? null,
        regressed: judged && (stuck !== null || isRegressed(recent!, live!.baseline, d)),
        jump: judged && isJump(recent!, live!.baseline, d),
        slowed: judged && (stuck !== null || isSlowed(recent!, live!.baseline, d)),
        stuckSince: stuck?.oldestSince ?? null,
      });
    }
    return readings;
  }

  /** Hysteresis of a shape in no incident; holds its baseline while it is slow. */
  private track(r: Reading, now: number): void {
    const w = r.watch;
    if (r.slowed) {
      w.slowedRun++;
      if (w.frozenBaseline === null && r.baseline) {
        w.frozenBaseline = r.baseline;
        w.baselineFrom = r.baselineFrom;
      }
    } else if (r.recent !== null) {
      w.slowedRun = 0;
      w.frozenBaseline = null;
      w.baselineFrom = null;
    }
    if (r.jump) {
      if (w.onset === null) {
        // A jump: get a fresh plan now, so a plan change is known by the next evaluation.
        this.options.sampler?.resample(r.fingerprint);
        w.onset = onsetOf(r.calls, r.baseline!, this.options.detector) ?? r.calls.at[0] ?? now;
      }
    } else if (r.stuckSince !== null) {
      w.onset ??= r.stuckSince;
    } else if (!r.regressed) {
      w.onset = null;
    }
    w.over = r.regressed ? w.over + 1 : 0;
  }

  /** The baseline from the shape's history, else a young shape's calls, else one saved before a restart. */
  private baselineFor(stats: ShapeStats, now: number): { baseline: Percentiles; from: BaselineSource } | null {
    const d = this.options.detector;
    const bucketMs = this.options.bucketMs;
    const recentStart = now - d.recentWindowMs;
    const points = stats.series
      .points(now, recentStart - d.baselineWindowMs)
      .filter((p) => p.t + bucketMs <= recentStart);
    const usable = points.filter((p) => p.timed >= d.minBucketCalls).length;
    if (usable >= d.minBaselineBuckets) {
      const baseline = baselineOf(points, bucketMs, d);
      if (baseline) return { baseline, from: 'series' };
    }
    if (points.length > 0) {
      const sketch = stats.series.window(points[0].t, points[points.length - 1].t);
      const merged = sketch
        ? { count: sketch.count, quantile: (q: number) => sketch.getValueAtQuantile(q), firstSeen: stats.firstSeen }
        : null;
      const baseline = baselineOf(points, bucketMs, d, merged);
      if (baseline) return { baseline, from: 'recent_calls' };
    }
    const saved = this.restored.get(stats.fingerprint);
    return saved ? { baseline: saved.baseline, from: 'restored' } : null;
  }

  private planChangeSince(fingerprint: string, since: number): TimelineEvent | null {
    const found = this.options.events
      .between(since, Number.MAX_SAFE_INTEGER, ['plan_change'])
      .filter((e) => e.fingerprint === fingerprint);
    return found.length > 0 ? found[found.length - 1] : null;
  }

  private roundTripRose(onset: number, now: number): boolean {
    const rtt = this.options.roundTrip;
    const before = rtt?.medianBetween(onset - 5 * 60_000, onset) ?? null;
    const after = rtt?.medianBetween(onset, now) ?? null;
    return before !== null && after !== null && after > before * 2 + 0.5;
  }

  // ------------------------------------------------------------------ lifecycle

  private newIncident(kind: Incident['kind'], primary: Reading, onset: number, now: number): Incident {
    const baseline = primary.baseline!;
    const recent = primary.recent ?? baseline;
    const current = roundPercentiles(recent);
    return {
      id: `inc-${now.toString(36)}-${this.nextId++}`,
      kind,
      root: kind === 'shape' ? primary.fingerprint : null,
      fingerprint: kind === 'shape' ? primary.fingerprint : '',
      query: kind === 'shape' ? primary.stats.query : '(most shapes)',
      status: 'active',
      onset: iso(onset),
      detected_at: iso(now),
      attributed_at: null,
      resolved_at: null,
      detection_s: round3((now - onset) / 1000),
      attribution_s: null,
      severity: round3(recent.p95_ms / Math.max(baseline.p95_ms, 0.001)),
      baseline: roundPercentiles(baseline),
      baseline_from: primary.baselineFrom ?? 'series',
      current,
      peak: { ...current, at: iso(now) },
      victims: [],
      impact: { shapes: kind === 'shape' ? 1 : 0, share_of_calls: 0, applications: [], users: [], databases: [] },
      summary: '',
      attributed: false,
      causes: [],
      ruled_out: [],
      checks: [],
      resolution: null,
      timeline: [
        {
          at: iso(onset),
          what: 'onset',
          summary:
            kind === 'shape' ? `shape ${primary.fingerprint} began to slow down` : 'shapes began to slow down together',
        },
      ],
    };
  }

  private register(
    incident: Incident,
    primary: Reading,
    members: Reading[],
    totalCalls: number,
    now: number,
  ): Incident {
    const tracking: Tracking = {
      primary: primary.fingerprint,
      baseline: primary.baseline!,
      members: new Set(),
      under: 0,
      recoveringSince: null,
    };
    this.incidents.set(incident.id, incident);
    this.tracking.set(incident.id, tracking);
    if (incident.kind === 'shape') this.claim(incident.id, primary);
    for (const m of members) this.addVictim(incident, m, totalCalls, now, false);
    this.updateImpact(incident, totalCalls);
    this.opened++;
    const detected = { at: iso(now), what: 'detected' as const, summary: '' };
    incident.timeline.push(detected);
    this.explain(incident, now);
    detected.summary = incident.summary;
    this.options.events.add({
      type: 'incident_opened',
      fingerprint: incident.root ?? undefined,
      summary: incident.summary,
      details: {
        incident: incident.id,
        kind: incident.kind,
        severity: incident.severity,
        victims: incident.victims.map((v) => v.fingerprint),
      },
    });
    this.options.log.warn(
      {
        incident: incident.id,
        kind: incident.kind,
        root: incident.root,
        query: incident.query,
        baseline_p95_ms: incident.baseline.p95_ms,
        current_p95_ms: incident.current.p95_ms,
        causes: incident.causes.map((c) => c.summary),
      },
      'regression incident opened',
    );
    this.notify(incident, 'opened');
    if (incident.attributed) this.notify(incident, 'attributed');
    this.prune();
    return incident;
  }

  private openShape(root: Reading, onset: number, totalCalls: number, now: number): Incident {
    // A database-wide incident that turns out to have a root becomes that root's incident.
    const wide = this.list('active').find(
      (i) => i.kind === 'database_wide' && Math.abs(Date.parse(i.onset) - onset) <= NEARBY_MS,
    );
    if (wide) return this.convert(wide, root, totalCalls, now);
    return this.register(this.newIncident('shape', root, onset, now), root, [], totalCalls, now);
  }

  private openDatabaseWide(slowed: Reading[], compared: number, totalCalls: number, now: number): void {
    const busiest = [...slowed].sort((a, b) => b.calls.ms.length - a.calls.ms.length)[0];
    const onset = Math.min(...slowed.map((r) => r.watch.onset ?? r.calls.at[0] ?? now));
    const incident = this.newIncident('database_wide', busiest, onset, now);
    const rtt = this.options.roundTrip;
    incident.evidence = {
      slowed: slowed.length,
      compared,
      round_trip_before_ms: round3OrNull(rtt?.medianBetween(onset - 5 * 60_000, onset) ?? null),
      round_trip_after_ms: round3OrNull(rtt?.medianBetween(onset, now) ?? null),
    };
    this.databaseWideRun = 0;
    this.register(incident, busiest, slowed, totalCalls, now);
  }

  private convert(incident: Incident, root: Reading, totalCalls: number, now: number): Incident {
    const tracking = this.tracking.get(incident.id)!;
    incident.kind = 'shape';
    incident.root = root.fingerprint;
    incident.fingerprint = root.fingerprint;
    incident.query = root.stats.query;
    incident.baseline = roundPercentiles(root.baseline!);
    incident.baseline_from = root.baselineFrom ?? 'series';
    incident.victims = incident.victims.filter((v) => v.fingerprint !== root.fingerprint);
    delete incident.evidence;
    tracking.primary = root.fingerprint;
    tracking.baseline = root.baseline!;
    tracking.members.delete(root.fingerprint);
    this.claim(incident.id, root);
    incident.timeline.push({
      at: iso(now),
      what: 'detected',
      summary: `root found: shape ${root.fingerprint}'s plan changed; the slowdown is its incident`,
    });
    this.updateImpact(incident, totalCalls);
    this.explain(incident, now);
    this.notify(incident, 'opened');
    if (incident.attributed) this.notify(incident, 'attributed');
    return incident;
  }

  private claim(id: string, r: Reading): void {
    r.watch.incidentId = id;
    r.watch.frozenBaseline ??= r.baseline;
    r.watch.baselineFrom ??= r.baselineFrom;
    r.watch.under = 0;
  }

  private addVictim(incident: Incident, r: Reading, totalCalls: number, now: number, announce = true): void {
    const tracking = this.tracking.get(incident.id);
    if (!tracking || tracking.members.has(r.fingerprint) || incident.root === r.fingerprint || !r.baseline) return;
    tracking.members.add(r.fingerprint);
    this.claim(incident.id, r);
    const p95 = r.recent?.p95_ms ?? 0;
    const victim: Victim = {
      fingerprint: r.fingerprint,
      query: r.stats.query,
      share_of_calls: round3(totalCalls > 0 ? r.calls.ms.length / totalCalls : 0),
      joined_at: iso(now),
      baseline_p95_ms: round3(r.baseline.p95_ms),
      peak_p95_ms: round3(p95),
      current_p95_ms: round3(p95),
    };
    incident.victims.push(victim);
    if (!announce) return;
    incident.timeline.push({
      at: iso(now),
      what: 'victim',
      summary: `shape ${r.fingerprint} slowed too: p95 ${victim.baseline_p95_ms} ms -> ${victim.current_p95_ms} ms`,
    });
    this.updateImpact(incident, totalCalls);
    if (!incident.attributed) this.explain(incident, now);
    else incident.summary = summaryOf(incident);
  }

  private updateImpact(incident: Incident, totalCalls: number): void {
    const fingerprints = [...(incident.root ? [incident.root] : []), ...incident.victims.map((v) => v.fingerprint)];
    const applications = new Set(incident.impact.applications);
    const users = new Set(incident.impact.users);
    const databases = new Set(incident.impact.databases);
    let calls = 0;
    for (const fp of fingerprints) {
      const stats = this.options.registry.get(fp);
      if (stats) {
        for (const a of stats.applications) applications.add(a);
        for (const u of stats.users) users.add(u);
        for (const d of stats.databases) databases.add(d);
      }
      calls +=
        this.watches.get(fp)?.recent.since(this.options.clock.now() - this.options.detector.recentWindowMs).ms.length ??
        0;
    }
    incident.impact = {
      shapes: fingerprints.length,
      share_of_calls: Math.max(
        incident.impact.share_of_calls,
        round3(totalCalls > 0 ? Math.min(1, calls / totalCalls) : 0),
      ),
      applications: [...applications].sort(),
      users: [...users].sort(),
      databases: [...databases].sort(),
    };
  }

  /** While an incident is active: refresh its numbers and evidence, resolve it when recovered. */
  private follow(incident: Incident, readings: Map<string, Reading>, totalCalls: number, now: number): void {
    const tracking = this.tracking.get(incident.id);
    if (!tracking) return;
    const d = this.options.detector;
    const primary = readings.get(tracking.primary);
    const recent = primary?.recent ?? null;
    if (recent && recent.samples > 0) {
      incident.current = roundPercentiles(recent);
      incident.severity = round3(recent.p95_ms / Math.max(tracking.baseline.p95_ms, 0.001));
      if (recent.p95_ms > incident.peak.p95_ms) {
        incident.peak = { ...incident.current, at: iso(now) };
        const entry = incident.timeline.find((t) => t.what === 'peak');
        const summary = `peak: p95 ${incident.peak.p95_ms} ms, p50 ${incident.peak.p50_ms} ms, ${rate(incident.peak.rate)} calls/s`;
        if (entry) Object.assign(entry, { at: incident.peak.at, summary });
        else incident.timeline.push({ at: incident.peak.at, what: 'peak', summary });
      }
    }
    let slowedMembers = 0;
    for (const victim of incident.victims) {
      const r = readings.get(victim.fingerprint);
      if (!r?.recent) continue;
      victim.current_p95_ms = round3(r.recent.p95_ms);
      victim.peak_p95_ms = Math.max(victim.peak_p95_ms, victim.current_p95_ms);
      if (r.slowed) slowedMembers++;
    }
    this.updateImpact(incident, totalCalls);
    if (!incident.attributed) {
      this.explain(incident, now);
      if (incident.attributed) {
        this.options.log.warn(
          { incident: incident.id, root: incident.root, summary: incident.summary },
          'regression incident attributed',
        );
        this.notify(incident, 'attributed');
      }
    } else {
      incident.summary = summaryOf(incident);
    }
    const stats = primary?.stats ?? this.options.registry.get(tracking.primary);
    const silent =
      (recent === null || recent.samples === 0) && (stats === undefined || now - stats.lastSeen >= SILENT_RESOLVE_MS);
    const recovered =
      incident.kind === 'shape'
        ? recent !== null && isRecovered(recent, tracking.baseline, d)
        : slowedMembers < Math.max(1, Math.ceil(incident.victims.length / 2));
    if (silent || recovered) {
      tracking.under++;
      if (tracking.recoveringSince === null) {
        tracking.recoveringSince = now;
        // Recovering: a fresh plan, so a plan flipping back is on record as the resolution.
        if (incident.root) this.options.sampler?.resample(incident.root);
      }
    } else {
      tracking.under = 0;
      tracking.recoveringSince = null;
    }
    if (silent || tracking.under >= d.resolveAfter) this.resolve(incident, silent ? 'silent' : 'recovered', now);
  }

  private resolve(incident: Incident, reason: 'recovered' | 'silent', now: number): void {
    const tracking = this.tracking.get(incident.id)!;
    if (!incident.attributed) {
      // Never attributed: causes as known when recovery began, not the fix that followed.
      this.explain(incident, tracking.recoveringSince ?? now);
    }
    incident.status = 'resolved';
    incident.resolved_at = iso(now);
    // The fix: the root's plan changing (back), a change to the very object a cause
    // changed (the dropped index re-created), or any change on its objects just
    // before the recovery showed. Not the rest of the migration that caused it.
    const after = Date.parse(incident.attributed_at ?? incident.detected_at);
    const recovering = (tracking.recoveringSince ?? now) - RESOLUTION_LEAD_MS;
    const causeObjects = new Set(
      incident.causes
        .filter((c) => c.kind !== 'plan_change' && c.objects.length > 0)
        .map((c) => c.objects[0].toLowerCase()),
    );
    const events = this.options.events
      .between(after + 1, now, ['plan_change', 'ddl', 'schema_change'])
      .filter(
        (e) =>
          this.concerns(incident, e) &&
          (e.type === 'plan_change' ||
            causeObjects.has((e.objects?.[0] ?? '').toLowerCase()) ||
            whenOf(e).to >= recovering),
      );
    incident.resolution = { reason, summary: '', events: [] };
    for (const e of events) this.addResolutionEvent(incident, e);
    incident.resolution.summary = resolutionSummary(incident);
    incident.timeline.push({ at: iso(now), what: 'resolved', summary: incident.resolution.summary });
    incident.timeline.sort((a, b) => Date.parse(a.at) - Date.parse(b.at));
    this.closing.set(incident.id, now + RESOLUTION_GRACE_MS);
    for (const fp of [tracking.primary, ...tracking.members]) {
      const watch = this.watches.get(fp);
      if (!watch || watch.incidentId !== incident.id) continue;
      watch.incidentId = null;
      watch.frozenBaseline = null;
      watch.baselineFrom = null;
      watch.over = 0;
      watch.under = 0;
      watch.slowedRun = 0;
      watch.onset = null;
    }
    this.tracking.delete(incident.id);
    this.options.events.add({
      type: 'incident_resolved',
      fingerprint: incident.root ?? undefined,
      summary: `incident ${incident.id} resolved: ${incident.resolution.summary}`,
      details: { incident: incident.id, kind: incident.kind },
    });
    this.options.log.info({ incident: incident.id, root: incident.root, reason }, 'regression incident resolved');
    this.notify(incident, 'resolved');
    void this.save();
  }

  /** Whether a change belongs to an incident: a plan change of its root, a schema change on its objects (any, database-wide). */
  private concerns(incident: Incident, e: TimelineEvent): boolean {
    if (e.type === 'plan_change') return e.fingerprint === incident.root && incident.root !== null;
    if (e.type !== 'ddl' && e.type !== 'schema_change') return false;
    if (incident.root === null) return true;
    if (!inDatabases(e, shapeDatabases(this.options.registry.get(incident.root)))) return false;
    const objects = new RelationSet(incident.causes.flatMap((c) => c.objects));
    for (const o of this.planKnowledge()?.objects(incident.root) ?? []) objects.add(o);
    return touchedObjects(e).some((o) => objects.has(o));
  }

  private addResolutionEvent(incident: Incident, e: TimelineEvent): void {
    const summary =
      e.type === 'plan_change'
        ? `plan changed ${e.summary}`
        : e.type === 'ddl'
          ? (e.details?.statement ?? e.summary)
          : e.summary;
    const at = iso(whenOf(e).to);
    incident.resolution!.events.push({ at, type: e.type, summary });
    incident.timeline.push({
      at,
      what: 'change',
      summary:
        e.type === 'schema_change'
          ? `${summary} (between ${iso(whenOf(e).from).slice(11, 21)} and ${at.slice(11, 21)})`
          : summary,
    });
  }

  /** A change found just after an incident resolved, made before it did: part of its resolution. */
  private lateResolutionEvent(e: TimelineEvent): void {
    for (const [id, until] of this.closing) {
      const incident = this.incidents.get(id);
      if (!incident?.resolution || e.at > until) {
        this.closing.delete(id);
        continue;
      }
      const resolvedAt = Date.parse(incident.resolved_at!);
      if (e.type !== 'plan_change' && whenOf(e).from > resolvedAt) continue;
      if (!this.concerns(incident, e)) continue;
      this.addResolutionEvent(incident, e);
      incident.resolution.summary = resolutionSummary(incident);
      const entry = incident.timeline.find((t) => t.what === 'resolved');
      if (entry) entry.summary = incident.resolution.summary;
      incident.timeline.sort((a, b) => Date.parse(a.at) - Date.parse(b.at));
      void this.save();
    }
  }

  /** Recomputes causes, checks and the summary from the evidence up to `until`; freezes them once attributed. */
  private explain(incident: Incident, until: number): void {
    const onset = Date.parse(incident.onset);
    const rootDatabases = incident.root === null ? null : shapeDatabases(this.options.registry.get(incident.root));
    const causes: Cause[] = timelineCauses(
      this.options.events,
      this.planKnowledge(),
      incident.root,
      onset,
      until,
      rootDatabases,
    );
    const providers = this.options.causeProviders ?? [];
    if (providers.length > 0) {
      // The shape the providers judge: the root, or a database-wide incident's busiest victim.
      const fingerprint = incident.root ?? incident.victims[0]?.fingerprint ?? '';
      const databases = fingerprint ? shapeDatabases(this.options.registry.get(fingerprint)) : null;
      const planChanges = this.options.events
        .between(onset - CAUSE_LOOKBACK_MS, until, ['plan_change'])
        .filter((e) => e.fingerprint === fingerprint);
      const objects = new RelationSet(fingerprint ? (this.planKnowledge()?.objects(fingerprint) ?? []) : []);
      for (const e of planChanges) for (const o of e.objects ?? []) objects.add(o);
      const context = { incident, fingerprint, onset, now: until, objects, planChanges, databases };
      for (const provider of providers) {
        try {
          causes.push(...provider.causes(context));
        } catch (err) {
          this.options.log.warn({ err, provider: provider.name, incident: incident.id }, 'cause provider failed');
        }
      }
    }
    incident.causes = causes;
    incident.checks = this.checks(incident, onset, until);
    incident.ruled_out = incident.checks.filter((c) => c.ruled_out).map(({ check, summary }) => ({ check, summary }));
    incident.attributed = isAttributed(causes);
    incident.summary = summaryOf(incident);
    if (incident.attributed && incident.attributed_at === null) {
      incident.attributed_at = iso(until);
      incident.attribution_s = round3((until - onset) / 1000);
      incident.timeline.push({ at: incident.attributed_at, what: 'attributed', summary: incident.summary });
    }
  }

  private planKnowledge(): PlanKnowledge | null {
    const sampler = this.options.sampler;
    if (!sampler) return null;
    return {
      indexes: (fp) => sampler.plansOf(fp)?.indexes() ?? new RelationSet(),
      objects: (fp) => sampler.plansOf(fp)?.objects() ?? new RelationSet(),
    };
  }

  private checks(incident: Incident, onset: number, now: number): Check[] {
    const checks: Check[] = [];
    const tracking = this.tracking.get(incident.id);
    const baseline = tracking?.baseline ?? incident.baseline;
    const recent = incident.current;
    if (incident.kind === 'shape') {
      const trafficNormal = recent.rate <= baseline.rate * 1.5 + 1;
      checks.push({
        check: 'traffic',
        ruled_out: trafficNormal,
        summary: trafficNormal
          ? `the shape's own traffic did not jump: ${rate(recent.rate)}/s now vs ${rate(baseline.rate)}/s before`
          : `the shape's traffic rose: ${rate(recent.rate)}/s now vs ${rate(baseline.rate)}/s before`,
      });
      const victims = incident.victims.length;
      checks.push({
        check: 'other_shapes',
        ruled_out: victims === 0,
        summary:
          victims === 0
            ? 'other shapes stayed normal: no other shape slowed with it'
            : `${victims} other shape${victims === 1 ? '' : 's'} slowed with it, with no plan change of their own: victims of this shape's load, not separate incidents`,
      });
    } else {
      const e = incident.evidence;
      checks.push({
        check: 'other_shapes',
        ruled_out: false,
        summary: `${e?.slowed ?? incident.victims.length} of ${e?.compared ?? '?'} shapes slowed together, none with a plan change`,
      });
    }
    const rtt = this.options.roundTrip;
    const before = rtt?.medianBetween(onset - 5 * 60_000, onset) ?? null;
    const after = rtt?.medianBetween(onset, now) ?? null;
    if (before === null || after === null) {
      checks.push({
        check: 'round_trip',
        ruled_out: false,
        summary: 'no round-trip measurements to the database around the onset',
      });
    } else {
      const unchanged = after <= before * 2 + 0.5;
      checks.push({
        check: 'round_trip',
        ruled_out: unchanged,
        summary: unchanged
          ? `the proxy-to-database round trip did not change: ${after.toFixed(2)} ms now vs ${before.toFixed(2)} ms before`
          : `the proxy-to-database round trip rose: ${after.toFixed(2)} ms now vs ${before.toFixed(2)} ms before${incident.kind === 'shape' && incident.victims.length > 0 ? ' (the root shape is loading the database)' : ''}`,
      });
    }
    return checks;
  }

  // ------------------------------------------------------------------ plumbing

  private onTimelineEvent(e: TimelineEvent): void {
    if (this.closing.size > 0) this.lateResolutionEvent(e);
    if (e.type === 'mitigation') {
      const incident = this.incidents.get(e.details?.incident ?? '');
      if (incident) incident.timeline.push({ at: iso(e.at), what: 'mitigation', summary: e.summary });
      return;
    }
    // A plan or schema change: judge soon, so a confirmed flip opens without waiting a tick.
    if (
      (e.type === 'plan_change' || e.type === 'ddl' || e.type === 'schema_change') &&
      this.timer !== null &&
      this.soonTimer === null
    ) {
      this.soonTimer = setTimeout(() => {
        this.soonTimer = null;
        this.evaluateSafely();
      }, EVALUATE_SOON_MS);
      this.soonTimer.unref();
    }
  }

  private evaluateSafely(): void {
    try {
      this.evaluate();
    } catch (err) {
      this.options.log.error({ err }, 'incident evaluation failed');
    }
  }

  private snapshot(): DetectorState {
    const now = this.options.clock.now();
    const baselines = new Map<string, SavedBaseline>(this.restored);
    for (const [fingerprint, watch] of this.watches) {
      const stats = this.options.registry.get(fingerprint);
      if (!stats) continue;
      // A shape in an incident keeps the baseline from before it, not its slow present.
      const live =
        watch.frozenBaseline && watch.baselineFrom !== 'restored'
          ? { baseline: watch.frozenBaseline, from: watch.baselineFrom }
          : this.baselineFor(stats, now);
      if (live && live.from !== 'restored')
        baselines.set(fingerprint, { fingerprint, baseline: roundPercentiles(live.baseline), computed_at: now });
    }
    const kept = this.list().slice(0, MAX_RESOLVED + this.activeCount);
    return { version: 1, saved_at: iso(now), baselines: [...baselines.values()], incidents: kept };
  }

  private notify(incident: Incident, change: IncidentChange): void {
    this.options.webhook?.send({ event: `incident_${change}`, incident });
    for (const listener of this.listeners) {
      try {
        listener(incident, change);
      } catch (err) {
        this.options.log.error({ err, incident: incident.id }, 'incident listener failed');
      }
    }
  }

  /** Keeps memory bounded: old resolved incidents are forgotten. */
  private prune(): void {
    const resolved = this.list('resolved');
    for (const old of resolved.slice(MAX_RESOLVED)) this.incidents.delete(old.id);
  }
}

function resolutionSummary(incident: Incident): string {
  const events = incident.resolution?.events ?? [];
  const what = events.length > 0 ? `; after ${events.map((e) => e.summary).join('; ')}` : '';
  if (incident.resolution?.reason === 'silent') return `the shape stopped being called${what}`;
  if (incident.kind === 'shape')
    return `p95 back to ${incident.current.p95_ms} ms (baseline ${incident.baseline.p95_ms} ms, peak ${incident.peak.p95_ms} ms)${what}`;
  return `most shapes back within their baselines${what}`;
}

/** Database time of a shape's recent calls (calls/s x median): who loads the database most. */
function dbTime(r: Reading): number {
  return r.recent ? r.recent.rate * r.recent.p50_ms : 0;
}

function round3OrNull(n: number | null): number | null {
  return n === null ? null : round3(n);
}

function roundPercentiles(p: Percentiles): Percentiles {
  return {
    p50_ms: round3(p.p50_ms),
    p95_ms: round3(p.p95_ms),
    p99_ms: round3(p.p99_ms),
    rate: round3(p.rate),
    samples: p.samples,
  };
}
