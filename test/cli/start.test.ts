// `pgwarden start` as an operator runs it: a separate process, stopped by SIGTERM.

import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { describe, test } from 'node:test';
import fs from 'node:fs';
import net from 'node:net';
import pg from 'pg';
import { serialize } from 'pg-protocol';
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
    [
      '--import',
      'tsx',
      'src/cli/main.ts',
      'start',
      '--listen',
      '127.0.0.1:0',
      '--admin',
      '127.0.0.1:0',
      '--upstream',
      `${db.host}:${db.port}`,
      ...extra,
    ],
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
  test('SIGTERM lets an in-flight query finish, refuses new connections, then exits 0', {
    timeout: 30_000,
  }, async () => {
    const proxy = await startCli(['--drain-timeout-ms', '10000']);
    const client = clientFor(proxy.port);
    const told: pg.DatabaseError[] = [];
    client.on('error', (err) => told.push(err as pg.DatabaseError)); // 57P01 once the session is idle
    await client.connect();
    const running = client.query('select pg_sleep(0.8) as slept, 42 as answer');
    await waitFor(
      () =>
        withClient(async (direct) => {
          const { rowCount } = await direct.query(
            "select 1 from pg_stat_activity where query like 'select pg_sleep(0.8)%' and state = 'active'",
          );
          return rowCount === 1;
        }),
      { what: 'the query to run on the server' },
    );
    proxy.child.kill('SIGTERM');
    const late = clientFor(proxy.port);
    await assert.rejects(
      waitFor(
        async () => {
          await late.connect();
          return true;
        },
        { timeoutMs: 300 },
      ).finally(() => late.end().catch(() => undefined)),
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
      await waitFor(
        async () => {
          const c = clientFor(proxy.port);
          await c.connect();
          await c.end();
          return true;
        },
        { what: 'workers ready' },
      );
      await Promise.all(clients.map((c) => c.connect()));
      const results = await Promise.all(clients.map((c) => c.query('select 1 as one')));
      assert.ok(results.every((r) => r.rows[0].one === 1));
      await Promise.all(clients.map((c) => c.end()));
    } finally {
      proxy.child.kill('SIGTERM');
      assert.equal(await proxy.exit, 0);
    }
  });

  test('2,000 malformed pre-auth connections that never close leave the fd count unchanged, and SIGTERM still exits within the drain deadline', {
    timeout: 120_000,
  }, async (t) => {
    const role = `pgw_cli_scram_${process.pid}`;
    await withClient(async (c) => {
      await c.query("set password_encryption = 'scram-sha-256'");
      await c.query(`drop role if exists ${role}; create role ${role} login password 'unused-secret'`);
    });
    const proxy = await startCli(['--drain-timeout-ms', '2000', '--startup-timeout-ms', '60000']);
    const fds = (): number => fs.readdirSync(`/proc/${proxy.child.pid}/fd`).length;
    const peers: net.Socket[] = [];
    try {
      const baseline = fds();
      const oversized = Buffer.alloc(10_005 + 64 * 1024);
      oversized.writeInt32BE(10_005, 0);
      oversized.writeInt32BE(196608, 4);
      const attacks = [
        Buffer.concat([
          serialize.startup({ user: role, database: testDatabase().database }),
          Buffer.from([0x43, 0, 0, 0, 4, 0x53, 0, 0, 0, 4]),
        ]),
        oversized,
        Buffer.from([0x58, 0, 0, 0, 4]), // Terminate before the startup packet
      ];
      for (let batch = 0; batch < 20; batch++) {
        await Promise.all(
          Array.from({ length: 100 }, async (_, i) => {
            // allowHalfOpen: the attacker never closes its side, whatever pgwarden does.
            const socket = net.connect({ host: '127.0.0.1', port: proxy.port, allowHalfOpen: true });
            socket.on('error', () => undefined);
            socket.on('data', () => undefined);
            peers.push(socket);
            await once(socket, 'connect');
            socket.write(attacks[(batch * 100 + i) % attacks.length]);
          }),
        );
      }
      const during = fds();
      await waitFor(() => fds() <= baseline, { timeoutMs: 60_000, what: `pgwarden's open fds back to ${baseline}` });
      t.diagnostic(
        `pgwarden open fds: ${baseline} before, ${during} right after 2,000 attacks, ${fds()} once settled (attackers still connected)`,
      );
      const client = clientFor(proxy.port);
      await client.connect();
      assert.equal((await client.query('select 1 as n')).rows[0].n, 1);
      await client.end();
      const signalled = Date.now();
      proxy.child.kill('SIGTERM');
      assert.equal(await proxy.exit, 0);
      const took = Date.now() - signalled;
      assert.ok(took < 2000 + 3000, `exited ${took} ms after SIGTERM (drain timeout 2000 ms)`);
    } finally {
      for (const socket of peers) socket.destroy();
      proxy.child.kill('SIGKILL');
      await withClient((c) => c.query(`drop role if exists ${role}`));
    }
  });

  test('SIGTERM exits within the drain deadline even with a client that never reads or closes', {
    timeout: 60_000,
  }, async () => {
    const proxy = await startCli(['--drain-timeout-ms', '1500']);
    const stalled = net.connect({ host: '127.0.0.1', port: proxy.port, allowHalfOpen: true });
    stalled.on('error', () => undefined);
    await once(stalled, 'connect');
    stalled.write(serialize.startup({ user: testDatabase().user, database: testDatabase().database }));
    stalled.pause(); // reads nothing from now on
    const busy = clientFor(proxy.port);
    busy.on('error', () => undefined);
    await busy.connect();
    busy.query('select pg_sleep(30)').catch(() => undefined);
    await waitFor(
      () =>
        withClient(
          async (direct) =>
            (
              await direct.query(
                "select 1 from pg_stat_activity where query = 'select pg_sleep(30)' and state = 'active'",
              )
            ).rowCount === 1,
        ),
      { what: 'the long query to run' },
    );
    const signalled = Date.now();
    proxy.child.kill('SIGTERM');
    assert.equal(await proxy.exit, 0);
    const took = Date.now() - signalled;
    assert.ok(took < 1500 + 3000, `exited ${took} ms after SIGTERM (drain timeout 1500 ms)`);
    stalled.destroy();
  });

  test('with several workers, a CancelRequest reaches the session on whichever worker holds it', {
    timeout: 60_000,
  }, async () => {
    const proxy = await startCli(['--workers', '2']);
    try {
      await waitFor(
        async () => {
          const c = clientFor(proxy.port);
          await c.connect();
          await c.end();
          return true;
        },
        { what: 'workers ready' },
      );
      const clients = Array.from({ length: 6 }, () => clientFor(proxy.port));
      await Promise.all(clients.map((c) => c.connect()));
      for (const client of clients) {
        const running = client.query('select pg_sleep(30)').then(
          () => null,
          (err: pg.DatabaseError) => err.code,
        );
        const { processID, secretKey } = client as unknown as { processID: number; secretKey: number };
        await waitFor(
          () =>
            withClient(
              async (direct) =>
                (await direct.query("select 1 from pg_stat_activity where pid = $1 and state = 'active'", [processID]))
                  .rowCount === 1,
            ),
          { what: 'pg_sleep to run' },
        );
        // One cancel each, on a connection the kernel gives to either worker: without
        // routing between workers about half of them would be lost.
        {
          const packet = Buffer.alloc(16);
          packet.writeInt32BE(16, 0);
          packet.writeInt32BE(80877102, 4);
          packet.writeInt32BE(processID, 8);
          packet.writeInt32BE(secretKey, 12);
          const socket = net.connect({ host: '127.0.0.1', port: proxy.port });
          socket.on('error', () => undefined);
          await once(socket, 'connect');
          socket.end(packet);
          socket.resume();
          await once(socket, 'close');
        }
        assert.equal(await running, '57014');
      }
      await Promise.all(clients.map((c) => c.end()));
    } finally {
      proxy.child.kill('SIGTERM');
      assert.equal(await proxy.exit, 0);
    }
  });
});
