// Proves the test harness itself: the server run.ts provides is real, speaks all
// three authentication methods pgwarden must pass through, and waitFor fails loudly.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, describe, test } from 'node:test';
import pg from 'pg';
import { testDatabase, waitFor, withClient } from './database.ts';

const db = testDatabase();
const createdRoles: string[] = [];

function uniqueRole(kind: string): string {
  return `pgw_test_${kind}_${process.pid}_${randomBytes(4).toString('hex')}`;
}

async function createLoginRole(kind: 'md5' | 'scram-sha-256', password: string): Promise<string> {
  const role = uniqueRole(kind === 'md5' ? 'md5' : 'scram');
  await withClient(async (client) => {
    // PostgreSQL 18 warns that md5 is deprecated; the warning is expected here.
    client.on('notice', () => {});
    await client.query(`set password_encryption = '${kind}'`);
    await client.query(`create role ${role} login password '${password}'`);
  });
  createdRoles.push(role);
  return role;
}

async function storedPassword(role: string): Promise<string> {
  return withClient(async (client) => {
    const { rows } = await client.query<{ rolpassword: string }>(
      'select rolpassword from pg_authid where rolname = $1',
      [role],
    );
    return rows[0].rolpassword;
  });
}

type AuthRequest = 'md5' | 'sasl' | 'none';

/** Connects as role and reports which authentication request the server sent. */
async function connectAs(role: string, password: string): Promise<AuthRequest> {
  const client = new pg.Client({ host: db.host, port: db.port, database: db.database, user: role, password });
  let request: AuthRequest = 'none';
  client.connection.on('authenticationMD5Password', () => (request = 'md5'));
  client.connection.on('authenticationSASL', () => (request = 'sasl'));
  try {
    await client.connect();
    const { rows } = await client.query<{ current_user: string }>('select current_user');
    assert.equal(rows[0].current_user, role);
  } finally {
    await client.end().catch(() => {});
  }
  return request;
}

after(async () => {
  if (createdRoles.length === 0) return;
  await withClient(async (client) => {
    for (const role of createdRoles) await client.query(`drop role if exists ${role}`);
  });
});

describe('test PostgreSQL server', () => {
  test('answers select version() with the advertised major version', async () => {
    const version = await withClient(async (client) => {
      const { rows } = await client.query<{ version: string; num: string }>(
        "select version(), current_setting('server_version_num') as num",
      );
      return rows[0];
    });
    assert.match(version.version, /^PostgreSQL \d+/);
    const expected = process.env.PGWARDEN_TEST_PG_VERSION;
    if (expected) assert.equal(Math.floor(Number(version.num) / 10_000), Number(expected));
  });

  test('a role stored as md5 authenticates with md5', async () => {
    const role = await createLoginRole('md5', 'md5-secret');
    assert.match(await storedPassword(role), /^md5[0-9a-f]{32}$/);
    assert.equal(await connectAs(role, 'md5-secret'), 'md5');
  });

  test('a role stored as SCRAM authenticates with SCRAM-SHA-256', async () => {
    const role = await createLoginRole('scram-sha-256', 'scram-secret');
    assert.ok((await storedPassword(role)).startsWith('SCRAM-SHA-256$'));
    assert.equal(await connectAs(role, 'scram-secret'), 'sasl');
  });

  test('a wrong password is refused with SQLSTATE 28P01', async () => {
    const md5Role = await createLoginRole('md5', 'right');
    const scramRole = await createLoginRole('scram-sha-256', 'right');
    for (const role of [md5Role, scramRole]) {
      await assert.rejects(connectAs(role, 'wrong'), (error: unknown) => {
        assert.equal((error as { code?: string }).code, '28P01', `role ${role}`);
        return true;
      });
    }
  });

  test('the pgw_trust role logs in over TCP without a password', async () => {
    const created = await withClient(async (client) => {
      const { rowCount } = await client.query("select 1 from pg_roles where rolname = 'pgw_trust'");
      if (rowCount) return false;
      await client.query('create role pgw_trust login');
      return true;
    });
    if (created) createdRoles.push('pgw_trust');
    assert.equal(await connectAs('pgw_trust', 'ignored'), 'none');
  });
});

describe('waitFor', () => {
  test('returns the first value that is neither undefined nor false', async () => {
    let calls = 0;
    const value = await waitFor(() => (++calls >= 3 ? `ready after ${calls}` : undefined), { intervalMs: 1 });
    assert.equal(value, 'ready after 3');
  });

  test('times out naming what it waited for and the last result', async () => {
    await assert.rejects(
      waitFor(() => false, { timeoutMs: 100, intervalMs: 10, what: 'the replica to catch up' }),
      /^Error: waitFor: timed out after 100 ms waiting for the replica to catch up \(\d+ attempts; last result: false\)$/,
    );
  });

  test('reports the last error thrown by the check', async () => {
    await assert.rejects(
      waitFor(
        async () => {
          throw Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:1'), { code: 'ECONNREFUSED' });
        },
        { timeoutMs: 50, intervalMs: 10, what: 'the proxy to listen' },
      ),
      (error: Error) => {
        assert.match(
          error.message,
          /waiting for the proxy to listen .*last attempt threw: connect ECONNREFUSED 127\.0\.0\.1:1 \(ECONNREFUSED\)/,
        );
        assert.equal((error.cause as Error).message, 'connect ECONNREFUSED 127.0.0.1:1');
        return true;
      },
    );
  });

  test('does not let a hanging check outlive the deadline', async () => {
    const started = Date.now();
    await assert.rejects(
      waitFor(() => new Promise<never>(() => {}), { timeoutMs: 100, what: 'a check that never settles' }),
      /timed out after 100 ms waiting for a check that never settles \(1 attempt; no attempt completed\)/,
    );
    assert.ok(Date.now() - started < 1_000);
  });
});
