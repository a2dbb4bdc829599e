// The reroute target against a real streaming replica of the test server: what it
// relays (and keeps back), that it really runs on a server in recovery, and how its
// pool behaves when connections are busy, broken or left in a transaction.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import net from 'node:net';
import { Readable } from 'node:stream';
import pino from 'pino';
import { parse, serialize } from 'pg-protocol';
import type { BackendMessage } from 'pg-protocol/dist/messages.js';
import type { RerouteSink } from '../../src/proxy/seam.ts';
import { ReplicaPool } from '../../src/rules/replica.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startReplica, type Replica } from '../harness/replica.ts';
import { freePort } from '../harness/postgres.ts';

const TABLE = 'pgw_replica_items';
const READER = 'pgw_replica_reader';
const READER_PASSWORD = 'reader-secret';
const binDir = process.env.PGWARDEN_TEST_PG_BIN_DIR;

type Fields = { fields: (string | null)[] };

/** Runs messages on the pool and gathers everything relayed (tests only: memory is theirs to spend). */
async function collect(pool: ReplicaPool, messages: Buffer, database?: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  const sink: RerouteSink = { closed: false, resumed: null, write: (bytes) => (chunks.push(Buffer.from(bytes)), true) };
  await pool.run(messages, database ?? pool.defaultDatabase, sink);
  return Buffer.concat(chunks);
}

/** Frames the relayed bytes with pg-protocol's own parser, as a client would. */
async function decode(bytes: Buffer): Promise<BackendMessage[]> {
  const messages: BackendMessage[] = [];
  await parse(Readable.from([bytes]), (message) => messages.push(message));
  return messages;
}

function names(messages: BackendMessage[]): string[] {
  return messages.map((m) => m.name);
}

function rows(messages: BackendMessage[]): (string | null)[][] {
  return messages.filter((m) => m.name === 'dataRow').map((m) => (m as unknown as Fields).fields);
}

function errorCode(messages: BackendMessage[]): string | undefined {
  const error = messages.find((m) => m.name === 'error') as unknown as { code: string } | undefined;
  return error?.code;
}

/** One backend message: type byte, int32 length, body. */
function backendMessage(type: string, body: Buffer = Buffer.alloc(0)): Buffer {
  const header = Buffer.alloc(5);
  header.write(type, 0, 'latin1');
  header.writeInt32BE(4 + body.length, 1);
  return Buffer.concat([header, body]);
}

const cstring = (text: string): Buffer => Buffer.from(`${text}\0`);
const readyForQuery = (status: string): Buffer => backendMessage('Z', Buffer.from(status, 'latin1'));

/**
 * A stand-in server that logs anyone in (trust) and answers each Query with
 * `answer`, written one byte per read: every header and body is split.
 */
