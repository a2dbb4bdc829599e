// The full frontend/backend protocol through pgwarden, driven by real clients:
// simple and extended queries (pipelined, prepared, suspended portals), errors in
// transactions, COPY both ways, LISTEN/NOTIFY, notices, large results and query
// texts, many concurrent sessions, CancelRequest, and pgbench as a whole workload.

import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { once } from 'node:events';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import postgres from 'postgres';
import { serialize } from 'pg-protocol';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startProxy, type TestProxy } from '../harness/proxy.ts';
import { conninfo, libpqEnv, PGBENCH, psql, startProcess } from '../harness/clients.ts';
import { RawConnection } from '../harness/wire.ts';

const db = testDatabase();
const suffix = `${process.pid}_${randomBytes(3).toString('hex')}`;
const md5 = (text: string) => createHash('md5').update(text).digest('hex');

function postgresJs(proxy: TestProxy, options: postgres.Options<Record<string, postgres.PostgresType>> = {}) {
  return postgres({
    host: proxy.host,
    port: proxy.port,
    database: db.database,
    user: db.user,
    max: 1,
    connect_timeout: 10,
    onnotice: () => undefined,
    ...options,
  });
}

/** The backend running the given application's query, once it is active. */
function activeBackend(applicationName: string): Promise<number> {
  return waitFor(
    () =>
      withClient(async (direct) => {
        const { rows } = await direct.query<{ pid: number }>(
          "select pid from pg_stat_activity where application_name = $1 and state = 'active' and query like 'select pg_sleep%'",
          [applicationName],
        );
        return rows[0]?.pid;
      }),
    { what: `an active pg_sleep of ${applicationName}` },
  );
}

