// The incident record: what the API, the dashboard, the webhook, the control
// database and the postmortem all show. One incident per cause: a `shape` incident
// names its root shape (whose plan changed, or which regressed on its own) and the
// victims it slowed; a `database_wide` one says most shapes slowed together with no
// plan change (the database or its host is saturated). Field names are the contract.

import type { Percentiles } from './detector.ts';
import type { TimelineEvent } from '../events/timeline.ts';
import type { RelationLookup } from '../plans/relations.ts';

/** What every cause has, whatever its kind (the fields new kinds share). */
export interface CauseBase {
  /** The timeline event it comes from (null for causes of providers without one). */
  event_id: number | null;
  /** When it happened (or was seen: see `between` of schema changes). */
  at: string;
  /** Positive: before the onset; negative: after it; 0: may have been at the onset. */
  seconds_before_onset: number;
  summary: string;
  /** Whether it touches a table or index of the root's plans. */
  relevant: boolean;
  objects: string[];
  /**
   * A cause that explains the incident on its own (a provider's strong evidence);
   * plan and schema changes explain it together instead.
   */
  conclusive?: boolean;
  /** Same as `kind` (the name the first API used). */
  type: string;
}

export interface PlanChangeCause extends CauseBase {
  kind: 'plan_change';
  type: 'plan_change';
  diff?: { headline: string; removed: string[]; added: string[]; before?: string; after?: string };
}

/** A DDL statement seen through the proxy: its time is exact. */
export interface DdlCause extends CauseBase {
  kind: 'ddl';
  type: 'ddl';
  statement: string;
}

/** A catalog difference found by the schema watch: it happened between two checks. */
export interface SchemaChangeCause extends CauseBase {
  kind: 'schema_change';
  type: 'schema_change';
  /** The last check that did not see it, and the one that did. */
  between: { from: string; to: string };
}

/** Evidence beyond plans and DDL, from the cause providers (see causes.ts, locks.ts, saturation.ts). */
export type ProvidedCauseKind = 'setting_change' | 'statistics_change' | 'lock_wait' | 'saturation' | 'generic_plan';

export interface ProvidedCause extends CauseBase {
  kind: ProvidedCauseKind;
  type: ProvidedCauseKind;
  /** false: shedding a shape would not help (a lock held elsewhere, load outside the proxy). */
  mitigable?: boolean;
  /** What the provider saw (blocking session, wait events, consumers, estimates...). */
  evidence?: Record<string, unknown>;
}

/**
 * Why an incident happened, by kind. New evidence modules add their own member
 * here (with a literal `kind`) and return it from a CauseProvider.
 */
export type Cause = PlanChangeCause | DdlCause | SchemaChangeCause | ProvidedCause;

export interface Check {
  check: 'traffic' | 'other_shapes' | 'round_trip';
  ruled_out: boolean;
  summary: string;
}

/** A shape slowed by the incident's cause, without a plan change of its own. */
export interface Victim {
  fingerprint: string;
  query: string;
  /** Its share of all calls seen in the recent window when it joined. */
  share_of_calls: number;
  joined_at: string;
  baseline_p95_ms: number;
  peak_p95_ms: number;
  current_p95_ms: number;
}

/** Who was hurt: the root and its victims together. */
export interface Impact {
  shapes: number;
  /** Share of all calls (recent window) made by the affected shapes, at the worst moment. */
  share_of_calls: number;
  applications: string[];
  users: string[];
  databases: string[];
}

/** The worst moment: the root's (or, database-wide, the busiest victim's) figures then. */
export type Peak = Percentiles & { at: string };

/** What happened after attribution: the fix and the plan flipping back. */
export interface ResolutionEvent {
  at: string;
  type: string;
  summary: string;
}

export interface Resolution {
  /** recovered: latency back to baseline; silent: the shape stopped being called; superseded: folded into another incident. */
  reason: 'recovered' | 'silent' | 'superseded';
  summary: string;
  /** Plan changes of the root and schema changes on its objects after attribution, oldest first. */
  events: ResolutionEvent[];
}

export interface TimelineEntry {
  at: string;
  what: 'onset' | 'detected' | 'attributed' | 'victim' | 'peak' | 'mitigation' | 'change' | 'resolved';
  summary: string;
}

export type IncidentKind = 'shape' | 'database_wide';

export interface Incident {
  id: string;
  kind: IncidentKind;
  /** The root shape's fingerprint; null for database_wide. */
  root: string | null;
  /** The root's fingerprint (kept for the first consumers); '' for database_wide. */
  fingerprint: string;
  query: string;
  status: 'active' | 'resolved';
  onset: string;
  detected_at: string;
  attributed_at: string | null;
  resolved_at: string | null;
  /** Seconds from onset to detection, and to attribution (null until attributed). */
  detection_s: number;
  attribution_s: number | null;
  /** Current p95 over baseline p95 (the last value while active). */
  severity: number;
  baseline: Percentiles;
  /** Where the baseline came from: 10 minutes of history, a young shape's calls, or saved before a restart. */
  baseline_from: string;
  current: Percentiles;
  peak: Peak;
  victims: Victim[];
  impact: Impact;
  summary: string;
  attributed: boolean;
  /** Frozen at attribution; what came later is in `resolution`. */
  causes: Cause[];
  ruled_out: { check: Check['check']; summary: string }[];
  checks: Check[];
  /** Database-wide: how many shapes slowed out of how many compared, and the round trip. */
  evidence?: {
    slowed: number;
    compared: number;
    round_trip_before_ms: number | null;
    round_trip_after_ms: number | null;
  };
  /** What the mitigation policy did about it (set by the policy, if one runs). */
  mitigation?: {
    mode: string;
    action: string;
    rule_id: string | null;
    note: string;
    refused?: readonly { fingerprint: string | null; reason: string }[];
  };
  resolution: Resolution | null;
  timeline: TimelineEntry[];
}

export type IncidentChange = 'opened' | 'attributed' | 'resolved';
export type IncidentListener = (incident: Incident, change: IncidentChange) => void;

/**
 * What a cause provider is told about an incident being attributed: the shape it
 * is about (the root; for a database-wide incident, its busiest slowed shape),
 * that shape's plan history, the onset and the tables and indexes of its plans.
 */
export interface CauseContext {
  readonly incident?: Readonly<Incident>;
  /** The shape judged (the root, or the busiest victim of a database-wide incident); '' when none. */
  readonly fingerprint: string;
  /** Epoch ms. */
  readonly onset: number;
  readonly now: number;
  /** Tables and indexes of the shape's plans: a bare name matches any schema's (see plans/relations.ts). */
  readonly objects: RelationLookup;
  /** The shape's plan changes from the lookback to now, oldest first. */
  readonly planChanges: readonly TimelineEvent[];
  /** The databases the shape ran in; null or absent: not known, any (see attribution.ts, shapeDatabases). */
  readonly databases?: ReadonlySet<string> | null;
}

/**
 * Extra evidence for attribution (settings, statistics, locks, saturation...). Called
 * at each attribution attempt until the incident is attributed, then never again for
 * it (its causes are frozen). Synchronous: a provider that needs the database gathers
 * its evidence on its own schedule and answers from what it holds. A throwing
 * provider is logged and skipped.
 */
export interface CauseProvider {
  readonly name: string;
  causes(context: CauseContext): Cause[];
}
