// Databases in attribution, with plain fixtures: which database an event and a
// shape belong to, a statistics or per-database setting change in another database
// is no cause, the plan and schema causes skip another database's changes, and the
// per-database watches stop at their cap (the watching itself runs against a real
// server in cause-other-database.test.ts).

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { pino } from 'pino';
import { ManualClock } from '../../src/clock.ts';
import { timelineCauses } from '../../src/detect/attribution.ts';
import { TimelineCauses } from '../../src/detect/causes.ts';
import { DatabaseWatches } from '../../src/detect/databases.ts';
import { databaseOf, inDatabases, shapeDatabases } from '../../src/detect/scope.ts';
import { EventLog } from '../../src/events/timeline.ts';
import { MonitorPool } from '../../src/plans/monitor.ts';
import { RelationSet } from '../../src/plans/relations.ts';
import { MAX_NAMES_PER_SHAPE } from '../../src/shapes/registry.ts';

const NOW = 10_000_000;

function drop(events: EventLog, database: string | undefined, at: number) {
  return events.add({
    type: 'schema_change',
    at,
    summary: 'index users_email_idx on public.users dropped',
    objects: ['users_email_idx', 'users'],
    details: { kind: 'index_dropped', schema: 'public', since: at - 2000, ...(database ? { database } : {}) } as never,
  });
}

describe('scope', () => {
  test('an event names its database when its details do; a shape its databases when the list is complete', () => {
    const events = new EventLog(new ManualClock(NOW));
    const a = drop(events, 'app1', NOW);
    const old = drop(events, undefined, NOW);
    const role = events.add({
      type: 'setting_change',
      summary: 'ALTER ROLE app SET work_mem',
      details: { name: 'work_mem', since: 0, database: null },
    });
    assert.equal(databaseOf(a), 'app1');
    assert.equal(databaseOf(old), null);
    assert.equal(databaseOf(role), null);
    assert.deepEqual(shapeDatabases({ databases: ['app2'] }), new Set(['app2']));
    assert.equal(shapeDatabases(undefined), null);
    assert.equal(shapeDatabases({ databases: [] }), null, 'no names (a worker replay): unknown');
    const full = Array.from({ length: MAX_NAMES_PER_SHAPE }, (_, i) => `db${i}`);
    assert.equal(shapeDatabases({ databases: full }), null, 'a full list may miss a database');
    assert.equal(inDatabases(a, new Set(['app2'])), false);
    assert.equal(inDatabases(a, new Set(['app1', 'app2'])), true);
    assert.equal(inDatabases(old, new Set(['app2'])), true, 'an event naming no database matches any');
    assert.equal(inDatabases(a, null), true, 'a shape of unknown databases matches any');
  });

  test("another database's drop of the same index is no cause; this database's is", () => {
    const events = new EventLog(new ManualClock(NOW));
    const plans = {
      indexes: () => new RelationSet(['public.users_email_idx']),
      objects: () => new RelationSet(['public.users', 'public.users_email_idx']),
    };
    const other = drop(events, 'app1', NOW - 5000);
    const causes = (databases: Set<string> | null) =>
      timelineCauses(events, plans, 'f1', NOW - 1000, NOW, databases).map((c) => c.event_id);
    assert.deepEqual(causes(new Set(['app2'])), [], 'nothing from app1, not even as a nearby change');
    assert.deepEqual(causes(null), [other.id], 'unknown databases: any');
    const own = drop(events, 'app2', NOW - 500);
    assert.deepEqual(causes(new Set(['app2'])), [own.id]);
    assert.deepEqual(causes(new Set(['app1', 'app2'])).sort(), [other.id, own.id].sort());
    assert.deepEqual(timelineCauses(events, plans, null, NOW - 1000, NOW, new Set(['app2'])).length, 2);
  });

  test('statistics and per-database settings of another database are no cause', () => {
    const events = new EventLog(new ManualClock(NOW));
    events.add({
      type: 'statistics_change',
      at: NOW - 30_000,
      summary: 'ANALYZE of public.users',
      objects: ['users'],
      details: { since: 0, database: 'app1' },
    });
    events.add({
      type: 'setting_change',
      at: NOW - 25_000,
      summary: 'ALTER DATABASE app1 SET enable_indexscan = off',
      details: { name: 'enable_indexscan', since: 0, database: 'app1' },
    });
    const plan = events.add({
      type: 'plan_change',
      at: NOW - 15_000,
      fingerprint: 'f1',
      summary: 'Index Scan -> Seq Scan on users',
      objects: ['public.users'],
    });
    const asked: (ReadonlySet<string> | null)[] = [];
    const provider = new TimelineCauses(events, (databases) => {
      asked.push(databases);
      return Number.POSITIVE_INFINITY;
    });
    const context = (databases: Set<string> | null) => ({
      fingerprint: 'f1',
      onset: NOW - 14_000,
      now: NOW,
      objects: new RelationSet(['public.users']),
      planChanges: [plan],
      databases,
    });
    assert.deepEqual(provider.causes(context(new Set(['app2']))), []);
    assert.deepEqual(asked, [new Set(['app2'])], "the watches of the shape's databases are the ones waited for");
    const mine = provider.causes(context(new Set(['app1'])));
    assert.deepEqual(
      mine.filter((c) => c.conclusive).map((c) => c.type),
      ['setting_change'],
      'in its own database the latest change before the flip is decisive',
    );
    assert.equal(mine.length, 2);
  });
});

describe('DatabaseWatches', () => {
  test('watches the default database, then those seen, up to the cap; a refused one is logged once', async () => {
    const lines: { msg: string; database?: string }[] = [];
    const log = pino({ level: 'info' }, { write: (line: string) => void lines.push(JSON.parse(line)) });
    // Never started: nothing connects to this URL.
    const monitor = new MonitorPool({
      url: 'postgres://monitor@127.0.0.1:1/app0',
      concurrency: 1,
      statementTimeoutMs: 1000,
      log,
    });
    const clock = new ManualClock(NOW);
    const watches = new DatabaseWatches({
      monitor,
      events: new EventLog(clock),
      clock,
      schemaLog: log,
      detectLog: log,
      intervalMs: 60_000,
      maxDatabases: 3,
    });
    assert.deepEqual(watches.databases, ['app0']);
    const seen = (database: string) =>
      watches.observe(null, null, { session: { database } } as Parameters<typeof watches.observe>[2]);
    for (const database of ['app1', '', 'app1', 'app2', 'app3', 'app3', 'app0', 'app4']) seen(database);
    assert.deepEqual(watches.databases, ['app0', 'app1', 'app2']);
    assert.deepEqual(watches.unwatched, ['app3', 'app4']);
    const refusals = lines.filter((l) => /database not watched/.test(l.msg)).map((l) => l.database);
    assert.deepEqual(refusals, ['app3', 'app4']);
    assert.equal(
      watches.statisticsWatchedUntil(new Set(['app3'])),
      Number.POSITIVE_INFINITY,
      'not watched: not waited for',
    );
    assert.equal(watches.statisticsWatchedUntil(new Set(['app1'])), 0, 'watched, not read yet');
    await watches.stop();
    await monitor.close();
  });
});
