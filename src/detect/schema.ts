// The schema watcher: a periodic snapshot of the catalog's tables, indexes and
// constraints, diffed against the previous one, so migrations run outside the
// proxy (a psql session, a deploy job on another host) still show up on the
// timeline as 'schema_change' events an incident can point at.
//
// Objects are identified by OID, so a rename or SET SCHEMA reads as one change, and
// a name dropped and re-created between two snapshots (REINDEX CONCURRENTLY, a
// migration's DROP + CREATE) as "re-created". The indexes and constraints of a
// table created or dropped with it are folded into the table's event instead of
// adding one event each. Each check reads a cheap digest of the catalog first and
// takes the full snapshot only when it moved (see VERSION_SQL).

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { MonitorPool } from '../plans/monitor.ts';
import type { EventLog } from '../events/timeline.ts';

export interface CatalogTable {
  readonly oid: number;
  readonly schema: string;
  readonly name: string;
  /** pg_class.relkind: r table, p partitioned table, v view, m materialized view, f foreign table. */
  readonly relkind: string;
}

export interface CatalogIndex {
  readonly oid: number;
  readonly tableOid: number;
  readonly schema: string;
  readonly table: string;
  readonly name: string;
  /** pg_get_indexdef; null when the index vanished while the snapshot was taken. */
  readonly definition: string | null;
  /** pg_index.indisvalid: false while CREATE INDEX CONCURRENTLY runs, or after it failed. */
  readonly valid: boolean;
}

export interface CatalogConstraint {
  readonly oid: number;
  readonly tableOid: number;
  readonly schema: string;
  readonly table: string;
  readonly name: string;
  /** pg_constraint.contype: p, u, f, c, x, t, n (NOT NULL, PostgreSQL 18+). */
  readonly type: string;
  /** pg_get_constraintdef; null when the constraint vanished while the snapshot was taken. */
  readonly definition: string | null;
}

export interface CatalogSnapshot {
  readonly tables: readonly CatalogTable[];
  readonly indexes: readonly CatalogIndex[];
  readonly constraints: readonly CatalogConstraint[];
}

export type SchemaChangeKind =
  | 'table_created'
  | 'table_dropped'
  | 'table_renamed'
  | 'table_recreated'
  | 'index_created'
  | 'index_dropped'
  | 'index_renamed'
  | 'index_changed'
  | 'index_recreated'
  | 'index_validated'
  | 'index_invalidated'
  | 'constraint_created'
  | 'constraint_dropped'
  | 'constraint_renamed'
  | 'constraint_changed'
  | 'constraint_recreated';

export interface SchemaChangeFound {
  readonly kind: SchemaChangeKind;
  /** One readable line: "index users_email_idx on public.users dropped". */
  readonly summary: string;
  /** Tables and indexes concerned, unqualified, case as stored (index first, then table). */
  readonly objects: string[];
  readonly details: Record<string, unknown>;
}

export interface SchemaWatcherOptions {
  readonly monitor: MonitorPool;
  readonly events: EventLog;
  readonly clock: Clock;
  readonly log: Logger;
  /** Pause between snapshots; default 5000 ms. */
  readonly intervalMs?: number;
  /** Database to watch; default the monitor URL's. */
  readonly database?: string;
}

