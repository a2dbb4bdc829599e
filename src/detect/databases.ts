// The per-database watches: the catalog (schema.ts) and statistics (statistics.ts)
// watches read one database each, but sessions through the proxy may use several,
// and an index dropped straight on the database in one of them must still reach the
// timeline. One pair of watches runs for the monitor URL's database from the start,
// and one more for each database that traffic through the proxy is seen in, up to
// a cap (the monitor's pool count: a watch beyond it would reopen a connection at
// each check). Settings, activity and locks are cluster-wide and need no copy.
//
// A database is learned from the shape collector's listener (off the relay path):
// one Map lookup per recorded statement, nothing more once its watches run.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { EventLog } from '../events/timeline.ts';
import type { MonitorPool } from '../plans/monitor.ts';
import type { QueryCompletion } from '../proxy/seam.ts';
import { SchemaWatcher } from './schema.ts';
import { StatisticsWatcher } from './statistics.ts';

export interface DatabaseWatchesOptions {
  readonly monitor: MonitorPool;
  readonly events: EventLog;
  readonly clock: Clock;
  /** The catalog watch's log ('schema' component). */
  readonly schemaLog: Logger;
  /** The statistics watch's log ('detect' component); the cap's warning goes here too. */
  readonly detectLog: Logger;
  readonly intervalMs: number;
  /** Databases watched at most, the monitor URL's included. */
  readonly maxDatabases: number;
}

interface Watches {
  readonly schema: SchemaWatcher;
  readonly statistics: StatisticsWatcher;
}

/** Names remembered as refused at the cap, so each is logged once (bounded: a flood logs nothing more). */
const MAX_REFUSED_NAMES = 64;

export class DatabaseWatches {
  private readonly watches = new Map<string, Watches>();
  private readonly refused = new Set<string>();
  private running = false;
  /** The monitor URL's database: always watched. */
  readonly defaultDatabase: string;

  constructor(private readonly options: DatabaseWatchesOptions) {
    this.defaultDatabase = options.monitor.defaultDatabase;
    this.add(this.defaultDatabase);
  }

  /** The default database's catalog watch (the admin side checks it on demand). */
  get schema(): SchemaWatcher {
    return this.watches.get(this.defaultDatabase)!.schema;
  }

  /** The databases watched, the default first. */
  get databases(): string[] {
    return [...this.watches.keys()];
  }

  /** Databases seen with traffic but not watched because of the cap (as far as remembered). */
  get unwatched(): string[] {
    return [...this.refused];
  }

  /** A shape listener: the database of each recorded statement gets its watches. */
  readonly observe = (_stats: unknown, _shape: unknown, c: QueryCompletion): void => {
    const database = c.session.database;
    if (database === '' || this.watches.has(database)) return;
    this.see(database);
  };

  /** Watches `database` from now on, unless the cap is reached. */
  see(database: string): void {
    if (database === '' || this.watches.has(database) || this.refused.has(database)) return;
    if (this.watches.size >= this.options.maxDatabases) {
      if (this.refused.size >= MAX_REFUSED_NAMES) return;
      this.refused.add(database);
      this.options.detectLog.warn(
        { database, watched: this.databases, max: this.options.maxDatabases },
        'database not watched: the catalog and statistics watches already cover monitor_max_databases databases; a change made directly in it is not seen (DDL through the proxy still is)',
      );
      return;
    }
    const watches = this.add(database);
    this.options.detectLog.info({ database }, 'watching the catalog and statistics of a database seen in traffic');
    if (this.running) {
      watches.schema.start();
      watches.statistics.start();
    }
  }

  start(): void {
    this.running = true;
    for (const w of this.watches.values()) {
      w.schema.start();
      w.statistics.start();
    }
  }

  /** Stops every watch; resolves once the catalog checks in flight have finished. */
  async stop(): Promise<void> {
    this.running = false;
    const stopping: Promise<void>[] = [];
    for (const w of this.watches.values()) {
      w.statistics.stop();
      stopping.push(w.schema.stop());
    }
    await Promise.all(stopping);
  }

  /**
   * The time up to which the statistics watches of `databases` (all watched ones if
   * null) have seen every change: the oldest of their last completed reads. A
   * database without a watch (past the cap) cannot be waited for, and is skipped.
   */
  statisticsWatchedUntil(databases: ReadonlySet<string> | null): number {
    let until = Number.POSITIVE_INFINITY;
    for (const [database, w] of this.watches) {
      if (databases !== null && !databases.has(database)) continue;
      until = Math.min(until, w.statistics.watchedUntil);
    }
    return until;
  }

  private add(database: string): Watches {
    const { monitor, events, clock, intervalMs } = this.options;
    const watches: Watches = {
      schema: new SchemaWatcher({ monitor, events, clock, log: this.options.schemaLog, intervalMs, database }),
      // The statistics watch's failures are logged by its poller, which does not name the database.
      statistics: new StatisticsWatcher({
        monitor,
        events,
        clock,
        log: this.options.detectLog.child({ database }),
        intervalMs,
        database,
      }),
    };
    this.watches.set(database, watches);
    return watches;
  }
}
