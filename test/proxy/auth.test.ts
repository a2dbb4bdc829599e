// The connection startup through pgwarden, as clients see it: every authentication
// method passes through to PostgreSQL (trust, md5, SCRAM-SHA-256) for each kind of
// client, the server's own refusals reach the client, startup parameters arrive
// unchanged, BackendKeyData is the server's, and replication connections work.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import postgres from 'postgres';
import { serialize } from 'pg-protocol';
import type { DataRowMessage } from 'pg-protocol/dist/messages.js';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startProxy, type TestProxy } from '../harness/proxy.ts';
import { conninfo, psql } from '../harness/clients.ts';
import { RawConnection, sqlstate } from '../harness/wire.ts';

const db = testDatabase();
const suffix = `${process.pid}_${randomBytes(3).toString('hex')}`;

type Method = 'trust' | 'md5' | 'scram-sha-256';
interface Login {
  role: string;
  password?: string;
  /** The authentication request the server sends this role. */
  request: 'none' | 'md5' | 'sasl';
}

/** node-postgres through the proxy; reports which authentication request reached the client. */
async function nodePostgresLogin(
  proxy: TestProxy,
  role: string,
  password?: string,
): Promise<{ user: string; request: string }> {
  const client = new pg.Client({
    host: proxy.host,
    port: proxy.port,
    database: db.database,
    user: role,
    password: password ?? '',
  });
  let request = 'none';
  client.connection.on('authenticationMD5Password', () => (request = 'md5'));
  client.connection.on('authenticationSASL', () => (request = 'sasl'));
  await client.connect();
  try {
    const { rows } = await client.query<{ current_user: string }>('select current_user');
    return { user: rows[0].current_user, request };
  } finally {
    await client.end();
  }
}

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

describe('authentication through pgwarden', () => {
  let proxy: TestProxy;
  const logins = {} as Record<Method, Login>;
  let createdTrustRole = false;

  before(async () => {
    proxy = await startProxy();
    await withClient(async (client) => {
      client.on('notice', () => undefined); // PostgreSQL 18 warns that md5 is deprecated
      const { rowCount } = await client.query("select 1 from pg_roles where rolname = 'pgw_trust'");
      if (!rowCount) {
        await client.query('create role pgw_trust login');
        createdTrustRole = true;
      }
      for (const method of ['md5', 'scram-sha-256'] as const) {
        const role = `pgw_auth_${method === 'md5' ? 'md5' : 'scram'}_${suffix}`;
        const password = `pw-${method}-${randomBytes(4).toString('hex')}`;
        await client.query(`set password_encryption = '${method}'`);
        await client.query(`create role ${role} login password '${password}'`);
        logins[method] = { role, password, request: method === 'md5' ? 'md5' : 'sasl' };
      }
    });
    logins.trust = { role: 'pgw_trust', request: 'none' };
  });

  after(async () => {
    await proxy.stop();
    await withClient(async (client) => {
      for (const method of ['md5', 'scram-sha-256'] as const) {
        if (logins[method]) await client.query(`drop role if exists ${logins[method].role}`);
      }
      if (createdTrustRole) await client.query('drop role if exists pgw_trust');
    });
  });

  for (const method of ['trust', 'md5', 'scram-sha-256'] as const) {
    const a = method === 'md5' ? 'an' : 'a';
    test(`${a} ${method} login with node-postgres reaches the server's own authentication exchange`, {
      timeout: 30_000,
    }, async () => {
      const { role, password, request } = logins[method];
      const got = await nodePostgresLogin(proxy, role, password);
      assert.deepEqual(got, { user: role, request });
    });

    test(`${a} ${method} login with postgres.js succeeds`, { timeout: 30_000 }, async () => {
      const { role, password } = logins[method];
      const sql = postgresJs(proxy, { user: role, pass: password });
      try {
        const [row] = await sql<{ current_user: string }[]>`select current_user`;
        assert.equal(row.current_user, role);
      } finally {
        await sql.end();
      }
    });

    test(`${a} ${method} login with psql succeeds`, { timeout: 30_000 }, async () => {
      const { role, password } = logins[method];
      const result = await psql(
        conninfo({ host: proxy.host, port: proxy.port, user: role, dbname: db.database }),
        ['select current_user'],
        {
          password,
        },
      ).done;
      assert.equal(result.code, 0, `psql failed: ${result.stderr}`);
      assert.equal(result.stdout.trim(), role);
    });
  }

  for (const method of ['md5', 'scram-sha-256'] as const) {
    test(`a wrong ${method} password gives node-postgres the server's 28P01`, { timeout: 30_000 }, async () => {
      const { role } = logins[method];
      await assert.rejects(nodePostgresLogin(proxy, role, 'not-the-password'), (err: pg.DatabaseError) => {
        assert.equal(err.code, '28P01');
        assert.equal(err.message, `password authentication failed for user "${role}"`);
        return true;
      });
    });

    test(`a wrong ${method} password gives postgres.js the server's 28P01`, { timeout: 30_000 }, async () => {
      const { role } = logins[method];
      const sql = postgresJs(proxy, { user: role, pass: 'not-the-password' });
      try {
        await assert.rejects(sql`select 1`, (err: postgres.PostgresError) => {
          assert.equal(err.code, '28P01');
          assert.equal(err.message, `password authentication failed for user "${role}"`);
          return true;
        });
      } finally {
        await sql.end();
      }
    });
  }

  test('a refused login leaves the proxy serving other clients', { timeout: 30_000 }, async () => {
    const { role, password } = logins['scram-sha-256'];
    const bystander = new pg.Client({ connectionString: proxy.url() });
    await bystander.connect();
    try {
      await assert.rejects(nodePostgresLogin(proxy, role, 'wrong'), { code: '28P01' });
      const { rows } = await bystander.query<{ n: number }>('select 41 + 1 as n');
      assert.equal(rows[0].n, 42);
      assert.deepEqual(await nodePostgresLogin(proxy, role, password), { user: role, request: 'sasl' });
    } finally {
      await bystander.end();
    }
  });
});