// One statement, so the three lists come from the same catalog snapshot. Schemas
// starting with pg_ are reserved for the system (pg_catalog, pg_toast, the
// per-session pg_temp_N and pg_toast_temp_N), so one pattern excludes them all.
// Nothing here takes a lock: the watcher never queues behind a migration's
// ACCESS EXCLUSIVE lock, and never holds one up.
const SNAPSHOT_SQL = `
select
  (select coalesce(json_agg(json_build_object(
            'oid', c.oid::int8, 'schema', n.nspname, 'name', c.relname, 'relkind', c.relkind)), '[]')
     from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where c.relkind in ('r', 'p', 'v', 'm', 'f')
      and n.nspname !~ '^pg_' and n.nspname <> 'information_schema') as tables,
  (select coalesce(json_agg(json_build_object(
            'oid', i.indexrelid::int8, 'tableOid', i.indrelid::int8, 'schema', n.nspname, 'table', t.relname,
            'name', c.relname, 'definition', pg_get_indexdef(i.indexrelid), 'valid', i.indisvalid)), '[]')
     from pg_index i
     join pg_class c on c.oid = i.indexrelid
     join pg_class t on t.oid = i.indrelid
     join pg_namespace n on n.oid = c.relnamespace
    where n.nspname !~ '^pg_' and n.nspname <> 'information_schema') as indexes,
  (select coalesce(json_agg(json_build_object(
            'oid', k.oid::int8, 'tableOid', k.conrelid::int8, 'schema', n.nspname, 'table', t.relname,
            'name', k.conname, 'type', k.contype, 'definition', pg_get_constraintdef(k.oid))), '[]')
     from pg_constraint k
     join pg_class t on t.oid = k.conrelid
     join pg_namespace n on n.oid = t.relnamespace
    where n.nspname !~ '^pg_' and n.nspname <> 'information_schema') as constraints`;

// What the snapshot depends on, hashed: every watched catalog row's OID and xmin,
// which change with any transactional update of the row (DDL, GRANT, validation;
// not VACUUM or ANALYZE, which update pg_class in place). Ten times cheaper than
// the snapshot on a large schema (pg_get_indexdef is the costly part), so a check
// that finds the catalog as it was stops here. Blind spot: a column rename changes
// index and constraint definitions through pg_attribute only, so a full snapshot is
// also taken every FULL_SNAPSHOT_EVERY_MS.
const VERSION_SQL = `
select count(*) || ':' || coalesce(sum(h), 0) as version from (
  select hashint8((n.oid::int8 << 32) + n.xmin::text::int8) as h
    from pg_namespace n where n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
  union all
  select hashint8((c.oid::int8 << 32) + c.xmin::text::int8)
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
   where c.relkind in ('r', 'p', 'v', 'm', 'f', 'i', 'I')
     and n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
  union all
  select hashint8((i.indexrelid::int8 << 32) + i.xmin::text::int8)
    from pg_index i join pg_class c on c.oid = i.indrelid join pg_namespace n on n.oid = c.relnamespace
   where n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
  union all
  select hashint8((k.oid::int8 << 32) + k.xmin::text::int8)
    from pg_constraint k join pg_class t on t.oid = k.conrelid join pg_namespace n on n.oid = t.relnamespace
   where n.nspname !~ '^pg_' and n.nspname <> 'information_schema'
) rows`;

const FULL_SNAPSHOT_EVERY_MS = 60_000;

interface Previous {
  snapshot: CatalogSnapshot;
  /** The catalog version read just before the snapshot (so a change racing it only costs one more snapshot). */
  version: string;
  /** When the catalog was last known to match the snapshot. */
  at: number;
  /** When the snapshot was taken. */
  takenAt: number;
}

export class SchemaWatcher {
  private readonly intervalMs: number;
  private previous: Previous | null = null;
  private timer: NodeJS.Timeout | null = null;
  private running = false;
  /** Checks run one at a time: a timer tick and an on-demand check never interleave. */
  private queue: Promise<unknown> = Promise.resolve();
  private failing = false;

  constructor(private readonly options: SchemaWatcherOptions) {
    this.intervalMs = options.intervalMs ?? 5000;
  }

  /** Takes the baseline now, then checks every interval. */
  start(): void {
    if (this.running) return;
    this.running = true;
    this.schedule(0);
  }

  /** Stops the timer; resolves once a check in flight has finished. */
  async stop(): Promise<void> {
    this.running = false;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    await this.queue;
  }

