// EXPLAIN of sampled executions through the monitoring connection: with the
// execution's own parameter values, with a generic plan when there are none
// (PostgreSQL 16+), never for anything but a single plain statement, and never
// leaving anything behind.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { explainableStatement, explainSample } from '../../src/plans/explain.ts';
import type { MonitorPool } from '../../src/plans/monitor.ts';
import { summarizePlan } from '../../src/plans/plan.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { singleConnectionMonitor } from '../harness/monitor.ts';

const TABLE = 'pgw_explain_items';
const PG_VERSION = Number(process.env.PGWARDEN_TEST_PG_VERSION ?? 0);

describe('explainableStatement', () => {
  test('a single statement is returned without its trailing semicolon and comments', () => {
    assert.equal(explainableStatement('select 1;  -- done\n'), 'select 1');
    assert.equal(
      explainableStatement('/* a /* nested */ comment */ (select 1) union select 2'),
      '/* a /* nested */ comment */ (select 1) union select 2',
    );
  });

  test('semicolons inside strings, quoted identifiers, dollar quotes and comments do not end the statement', () => {
    for (const text of [
      "select ';' from t",
      "select 'it''s; fine'",
      "select E'\\'; still a string'",
      'select "odd;name" from t',
      'select $$;$$, $tag$ ; $tag$',
      'select 1 /* ; */ -- ;\n + 1',
    ]) {
      assert.equal(explainableStatement(text), text);
    }
  });

  test('a second statement after a semicolon is refused', () => {
    assert.throws(() => explainableStatement('select 1; drop table x'), /more than one statement/);
    assert.throws(() => explainableStatement("select ';'; select 2"), /more than one statement/);
  });

  test('statements other than SELECT, INSERT, UPDATE, DELETE, WITH, VALUES, TABLE and MERGE are refused', () => {
    for (const text of [
      'create table x (id int)',
      'explain analyze delete from x',
      'vacuum x',
      'copy x to stdout',
      'set x = 1',
      '',
      '-- nothing',
    ]) {
      assert.throws(() => explainableStatement(text), /refusing to EXPLAIN/, text);
    }
    for (const text of [
      'SELECT 1',
      'insert into x values (1)',
      'update x set a = 1',
      'delete from x',
      'with y as (select 1) select * from y',
      'values (1)',
      'table x',
      'merge into x using y on true when matched then delete',
    ]) {
      assert.equal(explainableStatement(text), text);
    }
  });
});