describe('startup parameters and BackendKeyData through pgwarden', () => {
  let proxy: TestProxy;

  before(async () => {
    proxy = await startProxy();
  });
  after(() => proxy.stop());

  test('application_name and options -c reach the server unchanged', { timeout: 30_000 }, async () => {
    const client = new pg.Client({
      connectionString: proxy.url(),
      application_name: `pgw-auth-app-${suffix}`,
      options: '-c pgwarden.test=42 -c statement_timeout=12345',
    });
    await client.connect();
    try {
      const { rows } = await client.query(
        "select current_setting('application_name') as app, current_setting('pgwarden.test') as custom, current_setting('statement_timeout') as timeout",
      );
      assert.deepEqual(rows[0], { app: `pgw-auth-app-${suffix}`, custom: '42', timeout: '12345ms' });
    } finally {
      await client.end();
    }
  });

  test('a custom GUC sent as a startup parameter of its own reaches the server', { timeout: 30_000 }, async () => {
    const sql = postgresJs(proxy, {
      connection: { 'pgwarden.direct': 'from-startup', application_name: `pgw-pgjs-${suffix}` },
    });
    try {
      const [row] =
        await sql`select current_setting('pgwarden.direct') as custom, current_setting('application_name') as app`;
      assert.deepEqual({ ...row }, { custom: 'from-startup', app: `pgw-pgjs-${suffix}` });
    } finally {
      await sql.end();
    }
  });

  test('the process id postgres.js received in BackendKeyData is the backend serving it', {
    timeout: 30_000,
  }, async () => {
    const sql = postgresJs(proxy);
    try {
      const result = await sql<{ pid: number }[]>`select pg_backend_pid() as pid`;
      assert.ok(result.state.pid > 0, 'postgres.js saw a BackendKeyData');
      assert.equal(result.state.pid, result[0].pid);
    } finally {
      await sql.end();
    }
  });

  test('the BackendKeyData a raw client receives matches pg_backend_pid()', { timeout: 30_000 }, async () => {
    const raw = await RawConnection.open(proxy.port);
    try {
      raw.write(serialize.startup({ user: db.user, database: db.database }));
      const login = await raw.untilReady();
      const keys = login.filter((m) => m.name === 'backendKeyData') as unknown as {
        processID: number;
        secretKey: number;
      }[];
      assert.equal(keys.length, 1, `one BackendKeyData in ${login.map((m) => m.name).join(', ')}`);
      raw.write(serialize.query('select pg_backend_pid()'));
      const answer = await raw.untilReady();
      const row = answer.find((m) => m.name === 'dataRow') as DataRowMessage | undefined;
      assert.equal(Number(row?.fields[0]), keys[0].processID);
    } finally {
      raw.destroy();
    }
  });

  test('the secret key received through the proxy cancels the query when sent straight to the server', {
    timeout: 30_000,
  }, async () => {
    const client = new pg.Client({ connectionString: proxy.url(), application_name: `pgw-key-${suffix}` });
    await client.connect();
    try {
      const { processID, secretKey } = client as unknown as { processID: number; secretKey: number };
      const running = client.query('select pg_sleep(30)').then(
        () => null,
        (err: pg.DatabaseError) => err,
      );
      await waitFor(
        () =>
          withClient(async (direct) => {
            const { rowCount } = await direct.query(
              "select 1 from pg_stat_activity where pid = $1 and state = 'active' and query = 'select pg_sleep(30)'",
              [processID],
            );
            return rowCount === 1;
          }),
        { what: 'the proxied pg_sleep to be running on the backend named in BackendKeyData' },
      );
      // A CancelRequest on a connection of its own, to PostgreSQL itself.
      const cancel = await RawConnection.open(db.port, db.host);
      cancel.write(serialize.cancel(processID, secretKey));
      await cancel.closedAt;
      const error = await running;
      assert.equal(error?.code, '57014');
    } finally {
      await client.end();
    }
  });
});