  /**
   * Snapshots the catalog now, adds one event per difference from the previous
   * snapshot, and returns the differences. The first snapshot is the baseline and
   * finds nothing. Rejects when the snapshot fails (the previous one is kept).
   */
  checkNow(): Promise<SchemaChangeFound[]> {
    const check = this.queue.then(() => this.check());
    this.queue = check.catch(() => undefined);
    return check;
  }

  /** Reads the catalog once. */
  async snapshot(): Promise<CatalogSnapshot> {
    const { rows } = await this.options.monitor.query<CatalogSnapshot>(SNAPSHOT_SQL, [], this.database);
    return rows[0];
  }

  private get database(): string {
    return this.options.database ?? this.options.monitor.defaultDatabase;
  }

  /** A short digest of the watched catalog rows; equal digests mean an unchanged catalog (but see VERSION_SQL). */
  async version(): Promise<string> {
    const { rows } = await this.options.monitor.query<{ version: string }>(VERSION_SQL, [], this.database);
    return rows[0].version;
  }

  private async check(): Promise<SchemaChangeFound[]> {
    const at = this.options.clock.now();
    const started = performance.now();
    const version = await this.version();
    const previous = this.previous;
    if (previous !== null && version === previous.version && at - previous.takenAt < FULL_SNAPSHOT_EVERY_MS) {
      previous.at = at;
      return [];
    }
    const snapshot = await this.snapshot();
    const ms = Math.round(performance.now() - started);
    this.previous = { snapshot, version, at, takenAt: at };
    if (previous === null) {
      this.options.log.debug(
        { database: this.database, ms, tables: snapshot.tables.length, indexes: snapshot.indexes.length },
        'catalog baseline taken',
      );
      return [];
    }
    const changes = diffCatalog(previous.snapshot, snapshot);
    // When it ran is only known to lie between two checks: after the start of the
    // last one that did not see it (its digest was read after that), and before the
    // end of this one. The event is placed at the end ('seen'), with 'since' the
    // start of that window, so nobody reads the poll's delay as the change's time.
    const seen = this.options.clock.now();
    for (const change of changes) {
      this.options.events.add({
        type: 'schema_change',
        at: seen,
        summary: change.summary,
        objects: change.objects,
        details: { ...change.details, kind: change.kind, database: this.database, since: previous.at },
      });
    }
    if (changes.length > 0)
      this.options.log.info({ database: this.database, ms, changes: changes.length }, 'catalog changes found');
    return changes;
  }

  private schedule(delayMs: number): void {
    this.timer = setTimeout(() => {
      this.timer = null;
      void this.checkNow()
        .then(
          () => {
            if (this.failing) this.options.log.info({ database: this.database }, 'catalog snapshot works again');
            this.failing = false;
          },
          (err: unknown) => {
            if (!this.running) return; // stopped mid-check: the pool may be closing under us
            // Warn once per outage, not every interval; the next tick retries.
            const level = this.failing ? 'debug' : 'warn';
            this.options.log[level](
              { err, database: this.database },
              'catalog snapshot failed; retrying next interval',
            );
            this.failing = true;
          },
        )
        .finally(() => {
          if (this.running) this.schedule(this.intervalMs);
        });
    }, delayMs);
    this.timer.unref();
  }
}

// ---------------------------------------------------------------------------
// The diff: pure, so every case is tested with plain fixtures.

const RELKIND_WORDS: Record<string, string> = {
  r: 'table',
  p: 'partitioned table',
  v: 'view',
  m: 'materialized view',
  f: 'foreign table',
};

const CONTYPE_WORDS: Record<string, string> = {
  p: 'primary key',
  u: 'unique',
  f: 'foreign key',
  c: 'check',
  x: 'exclusion',
  t: 'trigger',
  n: 'not null',
};

/** Constraint types backed by an index of the same name, which plans can mention. */
const INDEXED_CONTYPES = new Set(['p', 'u', 'x']);

