// Before authentication completes a peer is anyone: pgwarden must hold nothing for
// it beyond a few KB and a bounded time, close what PostgreSQL closes the way
// PostgreSQL does, record nothing it sent, and forward no cancel it did not earn.
// Each attack is also sent straight to PostgreSQL, so the test states what the
// server itself does with the same bytes.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startProxy, type TestProxy } from '../harness/proxy.ts';
import { describeMessages, RawConnection, sqlstate } from '../harness/wire.ts';

const db = testDatabase();
const suffix = `${process.pid}_${randomBytes(3).toString('hex')}`;
const scramRole = `pgw_preauth_scram_${suffix}`;

const openFds = (): number => fs.readdirSync('/proc/self/fd').length;

function message(type: string, body: Buffer = Buffer.alloc(0), length = 4 + body.length): Buffer {
  const out = Buffer.alloc(5 + body.length);
  out[0] = type.charCodeAt(0);
  out.writeInt32BE(length, 1);
  body.copy(out, 5);
  return out;
}

/**
 * A peer that never closes its side: after the other side's FIN it keeps writing,
 * so the connection ends only when the other side has really let go of its socket
 * (the next write is then answered with a reset).
 */
class StubbornPeer {
  readonly received: Buffer[] = [];
  closed = false;
  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => this.received.push(d));
    socket.on('error', () => undefined);
    socket.once('end', () => {
      const poke = setInterval(() => socket.write('x'), 100);
      socket.once('close', () => clearInterval(poke));
    });
    socket.once('close', () => (this.closed = true));
  }
  static async open(port: number): Promise<StubbornPeer> {
    const socket = net.connect({ host: '127.0.0.1', port, allowHalfOpen: true });
    await once(socket, 'connect');
    return new StubbornPeer(socket);
  }
  /** Waits (bounded) for the other side to close the connection. */
  async closedWithin(ms: number, what: string): Promise<void> {
    await waitFor(() => this.closed, { timeoutMs: ms, what });
  }
  /** The backend messages received, by name. */
  messages(): string[] {
    const all = Buffer.concat(this.received);
    const out: string[] = [];
    for (let p = 0; p + 5 <= all.length; p += 1 + all.readInt32BE(p + 1)) {
      const type = String.fromCharCode(all[p]);
      if (type === 'E') {
        const code = /C([0-9A-Z]{5})\0/.exec(all.toString('latin1', p + 5, p + 1 + all.readInt32BE(p + 1)))?.[1];
        out.push(`error:${code}`);
      } else out.push(type);
    }
    return out;
  }
}

/** Runs the same attack against PostgreSQL and pgwarden; both must end the connection. */
async function againstBoth(
  proxy: TestProxy,
  send: (peer: StubbornPeer) => void,
): Promise<{ direct: string[]; proxied: string[] }> {
  const result: string[][] = [];
  for (const port of [db.port, proxy.port]) {
    const peer = await StubbornPeer.open(port);
    send(peer);
    await peer.closedWithin(15_000, `${port === db.port ? 'PostgreSQL' : 'pgwarden'} to close the connection`);
    result.push(peer.messages());
  }
  return { direct: result[0], proxied: result[1] };
}

