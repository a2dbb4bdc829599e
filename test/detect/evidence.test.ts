// The pure parts of the evidence beyond DDL, with plain fixtures: settings and
// statistics diffs, the lock-wait chain, the load behind a saturation, which setting
// or statistics change is decisive, and the in-flight tracker around a gate.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import type { ActivitySample, Backend } from '../../src/detect/activity.ts';
import { leadingCause, PreparedPlanCauses, TimelineCauses } from '../../src/detect/causes.ts';
import { EventLog } from '../../src/events/timeline.ts';
import { InFlightMerge, InFlightTracker, stuckRegression } from '../../src/detect/inflight.ts';
import { DEFAULT_DETECTOR_OPTIONS } from '../../src/detect/detector.ts';
import { describeLockWait, lockWaitOf } from '../../src/detect/locks.ts';
import { isSaturated, loadOf } from '../../src/detect/saturation.ts';
import { diffSettings, type SettingsSnapshot } from '../../src/detect/settings.ts';
import { diffStatistics, type TableStatistics } from '../../src/detect/statistics.ts';
import { FORWARD, type GateDecision, type QueryRequest, type SessionInfo } from '../../src/proxy/seam.ts';
import { ShapeFinder } from '../../src/shapes/fingerprint.ts';

const server = (name: string, setting: string, extra: Partial<SettingsSnapshot['server'][number]> = {}) => ({
  name,
  setting,
  unit: null,
  source: 'default',
  sourcefile: null,
  pendingRestart: false,
  ...extra,
});

describe('diffSettings', () => {
  test('an ALTER SYSTEM change applied by a reload names both values and the reload', () => {
    const before: SettingsSnapshot = { server: [server('random_page_cost', '4')], scoped: [], reloadedAt: 1000 };
    const after: SettingsSnapshot = {
      server: [
        server('random_page_cost', '1000', { source: 'configuration file', sourcefile: '/data/postgresql.auto.conf' }),
      ],
      scoped: [],
      reloadedAt: Date.parse('2025-01-14T10:00:00Z'),
    };
    const [change] = diffSettings(before, after);
    assert.equal(change.summary, 'random_page_cost 4 -> 1000 (ALTER SYSTEM, reloaded at 2025-01-14T10:00:00.000Z)');
  });

  test('per-database and per-role settings read like the statements that made them', () => {
    const before: SettingsSnapshot = {
      server: [],
      scoped: [{ database: 'app', role: '', name: 'enable_indexscan', value: 'on' }],
      reloadedAt: 1,
    };
    const after: SettingsSnapshot = {
      server: [],
      scoped: [
        { database: 'app', role: '', name: 'enable_indexscan', value: 'off' },
        { database: '', role: 'report', name: 'work_mem', value: '1GB' },
        { database: 'app', role: 'report', name: 'jit', value: 'off' },
      ],
      reloadedAt: 1,
    };
    assert.deepEqual(
      diffSettings(before, after).map((c) => c.summary),
      [
        'ALTER DATABASE app SET enable_indexscan = off (was on)',
        'ALTER ROLE report SET work_mem = 1GB',
        'ALTER ROLE report IN DATABASE app SET jit = off',
      ],
    );
    assert.deepEqual(
      diffSettings(after, before).map((c) => c.summary),
      [
        'ALTER DATABASE app SET enable_indexscan = on (was off)',
        'ALTER ROLE report RESET work_mem (was 1GB)',
        'ALTER ROLE report IN DATABASE app RESET jit (was off)',
      ],
    );
  });

  test('a change waiting for a restart is reported as pending', () => {
    const before: SettingsSnapshot = {
      server: [server('shared_buffers', '16384', { unit: '8kB' })],
      scoped: [],
      reloadedAt: 1,
    };
    const after: SettingsSnapshot = {
      server: [server('shared_buffers', '16384', { unit: '8kB', pendingRestart: true })],
      scoped: [],
      reloadedAt: 1,
    };
    assert.match(
      diffSettings(before, after)[0].summary,
      /shared_buffers changed in the configuration, pending a restart \(still 16384 8kB\)/,
    );
  });
});

