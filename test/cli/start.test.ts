// `pgwarden start` as an operator runs it: a separate process, stopped by SIGTERM.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { describe, test } from 'node:test';
import pg from 'pg';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';

interface Started {
  child: ChildProcess;
  port: number;
  exit: Promise<number | null>;
}

/** Starts the CLI on a free port and waits for its "listening" log line. */
async function startCli(extra: string[] = []): Promise<Started> {
  const db = testDatabase();
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', 'src/cli/main.ts', 'start', '--listen', '127.0.0.1:0', '--admin', '127.0.0.1:0', '--upstream', `${db.host}:${db.port}`, ...extra],
    { cwd: new URL('../..', import.meta.url), stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const exit = once(child, 'exit').then(([code]) => code as number | null);
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
  const port = await waitFor(
    () => {
      const line = output.split('\n').find((l) => l.includes('pgwarden proxy listening'));
      return line ? Number(JSON.parse(line).listen.split(':').at(-1)) : undefined;
    },
    { timeoutMs: 20_000, what: `the listening line (output so far: ${output})` },
  );
  return { child, port, exit };
}

function clientFor(port: number): pg.Client {
  const db = testDatabase();
  return new pg.Client({ host: '127.0.0.1', port, user: db.user, database: db.database });
}

describe('pgwarden start', () => {
  test('SIGTERM lets an in-flight query finish, refuses new connections, then exits 0', { timeout: 30_000 }, async () => {
    const proxy = await startCli(['--drain-timeout-ms', '10000']);
    const client = clientFor(proxy.port);
    const told: pg.DatabaseError[] = [];
    client.on('error', (err) => told.push(err as pg.DatabaseError)); // 57P01 once the session is idle
    await client.connect();
    const running = client.query('select pg_sleep(0.8) as slept, 42 as answer');
    await waitFor(
      () =>
        withClient(async (direct) => {
          const { rowCount } = await direct.query("select 1 from pg_stat_activity where query like 'select pg_sleep(0.8)%' and state = 'active'");
          return rowCount === 1;
        }),
      { what: 'the query to run on the server' },
    );
    proxy.child.kill('SIGTERM');
    const late = clientFor(proxy.port);
    await assert.rejects(
      waitFor(async () => {
        await late.connect();
        return true;
      }, { timeoutMs: 300 }).finally(() => late.end().catch(() => undefined)),
    );
    const { rows } = await running;
    assert.equal(rows[0].answer, 42);
    assert.equal(await proxy.exit, 0);
    await waitFor(() => told.length > 0, { what: 'the drained session to be told' });
    assert.equal(told[0].code, '57P01');
  });

  test('SIGTERM closes idle sessions at once with 57P01 and exits 0', { timeout: 30_000 }, async () => {
    const proxy = await startCli();
    const client = clientFor(proxy.port);
    const errors: Error[] = [];
    client.on('error', (err) => errors.push(err));
    await client.connect();
    await client.query('select 1');
    proxy.child.kill('SIGTERM');
    assert.equal(await proxy.exit, 0);
    await waitFor(() => errors.length > 0, { what: 'the idle client to be told' });
    assert.equal((errors[0] as pg.DatabaseError).code, '57P01');
  });

  test('with several workers, each serves queries through the shared port', { timeout: 30_000 }, async () => {
    const proxy = await startCli(['--workers', '2']);
    try {
      const clients = Array.from({ length: 6 }, () => clientFor(proxy.port));
      await waitFor(async () => {
        const c = clientFor(proxy.port);
        await c.connect();
        await c.end();
        return true;
      }, { what: 'workers ready' });
      await Promise.all(clients.map((c) => c.connect()));
      const results = await Promise.all(clients.map((c) => c.query('select 1 as one')));
      assert.ok(results.every((r) => r.rows[0].one === 1));
      await Promise.all(clients.map((c) => c.end()));
    } finally {
      proxy.child.kill('SIGTERM');
      assert.equal(await proxy.exit, 0);
    }
  });
});