async function startByteServer(answer: Buffer): Promise<{ port: number; close(): Promise<void> }> {
  const sockets = new Set<net.Socket>();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.setNoDelay(true);
    socket.on('error', () => {});
    let startupDone = false;
    socket.on('data', async (data) => {
      if (!startupDone) {
        startupDone = true;
        socket.write(Buffer.concat([backendMessage('R', Buffer.from([0, 0, 0, 0])), readyForQuery('I')]));
        return;
      }
      if (data[0] !== 0x51) return; // only Query is answered
      for (let i = 0; i < answer.length; i++) {
        socket.write(answer.subarray(i, i + 1));
        await new Promise((resolve) => setTimeout(resolve, 1));
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as net.AddressInfo).port,
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}

test('ReplicaPool frames a response that arrives one byte per read', async () => {
  const relayed = Buffer.concat([
    backendMessage('T', Buffer.concat([Buffer.from([0, 1]), cstring('x'), Buffer.alloc(18)])),
    backendMessage('D', Buffer.from([0, 1, 0, 0, 0, 2, 0x34, 0x32])),
    backendMessage('N', Buffer.concat([cstring('SNOTICE'), cstring('C00000'), cstring('Mhello'), Buffer.alloc(1)])),
    backendMessage('C', cstring('SELECT 1')),
  ]);
  const parameterStatus = backendMessage('S', Buffer.concat([cstring('TimeZone'), cstring('Mars')]));
  const server = await startByteServer(
    Buffer.concat([parameterStatus, relayed.subarray(0, 30), relayed.subarray(30), readyForQuery('I')]),
  );
  const pool = new ReplicaPool({
    name: 'bytes',
    url: `postgres://u@127.0.0.1:${server.port}/db`,
    size: 1,
    connectTimeoutMs: 2_000,
    log: pino({ level: 'silent' }),
  });
  try {
    const first = await collect(pool, serialize.query('select 42 as x'));
    assert.deepEqual(first, relayed);
    // The connection is back in the pool, framing from a clean state.
    assert.deepEqual(await collect(pool, serialize.query('select 42 as x')), relayed);
  } finally {
    await pool.close();
    await server.close();
  }
});

describe('ReplicaPool on a streaming replica', {
  skip: binDir ? false : 'needs PGWARDEN_TEST_PG_BIN_DIR (set by test/run.ts)',
}, () => {
  let replica: Replica;
  const pools: ReplicaPool[] = [];
  const log = pino({ level: 'silent' });

  /** A pool logging in as a password (SCRAM) role, as configured credentials would. */
  function makePool(options: { size?: number; name?: string; url?: string } = {}): ReplicaPool {
    const url = options.url ?? `postgres://${READER}:${READER_PASSWORD}@127.0.0.1:${replica.port}/postgres`;
    const pool = new ReplicaPool({
      name: options.name ?? 'replica-a',
      url,
      size: options.size ?? 4,
      connectTimeoutMs: 5_000,
      log,
    });
    pools.push(pool);
    return pool;
  }

  async function query(pool: ReplicaPool, text: string, database?: string): Promise<BackendMessage[]> {
    return decode(await collect(pool, serialize.query(text), database));
  }

  async function backendPid(pool: ReplicaPool): Promise<string> {
    const [[pid]] = rows(await query(pool, 'select pg_backend_pid()'));
    return pid!;
  }

  before(async () => {
    const db = testDatabase();
    replica = await startReplica({ host: db.host, port: db.port, binDir: binDir! });
    await withClient(async (client) => {
      await client.query(`drop table if exists ${TABLE}`);
      await client.query(`drop role if exists ${READER}`);
      await client.query(`create role ${READER} login password '${READER_PASSWORD}'`);
      await client.query(`create table ${TABLE} (id int primary key, name text)`);
      await client.query(`grant select, insert on ${TABLE} to ${READER}`);
      // Last, so that seeing the rows on the replica means it has replayed everything above.
      await client.query(`insert into ${TABLE} select g, 'item ' || g from generate_series(1, 3) g`);
    });
    await waitFor(
      () =>
        withClient(async (client) => {
          const result = await client.query<{ n: number }>(`select count(*)::int as n from ${TABLE}`);
          return result.rows[0].n === 3;
        }, replica.url()),
      { what: `${TABLE} to reach the replica` },
    );
  });

  after(async () => {
    await Promise.all(pools.map((pool) => pool.close()));
    await withClient(async (client) => {
      await client.query(`drop table if exists ${TABLE}`);
      await client.query(`drop role if exists ${READER}`);
    });
    await replica?.stop();
  });

  test('a simple Query returns RowDescription, DataRows and CommandComplete, without ReadyForQuery', async (t) => {
    t.diagnostic(`replica made with ${replica.method} in ${Math.round(replica.startedMs)} ms`);
    const messages = await query(makePool(), `select id, name from ${TABLE} order by id`);
    assert.deepEqual(names(messages), ['rowDescription', 'dataRow', 'dataRow', 'dataRow', 'commandComplete']);
    assert.deepEqual(rows(messages), [
      ['1', 'item 1'],
      ['2', 'item 2'],
      ['3', 'item 3'],
    ]);
    assert.equal((messages[4] as unknown as { text: string }).text, 'SELECT 3');
  });

  test('the statement runs on the replica, a server in recovery', async () => {
    const messages = await query(makePool(), 'select pg_is_in_recovery(), inet_server_port()');
    assert.deepEqual(rows(messages), [['t', String(replica.port)]]);
  });

  test('an extended-protocol group with parameters returns its responses', async () => {
    const group = Buffer.concat([
      serialize.parse({ text: `select name from ${TABLE} where id = $1`, types: [23] }),
      serialize.bind({ values: ['2'] }),
      serialize.describe({ type: 'P' }),
      serialize.execute({}),
      serialize.sync(),
    ]);
    const messages = await decode(await collect(makePool(), group));
    assert.deepEqual(names(messages), [
      'parseComplete',
      'bindComplete',
      'rowDescription',
      'dataRow',
      'commandComplete',
    ]);
    assert.deepEqual(rows(messages), [['item 2']]);
  });

  test('bad SQL comes back as an ErrorResponse and the connection stays usable', async () => {
    const pool = makePool({ size: 1 });
    const pid = await backendPid(pool);
    const messages = await query(pool, 'selec 1');
    assert.deepEqual(names(messages), ['error']);
    assert.equal(errorCode(messages), '42601');
    assert.equal(await backendPid(pool), pid);
  });

  test('a large result arrives whole across many reads', async () => {
    const messages = await query(makePool(), "select g, repeat('x', g % 300) from generate_series(1, 20000) g");
    const dataRows = rows(messages);
    assert.equal(dataRows.length, 20_000);
    assert.deepEqual(dataRows[19_999], ['20000', 'x'.repeat(20_000 % 300)]);
    assert.equal((messages.at(-1) as unknown as { text: string }).text, 'SELECT 20000');
  });

  test('a write fails with the server read-only error 25006', async () => {
    const messages = await query(makePool(), `insert into ${TABLE} values (4, 'item 4')`);
    assert.equal(errorCode(messages), '25006');
  });

  test('ParameterStatus messages are not relayed', async () => {
    const messages = await query(makePool({ size: 1 }), "set application_name = 'pgw_leak'");
    assert.deepEqual(names(messages), ['commandComplete']);
  });

  test('in a group with two Syncs the first ReadyForQuery is relayed and the last kept back', async () => {
    const group = Buffer.concat([
      serialize.parse({ text: 'select 1' }),
      serialize.bind({}),
      serialize.execute({}),
      serialize.sync(),
      serialize.parse({ text: 'select 2' }),
      serialize.bind({}),
      serialize.execute({}),
      serialize.sync(),
    ]);
    const messages = await decode(await collect(makePool(), group));
    assert.deepEqual(names(messages), [
      'parseComplete',
      'bindComplete',
      'dataRow',
      'commandComplete',
      'readyForQuery',
      'parseComplete',
      'bindComplete',
      'dataRow',
      'commandComplete',
    ]);
  });

  test('more concurrent runs than the pool size all complete, on at most size connections', async () => {
    const pool = makePool({ size: 2 });
    const results = await Promise.all(
      Array.from({ length: 12 }, (_, i) => query(pool, `select pg_backend_pid(), ${i}, pg_sleep(0.02)`)),
    );
    assert.deepEqual(
      results.map((messages) => rows(messages)[0][1]),
      Array.from({ length: 12 }, (_, i) => String(i)),
    );
    const pids = new Set(results.map((messages) => rows(messages)[0][0]));
    assert.ok(pids.size <= 2, `expected at most 2 connections, saw ${pids.size}`);
  });

  test('runs waiting for a connection are served in arrival order', async () => {
    const pool = makePool({ size: 1 });
    const order: number[] = [];
    await Promise.all(
      Array.from({ length: 6 }, (_, i) => collect(pool, serialize.query(`select ${i}`)).then(() => order.push(i))),
    );
    assert.deepEqual(order, [0, 1, 2, 3, 4, 5]);
  });

  test('a statement that leaves a transaction open loses its connection', async () => {
    const pool = makePool({ size: 1 });
    const pid = await backendPid(pool);
    const messages = await query(pool, 'begin');
    assert.deepEqual(names(messages), ['commandComplete']);
    assert.notEqual(await backendPid(pool), pid);
  });

  test('after its backend is terminated, the next run reconnects', async () => {
    const pool = makePool({ size: 1 });
    const pid = await backendPid(pool);
    await withClient(async (client) => {
      await client.query('select pg_terminate_backend($1)', [pid]);
      await waitFor(
        async () => (await client.query('select 1 from pg_stat_activity where pid = $1', [pid])).rowCount === 0,
        { what: `replica backend ${pid} to exit` },
      );
    }, replica.url());
    const next = await backendPid(pool);
    assert.notEqual(next, pid);
  });

  test('a run against an unreachable replica rejects with an Error naming it', async () => {
    const port = await freePort();
    const pool = makePool({
      name: 'replica-down',
      url: `postgres://${READER}:${READER_PASSWORD}@127.0.0.1:${port}/postgres`,
    });
    await assert.rejects(collect(pool, serialize.query('select 1')), /replica replica-down/);
  });

  test('the database parameter picks the database the statement runs in', async () => {
    const pool = makePool();
    assert.deepEqual(rows(await query(pool, 'select current_database()', 'template1')), [['template1']]);
    assert.deepEqual(rows(await query(pool, 'select current_database()')), [['postgres']]);
  });

  test('a group that does not end with Sync is refused without reaching the replica', async () => {
    const group = Buffer.concat([
      serialize.parse({ text: 'select 1' }),
      serialize.bind({}),
      serialize.execute({}),
      serialize.flush(),
    ]);
    await assert.rejects(
      collect(makePool(), group),
      /replica replica-a: messages to reroute must end with Query or Sync/,
    );
  });

  test('close terminates every connection and refuses later runs', async () => {
    const appName = 'pgw_replica_close_test';
    const url = `postgres://${READER}:${READER_PASSWORD}@127.0.0.1:${replica.port}/postgres?application_name=${appName}`;
    const pool = makePool({ size: 3, url });
    await Promise.all([1, 2, 3].map((i) => collect(pool, serialize.query(`select pg_sleep(0.05), ${i}`))));
    const count = async (): Promise<number> =>
      withClient(async (client) => {
        const result = await client.query<{ n: number }>(
          'select count(*)::int as n from pg_stat_activity where application_name = $1',
          [appName],
        );
        return result.rows[0].n;
      }, replica.url());
    assert.equal(await count(), 3);
    await pool.close();
    await waitFor(async () => (await count()) === 0, { what: 'the pool connections to end' });
    await assert.rejects(collect(pool, serialize.query('select 1')), /closed/);
  });
});
