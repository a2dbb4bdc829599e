import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { after, before, describe, test } from 'node:test';
import { pino } from 'pino';
import { ManualClock } from '../../src/clock.ts';
import { EventLog } from '../../src/events/timeline.ts';
import {
  diffCatalog,
  SchemaWatcher,
  type CatalogConstraint,
  type CatalogIndex,
  type CatalogSnapshot,
  type CatalogTable,
} from '../../src/detect/schema.ts';
import { MonitorPool } from '../../src/plans/monitor.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';

// --- fixtures ---------------------------------------------------------------

const users: CatalogTable = { oid: 100, schema: 'public', name: 'users', relkind: 'r' };
const orders: CatalogTable = { oid: 200, schema: 'public', name: 'orders', relkind: 'r' };

function index(oid: number, table: CatalogTable, name: string, columns: string, valid = true): CatalogIndex {
  return {
    oid,
    tableOid: table.oid,
    schema: table.schema,
    table: table.name,
    name,
    definition: `CREATE INDEX ${name} ON ${table.schema}.${table.name} USING btree (${columns})`,
    valid,
  };
}

function constraint(
  oid: number,
  table: CatalogTable,
  name: string,
  type: string,
  definition: string,
): CatalogConstraint {
  return { oid, tableOid: table.oid, schema: table.schema, table: table.name, name, type, definition };
}

const usersPkey: CatalogIndex = {
  ...index(101, users, 'users_pkey', 'id'),
  definition: 'CREATE UNIQUE INDEX users_pkey ON public.users USING btree (id)',
};
const usersEmailIdx = index(102, users, 'users_email_idx', 'email');
const usersPkeyConstraint = constraint(111, users, 'users_pkey', 'p', 'PRIMARY KEY (id)');

const base: CatalogSnapshot = {
  tables: [users],
  indexes: [usersPkey, usersEmailIdx],
  constraints: [usersPkeyConstraint],
};

function summaries(before: CatalogSnapshot, after: CatalogSnapshot): string[] {
  return diffCatalog(before, after).map((c) => c.summary);
}

