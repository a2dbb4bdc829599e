// The event timeline: DDL seen through the proxy, catalog changes, plan changes,
// incidents opening and resolving, rule changes. A bounded ring, newest last; the
// incident attribution and the dashboard both read it.

import type { Clock } from '../clock.ts';

export type EventType =
  | 'ddl' // a DDL statement that passed through the proxy and succeeded
  | 'schema_change' // a difference in the catalog found by the schema watcher
  | 'plan_change' // a shape's plan fingerprint changed
  | 'setting_change' // a server, per-database or per-role setting changed (settings watch)
  | 'statistics_change' // a table was analyzed (statistics watch)
  | 'new_shape' // a shape first seen recently is slow or heavy (new-shape watch)
  | 'admin_action' // an operator cancelled or terminated a blocking backend or a session through the admin API
  | 'incident_opened'
  | 'incident_resolved'
  | 'rule_added'
  | 'rule_removed'
  | 'mitigation';

/** What every event has, whatever its type. */
interface EventBase {
  readonly id: number;
  /** Epoch ms. */
  readonly at: number;
  /** One human-readable line ("DROP INDEX users_email_idx", "Index Scan ... -> Seq Scan ..."). */
  readonly summary: string;
  /** The shape concerned, if any. */
  readonly fingerprint?: string;
  /**
   * Tables and indexes the event touches, lower-case: unqualified for DDL and the
   * catalog watch (whose details name the schema), schema-qualified for plan changes
   * (plans name their schemas). Compare them with plans/relations.ts's RelationSet.
   */
  readonly objects?: readonly string[];
}

/** A change found between two reads of a watch: it happened after `since` (epoch ms) and by the event's time. */
interface Windowed {
  readonly since: number;
}

/**
 * What each type of event carries beyond the summary: the API shows it as is
 * (docs/api.md, Events), and attribution reads it (plan diffs, change windows).
 * Watch-specific fields beyond those named stay open (the catalog and settings
 * diffs describe what they found in their own terms).
 */
export interface EventDetails {
  ddl: { command: string; statement: string; user: string; database: string; application_name: string };
  schema_change: Windowed & { kind: string; database: string } & Record<string, unknown>;
  plan_change: {
    from: string;
    to: string;
    removed: readonly string[];
    added: readonly string[];
    before: string;
    after: string;
    estimates_before: string;
    estimates_after: string;
    /** Tables and indexes the old plan used and the new one does not (qualified when known). */
    removed_objects?: readonly string[];
    /** The schemas the new plan reads (its tenant). */
    schemas?: readonly string[];
    /** Custom or generic plan of a prepared statement, before and after; null: not a prepared statement with parameters. */
    kind_before?: 'custom' | 'generic' | null;
    kind_after?: 'custom' | 'generic' | null;
    /** Why the new kind (see plans/explain.ts). */
    kind_reason?: string | null;
    /** The sampled session's plan_cache_mode. */
    plan_cache_mode?: string;
    /** Set when the kind changed with the plan: the reason in words. */
    kind_switch?: string;
  };
  setting_change: Windowed & { name: string } & Record<string, unknown>;
  statistics_change: Windowed & { database: string } & Record<string, unknown>;
  new_shape: Record<string, unknown>;
  admin_action:
    | {
        /** On a backend that blocks others (POST /api/backends/:pid/...). */
        action: string;
        pid: number;
        ok: boolean;
        reason: string | null;
        blocking: readonly number[];
        user: string | null;
        application: string | null;
        query: string | null;
      }
    | {
        /** On a session through the proxy (DELETE /api/sessions/:id...). */
        action: 'cancel' | 'terminate';
        session: number | string;
        user: string;
        application: string;
      };
  incident_opened: { incident: string; kind: string; severity: number; victims: readonly string[] };
  incident_resolved: { incident: string; kind: string };
  rule_added: { rule: unknown };
  rule_removed: { rule: unknown };
  mitigation: { incident: string; mode: string; action: string; rule_id: string | null; refused: unknown };
}

/** One entry of the timeline; narrowing on `type` gives its `details`. */
export type TimelineEvent = {
  [T in EventType]: EventBase & { readonly type: T; readonly details?: EventDetails[T] };
}[EventType];

/** An event as added: the log gives it its id, and its time unless one is known. */
export type NewEvent = {
  [T in EventType]: Omit<EventBase, 'id' | 'at'> & { at?: number; type: T; details?: EventDetails[T] };
}[EventType];

export type EventListener = (event: TimelineEvent) => void;

export class EventLog {
  private readonly events: TimelineEvent[] = [];
  private nextId = 1;
  private readonly listeners: EventListener[] = [];

  constructor(
    private readonly clock: Clock,
    private readonly capacity = 2000,
  ) {}

  add(event: NewEvent): TimelineEvent {
    const stored = { ...event, id: this.nextId++, at: event.at ?? this.clock.now() } as TimelineEvent;
    this.events.push(stored);
    if (this.events.length > this.capacity) this.events.splice(0, this.events.length - this.capacity);
    for (const listener of this.listeners) listener(stored);
    return stored;
  }

  onEvent(listener: EventListener): void {
    this.listeners.push(listener);
  }

  /** Events between `from` and `to` (epoch ms, inclusive), oldest first, optionally of some types. */
  between(from: number, to: number, types?: readonly EventType[]): TimelineEvent[] {
    return this.events.filter((e) => e.at >= from && e.at <= to && (!types || types.includes(e.type)));
  }

  /** The newest `limit` events (oldest first), optionally for one shape or of some types. */
  recent(
    limit: number,
    filter: { fingerprint?: string; types?: readonly EventType[]; since?: number } = {},
  ): TimelineEvent[] {
    const out: TimelineEvent[] = [];
    for (let i = this.events.length - 1; i >= 0 && out.length < limit; i--) {
      const e = this.events[i];
      if (filter.since !== undefined && e.at < filter.since) break;
      if (filter.fingerprint !== undefined && e.fingerprint !== filter.fingerprint) continue;
      if (filter.types && !filter.types.includes(e.type)) continue;
      out.push(e);
    }
    return out.reverse();
  }
}
