// The control database shared by a fleet: rule changes and incidents of one
// instance reach the others within a second through LISTEN/NOTIFY, a late instance
// starts with the fleet's rules, and an instance cut off from the control database
// keeps enforcing what it knew, refuses changes, and catches up when it is back.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import pino from 'pino';
import { ControlDatabase, ControlDatabaseUnreachableError } from '../../src/state/control.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { rule } from './rules.ts';

const suffix = randomBytes(4).toString('hex');
const CONTROL_DB = `pgw_control_${suffix}`;
const LIMITED_ROLE = `pgw_control_${suffix}_limited`;
const LIMITED_PASSWORD = randomBytes(8).toString('hex');
const silent = pino({ level: 'silent' });

function controlUrl(user?: { name: string; password: string }): string {
  const url = new URL(testDatabase().url);
  url.pathname = `/${CONTROL_DB}`;
  if (user) {
    url.username = encodeURIComponent(user.name);
    url.password = encodeURIComponent(user.password);
  }
  return url.toString();
}

/** Every full rule set an instance's onExternalChange listener was called with, and when. */
class ChangeRecorder {
  readonly calls: Array<{ at: number; ids: string[] }> = [];
  constructor(control: ControlDatabase) {
    control.onExternalChange((rules) => this.calls.push({ at: performance.now(), ids: rules.map((r) => r.id).sort() }));
  }
  /** Waits for a call (after index `from`) whose rule set satisfies `ok`, and returns when it came. */
  async waitFor(what: string, from: number, ok: (ids: string[]) => boolean, timeoutMs = 5_000): Promise<number> {
    const call = await waitFor(() => this.calls.slice(from).find((c) => ok(c.ids)), { what, timeoutMs, intervalMs: 5 });
    return call.at;
  }
}

