// Client SQL is never planned with more privileges than the client's own role.
// Planning folds IMMUTABLE functions, so a client who can create one used to run
// code as the monitoring role by getting a statement sampled: here a role with no
// access to a table reads it out through a session advisory lock taken by the
// monitor (visible to anyone in pg_locks), and occupies the monitor with pg_sleep.
// The monitoring role below is set up as the docs once said (pg_read_all_data).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { planTimeReferences } from '../../src/plans/guard.ts';
import { startupSettings } from '../../src/proxy/settings.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';

const SECRET = 4242;
const ATTACKER = 'pgw_priv_attacker';
const MONITOR = 'pgw_priv_monitor';
const TENANT = 'pgw_priv_tenant';
const OTHER_DB = 'pgw_priv_other';
const PASSWORD = 'pgw-priv-pw';
/** The membership docs/operations.md asks for: SET ROLE allowed, privileges not inherited (PostgreSQL 16+). */
const MEMBERSHIP = Number(process.env.PGWARDEN_TEST_PG_VERSION ?? 0) >= 16 ? 'with inherit false, set true' : '';

function urlFor(user: string, database = testDatabase().database): string {
  const url = new URL(testDatabase().url);
  url.username = user;
  url.password = user === testDatabase().user ? url.password : PASSWORD;
  url.pathname = `/${database}`;
  return url.href;
}

/** A URL through pgwarden, with the role's password. */
function via(app: TestApp, user: string, database?: string): string {
  const url = new URL(app.url(user, database));
  if (user !== testDatabase().user) url.password = PASSWORD;
  return url.href;
}

async function query(url: string, sql: string, options?: string): Promise<pg.QueryResult> {
  const client = new pg.Client({ connectionString: url, ...(options ? { options } : {}) });
  await client.connect();
  try {
    return await client.query(sql);
  } finally {
    await client.end();
  }
}

/** The shape whose normalized text contains `needle`, once the sampler has dealt with it. */
async function sampledShape(app: TestApp, needle: string): Promise<{ plans: any }> {
  return waitFor(
    async () => {
      const { body } = await app.api('/api/shapes?limit=500');
      const shape = (body as { fingerprint: string; query: string }[]).find((s) => s.query.includes(needle));
      if (!shape) return undefined;
      const detail = (await app.api(`/api/shapes/${shape.fingerprint}`)).body;
      const plans = detail.plans;
      return plans && (plans.current !== null || plans.last_error !== null || plans.not_sampled) ? detail : undefined;
    },
    { timeoutMs: 30_000, what: `a sampled shape containing ${needle}` },
  );
}

async function secretLockHeld(): Promise<boolean> {
  return withClient(async (c) => {
    const { rows } = await c.query(`select 1 from pg_locks where locktype = 'advisory' and objid = $1 and granted`, [
      SECRET,
    ]);
    return rows.length > 0;
  });
}

async function superuser(sql: string): Promise<void> {
  await withClient((c) => c.query(sql));
}

describe('planTimeReferences', () => {
  test('collects called functions, spelled and implied operators and relations', async () => {
    const refs = await planTimeReferences(
      "select s.f(x), lower(y) from a join b.c using (id) where z between 1 and 2 and w like 'q' and v !~ 'r' and u @@@ any (select 1) order by 1",
    );
    assert.deepEqual([...refs.functions].sort(), ['f', 'lower']);
    assert.deepEqual([...refs.relations].sort(), ['a', 'c']);
    for (const text of [
      'insert into s.t1 values (1)',
      'update t1 set a = 1',
      'delete from t1',
      'merge into t1 using t2 on true when matched then delete',
    ]) {
      assert.ok((await planTimeReferences(text)).relations.includes('t1'), text);
    }
    for (const op of ['=', '<', '<=', '>=', '~~', '!~', '@@@']) assert.ok(refs.operators.includes(op), op);
  });

  test('text that does not parse is not sampled', async () => {
    await assert.rejects(
      planTimeReferences('select from where'),
      /^NotSampled: not sampled: the statement does not parse/,
    );
  });
});

describe('startupSettings', () => {
  test('startup parameters and -c options are settings; user, database and options are not', () => {
    const settings = startupSettings(
      new Map([
        ['user', 'app'],
        ['database', 'shop'],
        ['search_path', 'a'],
        ['options', '-c search_path=tenant_b -cplan_cache_mode=force_generic_plan --work-mem=8MB -c x=a\\ b'],
      ]),
    );
    assert.deepEqual(
      [...settings],
      [
        ['search_path', 'tenant_b'],
        ['plan_cache_mode', 'force_generic_plan'],
        ['work_mem', '8MB'],
        ['x', 'a b'],
      ],
    );
  });
});

