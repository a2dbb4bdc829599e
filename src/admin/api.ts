// JSON API routes over the shape registry (documented in docs/api.md). Field names are
// the contract: snake_case, times in ms, timestamps as ISO 8601 strings.

import type { Clock } from '../clock.ts';
import type { FleetShape } from '../shapes/fleet.ts';
import type { ShapeRegistry, ShapeStats } from '../shapes/registry.ts';
import { ApiError, type Route } from './server.ts';

/** How a shape is doing; later modules (incidents, rules) refine 'ok'. */
export type ShapeStatusOf = (fingerprint: string) => string;

/** What both an instance's shapes and the fleet's merged ones offer for sorting. */
type Sortable = Pick<ShapeStats, 'totalMs' | 'calls' | 'meanMs' | 'quantile'>;

const SORTS = {
  total_time: (s: Sortable) => s.totalMs,
  calls: (s: Sortable) => s.calls,
  p95: (s: Sortable) => s.quantile(0.95),
  mean: (s: Sortable) => s.meanMs,
} as const;

const round = (ms: number) => Math.round(ms * 1000) / 1000;

/** What a shape's summary reads, from this instance's registry or merged over the fleet. */
interface ShapeFigures {
  readonly fingerprint: string;
  readonly query: string;
  readonly command: string;
  readonly calls: number;
  readonly errors: number;
  readonly errorsByClass: Iterable<readonly [string, number]>;
  readonly rows: number;
  readonly totalMs: number;
  readonly meanMs: number;
  quantile(q: number): number;
  readonly firstSeen: number;
  readonly lastSeen: number;
  readonly fallback: boolean;
  readonly users: Iterable<string>;
  readonly databases: Iterable<string>;
  readonly applications: Iterable<string>;
}

function figuresOf(s: ShapeFigures) {
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
  };
}

function originOf(s: ShapeFigures) {
  return {
    fallback: s.fallback,
    users: [...s.users],
    databases: [...s.databases],
    application_names: [...s.applications],
  };
}

export function shapeSummary(s: ShapeStats, status: string, newSince: string | null = null) {
  return {
    ...figuresOf(s),
    status,
    /** First seen recently and flagged as slow or heavy by the new-shape watch: since when. */
    new_since: newSince,
    ...originOf(s),
  };
}

/** A shape merged over the fleet: the instance fields, plus how many instances ran it and their share. */
export function fleetShapeSummary(s: FleetShape, status: string) {
  return { ...figuresOf(s), status, ...originOf(s), instances: s.instances.length };
}

/** The fleet's shapes; the control database being down is a 503, like a rule change then. */
async function readFleet(fleet: NonNullable<DetailSources['fleet']>): Promise<FleetShape[]> {
  try {
    return await fleet();
  } catch (err) {
    throw new ApiError(503, `fleet view unavailable: ${(err as Error).message}`);
  }
}

function scopeOf(query: URLSearchParams, fleet: DetailSources['fleet']): 'instance' | 'fleet' {
  const scope = query.get('scope') ?? 'instance';
  if (scope !== 'instance' && scope !== 'fleet')
    throw new ApiError(400, `scope must be instance or fleet; got '${scope}'`);
  if (scope === 'fleet' && !fleet) throw new ApiError(400, 'scope=fleet needs a control database (control_url)');
  return scope;
}

export function shapeRoutes(
  registry: ShapeRegistry,
  clock: Clock,
  statusOf: ShapeStatusOf = () => 'ok',
  detail: DetailSources = {},
): Route[] {
  return [
    {
      method: 'GET',
      path: '/api/shapes',
      async handle({ query }) {
        const scope = scopeOf(query, detail.fleet);
        const sort = query.get('sort') ?? 'total_time';
        if (!(sort in SORTS))
          throw new ApiError(400, `sort must be one of ${Object.keys(SORTS).join(', ')}; got '${sort}'`);
        const limitText = query.get('limit') ?? '100';
        const limit = Number(limitText);
        if (!Number.isInteger(limit) || limit < 1 || limit > 10_000)
          throw new ApiError(400, `limit must be an integer from 1 to 10000; got '${limitText}'`);
        const status = query.get('status');
        const key = SORTS[sort as keyof typeof SORTS];
        if (scope === 'fleet') {
          const fleet = (await readFleet(detail.fleet!)).sort((a, b) => key(b) - key(a)).slice(0, limit);
          return { status: 200, body: fleet.map((s) => fleetShapeSummary(s, statusOf(s.fingerprint))) };
        }
        const all =
          status === null
            ? registry.all()
            : registry
                .all()
                .filter(
                  (s) => statusOf(s.fingerprint) === status || (status === 'new' && detail.newSinceOf?.(s.fingerprint)),
                );
        const shapes = all.sort((a, b) => key(b) - key(a)).slice(0, limit);
        return {
          status: 200,
          body: shapes.map((s) => shapeSummary(s, statusOf(s.fingerprint), detail.newSinceOf?.(s.fingerprint) ?? null)),
        };
      },
    },
    {
      method: 'GET',
      path: '/api/shapes/:fingerprint',
      async handle({ params, query }) {
        if (scopeOf(query, detail.fleet) === 'fleet') {
          const shape = (await readFleet(detail.fleet!)).find((s) => s.fingerprint === params.fingerprint);
          if (!shape) throw new ApiError(404, `no shape with fingerprint '${params.fingerprint}' in the fleet`);
          return {
            status: 200,
            body: {
              ...fleetShapeSummary(shape, statusOf(shape.fingerprint)),
              by_instance: shape.instances.map((i) => ({
                instance: i.instance,
                calls: i.calls,
                p95_ms: round(i.p95_ms),
              })),
            },
          };
        }
        const stats = registry.get(params.fingerprint);
        if (!stats) throw new ApiError(404, `no shape with fingerprint '${params.fingerprint}'`);
        const now = clock.now();
        const sinceText = query.get('since_s') ?? '3600';
        const since = Number(sinceText);
        if (!Number.isFinite(since) || since <= 0)
          throw new ApiError(400, `since_s must be a positive number of seconds; got '${sinceText}'`);
        return {
          status: 200,
          body: {
            ...shapeSummary(stats, statusOf(stats.fingerprint), detail.newSinceOf?.(stats.fingerprint) ?? null),
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
  /** Every live instance's shapes merged (through the control database); enables `?scope=fleet`. */
  readonly fleet?: () => Promise<FleetShape[]>;
  /** When a shape flagged as new was first seen (ISO 8601), else null. */
  readonly newSinceOf?: (fingerprint: string) => string | null;
  /** The detector's baseline and recent-window figures (current, not lifetime). */
  readonly detectorOf?: (fingerprint: string) => unknown;
}
