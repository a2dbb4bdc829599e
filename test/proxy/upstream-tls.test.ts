// TLS from pgwarden to the upstream, against a PostgreSQL server with ssl = on.

import assert from 'node:assert/strict';
import { execFileSync, execFile } from 'node:child_process';
import { promisify } from 'node:util';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { startPostgres, type PostgresServer } from '../harness/postgres.ts';
import { startProxy, type TestProxy } from '../harness/proxy.ts';
import { testDatabase } from '../harness/database.ts';

const haveOpenssl = (() => {
  try {
    execFileSync('openssl', ['version']);
    return true;
  } catch {
    return false;
  }
})();

describe('TLS toward the upstream', {
  timeout: 60_000,
  skip: haveOpenssl ? false : 'openssl is not installed (apt-get install -y openssl)',
}, () => {
  let dir: string;
  let cert: string;
  let key: string;
  let server: PostgresServer;
  const proxies: TestProxy[] = [];

  before(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-upstream-tls-'));
    cert = path.join(dir, 'server.crt');
    key = path.join(dir, 'server.key');
    execFileSync(
      'openssl',
      [
        'req',
        '-x509',
        '-newkey',
        'rsa:2048',
        '-nodes',
        '-days',
        '2',
        '-subj',
        '/CN=localhost',
        '-addext',
        'subjectAltName=DNS:localhost',
        '-keyout',
        key,
        '-out',
        cert,
      ],
      { stdio: 'ignore' },
    );
    fs.chmodSync(dir, 0o755);
    fs.chmodSync(cert, 0o644);
    fs.chmodSync(key, 0o600);
    if (process.getuid?.() === 0) {
      // PostgreSQL runs as the unprivileged 'postgres' user and wants its key to itself.
      const uid = Number(execFileSync('id', ['-u', 'postgres']).toString());
      const gid = Number(execFileSync('id', ['-g', 'postgres']).toString());
      fs.chownSync(key, uid, gid);
      fs.chownSync(cert, uid, gid);
    }
    server = await startPostgres({
      binDir: process.env.PGWARDEN_TEST_PG_BIN_DIR,
      extraConfig: { ssl: 'on', ssl_cert_file: cert, ssl_key_file: key },
    });
  });

  after(async () => {
    await Promise.all(proxies.map((p) => p.stop()));
    await server?.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function sslOfSession(proxy: TestProxy): Promise<boolean> {
    const client = new pg.Client({ host: '127.0.0.1', port: proxy.port, user: 'postgres', database: 'postgres' });
    await client.connect();
    try {
      return (await client.query('select ssl from pg_stat_ssl where pid = pg_backend_pid()')).rows[0].ssl;
    } finally {
      await client.end();
    }
  }

  test('upstream_tls require: the session to the server is encrypted while the client speaks plain TCP', async () => {
    const proxy = await startProxy({ upstreamHost: '127.0.0.1', upstreamPort: server.port, upstreamTls: 'require' });
    proxies.push(proxy);
    assert.equal(await sslOfSession(proxy), true);
  });

  test('upstream_tls prefer falls back to plain TCP against a server without TLS', async () => {
    const proxy = await startProxy({ upstreamTls: 'prefer' });
    proxies.push(proxy);
    assert.equal(await sslOfSession(proxy), false);
  });

  test('upstream_tls require against a server without TLS gives the client 08006', async () => {
    const proxy = await startProxy({ upstreamTls: 'require' });
    proxies.push(proxy);
    const db = testDatabase();
    const client = new pg.Client({ host: '127.0.0.1', port: proxy.port, user: db.user, database: db.database });
    await assert.rejects(client.connect(), (err: pg.DatabaseError) => {
      assert.equal(err.code, '08006');
      assert.match(err.message, /pgwarden: .*does not support TLS/);
      return true;
    });
  });

  // A client without TLS toward pgwarden cannot bind to the server's TLS channel;
  // if it saw the server's SCRAM-SHA-256-PLUS offer, libpq and node-postgres would
  // refuse to log in ("server offered SCRAM-SHA-256-PLUS authentication over a
  // non-SSL connection"). pgwarden withdraws the offer on such legs.
  describe('SCRAM over a plain client leg and a TLS upstream (upstream_tls prefer)', () => {
    let proxy: TestProxy;
    before(async () => {
      const admin = new pg.Client({ host: '127.0.0.1', port: server.port, user: 'postgres', database: 'postgres' });
      await admin.connect();
      await admin.query("set password_encryption = 'scram-sha-256'");
      await admin.query(
        "drop role if exists pgw_scram_plain; create role pgw_scram_plain login password 'plain-secret'",
      );
      await admin.end();
      proxy = await startProxy({ upstreamHost: '127.0.0.1', upstreamPort: server.port, upstreamTls: 'prefer' });
      proxies.push(proxy);
    });

    test('psql logs in, and the upstream session is encrypted', async () => {
      const { stdout } = await promisify(execFile)(
        'psql',
        [
          '-X',
          '-At',
          '-c',
          'select current_user, (select ssl from pg_stat_ssl where pid = pg_backend_pid())',
          `host=127.0.0.1 port=${proxy.port} user=pgw_scram_plain dbname=postgres sslmode=disable`,
        ],
        { env: { ...process.env, PGPASSWORD: 'plain-secret' } },
      );
      assert.equal(stdout.trim(), 'pgw_scram_plain|t');
    });

    test('node-postgres logs in and is offered plain SCRAM-SHA-256 only', async () => {
      const client = new pg.Client({
        host: '127.0.0.1',
        port: proxy.port,
        user: 'pgw_scram_plain',
        password: 'plain-secret',
        database: 'postgres',
      });
      let offered: string[] = [];
      client.connection.on('authenticationSASL', (message: { mechanisms: string[] }) => (offered = message.mechanisms));
      await client.connect();
      try {
        assert.equal((await client.query('select current_user as u')).rows[0].u, 'pgw_scram_plain');
      } finally {
        await client.end();
      }
      assert.deepEqual(offered, ['SCRAM-SHA-256']);
    });
  });

  // SCRAM channel binding ties the exchange to the TLS session the server sees, and
  // is built to defeat any party in the middle: a client of a TLS-terminating
  // pgwarden in front of a TLS upstream must not ask for it (channel_binding=disable).
  test('SCRAM through TLS on both sides works with channel_binding=disable', async () => {
    const admin = new pg.Client({ host: '127.0.0.1', port: server.port, user: 'postgres', database: 'postgres' });
    await admin.connect();
    await admin.query("set password_encryption = 'scram-sha-256'");
    await admin.query("drop role if exists pgw_scram_tls; create role pgw_scram_tls login password 'scram-secret'");
    await admin.end();
    const proxy = await startProxy({
      upstreamHost: '127.0.0.1',
      upstreamPort: server.port,
      upstreamTls: 'require',
      tlsCert: fs.readFileSync(cert),
      tlsKey: fs.readFileSync(key),
    });
    proxies.push(proxy);
    const { stdout } = await promisify(execFile)(
      'psql',
      [
        '-X',
        '-At',
        '-c',
        'select current_user, (select ssl from pg_stat_ssl where pid = pg_backend_pid())',
        `host=127.0.0.1 port=${proxy.port} user=pgw_scram_tls dbname=postgres sslmode=require channel_binding=disable`,
      ],
      { env: { ...process.env, PGPASSWORD: 'scram-secret' } },
    );
    assert.equal(stdout.trim(), 'pgw_scram_tls|t');
  });
});
