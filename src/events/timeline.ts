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
  | 'admin_action' // an operator cancelled or terminated a backend through the admin API
  | 'incident_opened'
  | 'incident_resolved'
  | 'rule_added'
  | 'rule_removed'
  | 'mitigation';

export interface TimelineEvent {
  readonly id: number;
  /** Epoch ms. */
  readonly at: number;
  readonly type: EventType;
  /** One human-readable line ("DROP INDEX users_email_idx", "Index Scan ... -> Seq Scan ..."). */
  readonly summary: string;
  /** The shape concerned, if any. */
  readonly fingerprint?: string;
  /** Tables and indexes the event touches, lower-case, unqualified. */
  readonly objects?: readonly string[];
  readonly details?: Record<string, unknown>;
}

export type EventListener = (event: TimelineEvent) => void;

export class EventLog {
  private readonly events: TimelineEvent[] = [];
  private nextId = 1;
  private readonly listeners: EventListener[] = [];

  constructor(
    private readonly clock: Clock,
    private readonly capacity = 2000,
  ) {}

  add(event: Omit<TimelineEvent, 'id' | 'at'> & { at?: number }): TimelineEvent {
    const stored: TimelineEvent = { ...event, id: this.nextId++, at: event.at ?? this.clock.now() };
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
  recent(limit: number, filter: { fingerprint?: string; types?: readonly EventType[]; since?: number } = {}): TimelineEvent[] {
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
