// Lock impact of a migration, measured rather than guessed from a table of
// rules: each statement runs inside the check's transaction, and right after
// it the check reads pg_locks for its own backend. Locks are held until the
// transaction ends (the rollback), so what a statement took is what is held
// after it and was not before. The relfilenode of every relation is compared
// around each statement too: a changed one means the statement rewrote it.
//
// The measured locks are then crossed with the captured workload: which shapes
// touch each locked table with a lock that conflicts (those would queue behind
// the migration in production), at what rate, and which patterns are known to
// cause outages (a long ACCESS EXCLUSIVE or a rewrite of a hot table, CREATE
// INDEX without CONCURRENTLY on a hot table, no lock_timeout), with the safer
// form of each.

import type pg from 'pg';
import type { MigrationStatement } from './migration.ts';
import { LOCK_MODES, type LockMode } from './statement.ts';

export type Run = <R extends pg.QueryResultRow>(sql: string, values?: unknown[]) => Promise<pg.QueryResult<R>>;

export interface RelationLock {
  /** As regclass prints it (schema-qualified when not on the search_path). */
  readonly relation: string;
  /** Bare name, for matching the workload's relation names. */
  readonly name: string;
  /** 'table' for tables, partitioned tables and materialized views; 'index'; 'other'. */
  readonly kind: 'table' | 'index' | 'other';
  /** The strongest lock the statement took on it. */
  readonly mode: LockMode;
}

export interface StatementLocks {
  readonly statement: MigrationStatement;
  /** Wall-clock time it ran on staging, in ms; null when skipped. */
  readonly durationMs: number | null;
  /** observed: read from pg_locks; documented: a CONCURRENTLY form, whose locks cannot be observed in a transaction; skipped. */
  readonly source: 'observed' | 'documented' | 'skipped';
  readonly locks: readonly RelationLock[];
  /** Tables (and materialized views) whose relfilenode changed: rewritten. */
  readonly rewrote: readonly string[];
}

/** Reads the check's own locks and relfilenodes around each migration statement. */
export class LockObserver {
  private held = new Map<string, RelationLock>();
  private files = new Map<string, { fn: string; kind: string }>();

  constructor(private readonly run: Run) {}

  async start(): Promise<void> {
    this.held = await this.locks();
    this.files = await this.filenodes();
  }

  /** Runs one statement (its `run` form) and reports what it took. */
  async observe(statement: MigrationStatement, execute: () => Promise<void>): Promise<StatementLocks> {
    if (statement.run === null) return { statement, durationMs: null, source: 'skipped', locks: [], rewrote: [] };
    const started = performance.now();
    await execute();
    const durationMs = performance.now() - started;
    const now = await this.locks();
    const files = await this.filenodes();
    const taken: RelationLock[] = [];
    for (const [key, lock] of now) {
      if (this.held.has(key)) continue;
      const stronger = taken.findIndex((t) => t.relation === lock.relation);
      if (stronger === -1) taken.push(lock);
      else if (rank(lock.mode) > rank(taken[stronger].mode)) taken[stronger] = lock;
    }
    const rewrote: string[] = [];
    for (const [relation, file] of files) {
      const before = this.files.get(relation);
      if (before !== undefined && before.fn !== file.fn && (file.kind === 'r' || file.kind === 'm'))
        rewrote.push(relation);
    }
    this.held = now;
    this.files = files;
    if (statement.concurrently) {
      // The plain form ran; production runs the CONCURRENTLY one, which takes SHARE UPDATE EXCLUSIVE.
      const documented = taken.map((l) => ({
        ...l,
        mode: l.kind === 'table' || l.kind === 'index' ? ('ShareUpdateExclusiveLock' as const) : l.mode,
      }));
      return { statement, durationMs, source: 'documented', locks: documented, rewrote: [] };
    }
    return { statement, durationMs, source: 'observed', locks: taken.sort(byStrength), rewrote };
  }

  private async locks(): Promise<Map<string, RelationLock>> {
    const { rows } = await this.run<{ relation: string; name: string | null; relkind: string | null; mode: string }>(
      `select l.relation::regclass::text as relation, c.relname as name, c.relkind::text as relkind, l.mode
         from pg_locks l left join pg_class c on c.oid = l.relation
        where l.pid = pg_backend_pid() and l.locktype = 'relation' and l.granted
          and l.database = (select oid from pg_database where datname = current_database())
          and (c.oid is null or c.relnamespace not in ('pg_catalog'::regnamespace, 'information_schema'::regnamespace, 'pg_toast'::regnamespace))`,
    );
    const out = new Map<string, RelationLock>();
    for (const row of rows) {
      if (!(LOCK_MODES as readonly string[]).includes(row.mode)) continue;
      const kind =
        row.relkind === 'r' || row.relkind === 'p' || row.relkind === 'm'
          ? 'table'
          : row.relkind === 'i' || row.relkind === 'I'
            ? 'index'
            : 'other';
      out.set(`${row.relation}\u0000${row.mode}`, {
        relation: row.relation,
        name: row.name ?? row.relation,
        kind,
        mode: row.mode as LockMode,
      });
    }
    return out;
  }

