// Attribution: which changes on the timeline explain an incident, and how its one
// line reads. Plan changes of the root come first, then schema changes by suspicion
// (a dropped index the root's plans used, then anything touching its tables) and
// proximity to the onset; extra cause providers (CauseProvider) add their own. A
// DDL seen through the proxy has its exact time; a catalog change found by the
// schema watch only happened "between" two checks, and is never placed after the
// onset when it may have run before it.

import type { EventLog, TimelineEvent } from '../events/timeline.ts';
import { RelationSet, type RelationLookup } from '../plans/relations.ts';
import type { Cause, Incident } from './record.ts';
import { leadingCause } from './causes.ts';
import { inDatabases } from './scope.ts';

/** How far before the onset causes are looked for. */
export const CAUSE_LOOKBACK_MS = 10 * 60_000;
/** Without a relevant schema change, nearby ones within this window are shown. */
export const NEARBY_MS = 2 * 60_000;

export const round3 = (n: number) => Math.round(n * 1000) / 1000;

export interface PlanKnowledge {
  /** Indexes used by any plan the shape has had (schema-qualified when the plan said). */
  indexes(fingerprint: string): RelationLookup;
  /** Tables and indexes of any plan the shape has had. */
  objects(fingerprint: string): RelationLookup;
}

/**
 * The objects a timeline event touches, schema-qualified where the event knows
 * the schema: the catalog watch names it in its details (its `objects` stay bare,
 * as the first API had them), so an index dropped in one tenant's schema touches
 * that tenant's plans only. DDL seen through the proxy names a schema only when the
 * statement did; unqualified, it may be any schema's.
 */
export function touchedObjects(e: TimelineEvent): string[] {
  const objects = (e.objects ?? []).map((o) => o.toLowerCase());
  const schema = e.type === 'schema_change' ? e.details?.schema : undefined;
  if (typeof schema !== 'string' || schema === '') return objects;
  return objects.map((o) => (o.includes('.') ? o : `${schema.toLowerCase()}.${o}`));
}

/** The interval a timeline event may have happened in: exact for DDL, between two checks for the catalog. */
export function whenOf(e: TimelineEvent): { from: number; to: number } {
  if (e.type !== 'schema_change') return { from: e.at, to: e.at };
  const since = Number(e.details?.since);
  return { from: Number.isFinite(since) && since <= e.at ? since : e.at, to: e.at };
}

/** Seconds before the onset: positive before, negative after, 0 when the interval holds the onset. */
export function secondsBeforeOnset(interval: { from: number; to: number }, onset: number): number {
  if (interval.to <= onset) return round3((onset - interval.to) / 1000);
  if (interval.from <= onset) return 0;
  return round3((onset - interval.from) / 1000);
}

export function causeOf(e: TimelineEvent, onset: number, relevant: boolean): Cause {
  const interval = whenOf(e);
  const base = {
    event_id: e.id,
    at: new Date(e.at).toISOString(),
    seconds_before_onset: secondsBeforeOnset(interval, onset),
    summary: e.summary,
    relevant,
    objects: [...(e.objects ?? [])],
  };
  if (e.type === 'plan_change') {
    return {
      ...base,
      kind: 'plan_change',
      type: 'plan_change',
      diff: {
        headline: e.summary,
        ...e.details,
        removed: [...(e.details?.removed ?? [])],
        added: [...(e.details?.added ?? [])],
      },
    };
  }
  if (e.type === 'ddl') return { ...base, kind: 'ddl', type: 'ddl', statement: e.details?.statement ?? e.summary };
  return {
    ...base,
    kind: 'schema_change',
    type: 'schema_change',
    between: { from: new Date(interval.from).toISOString(), to: new Date(interval.to).toISOString() },
  };
}

/**
 * Plan and schema causes of an incident from the timeline, as known at `until`.
 * `root` null (database-wide): schema changes near the onset only, none relevant.
 * `databases`: where the root ran (null: unknown); a change in another database is
 * no cause of it, not even a nearby one (the same table and index names recur
 * across databases: one app's schema in each).
 */