describe('before authentication', () => {
  let proxy: TestProxy;
  before(async () => {
    proxy = await startProxy({ startupTimeoutMs: 2000 });
    await withClient(async (client) => {
      await client.query("set password_encryption = 'scram-sha-256'");
      await client.query(`create role ${scramRole} login password 'secret-${suffix}'`);
    });
  });
  after(async () => {
    await proxy.stop();
    await withClient((client) => client.query(`drop role if exists ${scramRole}`));
  });

  test('a startup packet, a Close of length 4 and a Sync in one write (SCRAM role, no password): FATAL 08P01, then closed', {
    timeout: 60_000,
  }, async () => {
    const before = openFds();
    const bytes = Buffer.concat([
      serialize.startup({ user: scramRole, database: db.database }),
      message('C'),
      message('S'),
    ]);
    const { direct, proxied } = await againstBoth(proxy, (peer) => peer.socket.write(bytes));
    assert.deepEqual(direct, ['R', 'error:08P01']);
    assert.deepEqual(proxied, direct);
    await waitFor(() => openFds() <= before, {
      timeoutMs: 10_000,
      what: `open fds back to ${before} (now ${openFds()})`,
    });
    assert.equal(proxy.server.connections.size, 0);
    assert.equal(proxy.completions.length, 0, 'nothing framed before authentication is recorded');
  });

  for (const count of [1, 200]) {
    test(`${count === 1 ? 'a startup packet' : `${count} startup packets`} longer than 10000 bytes and followed by 64 KB: closed without a word`, {
      timeout: 60_000,
    }, async () => {
      const before = openFds();
      const oversized = Buffer.alloc(10_005 + 64 * 1024);
      oversized.writeInt32BE(10_005, 0); // PostgreSQL's bound is 10000 bytes after the length field
      oversized.writeInt32BE(196608, 4);
      if (count === 1) {
        const { direct, proxied } = await againstBoth(proxy, (peer) => peer.socket.write(oversized));
        assert.deepEqual(direct, []);
        assert.deepEqual(proxied, []);
      } else {
        const peers = await Promise.all(Array.from({ length: count }, () => StubbornPeer.open(proxy.port)));
        for (const peer of peers) peer.socket.write(oversized);
        await Promise.all(peers.map((peer) => peer.closedWithin(20_000, 'pgwarden to close an oversized startup')));
      }
      await waitFor(() => openFds() <= before, {
        timeoutMs: 10_000,
        what: `open fds back to ${before} (now ${openFds()})`,
      });
      assert.equal(proxy.server.connections.size, 0);
    });
  }

  test('a Terminate before any startup packet is closed without a word, as PostgreSQL does', {
    timeout: 60_000,
  }, async () => {
    const { direct, proxied } = await againstBoth(proxy, (peer) => peer.socket.write(message('X')));
    assert.deepEqual(direct, []);
    assert.deepEqual(proxied, []);
  });

  test('a Terminate right after the startup packet of a trust role ends the session quietly', {
    timeout: 60_000,
  }, async () => {
    const bytes = Buffer.concat([serialize.startup({ user: db.user, database: db.database }), message('X')]);
    const { direct, proxied } = await againstBoth(proxy, (peer) => peer.socket.write(bytes));
    assert.ok(!direct.some((m) => m.startsWith('error')), `PostgreSQL answered ${direct.join(',')}`);
    assert.ok(!proxied.some((m) => m.startsWith('error')), `pgwarden answered ${proxied.join(',')}`);
  });

  test('a client that never finishes authentication gets 57014 after startup_timeout_ms and is closed', {
    timeout: 60_000,
  }, async () => {
    const peer = await StubbornPeer.open(proxy.port);
    const started = Date.now();
    peer.socket.write(serialize.startup({ user: scramRole, database: db.database }));
    await peer.closedWithin(15_000, 'the stalled authentication to be ended');
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= 1500, `closed after ${elapsed} ms`);
    assert.deepEqual(peer.messages(), ['R', 'error:57014']);
    assert.ok(proxy.server.connections.rejected('startup_timeout') >= 1);
  });

  test('a query sent before authentication completes is recorded nowhere', { timeout: 60_000 }, async () => {
    const peer = await StubbornPeer.open(proxy.port);
    peer.socket.write(
      Buffer.concat([
        serialize.startup({ user: scramRole, database: db.database }),
        serialize.query('select 1 as injected'),
      ]),
    );
    await peer.closedWithin(15_000, 'the server to refuse the query as a password');
    assert.deepEqual(peer.messages(), ['R', 'error:08P01']);
    assert.equal(proxy.completions.length, 0);
  });

  test('a client leg that stays open is counted by phase until it closes', { timeout: 60_000 }, async () => {
    const client = new pg.Client({ connectionString: proxy.url() });
    await client.connect();
    try {
      await waitFor(() => proxy.server.connections.byPhase().active === 1, { what: 'one active connection' });
      const peer = await StubbornPeer.open(proxy.port);
      await waitFor(() => proxy.server.connections.byPhase().startup === 1, { what: 'one connection in startup' });
      peer.socket.destroy();
      await waitFor(() => proxy.server.connections.byPhase().startup === 0, {
        what: 'the startup connection to be gone',
      });
    } finally {
      await client.end();
    }
    await waitFor(() => proxy.server.connections.size === 0, { what: 'no connection left' });
  });
});