  private async filenodes(): Promise<Map<string, { fn: string; kind: string }>> {
    const { rows } = await this.run<{ relation: string; fn: string | null; kind: string }>(
      `select c.oid::regclass::text as relation, pg_relation_filenode(c.oid)::text as fn, c.relkind::text as kind
         from pg_class c
        where c.relkind in ('r', 'm', 'i') and c.relnamespace not in ('pg_catalog'::regnamespace, 'information_schema'::regnamespace, 'pg_toast'::regnamespace)`,
    );
    return new Map(rows.filter((r) => r.fn !== null).map((r) => [r.relation, { fn: r.fn!, kind: r.kind }]));
  }
}

const rank = (mode: LockMode) => LOCK_MODES.indexOf(mode);
const byStrength = (a: RelationLock, b: RelationLock) => rank(b.mode) - rank(a.mode);

/** PostgreSQL's table-level lock conflict matrix (the "Conflicting Lock Modes" table of the manual). */
const CONFLICTS: Record<LockMode, readonly LockMode[]> = {
  AccessShareLock: ['AccessExclusiveLock'],
  RowShareLock: ['ExclusiveLock', 'AccessExclusiveLock'],
  RowExclusiveLock: ['ShareLock', 'ShareRowExclusiveLock', 'ExclusiveLock', 'AccessExclusiveLock'],
  ShareUpdateExclusiveLock: [
    'ShareUpdateExclusiveLock',
    'ShareLock',
    'ShareRowExclusiveLock',
    'ExclusiveLock',
    'AccessExclusiveLock',
  ],
  ShareLock: [
    'RowExclusiveLock',
    'ShareUpdateExclusiveLock',
    'ShareRowExclusiveLock',
    'ExclusiveLock',
    'AccessExclusiveLock',
  ],
  ShareRowExclusiveLock: [
    'RowExclusiveLock',
    'ShareUpdateExclusiveLock',
    'ShareLock',
    'ShareRowExclusiveLock',
    'ExclusiveLock',
    'AccessExclusiveLock',
  ],
  ExclusiveLock: [
    'RowShareLock',
    'RowExclusiveLock',
    'ShareUpdateExclusiveLock',
    'ShareLock',
    'ShareRowExclusiveLock',
    'ExclusiveLock',
    'AccessExclusiveLock',
  ],
  AccessExclusiveLock: LOCK_MODES,
};

export function conflicts(a: LockMode, b: LockMode): boolean {
  return CONFLICTS[a].includes(b);
}

/** "ACCESS EXCLUSIVE" for "AccessExclusiveLock", as the manual names the modes. */
export function lockName(mode: LockMode): string {
  return mode
    .replace(/Lock$/, '')
    .replace(/([a-z])([A-Z])/g, '$1 $2')
    .toUpperCase();
}

/** A captured shape as the lock analysis sees it. */
export interface ShapeTouch {
  readonly fingerprint: string;
  readonly query: string;
  /** calls per second in production; null when the workload file does not say (older files). */
  readonly callsPerS: number | null;
  readonly calls: number;
  /** Bare relation name -> the lock the shape takes on it. */
  readonly relations: ReadonlyMap<string, LockMode>;
}

export interface BlockedShapes {
  readonly table: string;
  readonly mode: LockMode;
  /** Shapes whose lock on the table conflicts with `mode`: they would queue behind the statement. */
  readonly shapes: readonly {
    readonly fingerprint: string;
    readonly callsPerS: number | null;
    readonly calls: number;
  }[];
  /** Their summed rate; null when any rate is unknown. */
  readonly callsPerS: number | null;
  /** Shapes touching the table at all (with any lock): is it a hot table. */
  readonly touching: number;
}

export type LockPattern =
  | 'long_exclusive_lock'
  | 'table_rewrite'
  | 'create_index_without_concurrently'
  | 'missing_lock_timeout';

export interface LockFinding {
  readonly statement: number;
  readonly line: number;
  readonly pattern: LockPattern;
  readonly table: string;
  readonly message: string;
  /** What to do instead. */
  readonly safer: string;
}

export interface LockImpact {
  readonly statements: readonly (StatementLocks & { readonly blocked: readonly BlockedShapes[] })[];
  readonly findings: readonly LockFinding[];
}

/**
 * Crosses the observed locks with the workload and flags the outage patterns.
 * `longMs`: an ACCESS EXCLUSIVE held at least this long on a hot table is flagged.
 */