/** The differences between two catalog snapshots, tables first, then indexes, then constraints. */
export function diffCatalog(before: CatalogSnapshot, after: CatalogSnapshot): SchemaChangeFound[] {
  const tables = pairUp(before.tables, after.tables, (t) => `${t.schema}.${t.name}`);
  // Table events, keyed by the table OIDs whose indexes and constraints they absorb.
  const tableEvents = new Map<number, TableEvent>();
  const renamedTables = new Set<number>();
  const changes: (SchemaChangeFound | TableEvent)[] = [];

  for (const t of tables.created) {
    const event = new TableEvent('table_created', `${kindOf(t)} ${qualifiedName(t)} created`, t);
    tableEvents.set(t.oid, event);
    changes.push(event);
  }
  for (const t of tables.dropped) {
    const event = new TableEvent('table_dropped', `${kindOf(t)} ${qualifiedName(t)} dropped`, t);
    tableEvents.set(t.oid, event);
    changes.push(event);
  }
  for (const [old, now] of tables.recreated) {
    const event = new TableEvent('table_recreated', `${kindOf(now)} ${qualifiedName(now)} dropped and re-created`, now);
    if (old.relkind !== now.relkind) event.details.previousKind = kindOf(old);
    tableEvents.set(old.oid, event);
    tableEvents.set(now.oid, event);
    changes.push(event);
  }
  for (const [old, now] of tables.same) {
    if (old.schema === now.schema && old.name === now.name) continue;
    renamedTables.add(now.oid);
    changes.push({
      kind: 'table_renamed',
      summary:
        old.name === now.name
          ? `${kindOf(now)} ${qualifiedName(old)} moved to schema ${now.schema}`
          : `${kindOf(now)} ${qualifiedName(old)} renamed to ${qualifiedName(now)}`,
      objects: unique([old.name, now.name]),
      details: { schema: now.schema, table: now.name, previousSchema: old.schema, previousName: old.name },
    });
  }

  // Indexes: identity by OID, pairing by schema-qualified name (index names are unique per schema).
  const indexes = pairUp(before.indexes, after.indexes, (i) => `${i.schema}.${i.name}`);
  for (const i of indexes.created) {
    const folded = tableEvents.get(i.tableOid);
    if (folded !== undefined) folded.addIndex(i);
    else changes.push(indexChange('index_created', `index ${i.name} created: ${describeIndex(i)}`, i));
  }
  for (const i of indexes.dropped) {
    const folded = tableEvents.get(i.tableOid);
    if (folded !== undefined) folded.addIndex(i);
    else changes.push(indexChange('index_dropped', `index ${i.name} on ${tableOf(i)} dropped`, i));
  }
  for (const [old, now] of indexes.recreated) {
    const folded = tableEvents.get(now.tableOid);
    if (folded !== undefined) {
      folded.addIndex(now);
      continue;
    }
    const changed = old.definition !== now.definition && old.definition !== null && now.definition !== null;
    const summary = changed
      ? `index ${now.name} on ${tableOf(now)} re-created differently: ${describeIndex(now)}`
      : `index ${now.name} on ${tableOf(now)} dropped and re-created${now.valid ? '' : ' (not valid yet)'}`;
    changes.push(indexChange('index_recreated', summary, now, changed ? { previousDefinition: old.definition } : {}));
  }
  for (const [old, now] of indexes.same) {
    // An index follows its table through RENAME and SET SCHEMA; only its own changes count.
    const tableMoved = renamedTables.has(now.tableOid);
    if (old.name !== now.name) {
      changes.push(
        indexChange(
          'index_renamed',
          `index ${old.name} on ${tableOf(now)} renamed to ${now.name}`,
          now,
          { previousName: old.name },
          [old.name],
        ),
      );
    } else if (old.schema !== now.schema && !tableMoved) {
      changes.push(
        indexChange('index_renamed', `index ${old.schema}.${old.name} moved to schema ${now.schema}`, now, {
          previousSchema: old.schema,
        }),
      );
    }
    if (
      old.definition !== now.definition &&
      old.definition !== null &&
      now.definition !== null &&
      !tableMoved &&
      old.name === now.name
    ) {
      changes.push(
        indexChange('index_changed', `index ${now.name} on ${tableOf(now)} changed: ${now.definition}`, now, {
          previousDefinition: old.definition,
        }),
      );
    }
    if (old.valid !== now.valid) {
      const kind = now.valid ? 'index_validated' : 'index_invalidated';
      changes.push(
        indexChange(kind, `index ${now.name} on ${tableOf(now)} is now ${now.valid ? 'valid' : 'invalid'}`, now),
      );
    }
  }

  // Constraints: names are unique per table, not per schema.
  const constraints = pairUp(before.constraints, after.constraints, (k) => `${k.schema}.${k.table}.${k.name}`);
  for (const k of constraints.created) {
    const folded = tableEvents.get(k.tableOid);
    if (folded !== undefined) folded.addConstraint(k);
    else
      changes.push(
        constraintChange(
          'constraint_created',
          `constraint ${k.name} on ${tableOf(k)} created: ${k.definition ?? contypeOf(k)}`,
          k,
        ),
      );
  }
  for (const k of constraints.dropped) {
    const folded = tableEvents.get(k.tableOid);
    if (folded !== undefined) folded.addConstraint(k);
    else changes.push(constraintChange('constraint_dropped', `constraint ${k.name} on ${tableOf(k)} dropped`, k));
  }
  for (const [old, now] of constraints.recreated) {
    const folded = tableEvents.get(now.tableOid);
    if (folded !== undefined) {
      folded.addConstraint(now);
      continue;
    }
    const definition = now.definition ?? contypeOf(now);
    const summary =
      old.definition === now.definition
        ? `constraint ${now.name} on ${tableOf(now)} dropped and re-created`
        : `constraint ${now.name} on ${tableOf(now)} re-created differently: ${definition}`;
    changes.push(constraintChange('constraint_recreated', summary, now, { previousDefinition: old.definition }));
  }
  for (const [old, now] of constraints.same) {
    if (old.name !== now.name) {
      changes.push(
        constraintChange(
          'constraint_renamed',
          `constraint ${old.name} on ${tableOf(now)} renamed to ${now.name}`,
          now,
          { previousName: old.name },
          [old.name],
        ),
      );
      continue;
    }
    // A foreign key's definition names the table it references, so renaming that
    // table reads as a change here; VALIDATE CONSTRAINT drops a trailing NOT VALID.
    if (old.definition !== now.definition && old.definition !== null && now.definition !== null) {
      changes.push(
        constraintChange(
          'constraint_changed',
          `constraint ${now.name} on ${tableOf(now)} changed: ${now.definition}`,
          now,
          { previousDefinition: old.definition },
        ),
      );
    }
  }

  return changes.map((c) => (c instanceof TableEvent ? c.toChange() : c));
}

