// JSON API routes over the shape registry (PRODUCT.md section 5). Field names are
// the contract: snake_case, times in ms, timestamps as ISO 8601 strings.

import type { Clock } from '../clock.ts';
import type { ShapeRegistry, ShapeStats } from '../shapes/registry.ts';
import { ApiError, type Route } from './server.ts';

/** How a shape is doing; later modules (incidents, rules) refine 'ok'. */
export type ShapeStatusOf = (fingerprint: string) => string;

const SORTS = {
  total_time: (s: ShapeStats) => s.totalMs,
  calls: (s: ShapeStats) => s.calls,
  p95: (s: ShapeStats) => s.quantile(0.95),
  mean: (s: ShapeStats) => s.meanMs,
} as const;

const round = (ms: number) => Math.round(ms * 1000) / 1000;

export function shapeSummary(s: ShapeStats, status: string) {
  return {
    fingerprint: s.fingerprint,
    query: s.query,
    command: s.command,
    calls: s.calls,
    errors: s.errors,
    errors_by_class: Object.fromEntries(s.errorsByClass),
    rows: s.rows,
    total_ms: round(s.totalMs),
    mean_ms: round(s.meanMs),
    p50_ms: round(s.quantile(0.5)),
    p95_ms: round(s.quantile(0.95)),
    p99_ms: round(s.quantile(0.99)),
    first_seen: new Date(s.firstSeen).toISOString(),
    last_seen: new Date(s.lastSeen).toISOString(),
    status,
    fallback: s.fallback,
    users: [...s.users],
    databases: [...s.databases],
    application_names: [...s.applications],
  };
}

export function shapeRoutes(registry: ShapeRegistry, clock: Clock, statusOf: ShapeStatusOf = () => 'ok', detail: DetailSources = {}): Route[] {
  return [
    {
      method: 'GET',
      path: '/api/shapes',
      handle({ query }) {
        const sort = query.get('sort') ?? 'total_time';
        if (!(sort in SORTS)) throw new ApiError(400, `sort must be one of ${Object.keys(SORTS).join(', ')}; got '${sort}'`);
        const limitText = query.get('limit') ?? '100';
        const limit = Number(limitText);
        if (!Number.isInteger(limit) || limit < 1 || limit > 10_000) throw new ApiError(400, `limit must be an integer from 1 to 10000; got '${limitText}'`);
        const key = SORTS[sort as keyof typeof SORTS];
        const shapes = registry.all().sort((a, b) => key(b) - key(a)).slice(0, limit);
        return { status: 200, body: shapes.map((s) => shapeSummary(s, statusOf(s.fingerprint))) };
      },
    },
    {
      method: 'GET',
      path: '/api/shapes/:fingerprint',
      handle({ params, query }) {
        const stats = registry.get(params.fingerprint);
        if (!stats) throw new ApiError(404, `no shape with fingerprint '${params.fingerprint}'`);
        const now = clock.now();
        const sinceText = query.get('since_s') ?? '3600';
        const since = Number(sinceText);
        if (!Number.isFinite(since) || since <= 0) throw new ApiError(400, `since_s must be a positive number of seconds; got '${sinceText}'`);
        return {
          status: 200,
          body: {
            ...shapeSummary(stats, statusOf(stats.fingerprint)),
            series: stats.series.points(now, now - since * 1000),
            ...(detail.plansOf ? { plans: detail.plansOf(stats.fingerprint) } : {}),
            ...(detail.eventsOf ? { events: detail.eventsOf(stats.fingerprint) } : {}),
            ...(detail.incidentsOf ? { incidents: detail.incidentsOf(stats.fingerprint) } : {}),
            ...(detail.rulesOf ? { rules: detail.rulesOf(stats.fingerprint) } : {}),
            ...(detail.detectorOf ? { detector: detail.detectorOf(stats.fingerprint) } : {}),
          },
        };
      },
    },
  ];
}

export interface DetailSources {
  readonly plansOf?: (fingerprint: string) => unknown;
  readonly eventsOf?: (fingerprint: string) => unknown;
  readonly incidentsOf?: (fingerprint: string) => unknown;
  readonly rulesOf?: (fingerprint: string) => unknown;
  /** The detector's baseline and recent-window figures (current, not lifetime). */
  readonly detectorOf?: (fingerprint: string) => unknown;
}