export function lockImpact(
  observed: readonly StatementLocks[],
  shapes: readonly ShapeTouch[],
  longMs: number,
): LockImpact {
  const findings: LockFinding[] = [];
  let lockTimeoutSet = false;
  const statements = observed.map((o) => {
    if (o.statement.setsLockTimeout) lockTimeoutSet = true;
    const blocked: BlockedShapes[] = [];
    for (const lock of o.locks) {
      if (lock.kind !== 'table') continue;
      const touching = shapes.filter((s) => s.relations.has(lock.name) && s.calls > 0);
      const queued = touching.filter((s) => conflicts(lock.mode, s.relations.get(lock.name)!));
      const rate = queued.some((s) => s.callsPerS === null)
        ? null
        : queued.reduce((sum, s) => sum + (s.callsPerS ?? 0), 0);
      blocked.push({
        table: lock.relation,
        mode: lock.mode,
        shapes: queued.map((s) => ({ fingerprint: s.fingerprint, callsPerS: s.callsPerS, calls: s.calls })),
        callsPerS: rate,
        touching: touching.length,
      });
      const at = { statement: o.statement.index, line: o.statement.line, table: lock.relation };
      const hot = touching.length > 0;
      if (!hot) continue;
      const queue = queued.length > 0 ? `; ${describeQueue(queued.length, rate)} would queue behind it` : '';
      const duration = o.durationMs === null ? '' : ` for ${seconds(o.durationMs)}`;
      if (lock.mode === 'AccessExclusiveLock' && o.rewrote.includes(lock.relation)) {
        findings.push({
          ...at,
          pattern: 'table_rewrite',
          message: `rewrites ${lock.relation} under ACCESS EXCLUSIVE${duration} on staging (longer on a bigger table)${queue}`,
          safer: saferForm(o.statement),
        });
      } else if (lock.mode === 'AccessExclusiveLock' && o.durationMs !== null && o.durationMs >= longMs) {
        findings.push({
          ...at,
          pattern: 'long_exclusive_lock',
          message: `holds ACCESS EXCLUSIVE on ${lock.relation}${duration}${queue}`,
          safer: saferForm(o.statement),
        });
      }
      if (o.statement.type === 'IndexStmt' && !o.statement.concurrently && lock.mode === 'ShareLock') {
        findings.push({
          ...at,
          pattern: 'create_index_without_concurrently',
          message: `CREATE INDEX without CONCURRENTLY blocks every write to ${lock.relation} while it builds${duration}${queue}`,
          safer:
            'CREATE INDEX CONCURRENTLY (outside a transaction block; SHARE UPDATE EXCLUSIVE, reads and writes go on)',
        });
      }
      if (
        !lockTimeoutSet &&
        queued.length > 0 &&
        rank(lock.mode) >= rank('ShareLock') &&
        !findings.some((f) => f.pattern === 'missing_lock_timeout' && f.statement === o.statement.index)
      ) {
        findings.push({
          ...at,
          pattern: 'missing_lock_timeout',
          message: `takes ${lockName(lock.mode)} on ${lock.relation} with no lock_timeout set before it: while it waits for a long query to finish, every shape above queues behind it`,
          safer: "SET lock_timeout = '2s'; at the top of the migration, and retry it when it times out",
        });
      }
    }
    return { ...o, blocked };
  });
  return { statements, findings };
}

function saferForm(statement: MigrationStatement): string {
  const subtypes = statement.alterations;
  if (subtypes.includes('AT_AddColumn')) {
    return 'add the column without the volatile DEFAULT (a constant default needs no rewrite), backfill it in batches, then SET DEFAULT';
  }
  if (subtypes.includes('AT_AlterColumnType'))
    return 'add a column of the new type, backfill it in batches, switch the application to it, then drop the old one';
  if (subtypes.includes('AT_AddConstraint'))
    return 'ADD CONSTRAINT ... NOT VALID (brief lock), then VALIDATE CONSTRAINT in its own transaction (SHARE UPDATE EXCLUSIVE)';
  if (subtypes.includes('AT_SetNotNull'))
    return 'ADD CONSTRAINT ... CHECK (col IS NOT NULL) NOT VALID, VALIDATE CONSTRAINT, then SET NOT NULL (no scan since PostgreSQL 12)';
  if (statement.type === 'ClusterStmt' || statement.type === 'VacuumStmt')
    return 'an online tool (pg_repack) instead of CLUSTER / VACUUM FULL';
  return 'split the change so the ACCESS EXCLUSIVE part is short, and run the long part online';
}

function describeQueue(count: number, rate: number | null): string {
  const shapes = `${count} shape${count === 1 ? '' : 's'}`;
  return rate === null ? `${shapes} of the workload` : `${shapes} at ${formatRate(rate)} calls/s in production`;
}

export function formatRate(rate: number): string {
  if (rate >= 100) return Math.round(rate).toLocaleString('en-US');
  return rate >= 10 ? rate.toFixed(0) : rate.toFixed(1);
}

export function seconds(ms: number): string {
  return ms >= 1000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.max(ms, 0).toFixed(ms < 10 ? 1 : 0)} ms`;
}
