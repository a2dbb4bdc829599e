// The mitigation policy's decisions, with plain incidents and shapes (no database):
// it acts on the root shape only, never on a transaction-control or session
// statement, never beyond its budget, and a dry-run reports exactly what enforce does.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import pino from 'pino';
import { ManualClock } from '../../src/clock.ts';
import { EventLog } from '../../src/events/timeline.ts';
import type { Incident } from '../../src/detect/incidents.ts';
import { MitigationPolicy, type MitigationMode, type PolicyShapes } from '../../src/rules/policy.ts';
import { RuleStore } from '../../src/rules/store.ts';

const ROOT = 'aaaaaaaaaaaaaaaa';
const VICTIM = 'bbbbbbbbbbbbbbbb';
const COMMIT = 'cccccccccccccccc';
const OTHER = 'dddddddddddddddd';
const BUSY = 'eeeeeeeeeeeeeeee';

/** Shapes as the registry would describe them, with their share of recent calls. */
const SHAPES: Record<string, { kind: string; command: string; control: boolean; share: number }> = {
  [ROOT]: { kind: 'UpdateStmt', command: 'UPDATE', control: false, share: 0.1 },
  [VICTIM]: { kind: 'SelectStmt', command: 'SELECT', control: false, share: 0.1 },
  [COMMIT]: { kind: 'TransactionStmt', command: 'END', control: true, share: 0.1 },
  [OTHER]: { kind: 'InsertStmt', command: 'INSERT', control: false, share: 0.1 },
  [BUSY]: { kind: 'SelectStmt', command: 'SELECT', control: false, share: 0.6 },
};
const shapes: PolicyShapes = {
  lookup: (fp) => SHAPES[fp],
  trafficShare: (fps) => [...new Set(fps)].reduce((sum, fp) => sum + (SHAPES[fp]?.share ?? 0), 0),
};

let nextId = 1;
function incident(fingerprint: string, extra: Partial<Incident> = {}): Incident {
  return {
    id: `i-${nextId++}`,
    fingerprint,
    query: '',
    status: 'active',
    summary: 'regressed',
    causes: [],
    ...extra,
  } as Incident;
}

function policy(mode: MitigationMode, settings: { maxRules?: number; maxTrafficShare?: number } = {}) {
  const clock = new ManualClock();
  const log = pino({ level: 'silent' });
  const events = new EventLog(clock);
  const store = new RuleStore({ clock, log, events, persistence: null });
  const alerts: unknown[] = [];
  const p = new MitigationPolicy({
    mode,
    protect: new Set(),
    maxConcurrent: 1,
    queueTimeoutMs: 20,
    ttlS: 600,
    maxRules: settings.maxRules ?? 2,
    maxTrafficShare: settings.maxTrafficShare ?? 0.5,
    shapes,
    store,
    events,
    clock,
    log,
    alert: (payload) => alerts.push(payload),
  });
  return { p, store, alerts, clock };
}

const settle = () => new Promise((resolve) => setImmediate(resolve));

describe('mitigation policy decisions', () => {
  test('a transaction-control statement is never shed, and the refusal says why', async () => {
    const { p, store } = policy('enforce');
    const i = incident(COMMIT);
    p.onIncident(i, 'opened');
    await settle();
    assert.equal(store.list().length, 0);
    assert.equal(i.mitigation?.action, 'none');
    assert.match(
      i.mitigation?.refused?.[0].reason ?? '',
      /transaction-control or session statement \(TransactionStmt\)/,
    );
  });

  test('only the root shape of an incident is shed, never a victim', async () => {
    const { p, store } = policy('enforce');
    p.onIncident(
      incident(ROOT, { kind: 'shape', root: ROOT, victims: [{ fingerprint: VICTIM }] } as unknown as Partial<Incident>),
      'opened',
    );
    // An incident whose reported shape is a victim of another root: the root is what is acted on.
    p.onIncident(incident(VICTIM, { kind: 'shape', root: OTHER }), 'opened');
    await settle();
    const ruled = store
      .list()
      .map((r) => r.fingerprint)
      .sort();
    assert.deepEqual(ruled, [ROOT, OTHER].sort());
    const refusal = p.status().decisions.find((d) => d.fingerprint === OTHER)?.refused[0];
    assert.equal(refusal?.fingerprint, VICTIM);
    assert.match(refusal?.reason ?? '', /victim of root shape/);
  });

  test('a database-wide incident sheds nothing', async () => {
    const { p, store } = policy('enforce');
    const i = incident(ROOT, { kind: 'database_wide', root: null });
    p.onIncident(i, 'opened');
    await settle();
    assert.equal(store.list().length, 0);
    assert.match(i.mitigation?.note ?? '', /database-wide/);
  });

  test('at most mitigation_max_rules automatic rules are in force at once', async () => {
    const { p, store } = policy('enforce', { maxRules: 1 });
    p.onIncident(incident(ROOT), 'opened');
    const second = incident(OTHER);
    p.onIncident(second, 'opened');
    await settle();
    assert.deepEqual(
      store.list().map((r) => r.fingerprint),
      [ROOT],
    );
    assert.match(second.mitigation?.note ?? '', /budget: 1 automatic rule\(s\) in force already/);
  });

  test('the automatic rules never cover more than the configured share of traffic', async () => {
    const { p, store } = policy('enforce', { maxRules: 5, maxTrafficShare: 0.5 });
    const busy = incident(BUSY);
    p.onIncident(busy, 'opened');
    await settle();
    assert.equal(store.list().length, 0);
    assert.match(busy.mitigation?.note ?? '', /would cover 60% of recent calls/);
  });

  test('a resolved incident frees its share of the budget', async () => {
    const { p, store } = policy('enforce', { maxRules: 1 });
    const first = incident(ROOT);
    p.onIncident(first, 'opened');
    await settle();
    p.onIncident(first, 'resolved');
    await settle();
    p.onIncident(incident(OTHER), 'opened');
    await settle();
    assert.deepEqual(
      store.list().map((r) => r.fingerprint),
      [OTHER],
    );
  });

  test('dry-run decides exactly what enforce does, budget included, and stores nothing', async () => {
    const sequence = () => [incident(ROOT), incident(COMMIT), incident(OTHER), incident(VICTIM), incident(BUSY)];
    const enforce = policy('enforce', { maxRules: 2 });
    const dry = policy('dry-run', { maxRules: 2 });
    for (const i of sequence()) enforce.p.onIncident(i, 'opened');
    for (const i of sequence()) dry.p.onIncident(i, 'opened');
    await settle();
    const summary = (d: ReturnType<MitigationPolicy['status']>['decisions']) =>
      d.map((x) => [x.action, x.fingerprint, x.refused.map((r) => r.reason)]);
    assert.deepEqual(summary(dry.p.status().decisions), summary(enforce.p.status().decisions));
    assert.equal(dry.store.list().length, 0);
    assert.equal(enforce.store.list().length, 2);
  });

  test('every decision, a refusal too, is alerted', async () => {
    const { p, alerts } = policy('enforce');
    p.onIncident(incident(COMMIT), 'opened');
    p.onIncident(incident(ROOT), 'opened');
    await settle();
    assert.equal(alerts.length, 2);
    assert.deepEqual(alerts.map((a) => (a as { event: string; decision: { action: string } }).decision.action).sort(), [
      'none',
      'shed',
    ]);
  });
});