describe('an upstream that accepts but never answers', () => {
  let silent: net.Server;
  const held: net.Socket[] = [];
  let proxy: TestProxy;
  before(async () => {
    silent = net.createServer((socket) => {
      held.push(socket);
      socket.on('error', () => undefined);
      socket.pause(); // reads nothing, answers nothing
    });
    silent.listen(0, '127.0.0.1');
    await once(silent, 'listening');
    proxy = await startProxy({
      upstreamHost: '127.0.0.1',
      upstreamPort: (silent.address() as net.AddressInfo).port,
      upstreamTls: 'prefer',
    });
  });
  after(async () => {
    await proxy.stop();
    for (const socket of held) socket.destroy();
    silent.close();
  });

  test('the client is not read while the upstream connection is pending, and gets 08006 at the connect timeout', {
    timeout: 60_000,
  }, async () => {
    const peer = await StubbornPeer.open(proxy.port);
    const flood = Buffer.alloc(32 * 1024 * 1024, 0x51);
    peer.socket.write(Buffer.concat([serialize.startup({ user: db.user, database: db.database }), flood]));
    await new Promise((resolve) => setTimeout(resolve, 1000));
    // The kernel's socket buffers hold a few MB; pgwarden itself took nothing more.
    assert.ok(
      peer.socket.writableLength > 16 * 1024 * 1024,
      `only ${peer.socket.writableLength} bytes still unsent: pgwarden buffered the rest`,
    );
    await peer.closedWithin(20_000, 'the client to be closed at the connect timeout');
    assert.deepEqual(peer.messages(), ['error:08006']);
  });
});

describe('malformed extended-protocol messages', () => {
  let proxy: TestProxy;
  before(async () => {
    proxy = await startProxy();
  });
  after(() => proxy.stop());

  const cases: Record<string, Buffer> = {
    'a Close of length 4': message('C'),
    'a Close with an unterminated name': message('C', Buffer.from('Sabc')),
    'a Parse with truncated parameter types': message('P', Buffer.from('\0select 1\0\0\x05\0\0')),
    'a Bind with an unterminated portal name': message('B', Buffer.from('portal')),
    'an Execute of length 4': message('E'),
    'an Execute with an unterminated portal name': message('E', Buffer.from('p\x01\x02')),
    'a Query with an unterminated string': message('Q', Buffer.from('select 1')),
  };
  for (const [name, bytes] of Object.entries(cases)) {
    test(`${name} gets the server's ERROR and the connection is kept`, { timeout: 30_000 }, async () => {
      const answers: string[][] = [];
      for (const port of [db.port, proxy.port]) {
        const raw = await RawConnection.login(port, { user: db.user, database: db.database });
        raw.write(bytes, ...(bytes[0] === 0x51 ? [] : [serialize.sync()])); // a Query is answered with its own ReadyForQuery
        const answer = await raw.untilReady();
        raw.write(serialize.query('select 1'));
        const after = await raw.untilReady();
        assert.deepEqual(describeMessages(after), ['rowDescription', 'dataRow', 'commandComplete', 'readyForQuery:I']);
        raw.close();
        answers.push(describeMessages(answer));
      }
      assert.ok(answers[0].includes('error:08P01'), `PostgreSQL answered ${answers[0].join(',')}`);
      assert.deepEqual(answers[1], answers[0]);
    });
  }

  test('a malformed Execute inside a pipeline keeps the later statements matched to their results', {
    timeout: 30_000,
  }, async () => {
    proxy.completions.length = 0;
    const raw = await RawConnection.login(proxy.port, { user: db.user, database: db.database });
    raw.write(
      message('E'),
      serialize.sync(),
      serialize.parse({ text: 'select 2 as two' }),
      serialize.bind(),
      serialize.execute(),
      serialize.sync(),
    );
    const first = await raw.untilReady();
    const second = await raw.untilReady();
    assert.deepEqual(describeMessages(first), ['error:08P01', 'readyForQuery:I']);
    assert.deepEqual(describeMessages(second), [
      'parseComplete',
      'bindComplete',
      'dataRow',
      'commandComplete',
      'readyForQuery:I',
    ]);
    raw.close();
    await waitFor(() => proxy.completions.length >= 1, { what: 'the good statement to be recorded' });
    assert.deepEqual(
      proxy.completions.map((c) => [c.text, c.sqlstate]),
      [['select 2 as two', null]],
    );
  });
});