describe('replication connections through pgwarden', () => {
  let proxy: TestProxy;

  before(async () => {
    proxy = await startProxy();
  });
  after(() => proxy.stop());

  test('IDENTIFY_SYSTEM on a replication=database connection answers with the server identity', {
    timeout: 30_000,
  }, async () => {
    const config: pg.ClientConfig & { replication: string } = {
      connectionString: proxy.url(),
      replication: 'database',
    };
    const client = new pg.Client(config);
    await client.connect();
    try {
      const { rows } = await client.query<{ systemid: string; timeline: number; dbname: string }>('IDENTIFY_SYSTEM');
      const expected = await withClient(async (direct) => {
        const result = await direct.query<{ id: string }>(
          'select system_identifier::text as id from pg_control_system()',
        );
        return result.rows[0].id;
      });
      assert.equal(rows.length, 1);
      assert.equal(rows[0].systemid, expected);
      assert.equal(rows[0].dbname, db.database);
      assert.ok(Number(rows[0].timeline) >= 1);
    } finally {
      await client.end();
    }
  });

  test('physical replication streams WAL through the proxy in CopyBoth mode', { timeout: 30_000 }, async () => {
    const marker = `pgw_walmark_${suffix}`;
    const raw = await RawConnection.open(proxy.port);
    try {
      raw.write(serialize.startup({ user: db.user, database: db.database, replication: 'true' }));
      await raw.untilReady();
      raw.write(serialize.query('IDENTIFY_SYSTEM'));
      const identify = await raw.untilReady();
      const row = identify.find((m) => m.name === 'dataRow') as DataRowMessage;
      const xlogpos = row.fields[2] as string;
      assert.match(xlogpos, /^[0-9A-F]+\/[0-9A-F]+$/);

      raw.write(serialize.query(`START_REPLICATION PHYSICAL ${xlogpos}`));
      const start = await raw.next();
      assert.equal(
        start?.name,
        'replicationStart',
        `expected CopyBothResponse, got ${start?.name} ${sqlstate(start) ?? ''}`,
      );

      await withClient((direct) => direct.query('select pg_logical_emit_message(false, $1, $2)', ['pgw', marker]));
      // Keepalives may come first; the record carrying the marker must arrive intact.
      const needle = Buffer.from(marker);
      for (;;) {
        const message = await raw.next();
        assert.ok(message, 'the replication stream ended before the marker arrived');
        if (message.name !== 'copyData') assert.fail(`unexpected ${message.name} while streaming`);
        const chunk = (message as unknown as { chunk: Buffer }).chunk;
        if (chunk[0] === 0x77 /* 'w' XLogData */ && chunk.includes(needle)) break;
      }

      // The client ends streaming; the server finishes the command and is ready again.
      raw.write(serialize.copyDone());
      const rest = await raw.untilReady();
      assert.ok(
        !rest.some((m) => m.name === 'error'),
        `no error after CopyDone: ${rest.map((m) => m.name).join(', ')}`,
      );
      raw.write(serialize.query('IDENTIFY_SYSTEM'));
      assert.ok((await raw.untilReady()).some((m) => m.name === 'dataRow'));
    } finally {
      raw.destroy();
    }
  });
});