describe('EXPLAIN sampling and client code', () => {
  let app: TestApp;

  before(async () => {
    await superuser(`
      drop schema if exists ${ATTACKER} cascade;
      drop table if exists pgw_priv_secret;
      drop role if exists ${ATTACKER};
      drop role if exists ${MONITOR};
      create role ${MONITOR} login password '${PASSWORD}';
      grant pg_read_all_data, pg_monitor to ${MONITOR};
      create role ${ATTACKER} login password '${PASSWORD}';
      create table pgw_priv_secret (v bigint);
      insert into pgw_priv_secret values (${SECRET});
      revoke all on pgw_priv_secret from public;
      create schema ${ATTACKER} authorization ${ATTACKER};
      create table ${ATTACKER}.items (id int primary key, label text);
      alter table ${ATTACKER}.items owner to ${ATTACKER};
      grant ${ATTACKER} to ${MONITOR} ${MEMBERSHIP};`);
    // The attacker's own code: harmless when the attacker runs it (no access to
    // the table, or the session's own role after RESET ROLE), harmful as the monitor.
    await query(
      urlFor(ATTACKER),
      `
      create function ${ATTACKER}.leak() returns int language plpgsql immutable as $$
      declare s bigint;
      begin
        select v into s from public.pgw_priv_secret limit 1;
        perform pg_advisory_lock(s);
        return 1;
      exception when insufficient_privilege then return 0;
      end $$;
      create function ${ATTACKER}.escape() returns int language plpgsql immutable as $$
      declare s bigint;
      begin
        perform set_config('role', 'none', true); -- out of SET ROLE, back to the session's user
        select v into s from public.pgw_priv_secret limit 1;
        perform pg_advisory_lock(s);
        return 1;
      exception when insufficient_privilege then return 0;
      end $$;
      create domain ${ATTACKER}.quiet as int default ${ATTACKER}.leak();
      create table ${ATTACKER}.notes (id int, n ${ATTACKER}.quiet);
      create function ${ATTACKER}.nap() returns int language plpgsql immutable as $$
      begin
        perform set_config('role', 'none', true);
        if session_user::text = '${ATTACKER}' then return 0; end if;
        perform pg_sleep(4);
        return 1;
      end $$;`,
    );
    app = await startTestApp({ monitor_url: urlFor(MONITOR), plan_samples_per_second: 50 });
  });

  after(async () => {
    await app?.stop();
    await superuser(`
      drop schema if exists ${ATTACKER} cascade;
      drop table if exists pgw_priv_secret;
      drop owned by ${MONITOR};
      drop role if exists ${ATTACKER};
      drop role if exists ${MONITOR};`);
  });

  test('a function folded while planning cannot read a table the client cannot read', async () => {
    const { rows } = await query(
      via(app, ATTACKER),
      `select ${ATTACKER}.leak() as x from ${ATTACKER}.items where id = 1 union all select 7`,
    );
    assert.deepEqual(rows, [{ x: 7 }]);
    const shape = await sampledShape(app, `${ATTACKER}.leak()`);
    assert.equal(await secretLockHeld(), false, 'the monitor took an advisory lock keyed by the secret');
    assert.match(
      shape.plans.not_sampled ?? '',
      /^not sampled: function leak can run pgw_priv_attacker\.leak\(\), owned by pgw_priv_attacker/,
    );
    const metrics = (await app.api('/metrics')).body as string;
    assert.match(metrics, /^pgwarden_plan_samples_refused_total [1-9]/m);
  });

  test('RESET ROLE inside the function does not bring back the monitor', async () => {
    await query(via(app, ATTACKER), `select ${ATTACKER}.escape() as x from ${ATTACKER}.items`);
    const shape = await sampledShape(app, `${ATTACKER}.escape()`);
    assert.equal(await secretLockHeld(), false, 'the monitor took an advisory lock keyed by the secret');
    assert.match(shape.plans.not_sampled ?? '', /^not sampled: /);
  });

  test('a domain default reached by an INSERT is checked like a called function', async () => {
    await query(via(app, ATTACKER), `insert into ${ATTACKER}.notes (id) values (1)`);
    const shape = await sampledShape(app, `insert into ${ATTACKER}.notes`);
    assert.equal(await secretLockHeld(), false, 'the monitor took an advisory lock keyed by the secret');
    assert.match(
      shape.plans.not_sampled ?? '',
      /^not sampled: a relation it reads can run pgw_priv_attacker\.leak\(\)/,
    );
  });

  test('a sleeping function does not occupy the monitor', async () => {
    let sleeping = 0;
    let watching = true;
    // Watch the monitor's connections until the sample has been dealt with (the nap lasts 4 s).
    const watcher = withClient(async (c) => {
      while (watching) {
        const { rows } = await c.query(`select 1 from pg_stat_activity where usename = $1 and wait_event = 'PgSleep'`, [
          MONITOR,
        ]);
        sleeping += rows.length;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    });
    await query(via(app, ATTACKER), `select ${ATTACKER}.nap() as x from ${ATTACKER}.items`);
    const shape = await sampledShape(app, `${ATTACKER}.nap()`).finally(() => (watching = false));
    await watcher;
    assert.equal(sleeping, 0, 'a monitoring connection slept in the client function');
    assert.match(shape.plans.not_sampled ?? '', /^not sampled: /);
  });

  test("the client's plain statements are still planned, as the client's role", async () => {
    await query(via(app, ATTACKER), `select label from ${ATTACKER}.items where id = 42`);
    const shape = await sampledShape(app, `select label from ${ATTACKER}.items where id =`);
    assert.equal(shape.plans.not_sampled, null);
    assert.equal(shape.plans.current?.nodes[0], `Index Scan using items_pkey on ${ATTACKER}.items`);
  });

  test("a superuser's C function is planned as the client; a superuser's PL/pgSQL function is not planned", async () => {
    await superuser(`
      create or replace function public.pgw_priv_abs(int) returns int language internal immutable strict as 'int4abs';
      create or replace function public.pgw_priv_helper_user(int) returns int language plpgsql immutable as $$
        begin return pgw_priv_helper(abs($1)); end $$;
      create or replace function public.pgw_priv_helper(int) returns int language sql immutable as 'select $1';`);
    try {
      await query(via(app, ATTACKER), `select public.pgw_priv_abs(id) from ${ATTACKER}.items where id = 44`);
      const compiled = await sampledShape(app, 'select public.pgw_priv_abs(id)');
      assert.equal(compiled.plans.not_sampled, null);
      assert.match(compiled.plans.current?.nodes[0] ?? '', /using items_pkey on \w+\.items/);
      await query(via(app, ATTACKER), `select public.pgw_priv_helper_user(id) from ${ATTACKER}.items where id = 45`);
      const pl = await sampledShape(app, 'select public.pgw_priv_helper_user(id)');
      assert.match(pl.plans.not_sampled ?? '', /written in plpgsql, whose calls follow the session's search_path/);
    } finally {
      await superuser(
        'drop function public.pgw_priv_abs(int); drop function public.pgw_priv_helper_user(int); drop function public.pgw_priv_helper(int)',
      );
    }
  });

  test('without membership in the role, statements reaching code outside pg_catalog are not sampled', async () => {
    await superuser(`revoke ${ATTACKER} from ${MONITOR}`);
    try {
      await query(via(app, ATTACKER), `select ${ATTACKER}.leak() as y, 1 as z from ${ATTACKER}.items`);
      const shape = await sampledShape(app, `${ATTACKER}.leak() as y`);
      assert.equal(await secretLockHeld(), false);
      assert.match(
        shape.plans.not_sampled ?? '',
        /outside pg_catalog, and the monitoring role cannot SET ROLE to the session's role/,
      );
      // pg_catalog code only: still sampled, as the monitor.
      await query(via(app, ATTACKER), `select lower(label) from ${ATTACKER}.items where id = 43`);
      const plain = await sampledShape(app, `select lower(label) from ${ATTACKER}.items`);
      assert.equal(plain.plans.not_sampled, null);
      assert.equal(plain.plans.current?.nodes[0], `Index Scan using items_pkey on ${ATTACKER}.items`);
    } finally {
      await superuser(`grant ${ATTACKER} to ${MONITOR} ${MEMBERSHIP}`);
    }
  });
});

describe("EXPLAIN plans with the session's role settings, schema and database", () => {
  let app: TestApp;

  before(async () => {
    await superuser(`
      drop schema if exists pgw_tenant_a cascade;
      drop schema if exists pgw_tenant_b cascade;
      drop table if exists pgw_priv_items;`);
    await superuser(`drop database if exists ${OTHER_DB}`);
    await superuser(`
      drop role if exists ${TENANT};
      drop role if exists ${MONITOR};
      create role ${MONITOR} login password '${PASSWORD}';
      grant pg_monitor to ${MONITOR};
      create role ${TENANT} login password '${PASSWORD}';
      grant ${TENANT} to ${MONITOR} ${MEMBERSHIP};
      alter role ${TENANT} set enable_indexscan = off;
      alter role ${TENANT} set enable_bitmapscan = off;
      create table pgw_priv_items (id int primary key, label text);
      insert into pgw_priv_items select g, 'x' || g from generate_series(1, 20000) g;
      analyze pgw_priv_items;
      grant select on pgw_priv_items to ${TENANT};
      create schema pgw_tenant_a;
      create schema pgw_tenant_b;
      create table pgw_tenant_a.users (id int, email text);
      create table pgw_tenant_b.users (id int, email text);
      insert into pgw_tenant_a.users select g, 'u' || g from generate_series(1, 20000) g;
      insert into pgw_tenant_b.users select g, 'u' || g from generate_series(1, 20000) g;
      create index pgw_tenant_a_email on pgw_tenant_a.users (email);
      analyze pgw_tenant_a.users;
      analyze pgw_tenant_b.users;
      grant usage on schema pgw_tenant_a, pgw_tenant_b to public;
      grant select on pgw_tenant_a.users, pgw_tenant_b.users to public;
      drop table if exists pgw_priv_pcm;
      create table pgw_priv_pcm (id int, v int);
      insert into pgw_priv_pcm select g, g from generate_series(1, 20000) g;
      create index pgw_priv_pcm_small on pgw_priv_pcm (id) where id < 100;
      grant select on pgw_priv_pcm to public;
      analyze pgw_priv_pcm;`);
    await superuser(`create database ${OTHER_DB}`);
    await query(
      urlFor(testDatabase().user, OTHER_DB),
      `create table pgw_only_here (id int primary key); insert into pgw_only_here select generate_series(1, 5000); analyze pgw_only_here;
       grant select on pgw_only_here to public;`,
    );
    app = await startTestApp({ monitor_url: urlFor(MONITOR), plan_samples_per_second: 50 });
  });

  after(async () => {
    await app?.stop();
    await superuser(`
      drop schema if exists pgw_tenant_a cascade;
      drop schema if exists pgw_tenant_b cascade;
      drop table if exists pgw_priv_items;
      drop table if exists pgw_priv_pcm;`);
    await superuser(`drop database if exists ${OTHER_DB} with (force)`);
    await superuser(`
      drop owned by ${TENANT};
      drop owned by ${MONITOR};
      drop role if exists ${TENANT};
      drop role if exists ${MONITOR};`);
  });

  test('ALTER ROLE ... SET reaches the sampled plan', async () => {
    // The monitor itself could not even read the table (only the tenant may), and
    // would use the primary key index.
    await query(via(app, TENANT), `select label from pgw_priv_items where id = 5`);
    const shape = await sampledShape(app, 'from pgw_priv_items where id');
    assert.equal(shape.plans.current?.nodes[0], 'Seq Scan on pgw_priv_items');
  });

  test('search_path from the startup options picks the tenant schema', async () => {
    await query(
      via(app, testDatabase().user),
      `select id from users where email = 'u7'`,
      '-c search_path=pgw_tenant_a',
    );
    const shape = await sampledShape(app, 'from users where email');
    assert.equal(shape.plans.current?.relations.join(','), 'pgw_tenant_a.users');
    assert.equal(shape.plans.current?.indexes.join(','), 'pgw_tenant_a.pgw_tenant_a_email');
  });

  test('search_path changed with SET is followed', async () => {
    const client = new pg.Client({ connectionString: via(app, testDatabase().user) });
    await client.connect();
    try {
      await client.query('set search_path = pgw_tenant_a');
      await client.query(`select id, email from users where email = 'u8'`);
    } finally {
      await client.end();
    }
    const shape = await sampledShape(app, 'select id, email from users where email');
    assert.equal(shape.plans.current?.indexes.join(','), 'pgw_tenant_a.pgw_tenant_a_email');
  });

  test('plan_cache_mode set by the session decides between the custom and the generic plan', async () => {
    const client = new pg.Client({ connectionString: via(app, testDatabase().user) });
    await client.connect();
    try {
      // A custom plan for id = 5 can use the partial index (id < 100); a generic plan cannot.
      await client.query('select v from pgw_priv_pcm where id = $1', [5]);
      await client.query("set plan_cache_mode = 'force_generic_plan'");
      await client.query('select v, id from pgw_priv_pcm where id = $1', [5]);
    } finally {
      await client.end();
    }
    const custom = await sampledShape(app, 'select v from pgw_priv_pcm where id');
    assert.deepEqual(custom.plans.current?.indexes, ['public.pgw_priv_pcm_small']);
    assert.equal(custom.plans.current?.kind, 'custom');
    const generic = await sampledShape(app, 'select v, id from pgw_priv_pcm where id');
    assert.deepEqual(generic.plans.current?.indexes, []);
    assert.equal(generic.plans.current?.kind, 'generic');
  });

  test("the session's database is explained there, not in the monitor URL's", async () => {
    await query(via(app, TENANT, OTHER_DB), `select id from pgw_only_here where id = 3`);
    const shape = await sampledShape(app, 'from pgw_only_here');
    assert.equal(shape.plans.last_error, null);
    assert.equal(shape.plans.current?.nodes[0], 'Seq Scan on pgw_only_here');
  });
});