describe('diffStatistics', () => {
  const table = (extra: Partial<TableStatistics> = {}): TableStatistics => ({
    oid: 1,
    schema: 'public',
    table: 'orders',
    analyzeCount: 1,
    autoanalyzeCount: 0,
    lastAnalyze: null,
    lastAutoanalyze: null,
    reltuples: 1000,
    liveTuples: 1000,
    ...extra,
  });

  test('an ANALYZE is a change with the row estimate before and after; nothing else is', () => {
    const before = new Map([[1, table()]]);
    assert.deepEqual(diffStatistics(before, new Map([[1, table({ liveTuples: 5000 })]])), []);
    const at = Date.parse('2025-01-14T10:00:00Z');
    const [change] = diffStatistics(
      before,
      new Map([[1, table({ analyzeCount: 2, lastAnalyze: at, reltuples: 100_000 })]]),
    );
    assert.equal(change.summary, 'ANALYZE of public.orders at 2025-01-14T10:00:00.000Z (row estimate 1000 -> 100000)');
    const [auto] = diffStatistics(before, new Map([[1, table({ autoanalyzeCount: 1, lastAutoanalyze: at })]]));
    assert.match(auto.summary, /^autoanalyze of public\.orders .*row estimate unchanged at 1000/);
  });
});

function backend(pid: number, extra: Partial<Backend> = {}): Backend {
  return {
    pid,
    user: 'app',
    application: 'web',
    database: 'shop',
    client: null,
    state: 'active',
    waitEventType: null,
    waitEvent: null,
    xactStart: null,
    queryStart: null,
    fingerprint: 'f1',
    query: 'select * from users where id = $1',
    blockedBy: [],
    ...extra,
  };
}

describe('lockWaitOf', () => {
  test('follows the wait chain to the session at its head and names what it holds', () => {
    const at = 100_000;
    const sample: ActivitySample = {
      at,
      proxied: new Map(),
      backends: [
        backend(10, { waitEventType: 'Lock', waitEvent: 'relation', blockedBy: [20] }),
        backend(11, { waitEventType: 'Lock', waitEvent: 'relation', blockedBy: [20] }),
        // 20 waits for 30 itself (an ALTER TABLE queued behind a long transaction)
        backend(20, {
          user: 'deploy',
          application: 'migrate',
          fingerprint: 'f2',
          query: 'alter table users add column x int',
          waitEventType: 'Lock',
          blockedBy: [30],
        }),
        backend(30, {
          user: 'etl',
          application: 'nightly',
          state: 'idle in transaction',
          fingerprint: 'f3',
          query: 'select count(*) from users',
          xactStart: at - 25_000,
        }),
      ],
      locks: [
        { pid: 10, relation: 'users', mode: 'AccessShareLock', granted: false },
        { pid: 20, relation: 'users', mode: 'AccessExclusiveLock', granted: false },
        { pid: 30, relation: 'users', mode: 'AccessShareLock', granted: true },
      ],
    };
    const evidence = lockWaitOf(sample, 'f1', new Set(['users']))!;
    assert.equal(evidence.waiting, 2);
    assert.deepEqual(
      evidence.blockers.map((b) => b.pid),
      [30],
    );
    assert.equal(
      describeLockWait(evidence),
      '2 statements of this shape wait for a lock on users, held by pid 30 (user etl, application nightly, idle in transaction, last ran `select count(*) from users`, holding AccessShareLock on users, in its transaction for 25 s)',
    );
    assert.equal(
      lockWaitOf(sample, 'other', new Set(['orders'])),
      null,
      'a shape that waits for nothing has no lock evidence',
    );
  });
});

describe('loadOf and isSaturated', () => {
  const sample = (at: number, backends: Backend[], proxied: [string, number][] = []): ActivitySample => ({
    at,
    backends,
    locks: [],
    proxied: new Map(proxied),
  });

  test('consumers outside the proxy are told from proxied ones by the statements the proxy has in flight', () => {
    const hog = (pid: number) =>
      backend(pid, { user: 'etl', application: 'report', fingerprint: 'hog', query: 'select count(*) from big' });
    const app = (pid: number) => backend(pid, { fingerprint: 'f1' });
    const before = loadOf([sample(1, [app(1)], [['f1', 1]]), sample(2, [], [])]);
    const after = loadOf([
      sample(3, [app(1), hog(2), hog(3), hog(4)], [['f1', 1]]),
      sample(
        4,
        [
          app(1),
          hog(2),
          hog(3),
          backend(5, {
            waitEventType: 'IO',
            waitEvent: 'DataFileRead',
            fingerprint: 'hog',
            user: 'etl',
            application: 'report',
          }),
        ],
        [['f1', 1]],
      ),
    ]);
    assert.equal(before.active, 0.5);
    assert.equal(after.active, 4);
    assert.ok(isSaturated(before, after));
    assert.deepEqual(after.consumers[0], {
      user: 'etl',
      application: 'report',
      fingerprint: 'hog',
      query: 'select count(*) from big',
      proxied: false,
      sessions: 3,
    });
    assert.equal(after.consumers.find((c) => c.fingerprint === 'f1')!.proxied, true);
    assert.deepEqual(
      after.waits.map((w) => w.wait),
      ['CPU', 'IO:DataFileRead'],
    );
    assert.ok(!isSaturated(after, after), 'the same load is no saturation');
  });
});