describe('max_client_connections', () => {
  let proxy: TestProxy;
  before(async () => {
    proxy = await startProxy({ maxClientConnections: 3 });
  });
  after(() => proxy.stop());

  test('past the limit a client gets 53300 from pgwarden and the connection is closed; below it clients connect again', {
    timeout: 30_000,
  }, async () => {
    const clients = Array.from({ length: 3 }, () => new pg.Client({ connectionString: proxy.url() }));
    await Promise.all(clients.map((c) => c.connect()));
    try {
      const extra = new pg.Client({ connectionString: proxy.url() });
      extra.on('error', () => undefined);
      await assert.rejects(extra.connect(), (err: pg.DatabaseError) => {
        assert.equal(err.code, '53300');
        assert.equal(err.message, 'pgwarden: too many client connections');
        return true;
      });
      assert.equal(proxy.server.connections.rejected('too_many_connections'), 1);
    } finally {
      await clients.pop()!.end();
    }
    await waitFor(() => proxy.server.connections.size < 3, { what: 'a slot to free up' });
    const again = new pg.Client({ connectionString: proxy.url() });
    await again.connect();
    assert.equal((await again.query('select 1 as n')).rows[0].n, 1);
    await again.end();
    await Promise.all(clients.map((c) => c.end()));
  });
});

describe('cancel requests', () => {
  let relay: net.Server;
  let upstreamConnections = 0;
  let proxy: TestProxy;
  before(async () => {
    // Counts every connection pgwarden opens to the real server.
    relay = net.createServer((client) => {
      upstreamConnections++;
      const server = net.connect({ host: db.host, port: db.port });
      client.on('error', () => server.destroy());
      server.on('error', () => client.destroy());
      client.pipe(server).pipe(client);
    });
    relay.listen(0, '127.0.0.1');
    await once(relay, 'listening');
    proxy = await startProxy({ upstreamHost: '127.0.0.1', upstreamPort: (relay.address() as net.AddressInfo).port });
  });
  after(async () => {
    await proxy.stop();
    relay.close();
  });

  function cancelPacket(pid: number, key: Buffer): Buffer {
    const out = Buffer.alloc(12 + key.length);
    out.writeInt32BE(out.length, 0);
    out.writeInt32BE(80877102, 4);
    out.writeInt32BE(pid, 8);
    key.copy(out, 12);
    return out;
  }

  async function sendCancel(packet: Buffer): Promise<void> {
    const socket = net.connect({ host: '127.0.0.1', port: proxy.port });
    socket.on('error', () => undefined);
    await once(socket, 'connect');
    socket.end(packet);
    socket.resume();
    await once(socket, 'close');
  }

  test('a flood of cancels with unknown keys opens no upstream connection; a real one still cancels', {
    timeout: 60_000,
  }, async () => {
    const client = new pg.Client({ connectionString: proxy.url() });
    await client.connect();
    try {
      const pid = (await client.query<{ pid: number }>('select pg_backend_pid() as pid')).rows[0].pid;
      const before = upstreamConnections;
      for (let batch = 0; batch < 10; batch++) {
        await Promise.all(
          Array.from({ length: 50 }, (_, i) =>
            sendCancel(cancelPacket(i === 0 ? pid : randomBytes(4).readInt32BE(0), randomBytes(4))),
          ),
        );
      }
      assert.equal(upstreamConnections, before, 'no upstream connection for unknown keys');
      assert.equal(proxy.server.connections.rejected('cancel_unknown_key'), 500);
      const running = client.query('select pg_sleep(30)').then(
        () => null,
        (err: pg.DatabaseError) => err.code,
      );
      await waitFor(
        () =>
          withClient(
            async (direct) =>
              (await direct.query("select 1 from pg_stat_activity where pid = $1 and state = 'active'", [pid]))
                .rowCount === 1,
          ),
        { what: 'pg_sleep to run' },
      );
      const connection = client as unknown as { processID: number; secretKey: number };
      const key = Buffer.alloc(4);
      key.writeInt32BE(connection.secretKey);
      await sendCancel(cancelPacket(connection.processID, key));
      assert.equal(await running, '57014');
      assert.equal(upstreamConnections, before + 1, 'exactly one upstream connection, for the real cancel');
    } finally {
      await client.end();
    }
  });
});

describe('a session ended by the server', () => {
  let proxy: TestProxy;
  before(async () => {
    proxy = await startProxy();
  });
  after(() => proxy.stop());

  test('a backend terminated by the server ends the client leg and releases its socket', {
    timeout: 30_000,
  }, async () => {
    const raw = await RawConnection.login(proxy.port, { user: db.user, database: db.database });
    raw.write(serialize.query('select pg_terminate_backend(pg_backend_pid())'));
    const messages = await raw.untilClosed();
    assert.equal(sqlstate(messages.find((m) => m.name === 'error')), '57P01');
    await waitFor(() => proxy.server.connections.size === 0, { what: 'the client socket to be released' });
  });
});
