// New shapes: a deploy that ships an unindexed query gives a shape with no
// baseline, which therefore never "regresses". This watch flags shapes first seen
// after pgwarden had learned the workload (a grace period after start) that, within
// their first minutes, are slow from their first calls or take a large share of the
// database time through the proxy: a 'new_shape' event, a log line, a webhook
// message, and "new since T" in the shapes API (status 'new', field new_since).

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import { describePlan } from '../plans/plan.ts';
import type { PlanSampler } from '../plans/sampler.ts';
import { OVERFLOW_FINGERPRINT, type ShapeRegistry, type ShapeStats } from '../shapes/registry.ts';
import type { EventLog } from '../events/timeline.ts';
import type { WebhookSender } from './webhook.ts';

export interface NewShapeOptions {
  readonly registry: ShapeRegistry;
  readonly events: EventLog;
  readonly clock: Clock;
  readonly log: Logger;
  readonly sampler?: PlanSampler | null;
  readonly webhook?: WebhookSender | null;
  /** Shapes first seen within this long of the start are the known workload. */
  readonly graceMs: number;
  /** A shape is judged as new for this long after it was first seen. */
  readonly windowMs: number;
  /** Slow from its first calls: p50 at least this. */
  readonly slowMs: number;
  /** Heavy: at least this share of the database time of the last minute. */
  readonly share: number;
  /** Calls before a shape is judged. */
  readonly minCalls: number;
  readonly intervalMs?: number;
}

export interface NewShape {
  readonly fingerprint: string;
  readonly query: string;
  /** When the shape was first seen (ISO 8601). */
  readonly new_since: string;
  readonly flagged_at: string;
  readonly reason: 'slow' | 'heavy';
  readonly summary: string;
  readonly p50_ms: number;
  readonly share: number;
  readonly plan: string | null;
}

/** A flagged shape waits this long for its first plan before the alert goes out without one. */
const PLAN_WAIT_MS = 5000;
const SHARE_WINDOW_MS = 60_000;

export class NewShapeWatch {
  private readonly startedAt: number;
  private readonly flagged = new Map<string, NewShape>();
  /** When a shape first met the criteria (it may wait for its plan). */
  private readonly pending = new Map<string, number>();
  private timer: NodeJS.Timeout | null = null;

  constructor(private readonly options: NewShapeOptions) {
    this.startedAt = options.clock.now();
  }

  start(): void {
    this.timer = setInterval(() => {
      try {
        this.check();
      } catch (err) {
        this.options.log.error({ err }, 'new-shape check failed');
      }
    }, this.options.intervalMs ?? 2000);
    this.timer.unref();
  }

  stop(): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
  }

  /** The shape's record if it was flagged as new and is still within its window. */
  get(fingerprint: string): NewShape | undefined {
    const shape = this.flagged.get(fingerprint);
    if (shape === undefined) return undefined;
    if (this.options.clock.now() - Date.parse(shape.new_since) > this.options.windowMs) {
      this.flagged.delete(fingerprint);
      return undefined;
    }
    return shape;
  }

  list(): NewShape[] {
    return [...this.flagged.keys()].map((fp) => this.get(fp)).filter((s): s is NewShape => s !== undefined);
  }

  /** One pass over the registry. */
  check(): void {
    const o = this.options;
    const now = o.clock.now();
    const candidates = o.registry
      .all()
      .filter(
        (s) =>
          s.fingerprint !== OVERFLOW_FINGERPRINT &&
          !s.fallback &&
          s.firstSeen >= this.startedAt + o.graceMs &&
          now - s.firstSeen <= o.windowMs,
      );
    if (candidates.length === 0) return;
    // Database time of all shapes per bucket of the last minute, summed once per pass.
    const perBucket = new Map<number, number>();
    for (const s of o.registry.all())
      for (const p of s.series.points(now, now - SHARE_WINDOW_MS))
        perBucket.set(p.t, (perBucket.get(p.t) ?? 0) + p.mean_ms * p.timed);
    for (const stats of candidates) {
      if (this.flagged.has(stats.fingerprint) || stats.timedCalls < o.minCalls) continue;
      const p50 = stats.quantile(0.5);
      // Its share of the database time since it appeared (at most the last minute).
      const from = Math.max(now - SHARE_WINDOW_MS, stats.firstSeen);
      let total = 0;
      let own = 0;
      const points = stats.series.points(now, from);
      for (const p of points) own += p.mean_ms * p.timed;
      const firstBucket = points[0]?.t ?? now;
      for (const [t, ms] of perBucket) if (t >= firstBucket) total += ms;
      const share = total > 0 ? own / total : 0;
      const slow = p50 >= o.slowMs;
      const heavy = share >= o.share;
      if (!slow && !heavy) {
        this.pending.delete(stats.fingerprint);
        continue;
      }
      const since = this.pending.get(stats.fingerprint) ?? now;
      this.pending.set(stats.fingerprint, since);
      const plan = o.sampler?.plansOf(stats.fingerprint)?.current ?? null;
      if (plan === null && o.sampler && now - since < PLAN_WAIT_MS) continue;
      this.pending.delete(stats.fingerprint);
      this.flag(stats, slow ? 'slow' : 'heavy', p50, share, plan ? describePlan(plan.summary) : null, now);
    }
  }

  private flag(
    stats: ShapeStats,
    reason: 'slow' | 'heavy',
    p50: number,
    share: number,
    plan: string | null,
    now: number,
  ): void {
    const since = new Date(stats.firstSeen).toISOString();
    const why =
      reason === 'slow'
        ? `slow from its first calls (p50 ${Math.round(p50 * 10) / 10} ms)`
        : `taking ${Math.round(share * 100)}% of the database time`;
    const shape: NewShape = {
      fingerprint: stats.fingerprint,
      query: stats.query,
      new_since: since,
      flagged_at: new Date(now).toISOString(),
      reason,
      summary: `new since ${since}: shape ${stats.fingerprint} \`${stats.query}\` is ${why}${reason === 'slow' && share > 0 ? `, ${Math.round(share * 100)}% of the database time` : ''}${plan ? `; plan: ${plan}` : ''}`,
      p50_ms: Math.round(p50 * 1000) / 1000,
      share: Math.round(share * 1000) / 1000,
      plan,
    };
    this.flagged.set(stats.fingerprint, shape);
    this.options.events.add({
      type: 'new_shape',
      fingerprint: stats.fingerprint,
      summary: shape.summary,
      details: { ...shape },
    });
    this.options.log.warn(
      {
        fingerprint: stats.fingerprint,
        query: stats.query,
        new_since: since,
        reason,
        p50_ms: shape.p50_ms,
        share: shape.share,
        plan,
      },
      'new shape',
    );
    this.options.webhook?.send({ event: 'new_shape', shape });
  }
}