describe('setting and statistics causes', () => {
  test('only the latest change before the plan flipped is decisive, and it leads unless a DDL came after it', () => {
    let now = 1_000_000;
    const events = new EventLog({ now: () => now });
    events.add({
      type: 'setting_change',
      at: now - 60_000,
      summary: 'ALTER ROLE report SET work_mem = 64MB',
      objects: [],
    });
    events.add({
      type: 'setting_change',
      at: now - 20_000,
      summary: 'random_page_cost 4 -> 1000 (ALTER SYSTEM)',
      objects: [],
    });
    events.add({
      type: 'statistics_change',
      at: now - 30_000,
      summary: 'ANALYZE of public.orders',
      objects: ['orders'],
    });
    const plan = events.add({
      type: 'plan_change',
      at: now - 15_000,
      fingerprint: 'f1',
      summary: 'Index Scan -> Seq Scan on users',
      objects: ['users'],
    });
    const causes = new TimelineCauses(events).causes({
      fingerprint: 'f1',
      onset: now - 14_000,
      now,
      objects: new Set(['users']),
      planChanges: [plan],
    });
    const decisive = causes.filter((c) => c.conclusive).map((c) => c.summary);
    assert.deepEqual(decisive, [
      'setting changed: random_page_cost 4 -> 1000 (ALTER SYSTEM); the plan changed within 5 s',
    ]);
    assert.ok(
      !causes.some((c) => c.type === 'statistics_change'),
      'statistics of a table the shape does not use are no cause',
    );
    assert.match(leadingCause(causes)!.summary, /random_page_cost/);
    const ddl = {
      kind: 'schema_change' as const,
      type: 'schema_change' as const,
      event_id: 9,
      at: new Date(now - 16_000).toISOString(),
      between: { from: new Date(now - 17_000).toISOString(), to: new Date(now - 16_000).toISOString() },
      seconds_before_onset: 2,
      summary: 'index dropped',
      relevant: true,
      objects: ['users'],
    };
    assert.equal(leadingCause([...causes, ddl]), undefined, 'a DDL after the setting keeps the DDL attribution');
    now += 1;
  });
});

describe('prepared statements switched to their generic plan', () => {
  const planChange = (events: EventLog, at: number, details: Record<string, unknown>) =>
    events.add({
      type: 'plan_change',
      at,
      fingerprint: 'f1',
      summary: 'Index Scan using jobs_status_idx on jobs -> Index Scan using jobs_pkey on jobs',
      objects: ['public.jobs', 'public.jobs_status_idx', 'public.jobs_pkey'],
      details: {
        from: 'a',
        to: 'b',
        removed: [],
        added: [],
        before: 'Index Scan using jobs_status_idx on jobs',
        after: 'Index Scan using jobs_pkey on jobs',
        estimates_before: '',
        estimates_after: '',
        ...details,
      },
    });
  const context = (planChanges: ReturnType<EventLog['add']>[]) => ({
    fingerprint: 'f1',
    onset: 1_000_000,
    now: 1_010_000,
    objects: new Set<string>(),
    planChanges,
  });

  test('a plan change from custom to generic under plan_cache_mode auto is the conclusive cause, and leads', () => {
    const events = new EventLog({ now: () => 1_010_000 });
    const plan = planChange(events, 1_002_000, {
      kind_before: 'custom',
      kind_after: 'generic',
      plan_cache_mode: 'auto',
      kind_reason: 'execution 9: replayed',
    });
    const causes = new PreparedPlanCauses().causes(context([plan]));
    assert.equal(causes.length, 1);
    assert.equal(causes[0].type, 'generic_plan');
    assert.equal(causes[0].conclusive, true);
    assert.equal(
      causes[0].summary,
      'prepared statement switched to its generic plan after 5 executions (custom plans before): Index Scan using jobs_status_idx on jobs -> Index Scan using jobs_pkey on jobs',
    );
    assert.equal(leadingCause(causes), causes[0]);
  });

  test('no switch, a forced generic plan or a switch back to custom plans is no generic_plan cause', () => {
    const events = new EventLog({ now: () => 1_010_000 });
    const same = planChange(events, 1_001_000, {
      kind_before: 'custom',
      kind_after: 'custom',
      plan_cache_mode: 'auto',
    });
    const forced = planChange(events, 1_002_000, {
      kind_before: 'custom',
      kind_after: 'generic',
      plan_cache_mode: 'force_generic_plan',
    });
    const back = planChange(events, 1_003_000, {
      kind_before: 'generic',
      kind_after: 'custom',
      plan_cache_mode: 'auto',
    });
    const none = planChange(events, 1_004_000, {});
    assert.deepEqual(new PreparedPlanCauses().causes(context([same, forced, back, none])), []);
  });
});