/** A table created, dropped or re-created, with the indexes and constraints that came or went with it. */
class TableEvent {
  readonly details: Record<string, unknown>;
  private readonly indexes: CatalogIndex[] = [];
  private readonly constraints: CatalogConstraint[] = [];

  constructor(
    readonly kind: 'table_created' | 'table_dropped' | 'table_recreated',
    private readonly summary: string,
    private readonly table: CatalogTable,
  ) {
    this.details = { schema: table.schema, table: table.name, relkind: table.relkind };
  }

  addIndex(index: CatalogIndex): void {
    this.indexes.push(index);
  }

  addConstraint(constraint: CatalogConstraint): void {
    this.constraints.push(constraint);
  }

  toChange(): SchemaChangeFound {
    const details = { ...this.details };
    if (this.indexes.length > 0) details.indexes = this.indexes.map((i) => i.definition ?? i.name);
    if (this.constraints.length > 0)
      details.constraints = this.constraints.map((k) => `${k.name}: ${k.definition ?? contypeOf(k)}`);
    // The table's own indexes go with it: a plan that used one names it.
    const objects = unique([this.table.name, ...this.indexes.map((i) => i.name)]);
    return { kind: this.kind, summary: this.summary, objects, details };
  }
}

interface Paired<T> {
  /** OID only in `after` and name not in `before`. */
  created: T[];
  /** OID only in `before` and name not in `after`. */
  dropped: T[];
  /** Same name on both sides, different OIDs: [before, after]. */
  recreated: [T, T][];
  /** Same OID on both sides, possibly renamed: [before, after]. */
  same: [T, T][];
}