export function timelineCauses(
  events: EventLog,
  plans: PlanKnowledge | null,
  root: string | null,
  onset: number,
  until: number,
  databases: ReadonlySet<string> | null = null,
): Cause[] {
  const from = onset - CAUSE_LOOKBACK_MS;
  const schemaEvents = events
    .between(from, until, ['ddl', 'schema_change'])
    .filter((e) => root === null || inDatabases(e, databases));
  if (root === null)
    return schemaEvents.filter((e) => whenOf(e).to >= onset - NEARBY_MS).map((e) => causeOf(e, onset, false));
  const planEvents = events.between(from, until, ['plan_change']).filter((e) => e.fingerprint === root);
  const objects = new RelationSet(plans?.objects(root) ?? []);
  for (const e of planEvents) for (const o of e.objects ?? []) objects.add(o);
  // What the root's plan changes stopped using: the index a drop must have removed.
  const removed = new RelationSet();
  for (const e of planEvents)
    for (const o of (e.type === 'plan_change' ? e.details?.removed_objects : undefined) ?? []) removed.add(o);
  // The prime suspect is a change to an index the root's plans used (usually its
  // removal; first of all the one its plan change stopped using), then anything else
  // touching its tables; unrelated changes only show when nothing relevant exists,
  // and only near the onset.
  const usedIndexes = plans?.indexes(root) ?? new RelationSet();
  const score = (e: TimelineEvent) => {
    const touched = touchedObjects(e);
    const drop = /drop/i.test(e.summary);
    if (drop && touched.some((o) => removed.has(o) && usedIndexes.has(o))) return 4;
    if (touched.some((o) => usedIndexes.has(o))) return drop ? 3 : 2;
    return touched.some((o) => objects.has(o)) ? 1 : 0;
  };
  const relevant = schemaEvents.filter((e) => score(e) > 0);
  const chosen = relevant.length > 0 ? relevant : schemaEvents.filter((e) => whenOf(e).to >= onset - NEARBY_MS);
  const byProximity = (a: Cause, b: Cause) => Math.abs(a.seconds_before_onset) - Math.abs(b.seconds_before_onset);
  const scored = chosen.map((e) => ({ cause: causeOf(e, onset, score(e) > 0), score: score(e) }));
  scored.sort((a, b) => b.score - a.score || byProximity(a.cause, b.cause));
  return [...planEvents.map((e) => causeOf(e, onset, true)).sort(byProximity), ...scored.map((s) => s.cause)];
}

const isSchemaCause = (c: Cause) => c.kind === 'ddl' || c.kind === 'schema_change';

/** Attributed: a plan change with a schema (or other) change to explain it, or one conclusive cause. */
export function isAttributed(causes: readonly Cause[]): boolean {
  if (causes.some((c) => c.conclusive)) return true;
  // A setting or statistics change explains a plan change only when it is conclusive
  // (the latest before the flip, once the watches have read past it): see causes.ts.
  return causes.some((c) => c.kind === 'plan_change') && causes.some(isSchemaCause);
}

const clock = (ms: number) => new Date(ms).toISOString().slice(11, 21);

/** How a non-plan cause reads in the summary, placed against the onset. */
export function causePhrase(c: Cause, onset: number): string {
  if (c.kind === 'schema_change') {
    const from = Date.parse(c.between.from);
    const to = Date.parse(c.between.to);
    const where = to <= onset ? 'before the onset' : from <= onset ? 'around the onset' : 'after the onset';
    return `the catalog showed: ${c.summary}, between ${clock(from)} and ${clock(to)} UTC (${where} at ${clock(onset)})`;
  }
  const seconds = Math.round(c.seconds_before_onset);
  const what = c.kind === 'ddl' ? `\`${c.statement}\` was seen` : c.summary;
  return seconds >= 0 ? `${seconds} s after ${what}` : `${what} (${-seconds} s after the onset)`;
}

const pct = (share: number) => `${Math.round(share * 100)}%`;

/** The incident's one line. */
export function summaryOf(incident: Incident): string {
  const onset = Date.parse(incident.onset);
  let summary: string;
  if (incident.kind === 'database_wide') {
    const e = incident.evidence;
    summary = `database-wide slowdown: ${e ? `${e.slowed} of ${e.compared} shapes` : `${incident.victims.length} shapes`} slowed together with no plan change`;
    if (e?.round_trip_before_ms != null && e.round_trip_after_ms != null) {
      summary += `, round trip ${e.round_trip_before_ms.toFixed(2)} ms -> ${e.round_trip_after_ms.toFixed(2)} ms`;
    }
    summary += ' (the database or its host is saturated)';
  } else {
    summary = `shape ${incident.fingerprint}: p95 ${incident.baseline.p95_ms} ms -> ${incident.current.p95_ms} ms`;
    if (incident.peak.p95_ms > incident.current.p95_ms) summary += ` (peak ${incident.peak.p95_ms} ms)`;
  }
  const plan = incident.causes.find((c) => c.kind === 'plan_change');
  const other = incident.causes.find((c) => isSchemaCause(c) && c.relevant) ?? incident.causes.find(isSchemaCause);
  if (plan) summary += `, plan changed ${plan.summary}`;
  const lead = leadingCause(incident.causes);
  if (lead) summary += `; cause: ${lead.summary}`;
  else if (other)
    summary +=
      other.kind === 'schema_change' || Math.round(other.seconds_before_onset) < 0
        ? `; ${causePhrase(other, onset)}`
        : `, ${causePhrase(other, onset)}`;
  if (incident.kind === 'shape' && incident.victims.length > 0) {
    summary += `; ${incident.victims.length} other shape${incident.victims.length === 1 ? '' : 's'} slowed with it (${pct(incident.impact.share_of_calls)} of calls affected)`;
  }
  return summary;
}
