// JSON API routes over incidents (paged, newest first, with a Markdown postmortem
// each), the event timeline and plan histories.

import type { EventLog, EventType, TimelineEvent } from '../events/timeline.ts';
import type { IncidentManager } from '../detect/incidents.ts';
import { postmortemMarkdown } from '../detect/postmortem.ts';
import type { PlanSampler } from '../plans/sampler.ts';
import { ApiError, type Route } from './server.ts';

const EVENT_TYPES: EventType[] = [
  'ddl',
  'schema_change',
  'plan_change',
  'setting_change',
  'statistics_change',
  'new_shape',
  'admin_action',
  'incident_opened',
  'incident_resolved',
  'rule_added',
  'rule_removed',
  'mitigation',
];

export function eventJson(e: TimelineEvent) {
  return { ...e, at: new Date(e.at).toISOString() };
}

/** A shape's plan history for the shape detail: current plan, past plans, changes with diffs. */
export function plansJson(sampler: PlanSampler, fingerprint: string) {
  const plans = sampler.plansOf(fingerprint);
  if (!plans) return { current: null, history: [], changes: [], last_error: null, not_sampled: null };
  const record = (r: NonNullable<typeof plans.current>) => ({
    fingerprint: r.summary.fingerprint,
    nodes: r.summary.nodes.map((n) => n.description),
    relations: r.summary.relations,
    indexes: r.summary.indexes,
    schemas: r.summary.schemas,
    kind: r.kind,
    kind_reason: r.kindReason,
    plan_cache_mode: r.planCacheMode,
    total_cost: r.summary.totalCost,
    first_seen: new Date(r.firstSeen).toISOString(),
    last_seen: new Date(r.lastSeen).toISOString(),
    samples: r.samples,
  });
  return {
    current: plans.current ? record(plans.current) : null,
    history: plans.history.map(record),
    changes: plans.changes.map((c) => ({ at: new Date(c.at).toISOString(), from: c.from, to: c.to, ...c.diff })),
    last_error: plans.lastError,
    not_sampled: plans.notSampled,
  };
}

export function incidentRoutes(incidents: IncidentManager, events: EventLog, fleet?: () => unknown[]): Route[] {
  return [
    {
      method: 'GET',
      path: '/api/incidents',
      handle({ query }) {
        const status = query.get('status') ?? 'all';
        if (status !== 'all' && status !== 'active' && status !== 'resolved')
          throw new ApiError(400, `status must be active, resolved or all; got '${status}'`);
        const scope = query.get('scope') ?? 'instance';
        if (scope !== 'instance' && scope !== 'fleet')
          throw new ApiError(400, `scope must be instance or fleet; got '${scope}'`);
        const limit = integerParam(query, 'limit', 100, 1, 1000);
        const offset = integerParam(query, 'offset', 0, 0, 1_000_000);
        let list: unknown[];
        if (scope === 'fleet') {
          if (!fleet) throw new ApiError(400, 'scope=fleet needs a control database (control_url)');
          const all = fleet() as { status?: string }[];
          list = status === 'all' ? all : all.filter((i) => i.status === status);
        } else {
          list = incidents.list(status === 'all' ? undefined : status);
        }
        // The body stays a plain array (newest first); the total is in a header.
        return {
          status: 200,
          body: list.slice(offset, offset + limit),
          headers: { 'X-Total-Count': String(list.length) },
        };
      },
    },
    {
      method: 'GET',
      path: '/api/incidents/:id',
      handle({ params }) {
        const incident = incidents.get(params.id);
        if (!incident) throw new ApiError(404, `no incident '${params.id}'`);
        return { status: 200, body: incident };
      },
    },
    {
      method: 'GET',
      path: '/api/incidents/:id/postmortem',
      handle({ params }) {
        const incident = incidents.get(params.id);
        if (!incident) throw new ApiError(404, `no incident '${params.id}'`);
        return { status: 200, body: postmortemMarkdown(incident), contentType: 'text/markdown; charset=utf-8' };
      },
    },
    {
      method: 'GET',
      path: '/api/events',
      handle({ query }) {
        const limitText = query.get('limit') ?? '200';
        const limit = Number(limitText);
        if (!Number.isInteger(limit) || limit < 1 || limit > 2000)
          throw new ApiError(400, `limit must be an integer from 1 to 2000; got '${limitText}'`);
        const type = query.get('type');
        if (type !== null && !EVENT_TYPES.includes(type as EventType))
          throw new ApiError(400, `type must be one of ${EVENT_TYPES.join(', ')}; got '${type}'`);
        const sinceText = query.get('since');
        const since = sinceText === null ? undefined : Date.parse(sinceText);
        if (since !== undefined && Number.isNaN(since))
          throw new ApiError(400, `since must be an ISO 8601 time; got '${sinceText}'`);
        const list = events.recent(limit, {
          fingerprint: query.get('fingerprint') ?? undefined,
          types: type ? [type as EventType] : undefined,
          since,
        });
        return { status: 200, body: list.map(eventJson) };
      },
    },
  ];
}

function integerParam(query: URLSearchParams, name: string, fallback: number, min: number, max: number): number {
  const text = query.get(name);
  if (text === null) return fallback;
  const value = Number(text);
  if (!Number.isInteger(value) || value < min || value > max)
    throw new ApiError(400, `${name} must be an integer from ${min} to ${max}; got '${text}'`);
  return value;
}
