// The statistics watch: ANALYZE and autoanalyze of user tables (pg_stat_user_tables
// counters and timestamps, pg_class.reltuples as the planner's row estimate) read
// periodically, so a plan that flips after new statistics, with no DDL at all, has a
// cause on the timeline ('statistics_change' events naming the table).

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { MonitorPool } from '../plans/monitor.ts';
import type { EventLog } from '../events/timeline.ts';
import { Poller } from './poller.ts';

export interface TableStatistics {
  readonly oid: number;
  readonly schema: string;
  readonly table: string;
  readonly analyzeCount: number;
  readonly autoanalyzeCount: number;
  readonly lastAnalyze: number | null;
  readonly lastAutoanalyze: number | null;
  /** pg_class.reltuples: what the planner believes (-1: never analyzed, PostgreSQL 14+). */
  readonly reltuples: number;
  readonly liveTuples: number;
}

export interface StatisticsChange {
  readonly table: string;
  readonly summary: string;
  readonly details: Record<string, unknown>;
}

const STATS_SQL = `
select s.relid::int8 as oid, s.schemaname as schema, s.relname as table,
       s.analyze_count::int8 as "analyzeCount", s.autoanalyze_count::int8 as "autoanalyzeCount",
       (extract(epoch from s.last_analyze) * 1000)::float8 as "lastAnalyze",
       (extract(epoch from s.last_autoanalyze) * 1000)::float8 as "lastAutoanalyze",
       c.reltuples::float8 as reltuples, s.n_live_tup::int8 as "liveTuples"
  from pg_stat_user_tables s join pg_class c on c.oid = s.relid`;

export interface StatisticsWatcherOptions {
  readonly monitor: MonitorPool;
  readonly events: EventLog;
  readonly clock: Clock;
  readonly log: Logger;
  readonly intervalMs?: number;
  /** Database to watch; default the monitor URL's. */
  readonly database?: string;
}

export class StatisticsWatcher {
  private previous: Map<number, TableStatistics> | null = null;
  private previousAt = 0;
  private readonly poller: Poller;

  /** When the last completed read started: every change made before it has been seen. */
  get watchedUntil(): number {
    return this.previousAt;
  }

  constructor(private readonly options: StatisticsWatcherOptions) {
    this.poller = new Poller({
      what: 'statistics check',
      intervalMs: options.intervalMs ?? 5000,
      log: options.log,
      run: () => this.checkNow(),
    });
  }

  start(): void {
    this.poller.start();
  }

  stop(): void {
    this.poller.stop();
  }

  async checkNow(): Promise<StatisticsChange[]> {
    const at = this.options.clock.now();
    const database = this.options.database ?? this.options.monitor.defaultDatabase;
    const { rows } = await this.options.monitor.query<TableStatistics>(STATS_SQL, [], database);
    const current = new Map(rows.map((r) => [Number(r.oid), normalize(r)]));
    const previous = this.previous;
    const since = this.previousAt;
    this.previous = current;
    this.previousAt = at;
    if (previous === null) return [];
    const changes = diffStatistics(previous, current);
    for (const change of changes) {
      // The table's own analyze time is exact; the read only bounds it.
      const analyzedAt = typeof change.details.analyzed_at === 'string' ? Date.parse(change.details.analyzed_at) : NaN;
      const when = analyzedAt > since && analyzedAt <= at ? analyzedAt : at;
      this.options.events.add({
        type: 'statistics_change',
        at: when,
        summary: change.summary,
        objects: [change.table.toLowerCase()],
        // The database too: a table of that name in another database is another table.
        details: { ...change.details, database, since },
      });
    }
    if (changes.length > 0)
      this.options.log.info({ database, changes: changes.map((c) => c.summary) }, 'statistics changes found');
    return changes;
  }
}

function normalize(r: TableStatistics): TableStatistics {
  const num = (v: unknown) => (v === null || v === undefined ? null : Number(v));
  return {
    ...r,
    oid: Number(r.oid),
    analyzeCount: Number(r.analyzeCount),
    autoanalyzeCount: Number(r.autoanalyzeCount),
    lastAnalyze: num(r.lastAnalyze),
    lastAutoanalyze: num(r.lastAutoanalyze),
    reltuples: Number(r.reltuples),
    liveTuples: Number(r.liveTuples),
  };
}

/** Tables analyzed (by hand or by autovacuum) between two reads. Pure. */
export function diffStatistics(
  before: ReadonlyMap<number, TableStatistics>,
  after: ReadonlyMap<number, TableStatistics>,
): StatisticsChange[] {
  const changes: StatisticsChange[] = [];
  for (const [oid, now] of after) {
    const was = before.get(oid);
    if (was === undefined) continue; // a new table: the catalog watch reports it
    const manual = now.analyzeCount > was.analyzeCount;
    const auto = now.autoanalyzeCount > was.autoanalyzeCount;
    if (!manual && !auto) continue;
    const what = manual && auto ? 'ANALYZE and autoanalyze' : manual ? 'ANALYZE' : 'autoanalyze';
    const at = manual ? now.lastAnalyze : now.lastAutoanalyze;
    const estimate =
      was.reltuples !== now.reltuples
        ? `row estimate ${fmt(was.reltuples)} -> ${fmt(now.reltuples)}`
        : `row estimate unchanged at ${fmt(now.reltuples)}`;
    changes.push({
      table: now.table,
      summary: `${what} of ${now.schema}.${now.table}${at ? ` at ${new Date(at).toISOString()}` : ''} (${estimate})`,
      details: {
        schema: now.schema,
        table: now.table,
        kind: manual ? 'analyze' : 'autoanalyze',
        analyzed_at: at ? new Date(at).toISOString() : null,
        reltuples_before: was.reltuples,
        reltuples_after: now.reltuples,
        live_tuples: now.liveTuples,
      },
    });
  }
  return changes;
}

function fmt(n: number): string {
  return n < 0 ? 'unknown (never analyzed)' : String(Math.round(n));
}
