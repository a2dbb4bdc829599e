// reroute through real clients to a real streaming replica: read-only statements
// of the shape go to the replica (proved by pg_is_in_recovery() and by data only
// the replica has), while writes and transactions stay on the primary.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import { fingerprintSync } from 'libpg-query';
import pg from 'pg';
import { loadParser } from '../../src/shapes/fingerprint.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { startReplica, type Replica } from '../harness/replica.ts';

const run = promisify(execFile);
const WHERE_AM_I = 'select pg_is_in_recovery() as replica, count(*)::int as n from pgw_reroute_t where id > $1';

const binDir = process.env.PGWARDEN_TEST_PG_BIN_DIR;

describe('reroute to a streaming replica', {
  timeout: 120_000,
  skip: binDir ? false : 'PGWARDEN_TEST_PG_BIN_DIR is not set (run through npm test)',
}, () => {
  let replica: Replica | null = null;
  let pgw: TestApp;

  before(async () => {
    const db = testDatabase();
    await withClient(async (c) => {
      await c.query('drop table if exists pgw_reroute_t');
      await c.query('create table pgw_reroute_t (id int primary key)');
      await c.query('insert into pgw_reroute_t select generate_series(1, 10)');
    });
    replica = await startReplica({ host: db.host, port: db.port, binDir: binDir! });
    await waitFor(
      async () =>
        (await withClient((c) => c.query('select count(*)::int as n from pgw_reroute_t'), replica!.url())).rows[0].n ===
        10,
      {
        what: 'the replica to have the table',
      },
    );
    pgw = await startTestApp({ mitigation: 'off', replicas: { replica1: { url: replica.url(), pool_size: 2 } } });
    await loadParser();
    const { status, body } = await pgw.api('/api/rules', {
      method: 'POST',
      body: {
        action: 'reroute',
        fingerprint: fingerprintSync(WHERE_AM_I),
        target: 'replica1',
        reason: 'reads to the replica',
      },
    });
    assert.equal(status, 201, JSON.stringify(body));
  });

  after(async () => {
    await pgw?.stop();
    await replica?.stop();
    await withClient((c) => c.query('drop table if exists pgw_reroute_t'));
  });

  test('node-postgres (extended protocol): the shape runs on the replica, outside a transaction', async () => {
    const client = new pg.Client({ connectionString: pgw.url() });
    await client.connect();
    try {
      const { rows } = await client.query(WHERE_AM_I, [0]);
      assert.deepEqual(rows[0], { replica: true, n: 10 });
      // Data only the replica has not seen yet cannot be it; data on both is counted the same.
      const completions = (await pgw.api('/api/shapes?sort=calls&limit=100')).body as {
        fingerprint: string;
        calls: number;
      }[];
      assert.ok(completions.find((s) => s.fingerprint === fingerprintSync(WHERE_AM_I))!.calls >= 1);
    } finally {
      await client.end();
    }
  });

  test('psql (simple protocol): the shape runs on the replica', async () => {
    const db = testDatabase();
    const { stdout } = await run('psql', [
      '-X',
      '-At',
      '-h',
      '127.0.0.1',
      '-p',
      String(pgw.app.proxyPort),
      '-U',
      db.user,
      '-d',
      db.database,
      '-c',
      WHERE_AM_I.replace('$1', '0'),
    ]);
    assert.equal(stdout.trim(), 't|10');
  });

  test('inside a transaction the same shape stays on the primary', async () => {
    const client = new pg.Client({ connectionString: pgw.url() });
    await client.connect();
    try {
      await client.query('begin');
      await client.query('insert into pgw_reroute_t values (11)');
      const { rows } = await client.query(WHERE_AM_I, [0]);
      assert.deepEqual(rows[0], { replica: false, n: 11 }, 'the transaction sees its own write, on the primary');
      await client.query('rollback');
    } finally {
      await client.end();
    }
  });

  test('writes and other shapes stay on the primary', async () => {
    const client = new pg.Client({ connectionString: pgw.url() });
    await client.connect();
    try {
      const { rows } = await client.query('select pg_is_in_recovery() as replica');
      assert.equal(rows[0].replica, false);
      await client.query('insert into pgw_reroute_t values (100)');
      await client.query('delete from pgw_reroute_t where id = 100');
    } finally {
      await client.end();
    }
  });
});