/** Matches two lists of catalog objects by OID, then pairs what is left by name. */
function pairUp<T extends { readonly oid: number }>(
  before: readonly T[],
  after: readonly T[],
  nameOf: (item: T) => string,
): Paired<T> {
  const afterByOid = new Map(after.map((item) => [item.oid, item]));
  const beforeOids = new Set(before.map((item) => item.oid));
  const same: [T, T][] = [];
  const goneByName = new Map<string, T>();
  for (const old of before) {
    const now = afterByOid.get(old.oid);
    if (now !== undefined) same.push([old, now]);
    else goneByName.set(nameOf(old), old);
  }
  const created: T[] = [];
  const recreated: [T, T][] = [];
  for (const now of after) {
    if (beforeOids.has(now.oid)) continue;
    const old = goneByName.get(nameOf(now));
    if (old !== undefined) {
      recreated.push([old, now]);
      goneByName.delete(nameOf(now));
    } else {
      created.push(now);
    }
  }
  const byName = (a: T, b: T) => (nameOf(a) < nameOf(b) ? -1 : nameOf(a) > nameOf(b) ? 1 : 0);
  return {
    created: created.sort(byName),
    dropped: [...goneByName.values()].sort(byName),
    recreated: recreated.sort(([a], [b]) => byName(a, b)),
    same: same.sort(([a], [b]) => byName(a, b)),
  };
}

function indexChange(
  kind: SchemaChangeKind,
  summary: string,
  i: CatalogIndex,
  extra: Record<string, unknown> = {},
  moreObjects: string[] = [],
): SchemaChangeFound {
  return {
    kind,
    summary,
    objects: unique([i.name, ...moreObjects, i.table]),
    details: { schema: i.schema, table: i.table, index: i.name, definition: i.definition, valid: i.valid, ...extra },
  };
}

function constraintChange(
  kind: SchemaChangeKind,
  summary: string,
  k: CatalogConstraint,
  extra: Record<string, unknown> = {},
  moreObjects: string[] = [],
): SchemaChangeFound {
  // A primary key, unique or exclusion constraint shares its name with its index.
  const names = INDEXED_CONTYPES.has(k.type) ? [k.name, ...moreObjects] : [];
  return {
    kind,
    summary,
    objects: unique([...names, k.table]),
    details: {
      schema: k.schema,
      table: k.table,
      constraint: k.name,
      type: contypeOf(k),
      definition: k.definition,
      ...extra,
    },
  };
}

function describeIndex(i: CatalogIndex): string {
  const definition = i.definition ?? `index on ${tableOf(i)}`;
  return i.valid ? definition : `${definition} (not valid yet: being built concurrently, or the build failed)`;
}

function kindOf(t: CatalogTable): string {
  return RELKIND_WORDS[t.relkind] ?? 'relation';
}

function contypeOf(k: CatalogConstraint): string {
  return CONTYPE_WORDS[k.type] ?? k.type;
}

function qualifiedName(t: { schema: string; name: string }): string {
  return `${t.schema}.${t.name}`;
}

function tableOf(o: { schema: string; table: string }): string {
  return `${o.schema}.${o.table}`;
}

function unique(names: string[]): string[] {
  return [...new Set(names)];
}
