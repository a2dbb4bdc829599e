// The proxy's decision point, exercised with a test gate: refusing behaves exactly
// like a server-side error (in pipelines and transactions), and a gate that takes
// its time holds only its own session.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { FORWARD, type GateDecision, type QueryRequest } from '../../src/proxy/seam.ts';
import { testDatabase, withClient } from '../harness/database.ts';
import { startProxy, type TestProxy } from '../harness/proxy.ts';
import { describeMessages, RawConnection, serialize } from '../harness/wire.ts';

const BLOCKED_MARK = 'pgw_gate_refuse_me';
const HOLD_MARK = 'pgw_gate_hold_me';

const refusal: GateDecision = {
  action: 'refuse',
  error: {
    severity: 'ERROR',
    code: '42501',
    message: 'pgwarden: query blocked by rule r-test',
    detail: 'rule r-test: testing',
    hint: 'lift it',
  },
};

describe('the query gate', () => {
  let proxy: TestProxy;
  let releaseHeld: (() => void) | null = null;
  const phases: string[] = [];

  before(async () => {
    proxy = await startProxy({
      gate: {
        decide(request: QueryRequest) {
          if (request.text.includes(BLOCKED_MARK)) {
            phases.push(request.phase);
            return refusal;
          }
          if (request.text.includes(HOLD_MARK) && request.phase !== 'parse') {
            return new Promise<GateDecision>((resolve) => {
              releaseHeld = () => resolve(FORWARD);
            });
          }
          return FORWARD;
        },
      },
    });
    await withClient((c) => c.query('create table if not exists pgw_gate_t (v int)'));
  });

  after(async () => {
    await withClient((c) => c.query('drop table if exists pgw_gate_t'));
    await proxy.stop();
  });

  async function connect(): Promise<pg.Client> {
    const client = new pg.Client({ connectionString: proxy.url() });
    await client.connect();
    return client;
  }

  test('a refused simple query gets the gate error and the session stays usable', async () => {
    const client = await connect();
    try {
      await assert.rejects(client.query(`select '${BLOCKED_MARK}'`), (err: pg.DatabaseError) => {
        assert.equal(err.code, '42501');
        assert.match(err.message, /^pgwarden: query blocked by rule r-test/);
        assert.equal(err.detail, 'rule r-test: testing');
        assert.equal(err.hint, 'lift it');
        return true;
      });
      const { rows } = await client.query('select 1 as one');
      assert.equal(rows[0].one, 1);
    } finally {
      await client.end();
    }
  });

  test('a refused query inside a transaction leaves it failed on the server', async () => {
    const client = await connect();
    try {
      await client.query('begin');
      await client.query('insert into pgw_gate_t values (1)');
      await assert.rejects(client.query(`select '${BLOCKED_MARK}'`), { code: '42501' });
      await assert.rejects(client.query('select 1'), { code: '25P02' });
      const commit = await client.query('commit');
      assert.equal(commit.command, 'ROLLBACK');
      const { rows } = await client.query('select count(*)::int as n from pgw_gate_t');
      assert.equal(rows[0].n, 0);
    } finally {
      await client.end();
    }
  });

  test('a refused Execute in a pipeline skips to the next Sync exactly as a server error does', async () => {
    const db = testDatabase();
    const group = (errorText: string) => [
      serialize.parse({ text: 'select 1' }),
      serialize.bind({}),
      serialize.execute({}),
      serialize.parse({ text: errorText }),
      serialize.bind({}),
      serialize.execute({}),
      serialize.parse({ text: 'select 3' }),
      serialize.bind({}),
      serialize.execute({}),
      serialize.sync(),
      serialize.parse({ text: 'select 4' }),
      serialize.bind({}),
      serialize.execute({}),
      serialize.sync(),
    ];
    // PostgreSQL's own behaviour, for a runtime error at the same position.
    const direct = await RawConnection.login(db.port, { user: db.user, database: db.database });
    direct.write(...group('select 1 / (random() * 0)::int'));
    const expected = describeMessages([...(await direct.untilReady()), ...(await direct.untilReady())]);
    direct.close();

    const viaProxy = await RawConnection.login(proxy.port, { user: db.user, database: db.database });
    viaProxy.write(...group(`select '${BLOCKED_MARK}'`));
    const got = describeMessages([...(await viaProxy.untilReady()), ...(await viaProxy.untilReady())]);
    viaProxy.close();

    // The only differences: the refusal comes at Parse (no ParseComplete and
    // BindComplete for the refused statement) and carries 42501.
    assert.deepEqual(
      got,
      expected.filter((_, i) => i !== 4 && i !== 5).map((m) => (m === 'error:22012' ? 'error:42501' : m)),
    );
    assert.deepEqual(got, [
      'parseComplete',
      'bindComplete',
      'dataRow',
      'commandComplete',
      'error:42501',
      'readyForQuery:I',
      'parseComplete',
      'bindComplete',
      'dataRow',
      'commandComplete',
      'readyForQuery:I',
    ]);
  });

  test('a refused statement in an extended-protocol transaction reports the server true status', async () => {
    const db = testDatabase();
    const client = await RawConnection.login(proxy.port, { user: db.user, database: db.database });
    try {
      client.write(serialize.query('begin'));
      assert.deepEqual(describeMessages(await client.untilReady()).at(-1), 'readyForQuery:T');
      client.write(
        serialize.parse({ text: `select '${BLOCKED_MARK}'` }),
        serialize.bind({}),
        serialize.execute({}),
        serialize.sync(),
      );
      assert.deepEqual(describeMessages(await client.untilReady()), ['error:42501', 'readyForQuery:E']);
      client.write(serialize.query('select 1'));
      assert.deepEqual(describeMessages(await client.untilReady()), ['error:25P02', 'readyForQuery:E']);
      client.write(serialize.query('rollback'));
      assert.deepEqual(describeMessages(await client.untilReady()).at(-1), 'readyForQuery:I');
    } finally {
      client.close();
    }
  });

  test('a gate that takes its time holds only its own session, and later input keeps its order', async () => {
    const db = testDatabase();
    const held = await RawConnection.login(proxy.port, { user: db.user, database: db.database });
    const other = await connect();
    try {
      held.write(serialize.query(`select 1 as ${HOLD_MARK}`), serialize.query('select 2'));
      await other.query('select 1'); // not held up
      assert.ok(releaseHeld, 'the gate was asked');
      const before = proxy.completions.length;
      releaseHeld!();
      const first = describeMessages(await held.untilReady());
      const second = describeMessages(await held.untilReady());
      assert.deepEqual(first, ['rowDescription', 'dataRow', 'commandComplete', 'readyForQuery:I']);
      assert.deepEqual(second, ['rowDescription', 'dataRow', 'commandComplete', 'readyForQuery:I']);
      const texts = proxy.completions.slice(before).map((c) => c.text);
      assert.deepEqual(texts, [`select 1 as ${HOLD_MARK}`, 'select 2']);
    } finally {
      held.close();
      await other.end();
    }
  });
});