describe('diffCatalog', () => {
  test('identical snapshots differ in nothing', () => {
    assert.deepEqual(diffCatalog(base, structuredClone(base)), []);
  });

  test('a dropped index is named with its table', () => {
    const changes = diffCatalog(base, { ...base, indexes: [usersPkey] });
    assert.deepEqual(changes, [
      {
        kind: 'index_dropped',
        summary: 'index users_email_idx on public.users dropped',
        objects: ['users_email_idx', 'users'],
        details: {
          schema: 'public',
          table: 'users',
          index: 'users_email_idx',
          definition: usersEmailIdx.definition,
          valid: true,
        },
      },
    ]);
  });

  test('a created index carries its definition', () => {
    const created = index(103, users, 'users_created_idx', 'created_at');
    const [change] = diffCatalog(base, { ...base, indexes: [...base.indexes, created] });
    assert.equal(change.kind, 'index_created');
    assert.equal(
      change.summary,
      'index users_created_idx created: CREATE INDEX users_created_idx ON public.users USING btree (created_at)',
    );
    assert.deepEqual(change.objects, ['users_created_idx', 'users']);
  });

  test('an index built concurrently is reported as not valid, then as valid', () => {
    const building = index(103, users, 'users_created_idx', 'created_at', false);
    const during = { ...base, indexes: [...base.indexes, building] };
    const [created] = diffCatalog(base, during);
    assert.match(
      created.summary,
      /^index users_created_idx created: CREATE INDEX .* \(not valid yet: being built concurrently, or the build failed\)$/,
    );
    const done = { ...base, indexes: [...base.indexes, { ...building, valid: true }] };
    assert.deepEqual(summaries(during, done), ['index users_created_idx on public.users is now valid']);
    assert.equal(diffCatalog(during, done)[0].kind, 'index_validated');
  });

  test('a table created with its indexes and constraints is one event', () => {
    const ordersPkey = index(201, orders, 'orders_pkey', 'id');
    const ordersUser = index(202, orders, 'orders_user_idx', 'user_id');
    const fk = constraint(211, orders, 'orders_user_fk', 'f', 'FOREIGN KEY (user_id) REFERENCES users(id)');
    const changes = diffCatalog(base, {
      tables: [users, orders],
      indexes: [...base.indexes, ordersPkey, ordersUser],
      constraints: [...base.constraints, fk],
    });
    assert.equal(changes.length, 1);
    assert.equal(changes[0].kind, 'table_created');
    assert.equal(changes[0].summary, 'table public.orders created');
    assert.deepEqual(changes[0].objects, ['orders', 'orders_pkey', 'orders_user_idx']);
    assert.deepEqual(changes[0].details.indexes, [ordersPkey.definition, ordersUser.definition]);
    assert.deepEqual(changes[0].details.constraints, ['orders_user_fk: FOREIGN KEY (user_id) REFERENCES users(id)']);
  });

  test('a dropped table takes its indexes and constraints with it in one event', () => {
    const changes = diffCatalog(base, { tables: [], indexes: [], constraints: [] });
    assert.deepEqual(
      changes.map((c) => [c.kind, c.summary, c.objects]),
      [['table_dropped', 'table public.users dropped', ['users', 'users_email_idx', 'users_pkey']]],
    );
  });

  test('views and materialized views are named as such', () => {
    const view: CatalogTable = { oid: 300, schema: 'app', name: 'daily', relkind: 'm' };
    assert.deepEqual(summaries(base, { ...base, tables: [users, view] }), ['materialized view app.daily created']);
  });

  test('a renamed index is one event naming both names', () => {
    const renamed = {
      ...usersEmailIdx,
      name: 'users_mail_idx',
      definition: 'CREATE INDEX users_mail_idx ON public.users USING btree (email)',
    };
    const changes = diffCatalog(base, { ...base, indexes: [usersPkey, renamed] });
    assert.deepEqual(
      changes.map((c) => [c.kind, c.summary, c.objects]),
      [
        [
          'index_renamed',
          'index users_email_idx on public.users renamed to users_mail_idx',
          ['users_mail_idx', 'users_email_idx', 'users'],
        ],
      ],
    );
  });

  test('a renamed table is one event; its indexes and constraints follow silently', () => {
    const accounts = { ...users, name: 'accounts' };
    const moved = (i: CatalogIndex): CatalogIndex => ({
      ...i,
      table: 'accounts',
      definition: i.definition!.replace('public.users', 'public.accounts'),
    });
    const changes = diffCatalog(base, {
      tables: [accounts],
      indexes: base.indexes.map(moved),
      constraints: [{ ...usersPkeyConstraint, table: 'accounts' }],
    });
    assert.deepEqual(
      changes.map((c) => [c.kind, c.summary, c.objects]),
      [['table_renamed', 'table public.users renamed to public.accounts', ['users', 'accounts']]],
    );
  });

  test('an index dropped and re-created under the same name between two snapshots is one event', () => {
    const same = { ...usersEmailIdx, oid: 999 };
    assert.deepEqual(summaries(base, { ...base, indexes: [usersPkey, same] }), [
      'index users_email_idx on public.users dropped and re-created',
    ]);
    const different = { ...index(999, users, 'users_email_idx', 'lower(email)') };
    const [change] = diffCatalog(base, { ...base, indexes: [usersPkey, different] });
    assert.equal(change.kind, 'index_recreated');
    assert.equal(
      change.summary,
      'index users_email_idx on public.users re-created differently: CREATE INDEX users_email_idx ON public.users USING btree (lower(email))',
    );
    assert.equal(change.details.previousDefinition, usersEmailIdx.definition);
  });

  test('constraints added, dropped and validated are reported with their definitions', () => {
    const check = constraint(120, users, 'users_age_check', 'c', 'CHECK ((age > 0)) NOT VALID');
    const withCheck = { ...base, constraints: [...base.constraints, check] };
    assert.deepEqual(summaries(base, withCheck), [
      'constraint users_age_check on public.users created: CHECK ((age > 0)) NOT VALID',
    ]);
    const validated = { ...base, constraints: [...base.constraints, { ...check, definition: 'CHECK ((age > 0))' }] };
    assert.deepEqual(summaries(withCheck, validated), [
      'constraint users_age_check on public.users changed: CHECK ((age > 0))',
    ]);
    const dropped = diffCatalog(withCheck, base);
    assert.deepEqual(
      dropped.map((c) => [c.summary, c.objects]),
      [['constraint users_age_check on public.users dropped', ['users']]],
    );
  });

  test('a key constraint names its index among the objects', () => {
    const key = constraint(121, users, 'users_email_key', 'u', 'UNIQUE (email)');
    const [change] = diffCatalog(base, { ...base, constraints: [...base.constraints, key] });
    assert.deepEqual(change.objects, ['users_email_key', 'users']);
  });

  test('a definition that vanished mid-snapshot is not a change', () => {
    const vanished = { ...usersEmailIdx, definition: null };
    assert.deepEqual(diffCatalog(base, { ...base, indexes: [usersPkey, vanished] }), []);
  });
});