describe('ControlDatabase', () => {
  const opened: ControlDatabase[] = [];
  let a: ControlDatabase;
  let b: ControlDatabase;
  let seenByB: ChangeRecorder;

  async function open(instance: string, url = controlUrl(), log = silent): Promise<ControlDatabase> {
    const control = await ControlDatabase.open({ url, instance, log });
    opened.push(control);
    return control;
  }

  before(async () => {
    await withClient(async (client) => {
      await client.query(`create database ${CONTROL_DB}`);
      await client.query(`create role ${LIMITED_ROLE} login password '${LIMITED_PASSWORD}'`);
    });
  });

  after(async () => {
    await Promise.all(opened.map((control) => control.close()));
    await withClient(async (client) => {
      await client.query(`drop database if exists ${CONTROL_DB} with (force)`);
      await client.query(`drop role if exists ${LIMITED_ROLE}`);
    });
  });

  test('two instances opening at once on an empty database both create or find the schema', async () => {
    [a, b] = await Promise.all([open('a'), open('b')]);
    seenByB = new ChangeRecorder(b);
    const tables = await withClient(async (client) => {
      const { rows } = await client.query<{ name: string }>(
        `select table_name as name from information_schema.tables where table_schema = 'pgwarden' order by 1`,
      );
      return rows.map((r) => r.name);
    }, controlUrl());
    assert.deepEqual(tables, ['detector_state', 'incidents', 'instances', 'rules', 'shape_summaries']);
    assert.deepEqual(await a.load(), []);
    assert.equal(a.reachable, true);
  });

  test('a rule added on one instance reaches the other within a second, as the full rule set', async (t) => {
    const from = seenByB.calls.length;
    const started = performance.now();
    await a.add(rule('r-1'));
    const committed = performance.now();
    const arrived = await seenByB.waitFor('r-1 on b', from, (ids) => ids.includes('r-1'));
    const latency = arrived - started;
    t.diagnostic(
      `add propagation: ${latency.toFixed(1)} ms from add() call, ${(arrived - committed).toFixed(1)} ms after it returned`,
    );
    console.log(`add propagation latency: ${latency.toFixed(1)} ms`);
    assert.ok(latency < 1000, `propagation took ${latency} ms`);
    assert.deepEqual(await b.load(), [rule('r-1')]);
    assert.deepEqual(await a.load(), [rule('r-1')]);

    const next = seenByB.calls.length;
    await a.add(rule('r-2', { action: 'shed', max_concurrent: 3, queue_timeout_ms: 500 }));
    await seenByB.waitFor('r-2 on b', next, (ids) => ids.join() === 'r-1,r-2');
    assert.deepEqual(
      (await b.load()).find((r) => r.id === 'r-2'),
      rule('r-2', { action: 'shed', max_concurrent: 3, queue_timeout_ms: 500 }),
    );
  });

  test('a rule removed on one instance disappears from the other within a second', async (t) => {
    const from = seenByB.calls.length;
    const started = performance.now();
    await a.remove('r-1');
    const arrived = await seenByB.waitFor('r-1 gone from b', from, (ids) => !ids.includes('r-1'));
    const latency = arrived - started;
    t.diagnostic(`remove propagation: ${latency.toFixed(1)} ms`);
    console.log(`remove propagation latency: ${latency.toFixed(1)} ms`);
    assert.ok(latency < 1000, `propagation took ${latency} ms`);
    assert.deepEqual(
      (await b.load()).map((r) => r.id),
      ['r-2'],
    );
    await a.remove('r-never-existed');
  });

  test('incidents published by one instance are seen by the others, newest first, with their instance', async () => {
    await a.publishIncident({ id: 'i-1', title: 'slow shape', severity: 'warning' });
    await b.publishIncident({ id: 'i-2', title: 'plan flip' });
    const expected = (incidents: ReturnType<ControlDatabase['sharedIncidents']>) =>
      incidents.map((i) => `${i.id}@${i.instance}`).join() === 'i-2@b,i-1@a' ? incidents : undefined;
    const seen = await waitFor(() => expected(b.sharedIncidents()), { what: 'both incidents on b', timeoutMs: 2_000 });
    assert.deepEqual(seen[1], { id: 'i-1', instance: 'a', title: 'slow shape', severity: 'warning' });
    await waitFor(() => expected(a.sharedIncidents()), { what: 'both incidents on a', timeoutMs: 2_000 });

    await a.publishIncident({ id: 'i-1', title: 'slow shape', severity: 'critical' });
    await waitFor(
      () => {
        const incidents = b.sharedIncidents();
        return incidents[0]?.id === 'i-1' && incidents[0].severity === 'critical' && incidents.length === 2;
      },
      { what: 'the updated incident first on b', timeoutMs: 2_000 },
    );
  });

  test('an instance opened later starts with the rules and incidents already there', async () => {
    const c = await open('c');
    assert.deepEqual(
      (await c.load()).map((r) => r.id),
      ['r-2'],
    );
    assert.deepEqual(
      c.sharedIncidents().map((i) => i.id),
      ['i-1', 'i-2'],
    );
  });

  test('saved baselines reach an instance opened under a new name; its incident history stays with its own name', async () => {
    const state = {
      version: 1 as const,
      saved_at: new Date().toISOString(),
      baselines: [
        {
          fingerprint: 'f1',
          baseline: { p50_ms: 0.2, p95_ms: 0.5, p99_ms: 1, rate: 100, samples: 1000 },
          computed_at: Date.now(),
        },
      ],
      incidents: [{ id: 'inc-1' } as never],
    };
    await a.saveDetectorState(state);
    const again = await a.loadDetectorState();
    assert.deepEqual(again, state, 'the same instance gets its state back');
    const fresh = await open('fresh-after-restart');
    const seen = await fresh.loadDetectorState();
    assert.deepEqual(seen?.baselines, state.baselines);
    assert.deepEqual(seen?.incidents, [], "no other instance's incident history");
  });

  test('an instance cut off from the control database keeps its rules, refuses changes, and catches up when it is back', async () => {
    // A role that can be locked out, so this instance goes down while `a` stays up.
    await withClient(async (client) => {
      await client.query(`grant usage on schema pgwarden to ${LIMITED_ROLE}`);
      await client.query(
        `grant select, insert, update, delete on pgwarden.rules, pgwarden.incidents to ${LIMITED_ROLE}`,
      );
    }, controlUrl());
    const warnings: Array<{ msg: string }> = [];
    const log = pino({ level: 'warn' }, { write: (line: string) => warnings.push(JSON.parse(line)) });
    const d = await open('d', controlUrl({ name: LIMITED_ROLE, password: LIMITED_PASSWORD }), log);
    const seenByD = new ChangeRecorder(d);
    assert.deepEqual(
      (await d.load()).map((r) => r.id),
      ['r-2'],
      'a role without CREATE opens a provisioned schema',
    );

    const terminated = await withClient(async (client) => {
      await client.query(`alter role ${LIMITED_ROLE} nologin`);
      const { rows } = await client.query<{ n: number }>(
        `select count(pg_terminate_backend(pid))::int as n from pg_stat_activity where application_name = $1 and datname = $2`,
        ['pgwarden-control d', CONTROL_DB],
      );
      return rows[0].n;
    });
    assert.ok(terminated >= 1, `terminated ${terminated} connections`);
    await waitFor(() => !d.reachable, { what: 'd to notice the outage', timeoutMs: 5_000 });

    await assert.rejects(d.add(rule('r-while-down')), (error: Error) => {
      assert.ok(error instanceof ControlDatabaseUnreachableError, String(error));
      assert.match(
        error.message,
        new RegExp(`control database .*${CONTROL_DB} is unreachable .*cannot add rule r-while-down`),
      );
      return true;
    });
    await assert.rejects(d.remove('r-2'), ControlDatabaseUnreachableError);
    await assert.rejects(d.publishIncident({ id: 'i-d' }), ControlDatabaseUnreachableError);

    // The fleet moves on without d; d keeps enforcing what it knew.
    await a.add(rule('r-missed'));
    assert.deepEqual(
      (await d.load()).map((r) => r.id),
      ['r-2'],
    );

    const from = seenByD.calls.length;
    await withClient((client) => client.query(`alter role ${LIMITED_ROLE} login`));
    await waitFor(() => d.reachable, { what: 'd to reconnect', timeoutMs: 15_000 });
    await seenByD.waitFor(
      'the rule missed while down, reloaded on reconnect',
      from,
      (ids) => ids.join() === 'r-2,r-missed',
    );
    assert.deepEqual(
      (await d.load()).map((r) => r.id),
      ['r-2', 'r-missed'],
    );

    const afterReconnect = seenByD.calls.length;
    const started = performance.now();
    await a.add(rule('r-after'));
    const arrived = await seenByD.waitFor('a notification after reconnecting', afterReconnect, (ids) =>
      ids.includes('r-after'),
    );
    assert.ok(arrived - started < 1000, `propagation after reconnect took ${arrived - started} ms`);

    await d.add(rule('r-from-d'));
    await seenByB.waitFor('the rule d added after reconnecting', 0, (ids) => ids.includes('r-from-d'));

    const outageWarnings = warnings.filter((w) => /unreachable/.test(w.msg));
    assert.equal(outageWarnings.length, 1, JSON.stringify(warnings));
  });

  test('opening against an address nothing listens on fails with an error naming it', async () => {
    const port = await unusedPort();
    const url = new URL(testDatabase().url);
    url.port = String(port);
    url.pathname = `/${CONTROL_DB}`;
    const started = performance.now();
    await assert.rejects(ControlDatabase.open({ url: url.toString(), instance: 'x', log: silent }), (error: Error) => {
      assert.ok(error instanceof ControlDatabaseUnreachableError, String(error));
      assert.match(error.message, new RegExp(`control database ${url.hostname}:${port}/${CONTROL_DB} is unreachable`));
      assert.match(error.message, /ECONNREFUSED/);
      return true;
    });
    assert.ok(performance.now() - started < 5_000);
  });
});

async function unusedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((resolve) => server.close(() => resolve()));
  return port;
}