describe('the protocol through pgwarden', () => {
  let proxy: TestProxy;
  const clients: pg.Client[] = [];

  before(async () => {
    proxy = await startProxy();
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.end().catch(() => undefined)));
    await proxy.stop();
  });

  async function connect(config: pg.ClientConfig = {}): Promise<pg.Client> {
    const client = new pg.Client({ connectionString: proxy.url(), ...config });
    clients.push(client);
    await client.connect();
    return client;
  }

  test('a multi-statement simple query returns every statement result', { timeout: 30_000 }, async () => {
    const client = await connect();
    const results = (await client.query(
      'select 1 as a; select 2 as b, 3 as c; select g from generate_series(1, 3) g',
    )) as unknown as pg.QueryResult[];
    assert.deepEqual(
      results.map((r) => r.rows),
      [[{ a: 1 }], [{ b: 2, c: 3 }], [{ g: 1 }, { g: 2 }, { g: 3 }]],
    );
  });

  test('500 pipelined extended queries on one postgres.js connection are answered in order', {
    timeout: 30_000,
  }, async () => {
    const sql = postgresJs(proxy);
    try {
      const answers = await Promise.all(
        Array.from(
          { length: 500 },
          (_, i) =>
            sql<
              { i: number; m: string; pid: number }[]
            >`select ${i}::int as i, md5(${i}::text) as m, pg_backend_pid() as pid`,
        ),
      );
      answers.forEach((rows, i) => assert.deepEqual({ i: rows[0].i, m: rows[0].m }, { i, m: md5(String(i)) }));
      assert.equal(new Set(answers.map((rows) => rows[0].pid)).size, 1, 'all on one connection');
    } finally {
      await sql.end();
    }
  });

  test('a named prepared statement is parsed once and reused 50 times', { timeout: 30_000 }, async () => {
    const client = await connect();
    const name = `pgw_named_${suffix}`;
    for (let i = 0; i < 50; i++) {
      const { rows } = await client.query<{ d: number; t: string }>({
        name,
        text: 'select $1::int * 2 as d, $2::text as t',
        values: [i, `v${i}`],
      });
      assert.deepEqual(rows, [{ d: i * 2, t: `v${i}` }]);
    }
    const { rows } = await client.query<{ n: number }>(
      'select count(*)::int as n from pg_prepared_statements where name = $1',
      [name],
    );
    assert.equal(rows[0].n, 1);
  });

  test('each execution knows which Bind of its prepared statement it was, pipelined or not; a new Parse starts again', {
    timeout: 30_000,
  }, async () => {
    const raw = await RawConnection.open(proxy.port);
    const text = `select $1::int + 0 as pgw_execution_${suffix}`;
    try {
      raw.write(serialize.startup({ user: db.user, database: db.database }));
      await raw.untilReady();
      const run = (n: number) =>
        Array.from({ length: n }, (_, i) => [
          serialize.bind({ statement: 'pgw_n', values: [String(i)] }),
          serialize.execute({}),
        ]).flat();
      // Seven executions in one pipeline: the completions of the first come after later Binds.
      raw.write(serialize.parse({ name: 'pgw_n', text }), ...run(7), serialize.sync());
      await raw.untilReady();
      raw.write(...run(1), serialize.sync());
      await raw.untilReady();
      // Parsed again under the same name: the server starts counting again, and so does the proxy.
      raw.write(
        serialize.close({ type: 'S', name: 'pgw_n' }),
        serialize.parse({ name: 'pgw_n', text }),
        ...run(2),
        serialize.sync(),
      );
      await raw.untilReady();
      raw.write(serialize.query(`select 1 as pgw_execution_simple_${suffix}`));
      await raw.untilReady();
      const mine = await waitFor(() => {
        const found = proxy.completions.filter((c) => c.text.includes(`pgw_execution_`) && c.text.includes(suffix));
        return found.length === 11 && found;
      });
      assert.deepEqual(
        mine.map((c) => c.execution),
        [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 0],
      );
    } finally {
      raw.socket.destroy();
    }
  });

  test('a portal executed with a row limit is suspended, resumed after Flush and closed', {
    timeout: 30_000,
  }, async () => {
    const raw = await RawConnection.open(proxy.port);
    try {
      raw.write(serialize.startup({ user: db.user, database: db.database }));
      await raw.untilReady();
      raw.write(
        serialize.parse({ name: 'pgw_s', text: 'select g from generate_series(1, 5) g' }),
        serialize.bind({ statement: 'pgw_s', portal: 'pgw_p' }),
        serialize.describe({ type: 'P', name: 'pgw_p' }),
        serialize.execute({ portal: 'pgw_p', rows: 2 }),
        serialize.flush(),
      );
      const first: string[] = [];
      while (first.at(-1) !== 'portalSuspended') first.push((await raw.next())!.name);
      assert.deepEqual(first, [
        'parseComplete',
        'bindComplete',
        'rowDescription',
        'dataRow',
        'dataRow',
        'portalSuspended',
      ]);
      raw.write(
        serialize.execute({ portal: 'pgw_p', rows: 0 }),
        serialize.close({ type: 'P', name: 'pgw_p' }),
        serialize.sync(),
      );
      const rest = await raw.untilReady();
      assert.deepEqual(
        rest.map((m) => m.name),
        ['dataRow', 'dataRow', 'dataRow', 'commandComplete', 'closeComplete', 'readyForQuery'],
      );
      assert.deepEqual(
        rest.filter((m) => m.name === 'dataRow').map((m) => (m as unknown as { fields: string[] }).fields[0]),
        ['3', '4', '5'],
      );
    } finally {
      raw.destroy();
    }
  });

  test('a query sent in the same packet as the startup message is answered after login', {
    timeout: 30_000,
  }, async () => {
    const raw = await RawConnection.open(proxy.port);
    try {
      raw.write(serialize.startup({ user: db.user, database: db.database }), serialize.query("select 'early' as s"));
      const login = await raw.untilReady();
      assert.ok(login.some((m) => m.name === 'authenticationOk'));
      const answer = await raw.untilReady();
      assert.deepEqual(
        answer.map((m) => m.name),
        ['rowDescription', 'dataRow', 'commandComplete', 'readyForQuery'],
      );
      assert.equal((answer[1] as unknown as { fields: string[] }).fields[0], 'early');
    } finally {
      raw.destroy();
    }
  });

  test('Terminate ends the session and its backend', { timeout: 30_000 }, async () => {
    const raw = await RawConnection.open(proxy.port);
    raw.write(serialize.startup({ user: db.user, database: db.database }));
    await raw.untilReady();
    raw.write(serialize.query('select pg_backend_pid()'));
    const pid = Number(
      ((await raw.untilReady()).find((m) => m.name === 'dataRow') as unknown as { fields: string[] }).fields[0],
    );
    raw.write(serialize.end());
    assert.deepEqual(await raw.untilClosed(), []);
    await waitFor(
      () =>
        withClient(
          async (direct) => (await direct.query('select 1 from pg_stat_activity where pid = $1', [pid])).rowCount === 0,
        ),
      { timeoutMs: 5000, what: `backend ${pid} to exit` },
    );
  });

  test('an error inside a transaction fails the next statement with 25P02 until ROLLBACK', {
    timeout: 30_000,
  }, async () => {
    const client = await connect();
    await client.query('begin');
    await assert.rejects(client.query('select 1/0'), { code: '22012' });
    await assert.rejects(client.query('select $1::int', [1]), { code: '25P02' });
    const rollback = await client.query('rollback');
    assert.equal(rollback.command, 'ROLLBACK');
    const { rows } = await client.query<{ one: number }>('select 1 as one');
    assert.equal(rows[0].one, 1);
  });

  describe('COPY', () => {
    const rowsToCopy = 50_000;
    const copyIn = `pgw_copy_in_${suffix}`;
    const copyOut = `pgw_copy_out_${suffix}`;
    // The same rows the server generates, as COPY text; non-ASCII on purpose.
    const expectedHash = `select count(*)::int as n, sum(hashtext(g || ':' || 'é-' || md5(g::text)))::text as h from generate_series(1, ${rowsToCopy}) g`;

    before(async () => {
      await withClient(async (c) => {
        await c.query(`create table ${copyIn} (id int, v text)`);
        await c.query(
          `create table ${copyOut} as select g as id, 'é-' || md5(g::text) as v from generate_series(1, ${rowsToCopy}) g`,
        );
      });
    });
    after(async () => {
      await withClient((c) => c.query(`drop table if exists ${copyIn}, ${copyOut}`));
    });

    test('COPY FROM STDIN loads 50k rows intact', { timeout: 30_000 }, async () => {
      const sql = postgresJs(proxy);
      try {
        function* lines() {
          for (let i = 1; i <= rowsToCopy; i += 1000) {
            let chunk = '';
            for (let j = i; j < i + 1000 && j <= rowsToCopy; j++) chunk += `${j}\té-${md5(String(j))}\n`;
            yield chunk;
          }
        }
        const writable = await sql.unsafe(`copy ${copyIn} (id, v) from stdin`).writable();
        await pipeline(Readable.from(lines()), writable);
      } finally {
        await sql.end();
      }
      const [got, expected] = await withClient(async (c) => [
        (await c.query(`select count(*)::int as n, sum(hashtext(id || ':' || v))::text as h from ${copyIn}`)).rows[0],
        (await c.query(expectedHash)).rows[0],
      ]);
      assert.deepEqual(got, expected);
      assert.equal(got.n, rowsToCopy);
    });

    test('COPY TO STDOUT delivers 50k rows byte for byte as the server sends them', { timeout: 30_000 }, async () => {
      async function copyOutDigest(options: postgres.Options<Record<string, postgres.PostgresType>>) {
        const sql = postgres({ database: db.database, user: db.user, max: 1, onnotice: () => undefined, ...options });
        try {
          const hash = createHash('sha256');
          let lines = 0;
          const readable = await sql.unsafe(`copy (select * from ${copyOut} order by id) to stdout`).readable();
          await pipeline(
            readable,
            new Writable({
              write(chunk: Buffer, _encoding, callback) {
                hash.update(chunk);
                for (const byte of chunk) if (byte === 0x0a) lines++;
                callback();
              },
            }),
          );
          return { lines, sha256: hash.digest('hex') };
        } finally {
          await sql.end();
        }
      }
      const viaProxy = await copyOutDigest({ host: proxy.host, port: proxy.port });
      const direct = await copyOutDigest({ host: db.host, port: db.port });
      assert.equal(viaProxy.lines, rowsToCopy);
      assert.deepEqual(viaProxy, direct);
    });
  });

  test('a NOTIFY from one proxied connection reaches a LISTENer on another with its payload', {
    timeout: 30_000,
  }, async () => {
    const listener = await connect();
    const notifier = await connect();
    const channel = `pgw_chan_${suffix}`;
    const payload = `héllo, "world" 'quoted' \\ 🐘 ${suffix}`;
    await listener.query(`listen "${channel}"`);
    const received = once(listener, 'notification', { signal: AbortSignal.timeout(10_000) });
    await notifier.query('select pg_notify($1, $2)', [channel, payload]);
    const [message] = (await received) as [pg.Notification];
    assert.equal(message.channel, channel);
    assert.equal(message.payload, payload);
    const { rows } = await notifier.query<{ pid: number }>('select pg_backend_pid() as pid');
    assert.equal(message.processId, rows[0].pid);
  });

  test('a NoticeResponse raised by the server reaches the client', { timeout: 30_000 }, async () => {
    const client = await connect();
    const notice = once(client, 'notice', { signal: AbortSignal.timeout(10_000) });
    await client.query(`DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$`);
    const [message] = (await notice) as [pg.DatabaseError];
    assert.equal(message.message, 'hello 42');
    assert.equal(message.severity, 'NOTICE');
    assert.equal(message.code, '00000');
  });

  test('a 200k-row result arrives complete and in order', { timeout: 30_000 }, async () => {
    const client = await connect();
    const { rows } = await client.query<{ g: number; m: string }>(
      'select g, md5(g::text) as m from generate_series(1, 200000) g order by g',
    );
    const hash = createHash('md5');
    let sum = 0;
    for (const row of rows) {
      sum += row.g;
      hash.update(row.m);
    }
    const expected = await withClient(async (direct) => {
      const result = await direct.query<{ n: number; sum: string; digest: string }>(
        "select count(*)::int as n, sum(g)::text as sum, md5(string_agg(md5(g::text), '' order by g)) as digest from generate_series(1, 200000) g",
      );
      return result.rows[0];
    });
    assert.deepEqual({ n: rows.length, sum: String(sum), digest: hash.digest('hex') }, expected);
  });

  test('a 1 MB query text reaches the server intact', { timeout: 30_000 }, async () => {
    const client = await connect();
    const literal = randomBytes(512 * 1024).toString('hex'); // 1 MiB of text
    const { rows } = await client.query<{ len: number; digest: string; s: string }>(
      `select length(s) as len, md5(s) as digest, s from (select '${literal}'::text as s) t`,
    );
    assert.equal(rows[0].len, literal.length);
    assert.equal(rows[0].digest, md5(literal));
    assert.equal(rows[0].s, literal);
  });

  test('100 concurrent connections each get their own backend and all succeed', { timeout: 60_000 }, async () => {
    const many = Array.from({ length: 100 }, () => new pg.Client({ connectionString: proxy.url() }));
    clients.push(...many);
    await Promise.all(many.map((c) => c.connect()));
    await waitFor(() => proxy.server.sessionCount >= 100, { what: '100 proxy sessions' });
    const pids = await Promise.all(
      many.map(async (c, i) => {
        const { rows } = await c.query<{ i: number; pid: number }>('select $1::int as i, pg_backend_pid() as pid', [i]);
        assert.equal(rows[0].i, i);
        return rows[0].pid;
      }),
    );
    assert.equal(new Set(pids).size, 100);
    const before = proxy.server.sessionCount;
    await Promise.all(many.map((c) => c.end()));
    await waitFor(() => proxy.server.sessionCount <= before - 100, { what: 'the 100 sessions to close' });
  });

  test('postgres.js query.cancel() stops a running pg_sleep with 57014 within two seconds', {
    timeout: 30_000,
  }, async () => {
    const app = `pgw-cancel-pgjs-${suffix}`;
    const sql = postgresJs(proxy, { connection: { application_name: app } });
    try {
      const query = sql`select pg_sleep(30)`;
      const outcome = query.then(
        () => null,
        (err: postgres.PostgresError) => err,
      );
      await activeBackend(app);
      const started = Date.now();
      query.cancel();
      const error = await outcome;
      assert.equal(error?.code, '57014');
      assert.ok(Date.now() - started < 2000, `cancelled after ${Date.now() - started} ms`);
      const [row] = await sql`select 'still usable' as s`;
      assert.equal(row.s, 'still usable');
    } finally {
      await sql.end();
    }
  });

  test('psql interrupted with SIGINT cancels its running query through the proxy', { timeout: 30_000 }, async () => {
    const app = `pgw-cancel-psql-${suffix}`;
    const run = psql(
      conninfo({ host: proxy.host, port: proxy.port, user: db.user, dbname: db.database, application_name: app }),
      ['select pg_sleep(30)'],
    );
    await activeBackend(app);
    const started = Date.now();
    run.child.kill('SIGINT');
    const result = await run.done;
    assert.ok(Date.now() - started < 2000, `psql ended ${Date.now() - started} ms after SIGINT`);
    assert.match(result.stderr, /canceling statement due to user request/);
    assert.equal(result.code, 1);
  });

  describe('pgbench', () => {
    const benchDb = `pgw_bench_${suffix}`;

    before(async () => {
      await withClient((c) => c.query(`create database ${benchDb}`));
      const init = await startProcess(PGBENCH, ['-i', '-s', '1', '-q', proxy.url(db.user, benchDb)], libpqEnv(), 60_000)
        .done;
      assert.equal(init.code, 0, `pgbench -i failed: ${init.stderr}`);
    });
    after(async () => {
      await withClient((c) => c.query(`drop database if exists ${benchDb} with (force)`));
    });

    for (const mode of ['prepared', 'extended'] as const) {
      test(`pgbench -S -M ${mode} with 4 clients completes every transaction`, { timeout: 60_000 }, async () => {
        const run = await startProcess(
          PGBENCH,
          ['-S', '-M', mode, '-t', '200', '-c', '4', '-n', proxy.url(db.user, benchDb)],
          libpqEnv(),
          60_000,
        ).done;
        assert.equal(run.code, 0, `pgbench failed: ${run.stderr}`);
        assert.match(run.stdout, /number of transactions actually processed: 800\/800/);
        const failed = /number of failed transactions: (\d+)/.exec(run.stdout);
        assert.ok(failed, `pgbench reports failed transactions:\n${run.stdout}`);
        assert.equal(failed[1], '0');
      });
    }
  });
});