describe('explainSample', () => {
  let monitor: MonitorPool;
  let database: string;
  const user = testDatabase().user;

  async function rowCount(): Promise<number> {
    return withClient(async (c) => Number((await c.query(`select count(*) as n from ${TABLE}`)).rows[0].n));
  }

  before(async () => {
    // One connection, so a transaction left open by one EXPLAIN would be seen by the next.
    monitor = singleConnectionMonitor();
    database = monitor.defaultDatabase;
    await withClient(async (c) => {
      await c.query(`drop table if exists ${TABLE}`);
      await c.query(`create table ${TABLE} (id int primary key, label text not null)`);
      await c.query(`insert into ${TABLE} select g, 'item ' || g from generate_series(1, 5000) g`);
      await c.query(`analyze ${TABLE}`);
    });
  });

  after(async () => {
    await monitor.close();
    await withClient((c) => c.query(`drop table if exists ${TABLE}`));
  });

  test('text parameters are planned with their values', async () => {
    const json = await explainSample(
      monitor,
      { database, user, text: `select * from ${TABLE} where id = $1`, params: ['42'], paramCount: 1 },
      PG_VERSION,
    );
    const summary = summarizePlan(json);
    assert.equal(summary.nodes[0].description, `Index Scan using ${TABLE}_pkey on ${TABLE}`);
    // VERBOSE: columns are qualified.
    assert.match(JSON.stringify(json), /"Index Cond":"\(\w+\.id = 42\)"/);
  });

  test('a NULL parameter is passed as NULL', async () => {
    const json = await explainSample(
      monitor,
      { database, user, text: `select * from ${TABLE} where label = $1`, params: [null], paramCount: 1 },
      PG_VERSION,
    );
    // The planner proves "label = NULL" false without reading the table.
    assert.equal(summarizePlan(json).nodes[0].nodeType, 'Result');
  });

  test('a statement without parameters is explained as is', async () => {
    const json = await explainSample(
      monitor,
      { database, user, text: `select count(*) from ${TABLE};`, params: null, paramCount: 0 },
      PG_VERSION,
    );
    assert.deepEqual(summarizePlan(json).relations, [`public.${TABLE}`]);
  });

  test('parameters that could not be rendered get a generic plan on PostgreSQL 16+', {
    skip: PG_VERSION < 16 && `PostgreSQL ${PG_VERSION}`,
  }, async () => {
    const json = await explainSample(
      monitor,
      { database, user, text: `select * from ${TABLE} where id = $1`, params: null, paramCount: 1 },
      PG_VERSION,
    );
    assert.equal(summarizePlan(json).nodes[0].description, `Index Scan using ${TABLE}_pkey on ${TABLE}`);
    assert.match(JSON.stringify(json), /"Index Cond":"\(\w+\.id = \$1\)"/);
  });

  test('parameters that could not be rendered are an error before PostgreSQL 16', async () => {
    await assert.rejects(
      explainSample(
        monitor,
        { database, user, text: `select * from ${TABLE} where id = $1`, params: null, paramCount: 1 },
        15,
      ),
      /cannot EXPLAIN this sample: its 1 parameter\(s\) could not be rendered as text and PostgreSQL 15 has no GENERIC_PLAN/,
    );
  });

  test('a second statement is refused and never runs', async () => {
    await assert.rejects(
      explainSample(
        monitor,
        { database, user, text: `select 1; drop table ${TABLE}`, params: null, paramCount: 0 },
        PG_VERSION,
      ),
      /refusing to EXPLAIN more than one statement/,
    );
    assert.equal(await rowCount(), 5000);
  });

  test('DDL is refused and never runs', async () => {
    await assert.rejects(
      explainSample(
        monitor,
        { database, user, text: 'create table pgw_explain_never (id int)', params: null, paramCount: 0 },
        PG_VERSION,
      ),
      /refusing to EXPLAIN CREATE/,
    );
    const exists = await withClient(
      async (c) => (await c.query(`select to_regclass('pgw_explain_never') as t`)).rows[0].t,
    );
    assert.equal(exists, null);
  });

  test('an EXPLAIN of an INSERT does not insert', async () => {
    const json = await explainSample(
      monitor,
      {
        database,
        user,
        text: `insert into ${TABLE} (id, label) values ($1, $2)`,
        params: ['100000', 'new'],
        paramCount: 2,
      },
      PG_VERSION,
    );
    assert.equal(summarizePlan(json).nodes[0].description, `Insert on ${TABLE}`);
    assert.equal(await rowCount(), 5000);
  });

  test('an EXPLAIN of a DELETE does not delete', async () => {
    await explainSample(
      monitor,
      { database, user, text: `delete from ${TABLE}`, params: null, paramCount: 0 },
      PG_VERSION,
    );
    assert.equal(await rowCount(), 5000);
  });

  test('a failing EXPLAIN leaves the connection usable and out of any transaction', async () => {
    await assert.rejects(
      explainSample(
        monitor,
        { database, user, text: 'select * from pgw_explain_missing', params: null, paramCount: 0 },
        PG_VERSION,
      ),
      /relation "pgw_explain_missing" does not exist/,
    );
    const json = await explainSample(
      monitor,
      { database, user, text: `select * from ${TABLE} where id = $1`, params: ['7'], paramCount: 1 },
      PG_VERSION,
    );
    assert.equal(summarizePlan(json).relations[0], `public.${TABLE}`);
    const states = await withClient(async (c) => {
      const { rows } = await c.query<{ state: string }>(
        `select state from pg_stat_activity where application_name = 'pgwarden-monitor'`,
      );
      return rows.map((r) => r.state);
    });
    assert.deepEqual(states, ['idle']);
  });
});

describe('MonitorPool', () => {
  test("serverMajorVersion is the server's major version", async () => {
    const monitor = singleConnectionMonitor();
    try {
      const version = await monitor.serverMajorVersion();
      assert.ok(Number.isInteger(version) && version >= 13, String(version));
      if (PG_VERSION) assert.equal(version, PG_VERSION);
    } finally {
      await monitor.close();
    }
  });

  test('keeps pools for at most maxDatabases databases, closing the least recently used', async () => {
    const appName = 'pgwarden-monitor';
    const monitor = singleConnectionMonitor({ maxDatabases: 1 });
    const databases = async () =>
      withClient(async (c) => {
        const { rows } = await c.query<{ datname: string }>(
          'select datname from pg_stat_activity where application_name = $1 and pid <> pg_backend_pid() order by 1',
          [appName],
        );
        return rows.map((r) => r.datname);
      });
    try {
      await monitor.query('select 1', [], 'template1');
      assert.deepEqual(await databases(), ['template1']);
      await monitor.query('select 1', [], monitor.defaultDatabase);
      await waitFor(async () => JSON.stringify(await databases()) === JSON.stringify([monitor.defaultDatabase]), {
        what: "only the latest database's monitoring connection to remain",
      });
    } finally {
      await monitor.close();
    }
  });
});
