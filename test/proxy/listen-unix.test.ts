// listen_unix: clients that connect through a Unix socket directory, as they would
// to PostgreSQL (`psql -h /dir -p port`), reach the server through pgwarden.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { testDatabase, waitFor } from '../harness/database.ts';
import { startProxy, type TestProxy } from '../harness/proxy.ts';
import { conninfo, psql } from '../harness/clients.ts';

const db = testDatabase();

describe('listen_unix', () => {
  let dir: string;
  let proxy: TestProxy;
  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-unix-'));
    proxy = await startProxy({ unixSocketDir: dir });
  });
  after(async () => {
    await proxy.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('the socket is named .s.PGSQL.<port> as PostgreSQL names it', () => {
    assert.equal(proxy.server.unixSocket, path.join(dir, `.s.PGSQL.${proxy.port}`));
    assert.ok(fs.statSync(proxy.server.unixSocket!).isSocket());
  });

  test('psql -h DIR -p PORT runs queries through pgwarden', { timeout: 30_000 }, async () => {
    proxy.completions.length = 0;
    const result = await psql(conninfo({ host: dir, port: proxy.port, user: db.user, dbname: db.database }), [
      'select 40 + 2 as unix_answer',
    ]).done;
    assert.equal(result.code, 0, `psql failed: ${result.stderr}`);
    assert.equal(result.stdout.trim(), '42');
    await waitFor(() => proxy.completions.some((c) => c.text.includes('unix_answer')), {
      what: 'the query to be recorded',
    });
  });

  test('node-postgres connects through the socket directory', { timeout: 30_000 }, async () => {
    const client = new pg.Client({ host: dir, port: proxy.port, user: db.user, database: db.database });
    await client.connect();
    try {
      assert.equal((await client.query('select 1 as n')).rows[0].n, 1);
    } finally {
      await client.end();
    }
  });

  test('the socket file is removed when the proxy stops', { timeout: 30_000 }, async () => {
    const other = await startProxy({ unixSocketDir: dir });
    const file = other.server.unixSocket!;
    assert.ok(fs.existsSync(file));
    await other.stop();
    assert.equal(fs.existsSync(file), false);
  });
});
