// The database as a whole, sampled: every couple of seconds the monitoring
// connection reads pg_stat_activity (every client backend of the cluster, those that
// bypass the proxy included) and, when some backend waits on a lock, who blocks it
// (pg_blocking_pids) and which relation locks are involved (pg_locks). Lock waits and
// saturation are explained from these samples (locks.ts, saturation.ts).
//
// Statement text is reduced to its shape (fingerprint and normalized text) as soon
// as it is read: literal values never leave this module. Seeing other roles' queries
// and wait events needs the monitoring role to have pg_read_all_stats.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { MonitorPool } from '../plans/monitor.ts';
import type { ShapeFinder } from '../shapes/fingerprint.ts';
import { Poller } from './poller.ts';

/** One client backend at one sample. */
export interface Backend {
  readonly pid: number;
  readonly user: string;
  readonly application: string;
  readonly database: string;
  readonly client: string | null;
  /** active, idle in transaction, idle in transaction (aborted), fastpath function call... */
  readonly state: string;
  /** null while running on CPU (or in a wait PostgreSQL does not report). */
  readonly waitEventType: string | null;
  readonly waitEvent: string | null;
  /** Epoch ms; null outside a transaction. */
  readonly xactStart: number | null;
  readonly queryStart: number | null;
  /** Shape of its current (or, when idle in transaction, last) statement; null without one or without privilege to see it. */
  readonly fingerprint: string | null;
  readonly query: string | null;
  /** Backends it waits for (pg_blocking_pids), when it waits on a lock. */
  readonly blockedBy: readonly number[];
}

/** A relation lock of a backend involved in a lock wait. */
export interface RelationLock {
  readonly pid: number;
  readonly relation: string;
  readonly mode: string;
  readonly granted: boolean;
}

export interface ActivitySample {
  readonly at: number;
  readonly backends: readonly Backend[];
  /** Only when some backend waits on a lock: the relation locks of the waiters and their blockers. */
  readonly locks: readonly RelationLock[];
  /** Statements in flight through the proxy at sampling time, per shape: how many of the backends running a shape are proxied. */
  readonly proxied: ReadonlyMap<string, number>;
}

export interface ActivityOptions {
  readonly monitor: MonitorPool;
  readonly finder: ShapeFinder;
  readonly clock: Clock;
  readonly log: Logger;
  /** Pause between samples; default 2000 ms. */
  readonly intervalMs?: number;
  /** Statements in flight through the proxy per shape (the in-flight tracker), to tell proxied backends from the rest. */
  readonly inFlightByShape?: () => ReadonlyMap<string, number>;
  /** Samples kept (default 150: five minutes at 2 s). */
  readonly keep?: number;
}

// Own backend and pgwarden's other monitoring connections excluded; idle sessions
// are of no interest (a lock holder is in a transaction, so never plain idle).
const ACTIVITY_SQL = `
select a.pid, a.usename as user, a.application_name as application, a.datname as database,
       a.client_addr::text as client, a.state, a.wait_event_type, a.wait_event,
       (extract(epoch from a.xact_start) * 1000)::float8 as xact_start,
       (extract(epoch from a.query_start) * 1000)::float8 as query_start,
       a.query,
       case when a.wait_event_type = 'Lock' then pg_blocking_pids(a.pid) else '{}'::int[] end as blocked_by
  from pg_stat_activity a
 where a.pid <> pg_backend_pid()
   and a.backend_type = 'client backend'
   and a.application_name <> 'pgwarden-monitor'
   and a.state is not null and a.state <> 'idle'`;

const LOCKS_SQL = `
select l.pid, coalesce(l.relation::regclass::text, l.relation::text) as relation, l.mode, l.granted
  from pg_locks l
 where l.locktype = 'relation' and l.pid = any($1::int[])`;

export class ActivitySampler {
  private readonly samples: ActivitySample[] = [];
  private readonly poller: Poller;

  constructor(private readonly options: ActivityOptions) {
    this.poller = new Poller({
      what: 'activity sample',
      intervalMs: options.intervalMs ?? 2000,
      log: options.log,
      run: () => this.sampleNow(),
    });
  }

  start(): void {
    this.poller.start();
  }

  stop(): void {
    this.poller.stop();
  }

  /** Takes one sample now and keeps it. */
  async sampleNow(): Promise<ActivitySample> {
    const at = this.options.clock.now();
    const { rows } = await this.options.monitor.query<Record<string, unknown>>(ACTIVITY_SQL);
    this.poller.markHealthy();
    const backends = rows.map((r) => this.toBackend(r));
    let locks: RelationLock[] = [];
    const waiting = backends.filter((b) => b.blockedBy.length > 0);
    if (waiting.length > 0) {
      const pids = [...new Set([...waiting.map((b) => b.pid), ...waiting.flatMap((b) => b.blockedBy)])];
      const result = await this.options.monitor.query<RelationLock>(LOCKS_SQL, [pids]);
      locks = result.rows;
    }
    const proxied = this.options.inFlightByShape?.() ?? new Map<string, number>();
    const sample: ActivitySample = { at, backends, locks, proxied };
    this.samples.push(sample);
    if (this.samples.length > (this.options.keep ?? 150)) this.samples.shift();
    return sample;
  }

  /** The newest sample, or null before the first. */
  latest(): ActivitySample | null {
    return this.samples.at(-1) ?? null;
  }

  /** Samples taken between `from` and `to` (epoch ms), oldest first. */
  between(from: number, to: number): ActivitySample[] {
    return this.samples.filter((s) => s.at >= from && s.at <= to);
  }

  private toBackend(r: Record<string, unknown>): Backend {
    const text = typeof r.query === 'string' ? r.query : '';
    let fingerprint: string | null = null;
    let query: string | null = null;
    // '<insufficient privilege>' and empty texts have no shape worth naming.
    if (text !== '' && !text.startsWith('<insufficient privilege>')) {
      const shape = this.options.finder.shapesOfText(text)[0];
      if (shape !== undefined) {
        fingerprint = shape.fingerprint;
        query = shape.query;
      }
    }
    const num = (v: unknown) => (v === null || v === undefined ? null : Number(v));
    return {
      pid: Number(r.pid),
      user: String(r.user ?? ''),
      application: String(r.application ?? ''),
      database: String(r.database ?? ''),
      client: (r.client as string | null) ?? null,
      state: String(r.state ?? ''),
      waitEventType: (r.wait_event_type as string | null) ?? null,
      waitEvent: (r.wait_event as string | null) ?? null,
      xactStart: num(r.xact_start),
      queryStart: num(r.query_start),
      fingerprint,
      query,
      blockedBy: ((r.blocked_by as number[] | null) ?? []).map(Number),
    };
  }
}
