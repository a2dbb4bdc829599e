// What pgwarden does when things go wrong at the edges: malformed and oversized
// client input, stalled startups, an unreachable or vanishing upstream, clients
// that disconnect mid-query; and the SSLRequest/TLS negotiation toward clients.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import tls from 'node:tls';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startProxy, type TestProxy } from '../harness/proxy.ts';
import { conninfo, psql } from '../harness/clients.ts';
import { RawConnection, sqlstate } from '../harness/wire.ts';

const db = testDatabase();
const suffix = `${process.pid}_${randomBytes(3).toString('hex')}`;

const SSL_REQUEST = Buffer.from([0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]); // 80877103
const GSSENC_REQUEST = Buffer.from([0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]); // 80877104

/** A raw connection through the proxy, logged in as the trust superuser. */
async function rawLogin(port: number): Promise<RawConnection> {
  const raw = await RawConnection.open(port);
  raw.write(serialize.startup({ user: db.user, database: db.database }));
  const login = await raw.untilReady();
  assert.ok(!login.some((m) => m.name === 'error'), 'login succeeded');
  return raw;
}

async function backendPid(raw: RawConnection): Promise<number> {
  raw.write(serialize.query('select pg_backend_pid()'));
  const row = (await raw.untilReady()).find((m) => m.name === 'dataRow') as unknown as { fields: string[] };
  return Number(row.fields[0]);
}

/** A backend's state and current query, while it exists. */
async function backendRow(pid: number): Promise<{ state: string; query: string } | undefined> {
  return withClient(
    async (direct) =>
      (
        await direct.query<{ state: string; query: string }>(
          'select state, query from pg_stat_activity where pid = $1',
          [pid],
        )
      ).rows[0],
  );
}

async function selectOne(url: string): Promise<number> {
  return withClient(async (client) => (await client.query<{ n: number }>('select 1 as n')).rows[0].n, url);
}

/** The one-byte answer to an SSLRequest or GSSENCRequest. */
async function negotiationAnswer(socket: net.Socket, request: Buffer): Promise<string> {
  const answer = once(socket, 'data', { signal: AbortSignal.timeout(5000) });
  socket.write(request);
  const [data] = (await answer) as [Buffer];
  socket.pause();
  return data.toString('latin1');
}

describe('malformed client input', () => {
  let proxy: TestProxy;
  before(async () => {
    proxy = await startProxy();
  });
  after(() => proxy.stop());

  test('garbage instead of a startup packet is closed without a word, as PostgreSQL does', {
    timeout: 30_000,
  }, async () => {
    for (const port of [db.port, proxy.port]) {
      const raw = await RawConnection.open(port);
      raw.write(Buffer.from('GET / HTTP/1.1\r\n\r\n'));
      assert.deepEqual(await raw.untilClosed(), [], `port ${port === db.port ? 'of PostgreSQL' : 'of pgwarden'}`);
    }
  });

  test('a message with a length field below 4 gets 08P01 and both connections are closed', {
    timeout: 30_000,
  }, async () => {
    const raw = await rawLogin(proxy.port);
    const pid = await backendPid(raw);
    raw.write(Buffer.from([0x51, 0, 0, 0, 2])); // 'Q' with length 2
    const messages = await raw.untilClosed();
    assert.deepEqual(
      messages.map((m) => m.name),
      ['error'],
    );
    assert.equal(sqlstate(messages[0]), '08P01');
    await waitFor(async () => (await backendRow(pid)) === undefined, {
      timeoutMs: 5000,
      what: `backend ${pid} to exit`,
    });
  });
});

describe('a proxy with maxMessageBytes 65536', () => {
  let proxy: TestProxy;
  before(async () => {
    proxy = await startProxy({ maxMessageBytes: 65536 });
  });
  after(() => proxy.stop());

  test('a 100 kB Query gets 08P01 and closes only its own connection', { timeout: 30_000 }, async () => {
    const bystander = new pg.Client({ connectionString: proxy.url() });
    await bystander.connect();
    try {
      const raw = await rawLogin(proxy.port);
      raw.write(serialize.query(`select '${'x'.repeat(100 * 1024)}'`));
      const messages = await raw.untilClosed();
      assert.deepEqual(
        messages.map((m) => m.name),
        ['error'],
      );
      assert.equal(sqlstate(messages[0]), '08P01');
      const { rows } = await bystander.query<{ n: number }>('select 2 as n');
      assert.equal(rows[0].n, 2);
    } finally {
      await bystander.end();
    }
  });

  test('a query just under the limit still passes', { timeout: 30_000 }, async () => {
    const literal = 'y'.repeat(60 * 1024);
    const got = await withClient(
      async (c) => (await c.query<{ len: number }>(`select length('${literal}') as len`)).rows[0].len,
      proxy.url(),
    );
    assert.equal(got, literal.length);
  });
});

