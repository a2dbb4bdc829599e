// Saturation evidence: when the database as a whole got busier around the onset and
// the shape's plan did not change, the explanation is the load, not the shape. From
// the sampled pg_stat_activity (sessions that bypass the proxy included): active
// sessions before and after the onset, what they waited on (CPU when they waited on
// nothing), and the top consumers by user, application and statement shape, each
// marked as proxied or not; plus the round trip and the proxied shape whose database
// time grew the most. When the top consumer is a shape through the proxy it is the
// root (the policy may shed it); otherwise the cause says the load is outside the
// proxy and is marked not mitigable.

import type { ShapeRegistry } from '../shapes/registry.ts';
import type { ActivitySample, ActivitySampler } from './activity.ts';
import type { CauseContext, CauseProvider } from './causes.ts';
import type { Cause } from './record.ts';
import type { RoundTripTracker } from './roundtrip.ts';

export interface Consumer {
  readonly user: string;
  readonly application: string;
  readonly fingerprint: string | null;
  readonly query: string | null;
  readonly proxied: boolean;
  /** Average number of its sessions active per sample. */
  readonly sessions: number;
}

export interface Load {
  readonly samples: number;
  /** Average active sessions (lock waits excluded). */
  readonly active: number;
  /** Share of active session samples per wait ('CPU' when waiting on nothing), highest first. */
  readonly waits: { wait: string; share: number }[];
  readonly consumers: Consumer[];
}

/** Active sessions, waits and consumers over some samples. Pure. */
export function loadOf(samples: readonly ActivitySample[]): Load {
  const waits = new Map<string, number>();
  const consumers = new Map<string, { c: Omit<Consumer, 'sessions'>; n: number }>();
  let active = 0;
  for (const sample of samples) {
    const proxiedLeft = new Map(sample.proxied);
    for (const b of sample.backends) {
      if (b.state !== 'active' || b.waitEventType === 'Lock' || b.waitEventType === 'Client') continue;
      active++;
      const wait = b.waitEventType === null ? 'CPU' : `${b.waitEventType}:${b.waitEvent}`;
      waits.set(wait, (waits.get(wait) ?? 0) + 1);
      // As many backends of a shape as the proxy has statements of it in flight are its own.
      let proxied = false;
      const left = b.fingerprint === null ? 0 : (proxiedLeft.get(b.fingerprint) ?? 0);
      if (left > 0) {
        proxied = true;
        proxiedLeft.set(b.fingerprint!, left - 1);
      }
      const key = `${b.user}\u0000${b.application}\u0000${b.fingerprint}\u0000${proxied}`;
      const entry = consumers.get(key) ?? {
        c: { user: b.user, application: b.application, fingerprint: b.fingerprint, query: b.query, proxied },
        n: 0,
      };
      entry.n++;
      consumers.set(key, entry);
    }
  }
  const n = Math.max(samples.length, 1);
  return {
    samples: samples.length,
    active: active / n,
    waits: [...waits]
      .map(([wait, count]) => ({ wait, share: count / Math.max(active, 1) }))
      .sort((a, b) => b.share - a.share),
    consumers: [...consumers.values()]
      .map(({ c, n: count }) => ({ ...c, sessions: count / n }))
      .sort((a, b) => b.sessions - a.sessions),
  };
}

/** Whether the load after the onset is a saturation compared with the load before. */
export function isSaturated(before: Load, after: Load): boolean {
  return before.samples > 0 && after.samples > 0 && after.active >= 2 && after.active >= before.active * 2 + 1;
}

export interface SaturationOptions {
  readonly activity: ActivitySampler;
  readonly registry: ShapeRegistry;
  readonly bucketMs: number;
  readonly roundTrip?: RoundTripTracker | null;
  /** How far before the onset "before" reaches; default 60 s. */
  readonly beforeMs?: number;
}

export class SaturationCauses implements CauseProvider {
  readonly name = 'saturation';

  constructor(private readonly options: SaturationOptions) {}

