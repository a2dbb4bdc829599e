// `pgwarden start --workers 2`: the relay runs in two processes, and the one view
// (statistics, EXPLAIN sampling, incidents, webhooks, /metrics) covers both, with
// every side task done once.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import type net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { runSessions } from '../../src/cli/sessions.ts';
import { perWorker } from '../../src/cli/workers.ts';
import type { Rule, ShedRule } from '../../src/rules/rule.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';

const TOKEN = 'workers-test-token-0123456789';
const CLIENTS = 8;
const ROUNDS = 25;

interface Shape {
  fingerprint: string;
  query: string;
  calls: number;
}

describe('a shed limit under --workers', () => {
  test('each worker admits its share, rounded up, at least one', () => {
    const shed = { action: 'shed', max_concurrent: 5, queue_timeout_ms: 0 } as ShedRule;
    assert.equal(perWorker(shed, 2).max_concurrent, 3);
    assert.equal(perWorker({ ...shed, max_concurrent: 1 }, 4).max_concurrent, 1);
    assert.equal(perWorker({ ...shed, max_concurrent: 0 }, 2).max_concurrent, 0, 'zero stays zero');
    const block = { action: 'block', max_concurrent: null } as Rule;
    assert.equal(perWorker(block, 2), block);
  });
});

describe('pgwarden start --workers 2', { timeout: 180_000 }, () => {
  let child: ChildProcess;
  let stateDir: string | undefined;
  let exit: Promise<number | null>;
  let output = '';
  let proxyPort = 0;
  let adminPort = 0;
  let workerPids: number[] = [];
  let receiver: http.Server;
  const hooks: { event: string; incident: { id: string; fingerprint: string } }[] = [];

  before(async () => {
    receiver = http.createServer((req, res) => {
      let body = '';
      req.on('data', (d: Buffer) => (body += d.toString()));
      req.on('end', () => {
        hooks.push(JSON.parse(body));
        res.writeHead(204).end();
      });
    });
    receiver.listen(0, '127.0.0.1');
    await once(receiver, 'listening');
    const hookUrl = `http://127.0.0.1:${(receiver.address() as net.AddressInfo).port}/hook`;
    const db = testDatabase();
    stateDir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-workers-'));
    child = spawn(
      process.execPath,
      [
        '--import',
        'tsx',
        'src/cli/main.ts',
        'start',
        '--workers',
        '2',
        '--listen',
        '127.0.0.1:0',
        '--admin',
        '127.0.0.1:0',
        '--admin-token',
        TOKEN,
        // Its own state file: rules and saved incidents must not leak into the checkout or the next run.
        '--state-file',
        path.join(stateDir, 'state.json'),
        '--upstream',
        `${db.host}:${db.port}`,
        '--monitor-url',
        db.url,
        '--alert-webhook-url',
        hookUrl,
        '--mitigation',
        'off',
        '--plan-sample-period-s',
        '3600',
        '--schema-check-interval-s',
        '3600',
        '--series-bucket-s',
        '1',
        '--detect-evaluate-ms',
        '500',
        '--slow-query-ms',
        '100000',
      ],
      { cwd: new URL('../..', import.meta.url), stdio: ['ignore', 'pipe', 'pipe'] },
    );
    exit = once(child, 'exit').then(([code]) => code as number | null);
    child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
    const lines = () =>
      output
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as Record<string, unknown>);
    [proxyPort, adminPort] = await waitFor(
      () => {
        const workers = lines().filter((l) => String(l.msg).startsWith('pgwarden proxy listening'));
        const primary = lines().find((l) => String(l.msg).startsWith('pgwarden supervising proxy workers'));
        if (workers.length < 2 || !primary) return undefined;
        workerPids = workers.map((l) => l.pid as number);
        return [Number(String(workers[0].listen).split(':').at(-1)), primary.admin as number];
      },
      { timeoutMs: 30_000, what: `two workers and the primary to start (output so far: ${output})` },
    );
  });

  after(async () => {
    if (child && child.exitCode === null) {
      child.kill('SIGTERM');
      assert.equal(await exit, 0, output.slice(-2000));
    }
    receiver?.close();
    if (stateDir) fs.rmSync(stateDir, { recursive: true, force: true });
  });

  async function api(path: string, init: { method?: string; body?: unknown; status?: number } = {}): Promise<any> {
    const response = await fetch(`http://127.0.0.1:${adminPort}${path}`, {
      method: init.method ?? 'GET',
      headers: { Authorization: `Bearer ${TOKEN}`, ...(init.body ? { 'Content-Type': 'application/json' } : {}) },
      body: init.body ? JSON.stringify(init.body) : undefined,
    });
    const text = await response.text();
    assert.equal(response.status, init.status ?? 200, text);
    return path === '/metrics' ? text : JSON.parse(text);
  }

  async function clients(n: number): Promise<pg.Client[]> {
    const db = testDatabase();
    const list = Array.from(
      { length: n },
      () => new pg.Client({ host: '127.0.0.1', port: proxyPort, user: db.user, database: db.database }),
    );
    await Promise.all(list.map((c) => c.connect()));
    return list;
  }

  /**
   * Which worker process relays a client: the one holding the socket of its
   * upstream connection (the local port the server sees), found through /proc.
   */
  async function workerOf(client: pg.Client): Promise<number | undefined> {
    const { rows } = await client.query('select inet_client_port() as port');
    const port = (rows[0].port as number).toString(16).toUpperCase().padStart(4, '0');
    const inodes = new Set<string>();
    for (const table of ['/proc/net/tcp', '/proc/net/tcp6']) {
      for (const line of fs.readFileSync(table, 'utf8').split('\n').slice(1)) {
        const fields = line.trim().split(/\s+/);
        if (fields.length > 9 && fields[1].endsWith(`:${port}`)) inodes.add(fields[9]);
      }
    }
    return workerPids.find((pid) =>
      fs.readdirSync(`/proc/${pid}/fd`).some((fd) => {
        try {
          return inodes.has(/^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/${pid}/fd/${fd}`))?.[1] ?? '');
        } catch {
          return false;
        }
      }),
    );
  }

  /** Every client runs each of three shapes ROUNDS times: two extended-protocol ones and a simple Query. */
  async function runRound(list: pg.Client[]): Promise<void> {
    await Promise.all(
      list.map(async (c, k) => {
        for (let i = 0; i < ROUNDS; i++) {
          await c.query('select $1::int + 1 as pgw_wk_a', [i]);
          await c.query('select upper($1::text) as pgw_wk_b', [`v${k}`]);
          await c.query(`select abs(${i * 10 + k}) as pgw_wk_c`);
        }
      }),
    );
  }

  async function ours(): Promise<Shape[]> {
    return ((await api('/api/shapes?limit=10000')) as Shape[]).filter((s) => /pgw_wk_[abc]\b/.test(s.query));
  }

  test('every statement through either worker is counted in /api/shapes and /metrics, and each shape is explained once', async (t) => {
    // Eight connections: the cluster primary hands them to the workers round-robin.
    const list = await clients(CLIENTS);
    t.after(() => Promise.all(list.map((c) => c.end().catch(() => undefined))));
    const relayedBy = new Set(await Promise.all(list.map(workerOf)));
    assert.deepEqual([...relayedBy].sort(), [...workerPids].sort(), 'the clients are spread over both workers');
    await runRound(list);
    const expected = CLIENTS * ROUNDS;
    // (The workerOf queries above are a shape of their own, not one of these three.)
    const shapes = await waitFor(
      async () => {
        const found = await ours();
        return found.length === 3 && found.every((s) => s.calls === expected) ? found : undefined;
      },
      { timeoutMs: 15_000, intervalMs: 100, what: `three shapes with ${expected} calls each` },
    );

    const metrics = await api('/metrics');
    for (const s of shapes) {
      assert.match(
        metrics,
        new RegExp(`pgwarden_shape_calls_total\\{fingerprint="${s.fingerprint}"\\} ${expected}\\n`),
        `metrics count ${s.query}`,
      );
    }
    assert.match(metrics, new RegExp(`pgwarden_connections_total ${CLIENTS}\\n`));
    assert.match(
      metrics,
      new RegExp(`pgwarden_queries_total ${3 * expected + CLIENTS}\\n`),
      'every statement, the workerOf ones included',
    );
    assert.match(
      metrics,
      new RegExp(`pgwarden_connections_active ${CLIENTS}\\n`),
      "the gauge sums the workers' sessions",
    );

    // One EXPLAIN per shape, though both workers saw each shape (and see it again).
    await waitFor(
      async () => {
        for (const s of shapes) if ((await api(`/api/shapes/${s.fingerprint}`)).plans?.current === null) return false;
        return true;
      },
      { timeoutMs: 15_000, intervalMs: 200, what: 'a plan for each shape' },
    );
    // Four explainable shapes: the three and workerOf's query.
    const explained = async () => Number(/^pgwarden_plan_samples_total (\d+)$/m.exec(await api('/metrics'))?.[1]);
    await waitFor(async () => (await explained()) >= 4, { timeoutMs: 15_000, intervalMs: 200, what: 'four EXPLAINs' });
    await runRound(list);
    await waitFor(async () => (await ours()).every((s) => s.calls === 2 * expected), {
      timeoutMs: 15_000,
      intervalMs: 100,
      what: 'the second round counted',
    });
    for (const s of shapes) {
      const detail = await api(`/api/shapes/${s.fingerprint}`);
      assert.equal(detail.plans.current.samples, 1, `${s.query} explained once`);
      assert.equal(detail.plans.history.length, 1);
    }
    assert.equal(await explained(), 4, 'one EXPLAIN per sampled shape across both workers');
  });

  test('a rule added on the primary is enforced by both workers, counted in /metrics, and lifted on both', async (t) => {
    const list = await clients(4);
    t.after(() => Promise.all(list.map((c) => c.end().catch(() => undefined))));
    assert.equal(new Set(await Promise.all(list.map(workerOf))).size, 2, 'the clients are spread over both workers');
    const text = 'select lower($1::text) as pgw_wk_rule';
    await list[0].query(text, ['x']);
    const shape = await waitFor(
      async () => ((await api('/api/shapes?limit=10000')) as Shape[]).find((s) => s.query.includes('pgw_wk_rule')),
      { timeoutMs: 10_000, intervalMs: 100, what: 'the shape to be reported' },
    );
    const rule = await api('/api/rules', {
      method: 'POST',
      body: { action: 'block', fingerprint: shape.fingerprint, reason: 'workers test' },
      status: 201,
    });
    const refused = async (c: pg.Client) => {
      try {
        await c.query(text, ['y']);
        return false;
      } catch (err) {
        return (err as { code?: string }).code === '42501';
      }
    };
    await waitFor(async () => (await Promise.all(list.map(refused))).every(Boolean), {
      timeoutMs: 5000,
      intervalMs: 50,
      what: 'every worker to refuse the blocked shape',
    });
    await waitFor(
      async () => {
        const rules = (await api('/api/rules')) as { id: string; applied: number }[];
        return (rules.find((r) => r.id === rule.id)?.applied ?? 0) >= list.length;
      },
      { timeoutMs: 5000, intervalMs: 100, what: "the workers' refusals to be counted on the primary" },
    );
    assert.match(
      await api('/metrics'),
      new RegExp(`pgwarden_rule_applied_total\\{rule="${rule.id}",action="block"\\} [1-9]`),
    );
    await api(`/api/rules/${rule.id}`, { method: 'DELETE' });
    await waitFor(async () => (await Promise.all(list.map(refused))).every((r) => !r), {
      timeoutMs: 5000,
      intervalMs: 50,
      what: 'every worker to lift the rule',
    });
  });

  test('a regression through both workers opens one incident and sends one webhook', async () => {
    const list = await clients(4);
    assert.equal(new Set(await Promise.all(list.map(workerOf))).size, 2, 'the load goes through both workers');
    let delay = 0;
    let stop = false;
    const loops = list.map(async (c) => {
      while (!stop) await c.query('select pg_sleep($1) as pgw_wk_sleep', [delay]);
    });
    try {
      const fingerprint = await waitFor(
        async () => {
          const shape = ((await api('/api/shapes?limit=10000')) as Shape[]).find((s) =>
            s.query.includes('pgw_wk_sleep'),
          );
          if (!shape) return undefined;
          const detail = await api(`/api/shapes/${shape.fingerprint}`);
          return detail.series.filter((p: { timed: number }) => p.timed >= 5).length >= 12
            ? shape.fingerprint
            : undefined;
        },
        { timeoutMs: 60_000, intervalMs: 500, what: 'a baseline for the sleep shape' },
      );
      delay = 0.04;
      const incident = await waitFor(
        async () =>
          ((await api('/api/incidents')) as { id: string; fingerprint: string }[]).find(
            (i) => i.fingerprint === fingerprint,
          ),
        { timeoutMs: 60_000, intervalMs: 250, what: 'an incident for the sleep shape' },
      );
      await waitFor(() => hooks.some((h) => h.event === 'incident_opened' && h.incident.id === incident.id), {
        timeoutMs: 15_000,
        what: 'the webhook for the incident',
      });
      // Keep the regression going for a few evaluations: a second detector would open its own.
      const settled = Date.now() + 4000;
      await waitFor(() => Date.now() >= settled, { timeoutMs: 10_000, intervalMs: 200 });
      const incidents = ((await api('/api/incidents')) as { fingerprint: string }[]).filter(
        (i) => i.fingerprint === fingerprint,
      );
      assert.equal(incidents.length, 1, 'one incident');
      const opened = hooks.filter((h) => h.event === 'incident_opened');
      assert.equal(
        opened.length,
        1,
        `one incident_opened webhook; got ${JSON.stringify(opened.map((h) => h.incident.id))}`,
      );
      assert.equal(opened[0].incident.fingerprint, fingerprint);
    } finally {
      stop = true;
      await Promise.all(loops);
      await Promise.all(list.map((c) => c.end()));
    }
  });
  test("statements stuck on a lock in both workers show in the primary's in-flight view and open an incident before any completes; nothing stays stuck on release", async () => {
    const table = 'pgw_wk_locked';
    await withClient((c) => c.query(`drop table if exists ${table}; create table ${table} (id int)`));
    const locker = new pg.Client({ connectionString: testDatabase().url, application_name: 'pgw-wk-locker' });
    await locker.connect();
    const list = await clients(6);
    let stop = false;
    let loops: Promise<unknown>[] = [];
    try {
      const relayedBy = await Promise.all(list.map(workerOf));
      assert.equal(new Set(relayedBy).size, 2, 'the clients are spread over both workers');
      // The shape runs through both workers until it has a baseline.
      loops = list.map(async (c, i) => {
        while (!stop) await c.query(`select count(*) as pgw_wk_stuck from ${table} where id = $1`, [8675309 + i]);
      });
      await waitFor(
        async () => {
          const shape = ((await api('/api/shapes?limit=10000')) as Shape[]).find((s) =>
            s.query.includes('pgw_wk_stuck'),
          );
          if (!shape) return undefined;
          const detail = await api(`/api/shapes/${shape.fingerprint}`);
          return detail.series.filter((p: { timed: number }) => p.timed >= 5).length >= 12;
        },
        { timeoutMs: 60_000, intervalMs: 500, what: 'a baseline for the shape' },
      );
      await locker.query('begin');
      await locker.query(`lock table ${table} in access exclusive mode`);
      // Outside the proxy: no call of the shape completes, only the workers' in-flight reports show it.
      const view = await waitFor(
        async () => {
          const body = await api('/api/inflight?min_ms=1000');
          const ours = body.statements.filter((x: { query: string }) => x.query.includes('pgw_wk_stuck'));
          return ours.length === list.length ? { body, ours } : undefined;
        },
        { timeoutMs: 15_000, intervalMs: 200, what: `the ${list.length} stuck statements in the in-flight view` },
      );
      const fingerprint = view.ours[0].fingerprint;
      assert.ok(
        view.ours.every((x: { fingerprint: string }) => x.fingerprint === fingerprint),
        'one shape',
      );
      const workers = new Set(view.ours.map((x: { session: string }) => /^w(\d+)-\d+$/.exec(x.session)?.[1]));
      assert.equal(workers.size, 2, `stuck in both workers: ${JSON.stringify(view.ours)}`);
      assert.ok(view.ours.every((x: { age_ms: number }) => x.age_ms >= 1000));
      assert.equal(
        view.body.by_shape.find((x: { fingerprint: string }) => x.fingerprint === fingerprint)?.count,
        list.length,
        'counted by shape over both workers',
      );
      assert.ok(!JSON.stringify(view.body).includes('867530'), 'no literal value leaves a worker');
      // The session ids are those of the sessions API.
      const sessions = (await api('/api/sessions')) as { id: string }[];
      for (const x of view.ours)
        assert.ok(
          sessions.some((s) => s.id === x.session),
          `session ${x.session} listed`,
        );
      assert.equal(
        (await api('/api/inflight?min_ms=soon', { status: 400 })).error,
        "min_ms must be a whole number of milliseconds, not 'soon'",
      );

      // Before any of them completes (the lock is still held), the detector sees them.
      // (As its root, or as a victim of the incident the test above may have left open.)
      type Listed = { id: string; fingerprint: string; victims: { fingerprint: string }[] };
      const incident = await waitFor(
        async () =>
          ((await api('/api/incidents')) as Listed[]).find(
            (i) => i.fingerprint === fingerprint || i.victims.some((v) => v.fingerprint === fingerprint),
          ),
        { timeoutMs: 30_000, intervalMs: 250, what: 'an incident for the stuck shape while the lock is held' },
      );
      console.log(
        `# stuck shape in incident ${incident.id} as ${incident.fingerprint === fingerprint ? 'root' : 'victim'}`,
      );
      const stillStuck = (await api('/api/inflight?min_ms=1000')).statements.filter(
        (x: { fingerprint: string }) => x.fingerprint === fingerprint,
      );
      assert.equal(stillStuck.length, list.length, `the incident ${incident.id} opened with every call still stuck`);

      await locker.query('rollback');
      stop = true;
      await Promise.all(loops);
      await waitFor(
        async () => {
          const body = await api('/api/inflight?min_ms=0');
          return (
            !body.statements.some((x: { fingerprint: string }) => x.fingerprint === fingerprint) &&
            !body.by_shape.some((x: { fingerprint: string }) => x.fingerprint === fingerprint)
          );
        },
        { timeoutMs: 10_000, intervalMs: 100, what: 'nothing of the shape in flight after the release' },
      );
    } finally {
      stop = true;
      await locker.end().catch(() => undefined);
      await Promise.allSettled(loops);
      await Promise.all(list.map((c) => c.end().catch(() => undefined)));
      await withClient((c) => c.query(`drop table if exists ${table}`));
    }
  });

  test('the sessions of both workers are listed with worker-qualified ids, and terminate and cancel reach the right one', async () => {
    const db = testDatabase();
    const list = Array.from(
      { length: 4 },
      (_, i) =>
        new pg.Client({
          host: '127.0.0.1',
          port: proxyPort,
          user: db.user,
          database: db.database,
          application_name: `pgw-wk-s${i}`,
        }),
    );
    const told: (Error | undefined)[] = list.map(() => undefined);
    list.forEach((c, i) => c.on('error', (err) => (told[i] ??= err))); // the first: 57P01, then the socket's end
    await Promise.all(list.map((c) => c.connect()));
    try {
      const relayedBy = await Promise.all(list.map(workerOf));
      assert.equal(new Set(relayedBy).size, 2, 'the clients are spread over both workers');
      type Listed = {
        id: string;
        user: string;
        application_name: string;
        state: string;
        statement: { running: boolean } | null;
      };
      const ours = async () =>
        ((await api('/api/sessions')) as Listed[]).filter((s) => s.application_name.startsWith('pgw-wk-s'));
      const listed = await waitFor(async () => ((await ours()).length === list.length ? ours() : undefined), {
        what: 'the four sessions listed',
      });
      assert.equal(new Set(listed.map((s) => s.id)).size, list.length, 'ids are unique');
      assert.ok(
        listed.every((s) => /^w\d+-\d+$/.test(s.id)),
        JSON.stringify(listed.map((s) => s.id)),
      );
      assert.equal(new Set(listed.map((s) => s.id.split('-')[0])).size, 2, 'sessions of both workers');

      // Terminate one: the same 57P01 as in one process; the others carry on.
      const victim = listed.find((s) => s.application_name === 'pgw-wk-s0')!;
      assert.deepEqual(await api(`/api/sessions/${victim.id}`, { method: 'DELETE' }), {
        id: victim.id,
        user: victim.user,
        application_name: 'pgw-wk-s0',
        terminated: true,
      });
      await waitFor(() => told[0] !== undefined, { what: 'the terminated client to be told' });
      assert.equal((told[0] as pg.DatabaseError).code, '57P01', String(told[0]));
      assert.equal(told[0]!.message, 'pgwarden: terminating connection due to administrator command (pgwarden)');
      await waitFor(async () => !(await ours()).some((s) => s.id === victim.id), { what: 'the session to leave' });

      // Cancel a running statement in the other worker than the victim's.
      const other = listed.find((s) => s.id.split('-')[0] !== victim.id.split('-')[0])!;
      const runner = list[Number(other.application_name.slice('pgw-wk-s'.length))];
      const running = runner.query('select pg_sleep(30)').catch((err: pg.DatabaseError) => err);
      await waitFor(async () => (await ours()).find((s) => s.id === other.id)?.statement?.running, {
        what: 'the sleep to run',
      });
      assert.deepEqual(await api(`/api/sessions/${other.id}/query`, { method: 'DELETE' }), {
        id: other.id,
        user: other.user,
        application_name: other.application_name,
        cancel_sent: true,
      });
      // The primary records both actions, whichever worker carried them out.
      const actions = (await api('/api/events?type=admin_action')) as { summary: string }[];
      assert.deepEqual(
        actions.slice(-2).map((e) => e.summary),
        [
          `terminate session ${victim.id} (user ${victim.user}, application pgw-wk-s0)`,
          `cancel session ${other.id} (user ${other.user}, application ${other.application_name}): cancel request sent`,
        ],
      );
      assert.equal(((await running) as pg.DatabaseError).code, '57014');
      assert.equal((await runner.query('select 1 as one')).rows[0].one, 1, 'the session survives a cancel');
      for (const c of list.slice(1)) assert.equal((await c.query('select 2 as two')).rows[0].two, 2);

      // Ids that name no live session.
      const [w] = victim.id.split('-');
      for (const id of [victim.id, `${w}-999999`, 'w99-1', '1', 'nonsense'])
        assert.match((await api(`/api/sessions/${id}`, { method: 'DELETE', status: 404 })).error, /no live session/);

      // A worker that does not answer (stopped) is named, and the other's sessions are still listed.
      const stoppedPid = relayedBy[0]!;
      process.kill(stoppedPid, 'SIGSTOP');
      try {
        const started = Date.now();
        const response = await fetch(`http://127.0.0.1:${adminPort}/api/sessions`, {
          headers: { Authorization: `Bearer ${TOKEN}` },
        });
        const body = (await response.json()) as Listed[];
        assert.equal(response.status, 200);
        assert.ok(Date.now() - started < 5000, 'the list does not wait for the stopped worker');
        const unanswered = response.headers.get('x-pgwarden-unanswered-workers');
        assert.match(unanswered ?? '', /^w\d+$/);
        assert.ok(
          body.every((s) => !s.id.startsWith(`${unanswered}-`)),
          'nothing of the stopped worker',
        );
        assert.ok(
          body.some((s) => s.application_name.startsWith('pgw-wk-s')),
          "the other worker's sessions",
        );
        let out = '';
        let err = '';
        const code = await runSessions(
          ['--admin', `127.0.0.1:${adminPort}`, '--token', TOKEN],
          { write: (t: string) => (out += t) },
          { write: (t: string) => (err += t) },
        );
        assert.equal(code, 0, err);
        assert.equal(err, `pgwarden sessions: worker(s) ${unanswered} did not answer: their sessions are not listed\n`);
        assert.match(out, /^w\d+-\d+\s/m, 'the table lists the ids with their worker');
      } finally {
        process.kill(stoppedPid, 'SIGCONT');
      }
    } finally {
      await Promise.all(list.map((c) => c.end().catch(() => undefined)));
    }
  });
});
