// Causes beyond DDL: the seam through which incident attribution asks other evidence
// for explanations. Each CauseProvider is handed the incident's shape, onset and
// plan history and returns causes; the incident manager merges them with its plan
// and schema causes and leads its summary with the decisive one nearest the effect.
//
// This file also holds the providers for timeline evidence (setting and statistics
// changes, prepared statements switched to their generic plan); locks.ts and
// saturation.ts hold those sampled from pg_stat_activity.

import type { Cause, CauseContext, CauseProvider } from './record.ts';
import type { EventLog, TimelineEvent } from '../events/timeline.ts';
import { inDatabases } from './scope.ts';

export type { CauseContext, CauseProvider } from './record.ts';

/** How far before the onset timeline causes are looked for (as for DDL). */
export const CAUSE_LOOKBACK_MS = 10 * 60_000;
/** A change with no plan change after it is still shown when this close before the onset. */
const NEARBY_MS = 2 * 60_000;

const round = (n: number) => Math.round(n * 1000) / 1000;

/**
 * Setting and statistics changes. One is decisive when the shape's plan changed
 * after it (a setting or new statistics flip plans, they do not slow them
 * otherwise); a statistics change must also concern a table of the shape's plans.
 */
export class TimelineCauses implements CauseProvider {
  readonly name = 'timeline';

  /**
   * `watchedUntil`: the time up to which the settings and statistics watches (those
   * of the shape's databases; null: all) have certainly seen every change (their
   * last completed read). A plan change after it may have a cause they have not
   * read yet, so no change is conclusive until they have: otherwise an older change
   * would be frozen into the incident as its cause.
   */
  constructor(
    private readonly events: EventLog,
    private readonly watchedUntil: (databases: ReadonlySet<string> | null) => number = () => Number.POSITIVE_INFINITY,
  ) {}

  causes(context: CauseContext): Cause[] {
    const from = context.onset - CAUSE_LOOKBACK_MS;
    const out: Cause[] = [];
    const databases = context.databases ?? null;
    const lastPlanChange = context.planChanges.at(-1)?.at ?? 0;
    const complete = lastPlanChange <= this.watchedUntil(databases);
    // A change in another database (its statistics, ALTER DATABASE ... SET) is none of the shape's.
    const changes = this.events
      .between(from, context.now, ['setting_change', 'statistics_change'])
      .filter((e) => inDatabases(e, databases));
    const touching = changes.filter(
      (e) => e.type === 'setting_change' || (e.objects ?? []).some((o) => context.objects.has(o.toLowerCase())),
    );
    for (const e of changes) {
      const planAfter = context.planChanges.find((p) => p.at >= e.at);
      const touches = touching.includes(e);
      // The plan reacted to the latest change before it, not to every earlier one.
      const superseded =
        planAfter !== undefined && touching.some((other) => other.at > e.at && other.at <= planAfter.at);
      const decisive = planAfter !== undefined && touches && !superseded && complete;
      const nearby = e.at >= context.onset - NEARBY_MS && e.at <= context.onset + 30_000;
      if (!decisive && !(touches && nearby)) continue;
      let summary = e.type === 'setting_change' ? `setting changed: ${e.summary}` : `statistics changed: ${e.summary}`;
      if (planAfter && decisive) {
        const seconds = Math.max(0, Math.round((planAfter.at - e.at) / 1000));
        // A setting change is placed at the start of the window it was found in: an upper bound.
        summary +=
          e.type === 'setting_change'
            ? `; the plan changed within ${seconds} s`
            : `; the plan changed ${seconds} s later`;
      }
      const details = planAfter?.type === 'plan_change' ? planAfter.details : undefined;
      // New statistics act through the planner's estimates: show them moving.
      if (planAfter && e.type === 'statistics_change' && details?.estimates_before)
        summary += `; estimates: ${details.estimates_before} -> ${details.estimates_after}`;
      out.push({
        kind: e.type as 'setting_change' | 'statistics_change',
        type: e.type as 'setting_change' | 'statistics_change',
        event_id: e.id,
        at: new Date(e.at).toISOString(),
        seconds_before_onset: round((context.onset - e.at) / 1000),
        summary,
        relevant: touches,
        conclusive: decisive,
        objects: [...(e.objects ?? [])],
        evidence: {
          ...(e.details ?? {}),
          ...(planAfter
            ? {
                plan_change_event: planAfter.id,
                plan_before: details?.before,
                plan_after: details?.after,
                estimates_before: details?.estimates_before,
                estimates_after: details?.estimates_after,
              }
            : {}),
        },
      });
    }
    return out;
  }
}

/**
 * Prepared statements the server switched to their generic plan. With
 * plan_cache_mode = auto the server plans the first five executions of a prepared
 * statement for their values, then uses the generic plan if it does not look more
 * expensive than those did on average: a statement whose first executions had
 * values that suit a sequential scan keeps that plan for every later value, and
 * nothing changed in the database. The sampler replays that choice (plans/explain.ts)
 * and records the kind with each plan; a plan change from a custom to the generic
 * plan under `auto` explains the incident on its own. Under force_generic_plan the
 * setting is the cause, which the settings watch reports.
 */
export class PreparedPlanCauses implements CauseProvider {
  readonly name = 'prepared_plan';

  causes(context: CauseContext): Cause[] {
    // The latest switch: an older one was superseded by the plans sampled since.
    let e: (TimelineEvent & { type: 'plan_change' }) | undefined;
    for (const p of context.planChanges) {
      if (p.type !== 'plan_change' || p.details === undefined) continue;
      const d = p.details;
      if (d.kind_before === 'custom' && d.kind_after === 'generic' && d.plan_cache_mode === 'auto') e = p;
    }
    if (e?.details === undefined) return [];
    const d = e.details;
    return [
      {
        kind: 'generic_plan',
        type: 'generic_plan',
        event_id: e.id,
        at: new Date(e.at).toISOString(),
        seconds_before_onset: round((context.onset - e.at) / 1000),
        summary: `prepared statement switched to its generic plan after 5 executions (custom plans before): ${d.before} -> ${d.after}`,
        relevant: true,
        conclusive: true,
        mitigable: true,
        objects: [...(e.objects ?? [])],
        evidence: {
          plan_change_event: e.id,
          plan_before: d.before,
          plan_after: d.after,
          kind_before: d.kind_before,
          kind_after: d.kind_after,
          kind_reason: d.kind_reason ?? null,
          plan_cache_mode: d.plan_cache_mode,
        },
      },
    ];
  }
}

/**
 * The cause beyond DDL that leads the incident's summary, if any: the latest
 * decisive setting or statistics change, unless a relevant DDL came after it (the
 * plan then reacted to the DDL, and the DDL attribution stands); else a prepared
 * statement's switch to its generic plan; else a lock wait or saturation, which
 * explain a slowdown with an unchanged plan.
 */
export function leadingCause(causes: readonly Cause[]): Cause | undefined {
  const changes = causes
    .filter((c) => c.conclusive && (c.type === 'setting_change' || c.type === 'statistics_change'))
    .sort((a, b) => Date.parse(b.at) - Date.parse(a.at));
  if (changes.length > 0) {
    const latest = Date.parse(changes[0].at);
    const ddlAfter = causes.some(
      (c) => (c.type === 'ddl' || c.type === 'schema_change') && c.relevant && Date.parse(c.at) > latest,
    );
    return ddlAfter ? undefined : changes[0];
  }
  return (
    causes.find((c) => c.conclusive && c.type === 'generic_plan') ??
    causes.find((c) => c.conclusive && (c.type === 'lock_wait' || c.type === 'saturation'))
  );
}