describe('a proxy with startupTimeoutMs 500', () => {
  let proxy: TestProxy;
  before(async () => {
    proxy = await startProxy({ startupTimeoutMs: 500 });
  });
  after(() => proxy.stop());

  test('a half-sent startup packet blocks nobody and is closed after the startup timeout', {
    timeout: 30_000,
  }, async () => {
    const raw = await RawConnection.open(proxy.port);
    const opened = Date.now();
    raw.write(Buffer.from([0, 0, 0])); // 3 bytes of a length, then nothing
    assert.equal(await selectOne(proxy.url()), 1);
    assert.equal(raw.closed, false, 'the stalled connection is still open while others are served');
    await waitFor(() => raw.closed, { timeoutMs: 5000, what: 'the stalled connection to be closed' });
    const elapsed = (await raw.closedAt) - opened;
    assert.ok(elapsed >= 400 && elapsed < 3000, `closed after ${elapsed} ms`);
  });
});

describe('an unreachable upstream', () => {
  let proxy: TestProxy;
  before(async () => {
    const closed = net.createServer();
    closed.listen(0, '127.0.0.1');
    await once(closed, 'listening');
    const port = (closed.address() as net.AddressInfo).port;
    await new Promise<void>((resolve) => closed.close(() => resolve()));
    proxy = await startProxy({ upstreamHost: '127.0.0.1', upstreamPort: port });
  });
  after(() => proxy.stop());

  test('gives the client 08006 from pgwarden', { timeout: 30_000 }, async () => {
    const client = new pg.Client({ connectionString: proxy.url() });
    client.on('error', () => undefined);
    await assert.rejects(client.connect(), (err: pg.DatabaseError) => {
      assert.equal(err.code, '08006');
      assert.match(err.message, /^pgwarden: /);
      return true;
    });
  });
});

describe('sessions whose other side goes away', () => {
  let proxy: TestProxy;
  before(async () => {
    proxy = await startProxy();
  });
  after(() => proxy.stop());

  test('a client that disconnects mid-query gets its query cancelled and its backend closed', {
    timeout: 30_000,
  }, async () => {
    const marker = `pgw_disconnect_${suffix}`;
    const text = `select pg_sleep(30) as ${marker}`;
    const client = new pg.Client({ connectionString: proxy.url() });
    client.on('error', () => undefined);
    await client.connect();
    const { rows } = await client.query<{ pid: number }>('select pg_backend_pid() as pid');
    const pid = rows[0].pid;
    client.query(text).catch(() => undefined);
    await waitFor(async () => (await backendRow(pid))?.state === 'active', { what: `backend ${pid} to run pg_sleep` });
    client.connection.stream.destroy();
    await waitFor(
      () =>
        withClient(async (direct) => {
          const { rowCount } = await direct.query('select 1 from pg_stat_activity where pid = $1 or query = $2', [
            pid,
            text,
          ]);
          return rowCount === 0;
        }),
      { timeoutMs: 5000, what: `backend ${pid} and its pg_sleep to be gone` },
    );
  });

  test('a backend terminated mid-query gives the client the server error and the proxy keeps serving', {
    timeout: 30_000,
  }, async () => {
    const client = new pg.Client({ connectionString: proxy.url() });
    client.on('error', () => undefined);
    await client.connect();
    const { rows } = await client.query<{ pid: number }>('select pg_backend_pid() as pid');
    const pid = rows[0].pid;
    const outcome = client.query('select pg_sleep(30)').then(
      () => null,
      (err: pg.DatabaseError) => err,
    );
    await waitFor(async () => (await backendRow(pid))?.state === 'active', { what: `backend ${pid} to run pg_sleep` });
    await withClient((direct) => direct.query('select pg_terminate_backend($1)', [pid]));
    const error = await outcome;
    assert.ok(error, 'the query failed');
    assert.equal(error.code, '57P01');
    await client.end().catch(() => undefined);
    assert.equal(await selectOne(proxy.url()), 1);
  });
});