describe('InFlightTracker', async () => {
  const finder = await ShapeFinder.create({ cacheEntries: 100, maxTextBytes: 65_536 });
  const session: SessionInfo = {
    id: 1,
    user: 'app',
    database: 'shop',
    applicationName: 'web',
    clientAddress: '127.0.0.1',
    replication: false,
    settings: new Map(),
  };
  const request = (text: string, phase: QueryRequest['phase'] = 'query'): QueryRequest => ({
    session,
    phase,
    text,
    statement: null,
    transactionStatus: 'I',
    pipelineBusy: false,
  });

  test('tracks forwarded statements until their done, never parses or refused ones', () => {
    let now = 10_000;
    let inner: GateDecision = FORWARD;
    const tracker = new InFlightTracker({ decide: () => inner }, finder, () => now);
    const first = tracker.decide(request('select * from users where id = 1')) as GateDecision & { done?: () => void };
    const second = tracker.decide(request('select * from users where id = 2')) as GateDecision & { done?: () => void };
    assert.equal(first, second, 'one decision object per session: nothing allocated per query');
    tracker.decide(request('select 1', 'parse'));
    inner = { action: 'refuse', error: { severity: 'ERROR', code: '42501', message: 'pgwarden: no' } };
    assert.equal(tracker.decide(request('select 2')), inner);
    now += 5000;
    const stuck = tracker.stuckByShape(1000);
    assert.equal(stuck.size, 1);
    const [shape] = stuck.values();
    assert.equal(shape.count, 2);
    assert.deepEqual(shape.ages, [5000, 5000]);
    assert.equal(tracker.inFlight()[0].query, 'select * from users where id = $1', 'shapes are normalized');
    first.done!();
    assert.equal(tracker.inFlight().length, 1);
    second.done!();
    assert.equal(tracker.inFlight().length, 0);
  });

  test("a statement admitted after queueing (a shed rule) is tracked from then, with the rule's own done still called", async () => {
    let released = 0;
    const tracker = new InFlightTracker(
      { decide: () => Promise.resolve({ action: 'forward', done: () => released++ } as GateDecision) },
      finder,
      () => 1000,
    );
    const req = request('select * from orders where id = 7');
    const pending = tracker.decide(req) as Promise<GateDecision & { done?: () => void }>;
    (req as { text: string }).text = 'select 1'; // the session reuses its request object
    const decision = await pending;
    assert.equal(tracker.inFlight()[0].query, 'select * from orders where id = $1');
    decision.done!();
    assert.equal(released, 1);
    assert.equal(tracker.inFlight().length, 0);
  });

  test("a worker's report: counts of everything in flight, the old statements capped (oldest kept), shapes without values", () => {
    let now = 50_000;
    const tracker = new InFlightTracker({ decide: () => FORWARD }, finder, () => now);
    const sessionOf = (id: number) => ({ ...session, id });
    for (let i = 0; i < 5; i++)
      tracker.decide({ ...request(`select * from users where id = ${100 + i}`), session: sessionOf(10 + i) });
    now += 2000;
    tracker.decide({ ...request("select * from orders where note = 'secret'"), session: sessionOf(20) });
    now += 100;
    const report = tracker.report(1000, 3, 10);
    assert.equal(report.statements.length, 3, 'capped');
    assert.equal(report.omitted, 2, 'the rest counted as left out');
    assert.deepEqual(
      report.statements.map((s) => s.session),
      [10, 11, 12],
      'the oldest are kept',
    );
    const fp = report.statements[0].fingerprint;
    assert.deepEqual(report.queries, { [fp]: 'select * from users where id = $1' });
    assert.equal(
      Object.values(report.counts).reduce((a, b) => a + b, 0),
      6,
      'every statement counted, any age',
    );
    assert.equal(report.counts[fp], 5);
    assert.ok(!JSON.stringify(report).includes('secret') && !JSON.stringify(report).includes('100'), 'no literal');
    assert.equal(Object.keys(tracker.report(1000, 3, 1).counts).length, 1, 'shapes counted are capped too');
  });

  test('a stuck statement is parsed into its shape once, however often it is asked about', () => {
    let now = 1000;
    let lookups = 0;
    const counting = {
      shapesOfText: (text: string) => {
        lookups++;
        return finder.shapesOfText(text);
      },
      shapeOfStatement: finder.shapeOfStatement.bind(finder),
    } as unknown as ShapeFinder;
    const tracker = new InFlightTracker({ decide: () => FORWARD }, counting, () => now);
    const decision = tracker.decide(request('select * from users where id = 5')) as GateDecision & {
      done?: () => void;
    };
    now += 5000;
    for (let i = 0; i < 10; i++) tracker.report(750, 200, 500);
    assert.equal(tracker.stuckByShape(1000).size, 1);
    assert.equal(lookups, 1);
    decision.done!();
    tracker.decide(request('select * from orders where id = 5'));
    assert.equal(tracker.inFlight()[0].query, 'select * from orders where id = $1', 'the next statement is its own');
    assert.equal(lookups, 2);
  });

  test("the merged view adds the workers' latest reports to its own, and forgets stale or departed workers", () => {
    let now = 100_000;
    const local = new InFlightTracker({ decide: () => FORWARD }, finder, () => now);
    local.decide(request('select * from users where id = 1'));
    const merge = new InFlightMerge(local, 1000, () => now);
    const fp = local.inFlight()[0].fingerprint;
    const report = (sessions: number[]) => ({
      counts: { [fp]: sessions.length + 1, other: 1 },
      statements: sessions.map((id) => ({
        session: id,
        user: 'app',
        database: 'shop',
        fingerprint: fp,
        since: now - 1500,
      })),
      queries: { [fp]: 'select * from users where id = $1' },
      omitted: 0,
    });
    merge.set(1, report([7, 8]));
    merge.set(2, report([7]));
    now += 2000; // the local statement is 2 s old, the workers' 3.5 s, reports 2 s old: stale
    assert.equal(merge.stuckByShape(1000).get(fp)?.count, 1, 'stale reports count for nothing');
    merge.set(1, report([7, 8]));
    merge.set(2, report([7]));
    now += 200;
    const stuck = merge.stuckByShape(1000).get(fp)!;
    assert.equal(stuck.count, 4, 'local and both workers');
    assert.equal(stuck.oldestSince, 100_000, "the local statement's");
    assert.deepEqual(
      merge
        .inFlight(1000)
        .filter((s) => s.worker !== undefined)
        .map((s) => [s.worker, s.session]),
      [
        [1, 7],
        [1, 8],
        [2, 7],
      ],
      'each statement keeps its worker: session numbers repeat across workers',
    );
    assert.equal(merge.stuckByShape(1800).get(fp)?.count, 1, 'the minimum age applies to reported statements');
    assert.equal(merge.countsByShape().get(fp), 1 + 3 + 2);
    assert.equal(merge.countsByShape().get('other'), 2);
    merge.drop(1);
    assert.equal(merge.stuckByShape(1000).get(fp)?.count, 2, 'a worker that exited is forgotten');
  });

  test('statements stuck far beyond the baseline are a regression; one stuck call or a slow-ish one is not', () => {
    const baseline = { p50_ms: 1, p95_ms: 2, p99_ms: 3, rate: 100, samples: 1000 };
    const d = DEFAULT_DETECTOR_OPTIONS;
    assert.equal(stuckRegression({ fingerprint: 'f', count: 1, oldestSince: 0, ages: [30_000] }, baseline, d), null);
    assert.equal(stuckRegression({ fingerprint: 'f', count: 2, oldestSince: 0, ages: [900, 950] }, baseline, d), null);
    assert.equal(
      stuckRegression({ fingerprint: 'f', count: 3, oldestSince: 0, ages: [5000, 4000, 500] }, baseline, d)!.count,
      2,
    );
  });
});