// --- against the real server ------------------------------------------------

describe('SchemaWatcher', () => {
  const silent = pino({ level: 'silent' });
  const suffix = `${process.pid}_${Date.now().toString(36)}`;
  const table = `pgw_schema_${suffix}`;
  const emailIdx = `${table}_email_idx`;
  const createdIdx = `${table}_created_idx`;
  let monitor: MonitorPool;

  before(async () => {
    monitor = new MonitorPool({ url: testDatabase().url, concurrency: 2, statementTimeoutMs: 5000, log: silent });
    await sql(
      `create table ${table} (id bigint primary key, email text, created_at timestamptz)`,
      `create index ${emailIdx} on ${table} (email)`,
    );
  });

  after(async () => {
    try {
      await sql(
        `drop table if exists ${table}_orders`,
        `drop table if exists ${table}_ren`,
        `drop table if exists ${table}`,
      );
    } finally {
      await monitor.close();
    }
  });

  function sql(...statements: string[]): Promise<void> {
    return withClient(async (client) => {
      for (const statement of statements) await client.query(statement);
    });
  }

  /** Changes that concern this file's tables (the server is shared with other test files). */
  function ours<T extends { objects?: readonly string[] }>(items: T[]): T[] {
    return items.filter((c) => (c.objects ?? []).some((o) => o.startsWith(table)));
  }

  test('the first snapshot is the baseline and reports nothing', async () => {
    const events = new EventLog(new ManualClock());
    const watcher = new SchemaWatcher({ monitor, events, clock: new ManualClock(), log: silent, intervalMs: 60_000 });
    assert.deepEqual(await watcher.checkNow(), []);
    assert.deepEqual(events.recent(10), []);
    const snapshot = await watcher.snapshot();
    assert.ok(snapshot.tables.some((t) => t.name === table && t.schema === 'public' && t.relkind === 'r'));
    const idx = snapshot.indexes.find((i) => i.name === emailIdx);
    assert.equal(idx?.definition, `CREATE INDEX ${emailIdx} ON public.${table} USING btree (email)`);
    assert.equal(idx?.valid, true);
    const pkey = snapshot.constraints.find((k) => k.table === table && k.type === 'p');
    assert.equal(pkey?.definition, 'PRIMARY KEY (id)');
    assert.ok(
      !snapshot.tables.some(
        (t) => t.schema === 'pg_catalog' || t.schema === 'information_schema' || t.schema.startsWith('pg_'),
      ),
    );
  });

  test('a dropped index and a created one are both reported, and added to the timeline', async () => {
    const clock = new ManualClock();
    const events = new EventLog(clock);
    const watcher = new SchemaWatcher({ monitor, events, clock, log: silent, intervalMs: 60_000 });
    await watcher.checkNow();
    clock.advance(5000);
    await sql(`drop index ${emailIdx}`, `create index concurrently ${createdIdx} on ${table} (created_at)`);

    const changes = ours(await watcher.checkNow());
    assert.deepEqual(
      changes.map((c) => [c.kind, c.summary, c.objects]),
      [
        [
          'index_created',
          `index ${createdIdx} created: CREATE INDEX ${createdIdx} ON public.${table} USING btree (created_at)`,
          [createdIdx, table],
        ],
        ['index_dropped', `index ${emailIdx} on public.${table} dropped`, [emailIdx, table]],
      ],
    );
    const timeline = ours(events.recent(10, { types: ['schema_change'] }));
    assert.deepEqual(
      timeline.map((e) => e.summary),
      changes.map((c) => c.summary),
    );
    assert.equal(timeline[0].at, clock.now());
    const first = timeline[0];
    assert.ok(first.type === 'schema_change');
    assert.equal(first.details?.since, clock.now() - 5000);
    assert.equal(first.details?.database, monitor.defaultDatabase);
    assert.deepEqual(ours(await watcher.checkNow()), [], 'nothing new on the next check');
  });

  test('the timer takes a baseline at start and reports what changed after it', async () => {
    const clock = new ManualClock();
    const events = new EventLog(clock);
    const watcher = new SchemaWatcher({ monitor, events, clock, log: silent, intervalMs: 50 });
    watcher.start();
    // Checks run one at a time, so once this one is done the baseline is in.
    await watcher.checkNow();
    await sql(`create table ${table}_orders (id int primary key, user_id bigint references ${table} (id))`);
    const event = await waitFor(
      () => ours(events.recent(50)).find((e) => e.summary === `table public.${table}_orders created`),
      {
        what: 'the table_created event from the timer',
      },
    );
    assert.deepEqual(event.objects, [`${table}_orders`, `${table}_orders_pkey`]);
    assert.ok(event.type === 'schema_change');
    assert.equal(event.details?.kind, 'table_created');
    await watcher.stop();
  });

  test('an unchanged catalog costs one cheap query; a full snapshot is still taken every minute', async () => {
    const clock = new ManualClock();
    const snapshots: number[] = [];
    const counting = Object.create(monitor) as MonitorPool;
    counting.query = ((sql: string, values?: readonly unknown[], database?: string) => {
      if (sql.includes('pg_get_indexdef')) snapshots.push(clock.now());
      return monitor.query(sql, values, database);
    }) as MonitorPool['query'];
    const watcher = new SchemaWatcher({
      monitor: counting,
      events: new EventLog(clock),
      clock,
      log: silent,
      intervalMs: 60_000,
    });
    await sql(
      `create table ${table}_ren (id int, created_at date)`,
      `create index ${table}_ren_idx on ${table}_ren (created_at)`,
    );
    await watcher.checkNow();
    clock.advance(5000);
    assert.deepEqual(ours(await watcher.checkNow()), []);
    assert.equal(snapshots.length, 1, 'no second snapshot while nothing changed');

    // A column rename touches only pg_attribute, which the cheap check does not read.
    await sql(`alter table ${table}_ren rename column created_at to created`);
    clock.advance(5000);
    assert.deepEqual(ours(await watcher.checkNow()), []);
    clock.advance(60_000);
    const changes = ours(await watcher.checkNow());
    assert.equal(snapshots.length, 2);
    assert.deepEqual(
      changes.map((c) => [c.kind, c.summary]),
      [
        [
          'index_changed',
          `index ${table}_ren_idx on public.${table}_ren changed: CREATE INDEX ${table}_ren_idx ON public.${table}_ren USING btree (created)`,
        ],
      ],
    );
  });

  test('a failing snapshot is logged, retried on the next interval, and never throws from the timer', async () => {
    const lines: { msg: string; level: number }[] = [];
    const sink = new Writable({
      write(chunk: Buffer, _encoding, done) {
        for (const line of chunk.toString().split('\n').filter(Boolean)) lines.push(JSON.parse(line));
        done();
      },
    });
    const log = pino({ level: 'debug' }, sink);
    // Port 1 on localhost refuses connections at once.
    const unreachable = new MonitorPool({
      url: 'postgres://nobody@127.0.0.1:1/nowhere',
      concurrency: 1,
      statementTimeoutMs: 1000,
      log: silent,
    });
    const watcher = new SchemaWatcher({
      monitor: unreachable,
      events: new EventLog(new ManualClock()),
      clock: new ManualClock(),
      log,
      intervalMs: 20,
    });
    try {
      watcher.start();
      await waitFor(() => lines.filter((l) => l.msg.startsWith('catalog snapshot failed')).length >= 3, {
        what: 'three failed attempts',
      });
      const failures = lines.filter((l) => l.msg.startsWith('catalog snapshot failed'));
      assert.equal(failures[0].level, 40, 'the first failure is a warning');
      assert.ok(
        failures.slice(1).every((l) => l.level === 20),
        'repeats are debug lines',
      );
      await assert.rejects(watcher.checkNow(), 'an on-demand check reports the failure to its caller');
    } finally {
      await watcher.stop();
      await unreachable.close();
    }
  });
});