  causes(context: CauseContext): Cause[] {
    const beforeMs = this.options.beforeMs ?? 60_000;
    const activity = this.options.activity;
    // The onset is estimated from finished calls; leave a margin on both sides.
    const before = loadOf(activity.between(context.onset - beforeMs, context.onset - 3000));
    const after = loadOf(activity.between(context.onset, context.now));
    if (!isSaturated(before, after)) return [];
    // A plan change of the shape since shortly before the onset explains it better.
    if (context.planChanges.some((p) => p.at >= context.onset - 30_000)) return [];
    const top = after.consumers[0];
    const waits = after.waits
      .slice(0, 3)
      .map((w) => `${w.wait} ${Math.round(w.share * 100)}%`)
      .join(', ');
    const outside = after.consumers.filter((c) => !c.proxied).reduce((sum, c) => sum + c.sessions, 0);
    const growth = this.topGrowth(context.onset, context.now, beforeMs);
    const rtt = this.options.roundTrip;
    const rttBefore = rtt?.medianBetween(context.onset - beforeMs, context.onset) ?? null;
    const rttAfter = rtt?.medianBetween(context.onset, context.now) ?? null;
    const who = (c: Consumer) =>
      `${fmt(c.sessions)} session${c.sessions === 1 ? '' : 's'} of user ${c.user}, application ${c.application || '(none)'}${c.query ? `, running \`${c.query}\`` : ''}`;
    let summary = `the database is saturated: ${fmt(after.active)} active sessions on average since the onset vs ${fmt(before.active)} before (${waits})`;
    const proxiedRoot = top?.proxied;
    if (top === undefined) summary += '';
    else if (proxiedRoot) summary += `; the top consumer is a shape through the proxy (${who(top)}): it is the root`;
    else
      summary += `; the top consumer bypasses the proxy (${who(top)}); the load is outside the proxy, so nothing is mitigated`;
    return [
      {
        kind: 'saturation',
        type: 'saturation',
        event_id: null,
        at: new Date(context.onset).toISOString(),
        seconds_before_onset: 0,
        summary,
        relevant: true,
        conclusive: true,
        mitigable: proxiedRoot,
        objects: [],
        evidence: {
          active_before: fmt(before.active),
          active_after: fmt(after.active),
          waits: after.waits.slice(0, 8).map((w) => ({ wait: w.wait, share: Math.round(w.share * 1000) / 1000 })),
          top_consumers: after.consumers.slice(0, 5).map((c) => ({ ...c, sessions: fmt(c.sessions) })),
          sessions_outside_proxy: fmt(outside),
          root: proxiedRoot ? { fingerprint: top.fingerprint, query: top.query } : null,
          round_trip_ms:
            rttBefore !== null && rttAfter !== null ? { before: fmt(rttBefore), after: fmt(rttAfter) } : null,
          top_growth_shape: growth,
        },
      },
    ];
  }

  /** The proxied shape whose database time (ms per second) grew the most from before the onset to after it. */
  private topGrowth(
    onset: number,
    now: number,
    beforeMs: number,
  ): { fingerprint: string; query: string; before_ms_per_s: number; after_ms_per_s: number } | null {
    const bucket = this.options.bucketMs;
    let best: { fingerprint: string; query: string; before_ms_per_s: number; after_ms_per_s: number } | null = null;
    for (const stats of this.options.registry.all()) {
      if (stats.lastSeen < onset - beforeMs) continue;
      let beforeMs_ = 0;
      let afterMs = 0;
      for (const p of stats.series.points(now, onset - beforeMs)) {
        const ms = p.mean_ms * p.timed;
        if (p.t + bucket <= onset) beforeMs_ += ms;
        else if (p.t >= onset - bucket) afterMs += ms;
      }
      const beforeRate = beforeMs_ / (beforeMs / 1000);
      const afterRate = afterMs / (Math.max(now - onset + bucket, 1000) / 1000);
      if (best === null || afterRate - beforeRate > best.after_ms_per_s - best.before_ms_per_s) {
        best = {
          fingerprint: stats.fingerprint,
          query: stats.query,
          before_ms_per_s: fmt(beforeRate),
          after_ms_per_s: fmt(afterRate),
        };
      }
    }
    return best;
  }
}

function fmt(n: number): number {
  return Math.round(n * 10) / 10;
}
