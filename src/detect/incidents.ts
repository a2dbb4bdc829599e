// Regression incidents: every couple of seconds each busy shape is compared with
// its own baseline (detector.ts); a regression opens an incident that names its
// suspected causes (plan changes of the shape and schema changes near the onset,
// most relevant first) and what the evidence rules out (the shape's own traffic,
// other shapes, the proxy-to-database round trip), so responders skip wrong paths.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { PlanSampler } from '../plans/sampler.ts';
import type { QueryCompletion } from '../proxy/seam.ts';
import type { StatementShape } from '../shapes/fingerprint.ts';
import type { ShapeRegistry, ShapeStats } from '../shapes/registry.ts';
import {
  baselineOf,
  isRecovered,
  isRegressed,
  onsetOf,
  recentOf,
  ShapeWatch,
  type DetectorOptions,
  type Percentiles,
} from './detector.ts';
import type { EventLog, TimelineEvent } from './events.ts';
import type { RoundTripTracker } from './roundtrip.ts';
import type { WebhookSender } from './webhook.ts';
import { leadingCause, type CauseProvider } from './causes.ts';
import { STUCK_MIN_MS, stuckRegression, withStuck, type InFlightTracker, type StuckShape } from './inflight.ts';

export interface Cause {
  type: 'plan_change' | 'ddl' | 'schema_change' | 'setting_change' | 'statistics_change' | 'lock_wait' | 'saturation';
  event_id: number;
  at: string;
  /** Positive: before the onset; negative: after it. */
  seconds_before_onset: number;
  summary: string;
  /** Whether it touches a table or index of this shape's plans. */
  relevant: boolean;
  objects: string[];
  statement?: string;
  diff?: { headline: string; removed: string[]; added: string[]; before?: string; after?: string };
  /** Explains the incident on its own (causes from providers: setting, statistics, lock, saturation). */
  decisive?: boolean;
  /** false: shedding the shape would not help (a lock held elsewhere, load outside the proxy). */
  mitigable?: boolean;
  /** What the provider saw (blocking session, wait events, consumers, estimates...). */
  evidence?: Record<string, unknown>;
}

export interface Check {
  check: 'traffic' | 'other_shapes' | 'round_trip';
  ruled_out: boolean;
  summary: string;
}

export interface Incident {
  id: string;
  fingerprint: string;
  query: string;
  status: 'active' | 'resolved';
  onset: string;
  detected_at: string;
  resolved_at: string | null;
  /** Current p95 over baseline p95 (the last value while active). */
  severity: number;
  baseline: Percentiles;
  current: Percentiles;
  summary: string;
  attributed: boolean;
  causes: Cause[];
  ruled_out: { check: Check['check']; summary: string }[];
  checks: Check[];
  /**
   * 'shape': one root shape regressed (victims may follow it); 'database_wide': the
   * whole database slowed, no single shape is the cause. Absent means 'shape'.
   */
  kind?: 'shape' | 'database_wide';
  /** The root shape's fingerprint (null for a database-wide incident); absent means `fingerprint`. */
  root?: string | null;
  /** What the mitigation policy did about it (set by the policy, if one runs), with the shapes it refused and why. */
  mitigation?: { mode: string; action: string; rule_id: string | null; note: string; refused?: readonly { fingerprint: string | null; reason: string }[] };
}

export type IncidentChange = 'opened' | 'attributed' | 'resolved';
export type IncidentListener = (incident: Incident, change: IncidentChange) => void;

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
  /** Evidence beyond plans and DDL (settings, statistics, locks, saturation), asked at each attribution. */
  readonly causeProviders?: readonly CauseProvider[];
  /** Statements still running, so a shape whose calls are all stuck is judged before any completes. */
  readonly inflight?: InFlightTracker | null;
}

/** How far before the onset causes are looked for. */
const CAUSE_LOOKBACK_MS = 10 * 60_000;
/** Without a relevant schema change, nearby ones within this window are shown. */
const NEARBY_MS = 2 * 60_000;
/** An incident whose shape stops being called resolves after this long. */
const SILENT_RESOLVE_MS = 5 * 60_000;
const MAX_RESOLVED = 200;

const round = (n: number) => Math.round(n * 1000) / 1000;
/** A rate for people: whole numbers from 10/s up. */
const rate = (perSecond: number) => (perSecond >= 10 ? Math.round(perSecond) : Math.round(perSecond * 10) / 10);

