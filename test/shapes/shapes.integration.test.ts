// Query shapes end to end: real clients through a whole pgwarden (proxy, shape
// collector, admin API) in front of a real PostgreSQL. What the tests drive is
// what the API, the metrics and the slow-query log must report, and literal values
// must never leave the proxy unless the operator asks for them.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { fingerprintSync, loadModule } from 'libpg-query';
import pg from 'pg';
import postgres from 'postgres';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { parsePrometheusText } from './prometheus.ts';

const db = testDatabase();
const suffix = `${process.pid}_${randomBytes(3).toString('hex')}`;
const ITEMS = `pgw_shape_items_${suffix}`;
const SECRET = `secret-literal-XYZ-${suffix}`;

interface ShapeSummary {
  fingerprint: string;
  query: string;
  command: string;
  calls: number;
  errors: number;
  errors_by_class: Record<string, number>;
  rows: number;
  total_ms: number;
  mean_ms: number;
  p50_ms: number;
  p95_ms: number;
  p99_ms: number;
  first_seen: string;
  last_seen: string;
  status: string;
  fallback: boolean;
  users: string[];
  databases: string[];
  application_names: string[];
}

describe('query shapes through pgwarden', () => {
  let pgw: TestApp;
  const pgClients: pg.Client[] = [];
  const sqls: postgres.Sql[] = [];

  before(async () => {
    await loadModule();
    await withClient(async (c) => {
      await c.query(`create table ${ITEMS} (id int primary key, note text)`);
      await c.query(`insert into ${ITEMS} select i, 'note ' || i from generate_series(1, 5) i`);
    });
    pgw = await startTestApp({ slow_query_ms: 20 });
  });

  after(async () => {
    await Promise.all(pgClients.map((c) => c.end().catch(() => undefined)));
    await Promise.all(sqls.map((s) => s.end({ timeout: 5 })));
    await pgw?.stop();
    await withClient((c) => c.query(`drop table if exists ${ITEMS}`));
  });

  async function connect(applicationName = 'pgw-shapes-test'): Promise<pg.Client> {
    const client = new pg.Client({ connectionString: pgw.url(), application_name: applicationName });
    pgClients.push(client);
    await client.connect();
    return client;
  }

  function postgresJs(): postgres.Sql {
    const sql = postgres(pgw.url(), { max: 1, fetch_types: false, connect_timeout: 10, onnotice: () => undefined });
    sqls.push(sql);
    return sql;
  }

  /** The shape's summary once `ready` holds for it (stats are recorded as completions pass back). */
  function shapeWhen(fingerprint: string, ready: (s: ShapeSummary) => boolean, what: string): Promise<ShapeSummary> {
    return waitFor(
      async () => {
        const { status, body } = await pgw.api(`/api/shapes/${fingerprint}`);
        return status === 200 && ready(body as ShapeSummary) ? (body as ShapeSummary) : undefined;
      },
      { what, timeoutMs: 10_000 },
    );
  }

  async function allShapes(): Promise<ShapeSummary[]> {
    const { status, body } = await pgw.api('/api/shapes?limit=10000');
    assert.equal(status, 200);
    return body as ShapeSummary[];
  }

  test('simple protocol, extended protocol and postgres.js find the same shape', { timeout: 30_000 }, async () => {
    const client = await connect();
    const sql = postgresJs();
    const text = `select id, note from ${ITEMS} where id = `;
    for (const id of [1, 2, 3]) await client.query(`${text}${id}`); // simple Query, literal inline
    for (const id of [4, 5]) await client.query(`${text}$1`, [id]); // Parse/Bind/Execute
    for (const id of [1, 2, 3, 4]) await sql`select id, note from ${sql(ITEMS)} where id = ${id}`; // named prepared statement, reused
    const fingerprint = fingerprintSync(`${text}1`);

    const shape = await shapeWhen(fingerprint, (s) => s.calls >= 9, 'nine calls of the item lookup');
    assert.equal(shape.calls, 9);
    assert.equal(shape.rows, 9);
    assert.equal(shape.query, `${text}$1`);
    const lookups = (await allShapes()).filter((s) => s.query.startsWith(text));
    assert.deepEqual(
      lookups.map((s) => s.fingerprint),
      [fingerprint],
      'one shape for all three ways of running it',
    );
  });

  test('repeated and alternating Parses of the unnamed statement each count under their own shape', {
    timeout: 30_000,
  }, async () => {
    // The session reuses the decoded statement when a Parse repeats the last one byte
    // for byte: alternating texts, and a text repeated after another, must still count right.
    const client = await connect();
    const a = `select id from ${ITEMS} where id = $1`;
    const b = `select note from ${ITEMS} where id = $1`;
    for (const text of [a, a, a, b, a, b, b, a]) await client.query(text, [1]);
    const [shapeA, shapeB] = await Promise.all([
      shapeWhen(fingerprintSync(a), (s) => s.calls >= 5, 'five calls of the first text'),
      shapeWhen(fingerprintSync(b), (s) => s.calls >= 3, 'three calls of the second text'),
    ]);
    assert.deepEqual([shapeA.calls, shapeA.query], [5, a]);
    assert.deepEqual([shapeB.calls, shapeB.query], [3, b]);
  });

  test('calls, rows and errors match what was run, with errors by SQLSTATE class', { timeout: 30_000 }, async () => {
    const client = await connect('pgw-stats-app');
    const text = `select id, 100 / $1::int as ratio from ${ITEMS} where id <= $2`;
    await client.query(text, [5, 3]); // 3 rows
    await client.query(text, [2, 1]); // 1 row
    await assert.rejects(client.query(text, [0, 2]), { code: '22012' });
    const fingerprint = fingerprintSync(text);

    const shape = await shapeWhen(fingerprint, (s) => s.calls >= 3, 'three calls of the ratio query');
    assert.deepEqual(
      { calls: shape.calls, rows: shape.rows, errors: shape.errors, errors_by_class: shape.errors_by_class },
      { calls: 3, rows: 4, errors: 1, errors_by_class: { '22': 1 } },
    );
    assert.equal(shape.command, 'SELECT');
    assert.equal(shape.fallback, false);
    assert.deepEqual(shape.users, [db.user]);
    assert.deepEqual(shape.databases, [db.database]);
    assert.deepEqual(shape.application_names, ['pgw-stats-app']);
    assert.ok(shape.total_ms > 0 && shape.mean_ms > 0, `total ${shape.total_ms} ms, mean ${shape.mean_ms} ms`);
    assert.ok(Date.parse(shape.first_seen) <= Date.parse(shape.last_seen), `${shape.first_seen} .. ${shape.last_seen}`);
  });

  test('a shape sleeping 50 ms reports p50 within 10% of 50 ms', { timeout: 30_000 }, async (t) => {
    const client = await connect();
    for (let i = 0; i < 40; i++) await client.query('select pg_sleep(0.05)');
    const shape = await shapeWhen(fingerprintSync('select pg_sleep(0.05)'), (s) => s.calls >= 40, '40 sleeps');
    assert.equal(shape.calls, 40);
    t.diagnostic(`p50 ${shape.p50_ms} ms, p95 ${shape.p95_ms} ms, p99 ${shape.p99_ms} ms, mean ${shape.mean_ms} ms`);
    assert.ok(Math.abs(shape.p50_ms - 50) <= 5, `p50 ${shape.p50_ms} ms`);
    assert.ok(shape.p95_ms >= shape.p50_ms, `p95 ${shape.p95_ms} ms, p50 ${shape.p50_ms} ms`);
    assert.ok(shape.p99_ms >= shape.p95_ms, `p99 ${shape.p99_ms} ms, p95 ${shape.p95_ms} ms`);
    assert.ok(shape.mean_ms >= 50, `mean ${shape.mean_ms} ms`);
  });

  test('each statement of a multi-statement simple query counts under its own shape', { timeout: 30_000 }, async () => {
    const client = await connect();
    const statements = [
      `select count(*) from ${ITEMS} where id > 0`,
      `update ${ITEMS} set note = note where id = 2`,
      `select max(id) from ${ITEMS} where note <> 'x'`,
    ];
    await client.query(statements.join('; '));
    await client.query(statements.map((s) => s.replace(/\b(0|2)\b/, '4')).join(';\n'));
    for (const statement of statements) {
      const shape = await shapeWhen(fingerprintSync(statement), (s) => s.calls >= 2, `two calls of ${statement}`);
      assert.equal(shape.calls, 2, statement);
      assert.equal(shape.rows, 2, statement);
    }
  });

  test('bad SQL gets a fallback shape and the client gets the server syntax error', { timeout: 30_000 }, async () => {
    const client = await connect();
    await assert.rejects(client.query(`selec id from ${ITEMS} where note = 'bad-sql'`), (err: pg.DatabaseError) => {
      assert.equal(err.code, '42601');
      assert.match(err.message, /^syntax error at or near "selec"/);
      return true;
    });
    const shape = await waitFor(
      async () => (await allShapes()).find((s) => s.fallback && s.query.includes(`selec id from ${ITEMS}`)),
      {
        what: 'the fallback shape of the misspelled query',
      },
    );
    assert.match(shape.fingerprint, /^u[0-9a-f]{15}$/);
    assert.deepEqual(
      { calls: shape.calls, errors: shape.errors, errors_by_class: shape.errors_by_class },
      { calls: 1, errors: 1, errors_by_class: { '42': 1 } },
    );
    assert.ok(!shape.query.includes('bad-sql'), `fallback query ${JSON.stringify(shape.query)}`);
  });

  test('a slow query is logged with its shape and session but without its literal values', {
    timeout: 30_000,
  }, async () => {
    const client = await connect('pgw-slow-app');
    const text = `select pg_sleep(0.03), '${SECRET}' as tag, id from ${ITEMS} where id = 1`;
    await client.query(text);
    const fingerprint = fingerprintSync(text);
    const line = await waitFor(
      () => pgw.logLines.find((l) => l.msg === 'slow query' && l.fingerprint === fingerprint),
      { what: 'the slow query log line' },
    );
    assert.equal(line.query, `select pg_sleep($1), $2 as tag, id from ${ITEMS} where id = $3`);
    assert.ok(
      typeof line.duration_ms === 'number' && line.duration_ms >= 30,
      `duration_ms ${String(line.duration_ms)}`,
    );
    assert.equal(line.rows, 1);
    assert.equal(line.user, db.user);
    assert.equal(line.database, db.database);
    assert.equal(line.application_name, 'pgw-slow-app');
    assert.match(String(line.client), /127\.0\.0\.1/);
    const leaks = pgw.logLines.filter((l) => JSON.stringify(l).includes(SECRET));
    assert.deepEqual(leaks, [], 'no log line holds the literal');
  });

  test('a query faster than slow_query_ms is not logged', { timeout: 30_000 }, async () => {
    const client = await connect();
    await client.query(`select id from ${ITEMS} where id = 0`); // a new backend's first query loads its caches
    const text = `select note from ${ITEMS} where id = 3 and note is not null`;
    await client.query(text);
    const fingerprint = fingerprintSync(text);
    await shapeWhen(fingerprint, (s) => s.calls >= 1, 'the fast query recorded');
    assert.equal(
      pgw.logLines.some((l) => l.fingerprint === fingerprint),
      false,
    );
  });

  describe('the admin API', () => {
    test('requests without a token or with a wrong one get 401', { timeout: 10_000 }, async () => {
      for (const token of [null, 'wrong-token', 'test-admin-token-0123456788']) {
        for (const path of ['/api/shapes', '/metrics', '/readyz']) {
          const { status, body } = await pgw.api(path, { token });
          assert.equal(status, 401, `${path} with token ${String(token)}`);
          assert.match(String(body.error), /bearer token/);
        }
      }
    });

    test('/healthz answers 200 without a token', { timeout: 10_000 }, async () => {
      const { status } = await pgw.api('/healthz', { token: null });
      assert.equal(status, 200);
    });

    test('/readyz answers 200 while the upstream is reachable', { timeout: 10_000 }, async () => {
      const { status, body } = await pgw.api('/readyz');
      assert.equal(status, 200, JSON.stringify(body));
    });

    test('shapes are sorted by the requested key and cut to the limit', { timeout: 30_000 }, async () => {
      const client = await connect();
      for (let i = 0; i < 6; i++) await client.query(`select id from ${ITEMS} where id = ${i} or note = 'sorted'`);
      for (let i = 0; i < 3; i++) await client.query(`select pg_sleep(0.025), id from ${ITEMS} where id = ${i}`);
      await waitFor(async () => (await allShapes()).length >= 3, { what: 'a few shapes' });

      const keys = { calls: 'calls', total_time: 'total_ms', p95: 'p95_ms', mean: 'mean_ms' } as const;
      for (const [sort, field] of Object.entries(keys)) {
        const { status, body } = await pgw.api(`/api/shapes?sort=${sort}&limit=10000`);
        assert.equal(status, 200);
        const values = (body as ShapeSummary[]).map((s) => s[field]);
        assert.deepEqual(
          values,
          [...values].sort((a, b) => b - a),
          `sorted by ${sort}`,
        );
        const limited = await pgw.api(`/api/shapes?sort=${sort}&limit=2`);
        assert.deepEqual(
          (limited.body as ShapeSummary[]).map((s) => s.fingerprint),
          (body as ShapeSummary[]).slice(0, 2).map((s) => s.fingerprint),
          `limit=2 sorted by ${sort}`,
        );
      }
    });

    test('a bad sort or limit gets 400 with a message that says what is allowed', { timeout: 10_000 }, async () => {
      const sort = await pgw.api('/api/shapes?sort=fastest');
      assert.equal(sort.status, 400);
      assert.match(sort.body.error, /sort must be one of total_time, calls, p95, mean/);
      for (const limit of ['0', '-1', 'abc', '1.5', '10001', '']) {
        const { status, body } = await pgw.api(`/api/shapes?limit=${limit}`);
        assert.equal(status, 400, `limit=${limit}`);
        assert.match(body.error, /limit must be an integer from 1 to 10000/, `limit=${limit}`);
      }
    });

    test('an unknown fingerprint gets 404', { timeout: 10_000 }, async () => {
      const { status, body } = await pgw.api('/api/shapes/0123456789abcdef');
      assert.equal(status, 404);
      assert.match(body.error, /0123456789abcdef/);
    });

    test("a shape's detail has its latency series, whose points add up to its calls", { timeout: 30_000 }, async () => {
      const client = await connect();
      const text = `select note from ${ITEMS} where id = $1 and note like 'series%'`;
      for (let i = 0; i < 5; i++) await client.query(text, [i]);
      const shape = await shapeWhen(fingerprintSync(text), (s) => s.calls >= 5, 'five calls');
      const { body } = await pgw.api(`/api/shapes/${shape.fingerprint}`);
      const series = (body as { series: { t: number; calls: number; p50_ms: number }[] }).series;
      assert.ok(Array.isArray(series) && series.length >= 1, `series ${JSON.stringify(series)}`);
      assert.equal(
        series.reduce((sum, p) => sum + p.calls, 0),
        5,
      );
      for (const p of series) {
        assert.equal(p.t % (pgw.config.series_bucket_s * 1000), 0, 'points start on bucket boundaries');
        assert.ok(p.p50_ms > 0, `p50 ${p.p50_ms}`);
      }
    });
  });

  describe('/metrics', () => {
    test('is valid Prometheus text with HELP and TYPE for every family', { timeout: 10_000 }, async () => {
      const { status, body } = await pgw.api('/metrics');
      assert.equal(status, 200);
      assert.equal(typeof body, 'string');
      const families = parsePrometheusText(body as string);
      assert.ok(families.size >= 10, `${families.size} families`);
    });

    test('counts every statement in pgwarden_queries_total', { timeout: 30_000 }, async () => {
      const before = await queriesTotal();
      const client = await connect();
      for (let i = 0; i < 7; i++) await client.query(`select ${i} as n from ${ITEMS} limit 1`);
      await waitFor(async () => (await queriesTotal()) >= before + 7, { what: 'seven more queries counted' });
    });

    test('has per-shape series that agree with the API', { timeout: 30_000 }, async () => {
      const client = await connect();
      const text = `select count(*) from ${ITEMS} where note like $1`;
      for (let i = 0; i < 4; i++) await client.query(text, [`metrics-${i}%`]);
      const fingerprint = fingerprintSync(text);
      const shape = await shapeWhen(fingerprint, (s) => s.calls >= 4, 'four calls');
      const families = parsePrometheusText((await pgw.api('/metrics')).body as string);
      const calls = families
        .get('pgwarden_shape_calls_total')
        ?.samples.find((s) => s.labels.fingerprint === fingerprint);
      assert.equal(calls?.value, shape.calls);
      const info = families.get('pgwarden_shape_info')?.samples.find((s) => s.labels.fingerprint === fingerprint);
      assert.equal(info?.labels.query, shape.query);
      const latency = families.get('pgwarden_shape_latency_seconds');
      assert.equal(latency?.type, 'histogram');
      const ofShape = latency!.samples.filter((s) => s.labels.fingerprint === fingerprint);
      const count = ofShape.find((s) => s.name === 'pgwarden_shape_latency_seconds_count');
      assert.equal(count?.value, shape.calls, 'every call is in the histogram');
      const sum = ofShape.find((s) => s.name === 'pgwarden_shape_latency_seconds_sum');
      assert.ok(
        sum && Math.abs(sum.value * 1000 - shape.total_ms) < 0.01,
        `sum ${sum?.value} s vs ${shape.total_ms} ms`,
      );
      // The median call falls in the first bucket whose cumulative count reaches half of the calls.
      const buckets = ofShape.filter((s) => s.name === 'pgwarden_shape_latency_seconds_bucket');
      const median = buckets.find((b) => b.value >= shape.calls / 2)!;
      const below = buckets[buckets.indexOf(median) - 1];
      assert.ok(
        shape.p50_ms <= Number(median.labels.le) * 1000 * 1.02,
        `p50 ${shape.p50_ms} ms within the median's bucket (le ${median.labels.le})`,
      );
      if (below)
        assert.ok(
          shape.p50_ms >= Number(below.labels.le) * 1000 * 0.98,
          `p50 ${shape.p50_ms} ms above the bucket below (le ${below.labels.le})`,
        );
    });

    test('holds no literal value', { timeout: 10_000 }, async () => {
      const client = await connect();
      await client.query(`select '${SECRET}' as metrics_tag, id from ${ITEMS} where id = 2`);
      await waitFor(async () => (await allShapes()).some((s) => s.query.includes('as metrics_tag')), {
        what: 'the tagged query recorded',
      });
      const { body } = await pgw.api('/metrics');
      assert.ok(!(body as string).includes(SECRET));
    });

    async function queriesTotal(): Promise<number> {
      const families = parsePrometheusText((await pgw.api('/metrics')).body as string);
      const sample = families.get('pgwarden_queries_total')?.samples[0];
      assert.ok(sample, 'pgwarden_queries_total is exported');
      return sample.value;
    }
  });
});

describe('query shapes with log_query_values', () => {
  let pgw: TestApp;

  before(async () => {
    pgw = await startTestApp({ slow_query_ms: 0, log_query_values: true });
  });

  after(async () => {
    await pgw?.stop();
  });

  test('the slow query log line holds the statement text with its values', { timeout: 30_000 }, async () => {
    const client = new pg.Client({ connectionString: pgw.url() });
    await client.connect();
    try {
      await client.query(`select '${SECRET}' as opted_in`);
    } finally {
      await client.end();
    }
    const line = await waitFor(
      () => pgw.logLines.find((l) => l.msg === 'slow query' && String(l.query).includes('opted_in')),
      { what: 'the log line' },
    );
    assert.equal(line.text, `select '${SECRET}' as opted_in`);
    assert.equal(line.query, 'select $1 as opted_in');
  });
});
