// Causes beyond DDL: the seam through which incident attribution asks other evidence
// for explanations. Each CauseProvider is handed the incident's shape, onset and
// plan history and returns causes; the incident manager merges them with its plan
// and schema causes and leads its summary with the decisive one nearest the effect.
//
// This file also holds the provider for timeline evidence (setting and statistics
// changes); locks.ts and saturation.ts hold those sampled from pg_stat_activity.

import type { Cause, CauseContext, CauseProvider } from './record.ts';
import type { EventLog } from '../events/timeline.ts';

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
   * `watchedUntil`: the time up to which the settings and statistics watches have
   * certainly seen every change (their last completed read). A plan change after it
   * may have a cause they have not read yet, so no change is conclusive until they
   * have: otherwise an older change would be frozen into the incident as its cause.
   */
  constructor(
    private readonly events: EventLog,
    private readonly watchedUntil: () => number = () => Number.POSITIVE_INFINITY,
  ) {}

  causes(context: CauseContext): Cause[] {
    const from = context.onset - CAUSE_LOOKBACK_MS;
    const out: Cause[] = [];
    const lastPlanChange = context.planChanges.at(-1)?.at ?? 0;
    const complete = lastPlanChange <= this.watchedUntil();
    const touching = this.events
      .between(from, context.now, ['setting_change', 'statistics_change'])
      .filter(
        (e) => e.type === 'setting_change' || (e.objects ?? []).some((o) => context.objects.has(o.toLowerCase())),
      );
    for (const e of this.events.between(from, context.now, ['setting_change', 'statistics_change'])) {
      const planAfter = context.planChanges.find((p) => p.at >= e.at);
      const touches = touching.includes(e);
      // The plan reacted to the latest change before it, not to every earlier one.
      const superseded =
        planAfter !== undefined && touching.some((other) => other.at > e.at && other.at <= planAfter.at);
      const decisive = planAfter !== undefined && touches && !superseded && complete;
      const nearby = e.at >= context.onset - NEARBY_MS && e.at <= context.onset + 30_000;
      if (!decisive && !(touches && nearby)) continue;
      let summary = e.type === 'setting_change' ? `setting changed: ${e.summary}` : `statistics changed: ${e.summary}`;
      if (planAfter && decisive)
        summary += `; the plan changed ${Math.max(0, Math.round((planAfter.at - e.at) / 1000))} s later`;
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
 * The cause beyond DDL that leads the incident's summary, if any: the latest
 * decisive setting or statistics change, unless a relevant DDL came after it (the
 * plan then reacted to the DDL, and the DDL attribution stands); else a lock wait or
 * saturation, which explain a slowdown with an unchanged plan.
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
  return causes.find((c) => c.conclusive && (c.type === 'lock_wait' || c.type === 'saturation'));
}