export class IncidentManager {
  private readonly watches = new Map<string, ShapeWatch>();
  private readonly incidents = new Map<string, Incident>();
  private readonly listeners: IncidentListener[] = [];
  private timer: NodeJS.Timeout | null = null;
  private nextId = 1;
  opened = 0;

  constructor(private readonly options: IncidentOptions) {}

  /** Subscribed to the shape collector: feeds each shape's recent-calls ring. */
  readonly observe = (stats: ShapeStats, _shape: StatementShape, c: QueryCompletion): void => {
    if (c.refused) return; // refused by a rule: not a latency sample
    let watch = this.watches.get(stats.fingerprint);
    if (watch === undefined) {
      // A shape seen fewer times than a judgement needs cannot regress yet: no watch
      // (and no ring buffers) for the long tail of rare or one-off shapes.
      if (stats.calls < this.options.detector.minRecentSamples) return;
      watch = new ShapeWatch();
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

  start(): void {
    this.timer = setInterval(() => {
      try {
        this.evaluate();
      } catch (err) {
        this.options.log.error({ err }, 'incident evaluation failed');
      }
    }, this.options.evaluateEveryMs);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  list(status?: 'active' | 'resolved'): Incident[] {
    return [...this.incidents.values()].filter((i) => !status || i.status === status).reverse();
  }

  get(id: string): Incident | undefined {
    return this.incidents.get(id);
  }

  activeFor(fingerprint: string): Incident | undefined {
    const id = this.watches.get(fingerprint)?.incidentId;
    return id ? this.incidents.get(id) : undefined;
  }

  get activeCount(): number {
    let n = 0;
    for (const i of this.incidents.values()) if (i.status === 'active') n++;
    return n;
  }

  /** Current p95 over baseline p95 of a shape, or null without a baseline. */
  regressionRatio(fingerprint: string): number | null {
    const watch = this.watches.get(fingerprint);
    const stats = this.options.registry.get(fingerprint);
    if (!watch || !stats) return null;
    const now = this.options.clock.now();
    const baseline = watch.frozenBaseline ?? this.baseline(stats, now);
    if (!baseline || baseline.p95_ms <= 0) return null;
    const recent = recentOf(watch.recent.since(now - this.options.detector.recentWindowMs), now, this.options.detector.recentWindowMs);
    return recent.samples === 0 ? null : recent.p95_ms / baseline.p95_ms;
  }

  /** One pass of the detector over every watched shape. */
  evaluate(): void {
    const now = this.options.clock.now();
    const d = this.options.detector;
    const stuckShapes = this.options.inflight?.stuckByShape(STUCK_MIN_MS) ?? null;
    for (const [fingerprint, watch] of this.watches) {
      const stats = this.options.registry.get(fingerprint);
      if (stats === undefined) {
        if (watch.incidentId === null) this.watches.delete(fingerprint);
        continue;
      }
      const calls = watch.recent.since(now - d.recentWindowMs);
      if (watch.incidentId !== null) {
        this.follow(watch, stats, calls, now);
        continue;
      }
      const stuck = stuckShapes?.get(fingerprint);
      if (calls.ms.length < d.minRecentSamples && stuck === undefined) {
        watch.over = 0;
        continue;
      }
      const baseline = this.baseline(stats, now);
      if (baseline === null) continue;
      if (this.judgeStuck(watch, stats, baseline, calls, stuck, now)) continue;
      const recent = recentOf(calls, now, d.recentWindowMs);
      if (!isRegressed(recent, baseline, d)) {
        watch.over = 0;
        continue;
      }
      watch.over++;
      if (watch.over === 1) {
        // A jump: get a fresh plan now, so it is there by the time the incident opens.
        this.options.sampler?.resample(fingerprint);
        watch.onset = onsetOf(calls, baseline, d) ?? calls.at[0];
      }
      if (watch.over >= d.openAfter) this.open(watch, stats, baseline, recent, watch.onset ?? calls.at[0], now);
    }
    this.options.sampler?.retain((fp) => this.options.registry.get(fp) !== undefined);
  }

  /**
   * Statements stuck far beyond the baseline are a regression before any of them
   * completes (every call of a shape waiting on a lock): they count as calls lasting
   * their age so far. Returns whether it judged the shape.
   */
  private judgeStuck(watch: ShapeWatch, stats: ShapeStats, baseline: Percentiles, calls: { at: number[]; ms: number[] }, stuck: StuckShape | undefined, now: number): boolean {
    const d = this.options.detector;
    const regression = stuckRegression(stuck, baseline, d);
    if (regression === null) return false;
    const combined = withStuck(calls, regression, now);
    watch.over++;
    if (watch.over === 1) watch.onset = regression.oldestSince;
    if (watch.over >= d.openAfter) this.open(watch, stats, baseline, recentOf(combined, now, d.recentWindowMs), Math.min(watch.onset ?? regression.oldestSince, regression.oldestSince), now);
    return true;
  }

  private baseline(stats: ShapeStats, now: number): Percentiles | null {
    const d = this.options.detector;
    const recentStart = now - d.recentWindowMs;
    const points = stats.series.points(now, recentStart - d.baselineWindowMs).filter((p) => p.t + this.options.bucketMs <= recentStart);
    return baselineOf(points, this.options.bucketMs, d);
  }

  private open(watch: ShapeWatch, stats: ShapeStats, baseline: Percentiles, recent: Percentiles, onset: number, now: number): void {
    const id = `inc-${now.toString(36)}-${this.nextId++}`;
    const incident: Incident = {
      id,
      fingerprint: stats.fingerprint,
      query: stats.query,
      status: 'active',
      onset: new Date(onset).toISOString(),
      detected_at: new Date(now).toISOString(),
      resolved_at: null,
      severity: round(recent.p95_ms / Math.max(baseline.p95_ms, 0.001)),
      baseline: roundPercentiles(baseline),
      current: roundPercentiles(recent),
      summary: '',
      attributed: false,
      causes: [],
      ruled_out: [],
      checks: [],
    };
    watch.incidentId = id;
    watch.frozenBaseline = baseline;
    watch.under = 0;
    this.incidents.set(id, incident);
    this.opened++;
    this.explain(incident, watch, now);
    this.options.events.add({
      type: 'incident_opened',
      fingerprint: stats.fingerprint,
      summary: incident.summary,
      details: { incident: id, severity: incident.severity },
    });
    this.options.log.warn(
      { incident: id, fingerprint: stats.fingerprint, query: stats.query, baseline_p95_ms: incident.baseline.p95_ms, current_p95_ms: incident.current.p95_ms, causes: incident.causes.map((c) => c.summary) },
      'regression incident opened',
    );
    this.notify(incident, 'opened');
    if (incident.attributed) this.notify(incident, 'attributed');
    this.prune();
  }

  /** While an incident is active: refresh its numbers and evidence, resolve it when recovered. */
  private follow(watch: ShapeWatch, stats: ShapeStats, calls: { at: number[]; ms: number[] }, now: number): void {
    const incident = this.incidents.get(watch.incidentId!)!;
    const d = this.options.detector;
    const recent = recentOf(calls, now, d.recentWindowMs);
    const baseline = watch.frozenBaseline!;
    if (recent.samples > 0) {
      incident.current = roundPercentiles(recent);
      incident.severity = round(recent.p95_ms / Math.max(baseline.p95_ms, 0.001));
    }
    const wasAttributed = incident.attributed;
    this.explain(incident, watch, now);
    if (!wasAttributed && incident.attributed) {
      this.options.log.warn({ incident: incident.id, fingerprint: incident.fingerprint, summary: incident.summary }, 'regression incident attributed');
      this.notify(incident, 'attributed');
    }
    const silent = recent.samples === 0 && now - stats.lastSeen >= SILENT_RESOLVE_MS;
    if (silent || isRecovered(recent, baseline, d)) watch.under++;
    else watch.under = 0;
    if (silent || watch.under >= d.resolveAfter) this.resolve(incident, watch, now);
  }

  private resolve(incident: Incident, watch: ShapeWatch, now: number): void {
    incident.status = 'resolved';
    incident.resolved_at = new Date(now).toISOString();
    watch.incidentId = null;
    watch.frozenBaseline = null;
    watch.over = 0;
    watch.under = 0;
    this.options.events.add({
      type: 'incident_resolved',
      fingerprint: incident.fingerprint,
      summary: `shape ${incident.fingerprint} back to p95 ${incident.current.p95_ms} ms (baseline ${incident.baseline.p95_ms} ms)`,
      details: { incident: incident.id },
    });
    this.options.log.info({ incident: incident.id, fingerprint: incident.fingerprint }, 'regression incident resolved');
    this.notify(incident, 'resolved');
  }

  /** Recomputes causes, checks and the one-line summary from the current evidence. */
  private explain(incident: Incident, watch: ShapeWatch, now: number): void {
    const onset = Date.parse(incident.onset);
    incident.causes = [...this.causes(incident.fingerprint, onset, now), ...this.providedCauses(incident.fingerprint, onset, now)];
    incident.checks = this.checks(incident, watch, onset, now);
    incident.ruled_out = incident.checks.filter((c) => c.ruled_out).map(({ check, summary }) => ({ check, summary }));
    const plan = incident.causes.find((c) => c.type === 'plan_change');
    const ddl = (c: Cause) => c.type === 'ddl' || c.type === 'schema_change';
    const schema = incident.causes.find((c) => ddl(c) && c.relevant) ?? incident.causes.find(ddl);
    const lead = leadingCause(incident.causes);
    incident.attributed = (plan !== undefined && schema !== undefined) || lead !== undefined;
    let summary = `shape ${incident.fingerprint}: p95 ${incident.baseline.p95_ms} ms -> ${incident.current.p95_ms} ms`;
    if (plan) summary += `, plan changed ${plan.summary}`;
    if (lead) {
      summary += `; cause: ${lead.summary}`;
    } else if (schema) {
      const seconds = Math.round(schema.seconds_before_onset);
      const what = schema.statement ? `\`${schema.statement}\` was seen` : `the catalog showed: ${schema.summary}`;
      summary += seconds >= 0 ? `, ${seconds} s after ${what}` : `; ${what} (${-seconds} s after the onset)`;
    }
    incident.summary = summary;
  }

  /** Causes from the providers (settings, statistics, locks, saturation); a failing provider is logged and skipped. */
  private providedCauses(fingerprint: string, onset: number, now: number): Cause[] {
    const providers = this.options.causeProviders ?? [];
    if (providers.length === 0) return [];
    const planChanges = this.options.events.between(onset - CAUSE_LOOKBACK_MS, now, ['plan_change']).filter((e) => e.fingerprint === fingerprint);
    const objects = new Set<string>(this.options.sampler?.plansOf(fingerprint)?.objects() ?? []);
    for (const e of planChanges) for (const o of e.objects ?? []) objects.add(o.toLowerCase());
    const out: Cause[] = [];
    for (const provider of providers) {
      try {
        out.push(...provider.causes({ fingerprint, onset, now, objects, planChanges }));
      } catch (err) {
        this.options.log.warn({ err, provider: provider.name, fingerprint }, 'cause provider failed');
      }
    }
    return out;
  }

  private causes(fingerprint: string, onset: number, now: number): Cause[] {
    const events = this.options.events;
    const from = onset - CAUSE_LOOKBACK_MS;
    const planEvents = events.between(from, now, ['plan_change']).filter((e) => e.fingerprint === fingerprint);
    const objects = new Set<string>(this.options.sampler?.plansOf(fingerprint)?.objects() ?? []);
    for (const e of planEvents) for (const o of e.objects ?? []) objects.add(o);
    const schemaEvents = events.between(from, now, ['ddl', 'schema_change']);
    // The prime suspect is a change to an index the shape's plans used (usually its
    // removal), then anything else touching its tables; unrelated changes only show
    // when nothing relevant exists, and only near the onset.
    const usedIndexes = new Set<string>(this.options.sampler?.plansOf(fingerprint)?.indexes() ?? []);
    const score = (e: TimelineEvent) => {
      const touched = (e.objects ?? []).map((o) => o.toLowerCase());
      if (touched.some((o) => usedIndexes.has(o))) return /drop|DROP/.test(e.summary) ? 3 : 2;
      return touched.some((o) => objects.has(o)) ? 1 : 0;
    };
    const relevant = schemaEvents.filter((e) => score(e) > 0);
    const chosen = relevant.length > 0 ? relevant : schemaEvents.filter((e) => e.at >= onset - NEARBY_MS);
    const toCause = (e: TimelineEvent, isRelevant: boolean): Cause => ({
      type: e.type as Cause['type'],
      event_id: e.id,
      at: new Date(e.at).toISOString(),
      seconds_before_onset: round((onset - e.at) / 1000),
      summary: e.summary,
      relevant: isRelevant,
      objects: [...(e.objects ?? [])],
      ...(e.type === 'ddl' ? { statement: String(e.details?.statement ?? e.summary) } : {}),
      ...(e.type === 'plan_change' ? { diff: { headline: e.summary, ...(e.details as object) } as Cause['diff'] } : {}),
    });
    // Plan changes first (nearest the onset first), then schema changes by suspicion and proximity.
    const byProximity = (a: Cause, b: Cause) => Math.abs(a.seconds_before_onset) - Math.abs(b.seconds_before_onset);
    const scored = chosen.map((e) => ({ cause: toCause(e, score(e) > 0), score: score(e) }));
    scored.sort((a, b) => b.score - a.score || byProximity(a.cause, b.cause));
    return [...planEvents.map((e) => toCause(e, true)).sort(byProximity), ...scored.map((s) => s.cause)];
  }

  private checks(incident: Incident, watch: ShapeWatch, onset: number, now: number): Check[] {
    const d = this.options.detector;
    const baseline = watch.frozenBaseline!;
    const recent = incident.current;
    const checks: Check[] = [];

    const trafficNormal = recent.rate <= baseline.rate * 1.5 + 1;
    checks.push({
      check: 'traffic',
      ruled_out: trafficNormal,
      summary: trafficNormal
        ? `the shape's own traffic did not jump: ${rate(recent.rate)}/s now vs ${rate(baseline.rate)}/s before`
        : `the shape's traffic rose: ${rate(recent.rate)}/s now vs ${rate(baseline.rate)}/s before`,
    });

    let compared = 0;
    const alsoSlow: string[] = [];
    for (const [fingerprint, other] of this.watches) {
      if (fingerprint === incident.fingerprint) continue;
      const stats = this.options.registry.get(fingerprint);
      const calls = other.recent.since(now - d.recentWindowMs);
      if (!stats || calls.ms.length < d.minRecentSamples) continue;
      const otherBaseline = other.frozenBaseline ?? this.baseline(stats, now);
      if (!otherBaseline) continue;
      compared++;
      const otherRecent = recentOf(calls, now, d.recentWindowMs);
      if (otherRecent.p95_ms > Math.max(otherBaseline.p95_ms * 1.5, otherBaseline.p95_ms + d.absoluteMs / 2)) alsoSlow.push(fingerprint);
    }
    const othersNormal = compared > 0 && alsoSlow.length <= compared * 0.2;
    checks.push({
      check: 'other_shapes',
      ruled_out: othersNormal,
      summary:
        compared === 0
          ? 'no other shape had enough recent traffic to compare'
          : othersNormal
            ? `other shapes stayed normal: ${compared - alsoSlow.length} of ${compared} kept their p95`
            : `other shapes slowed too: ${alsoSlow.length} of ${compared} (${alsoSlow.slice(0, 5).join(', ')})`,
    });

    const rtt = this.options.roundTrip;
    const before = rtt?.medianBetween(onset - 5 * 60_000, onset) ?? null;
    const after = rtt?.medianBetween(onset, now) ?? null;
    if (before === null || after === null) {
      checks.push({ check: 'round_trip', ruled_out: false, summary: 'no round-trip measurements to the database around the onset' });
    } else {
      const unchanged = after <= before * 2 + 0.5;
      checks.push({
        check: 'round_trip',
        ruled_out: unchanged,
        summary: unchanged
          ? `the proxy-to-database round trip did not change: ${after.toFixed(2)} ms now vs ${before.toFixed(2)} ms before`
          : `the proxy-to-database round trip rose: ${after.toFixed(2)} ms now vs ${before.toFixed(2)} ms before`,
      });
    }
    return checks;
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
    const resolved = [...this.incidents.values()].filter((i) => i.status === 'resolved');
    for (const old of resolved.slice(0, Math.max(0, resolved.length - MAX_RESOLVED))) this.incidents.delete(old.id);
  }
}

function roundPercentiles(p: Percentiles): Percentiles {
  return { p50_ms: round(p.p50_ms), p95_ms: round(p.p95_ms), p99_ms: round(p.p99_ms), rate: round(p.rate), samples: p.samples };
}