describe('SSLRequest without a configured certificate', () => {
  let proxy: TestProxy;
  before(async () => {
    proxy = await startProxy();
  });
  after(() => proxy.stop());

  test("is answered 'N' and the startup continues on the same connection", { timeout: 30_000 }, async () => {
    const socket = net.connect({ host: proxy.host, port: proxy.port });
    await once(socket, 'connect');
    assert.equal(await negotiationAnswer(socket, SSL_REQUEST), 'N');
    const raw = RawConnection.wrap(socket);
    try {
      raw.write(serialize.startup({ user: db.user, database: db.database }));
      await raw.untilReady();
      raw.write(serialize.query("select 'plain' as s"));
      const row = (await raw.untilReady()).find((m) => m.name === 'dataRow') as unknown as { fields: string[] };
      assert.equal(row.fields[0], 'plain');
    } finally {
      raw.destroy();
    }
  });

  test("a GSSENCRequest is answered 'N' and the startup continues", { timeout: 30_000 }, async () => {
    const socket = net.connect({ host: proxy.host, port: proxy.port });
    await once(socket, 'connect');
    assert.equal(await negotiationAnswer(socket, GSSENC_REQUEST), 'N');
    const raw = RawConnection.wrap(socket);
    try {
      raw.write(serialize.startup({ user: db.user, database: db.database }));
      const login = await raw.untilReady();
      assert.ok(!login.some((m) => m.name === 'error'));
    } finally {
      raw.destroy();
    }
  });

  test('psql with sslmode=prefer connects without TLS', { timeout: 30_000 }, async () => {
    const result = await psql(
      conninfo({ host: proxy.host, port: proxy.port, user: db.user, dbname: db.database, sslmode: 'prefer' }),
      ['select current_user'],
    ).done;
    assert.equal(result.code, 0, result.stderr);
    assert.equal(result.stdout.trim(), db.user);
  });

  test('psql with sslmode=require is refused', { timeout: 30_000 }, async () => {
    const result = await psql(
      conninfo({ host: proxy.host, port: proxy.port, user: db.user, dbname: db.database, sslmode: 'require' }),
      ['select current_user'],
    ).done;
    assert.notEqual(result.code, 0);
    assert.match(result.stderr, /server does not support SSL, but SSL was required/);
  });
});

const opensslMissing = spawnSync('openssl', ['version']).status !== 0;

describe('TLS toward clients with a configured certificate', {
  skip: opensslMissing ? 'the openssl CLI is not installed: cannot make a test certificate' : false,
}, () => {
  let proxy: TestProxy;
  let dir: string;

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgwarden-tls-'));
    const made = spawnSync(
      'openssl',
      [
        'req',
        '-x509',
        '-newkey',
        'ec',
        '-pkeyopt',
        'ec_paramgen_curve:prime256v1',
        '-nodes',
        '-keyout',
        'key.pem',
        '-out',
        'cert.pem',
        '-days',
        '1',
        '-subj',
        '/CN=localhost',
      ],
      { cwd: dir, encoding: 'utf8', timeout: 30_000 },
    );
    assert.equal(made.status, 0, `openssl failed: ${made.stderr}`);
    proxy = await startProxy({
      tlsCert: fs.readFileSync(path.join(dir, 'cert.pem')),
      tlsKey: fs.readFileSync(path.join(dir, 'key.pem')),
    });
  });
  after(async () => {
    await proxy?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('node-postgres with ssl runs queries over an encrypted connection', { timeout: 30_000 }, async () => {
    const client = new pg.Client({ connectionString: proxy.url(), ssl: { rejectUnauthorized: false } });
    await client.connect();
    try {
      const stream = client.connection.stream;
      assert.ok(stream instanceof tls.TLSSocket, 'the connection was upgraded to TLS');
      assert.equal(stream.encrypted, true);
      const { rows } = await client.query<{ n: number; s: string }>("select 6 * 7 as n, repeat('z', 100000) as s");
      assert.equal(rows[0].n, 42);
      assert.equal(rows[0].s.length, 100000);
    } finally {
      await client.end();
    }
  });

  test('psql with sslmode=require connects over TLS and runs queries', { timeout: 30_000 }, async () => {
    const result = await psql(
      conninfo({ host: proxy.host, port: proxy.port, user: db.user, dbname: db.database, sslmode: 'require' }),
      ['\\conninfo', 'select current_user'],
    ).done;
    assert.equal(result.code, 0, result.stderr);
    assert.match(result.stdout, /SSL connection \(protocol: TLSv1\.[23]/);
    assert.equal(result.stdout.trim().split('\n').at(-1), db.user);
  });
});