describe('the completion event', () => {
  let proxy: TestProxy;
  before(async () => {
    proxy = await startProxy();
  });
  after(() => proxy.stop());

  test('each statement of a multi-statement query completes on its own with its rows', async () => {
    const client = new pg.Client({ connectionString: proxy.url(), application_name: 'pgw-events' });
    await client.connect();
    try {
      const text = 'select 1; select g from generate_series(1, 3) g';
      await client.query(text);
      const events = proxy.completions.filter((c) => c.text === text);
      assert.deepEqual(
        events.map((e) => [e.statementIndex, e.rows, e.sqlstate]),
        [
          [0, 1, null],
          [1, 3, null],
        ],
      );
      assert.equal(events[0].applicationName, 'pgw-events');
      assert.equal(events[0].user, testDatabase().user);
      assert.equal(events[0].statementName, null);
    } finally {
      await client.end();
    }
  });

  test('an extended-protocol execution carries its prepared statement and parameters', async () => {
    const client = new pg.Client({ connectionString: proxy.url() });
    await client.connect();
    try {
      const text = 'select g from generate_series(1, $1::int) g';
      await client.query({ name: 'pgw_named', text, values: [7] });
      await client.query({ name: 'pgw_named', text, values: [2] });
      const events = proxy.completions.filter((c) => c.text === text);
      assert.deepEqual(
        events.map((e) => [e.statementName, e.hasBind, e.rows]),
        [
          ['pgw_named', true, 7],
          ['pgw_named', true, 2],
        ],
      );
    } finally {
      await client.end();
    }
  });

  test('a failed statement reports its SQLSTATE and a later SET application_name is seen', async () => {
    const client = new pg.Client({ connectionString: proxy.url() });
    await client.connect();
    try {
      await client.query("set application_name = 'renamed-app'");
      await assert.rejects(client.query('select 1/0 as pgw_div'), { code: '22012' });
      const event = proxy.completions.find((c) => c.text === 'select 1/0 as pgw_div');
      assert.equal(event?.sqlstate, '22012');
      assert.equal(event?.applicationName, 'renamed-app');
    } finally {
      await client.end();
    }
  });

  test('duration spans the query from arrival at the proxy to its completion', async () => {
    const client = new pg.Client({ connectionString: proxy.url() });
    await client.connect();
    try {
      await client.query('select pg_sleep(0.05) as pgw_sleep');
      const event = proxy.completions.find((c) => c.text === 'select pg_sleep(0.05) as pgw_sleep');
      assert.ok(event && event.durationMs >= 50 && event.durationMs < 1000, `duration ${event?.durationMs}`);
    } finally {
      await client.end();
    }
  });
});
