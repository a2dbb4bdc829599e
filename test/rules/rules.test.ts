// Rules through real clients: block (simple, extended, pipelined; in and out of
// transactions), shed, TTL, the API's validation, persistence across a restart.

import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import postgres from 'postgres';
import { fingerprintSync } from 'libpg-query';
import { runRules } from '../../src/cli/rules.ts';
import { loadParser } from '../../src/shapes/fingerprint.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';

const run = promisify(execFile);

/** The shape's fingerprint, as pgwarden computes it (libpg_query's). */
async function fingerprintOf(_pgw: TestApp, text: string, _values?: unknown[]): Promise<string> {
  await loadParser();
  return fingerprintSync(text);
}

describe('rules', { timeout: 120_000 }, () => {
  let pgw: TestApp;

  before(async () => {
    pgw = await startTestApp({ mitigation: 'off' });
    await withClient(async (c) => {
      await c.query('drop table if exists pgw_rules_t');
      await c.query('create table pgw_rules_t (id int primary key, v text)');
      await c.query("insert into pgw_rules_t select g, 'v' || g from generate_series(1, 100) g");
    });
  });

  after(async () => {
    await pgw.stop();
    await withClient((c) => c.query('drop table if exists pgw_rules_t'));
  });

  async function block(fingerprint: string, extra: Record<string, unknown> = {}): Promise<string> {
    const { status, body } = await pgw.api('/api/rules', {
      method: 'POST',
      body: { action: 'block', fingerprint, reason: 'test block', ...extra },
    });
    assert.equal(status, 201, JSON.stringify(body));
    return body.id;
  }

  async function lift(id: string): Promise<void> {
    const { status } = await pgw.api(`/api/rules/${id}`, { method: 'DELETE' });
    assert.equal(status, 200);
  }

  test('a blocked shape gets 42501 with node-postgres, simple and extended, and lifting it restores service', async () => {
    const fp = await fingerprintOf(pgw, 'select v from pgw_rules_t where id = $1', [1]);
    const id = await block(fp);
    const client = new pg.Client({ connectionString: pgw.url() });
    await client.connect();
    try {
      await assert.rejects(client.query('select v from pgw_rules_t where id = $1', [2]), (err: pg.DatabaseError) => {
        assert.equal(err.code, '42501');
        assert.match(err.message, new RegExp(`^pgwarden: query blocked by rule ${id}`));
        assert.match(err.detail ?? '', /test block/);
        assert.match(err.hint ?? '', /pgwarden rules delete/);
        return true;
      });
      await assert.rejects(
        client.query('select v from pgw_rules_t where id = 3'),
        { code: '42501' },
        'the same shape via the simple protocol',
      );
      assert.equal((await client.query('select 1 as other')).rows[0].other, 1, 'other shapes pass');
      await lift(id);
      assert.equal((await client.query('select v from pgw_rules_t where id = $1', [2])).rows[0].v, 'v2');
    } finally {
      await client.end();
    }
  });

  test('a blocked statement inside a transaction fails it: 25P02 next, and COMMIT rolls back', async () => {
    const fp = await fingerprintOf(pgw, 'select v from pgw_rules_t where id = $1 and v is not null', [1]);
    const id = await block(fp);
    const client = new pg.Client({ connectionString: pgw.url() });
    await client.connect();
    try {
      await client.query('begin');
      await client.query("update pgw_rules_t set v = 'changed' where id = 50");
      await assert.rejects(client.query('select v from pgw_rules_t where id = $1 and v is not null', [1]), {
        code: '42501',
      });
      await assert.rejects(client.query('select 1'), { code: '25P02' });
      assert.equal((await client.query('commit')).command, 'ROLLBACK');
      assert.equal((await client.query('select v from pgw_rules_t where id = 50')).rows[0].v, 'v50');
    } finally {
      await lift(id);
      await client.end();
    }
  });

  test('postgres.js pipelining: only the blocked queries fail, the others in the same pipeline succeed', async () => {
    const fp = await fingerprintOf(pgw, 'select v, id from pgw_rules_t where id = $1', [1]);
    const id = await block(fp);
    const sql = postgres(pgw.url(), { max: 1, prepare: false, onnotice: () => undefined });
    try {
      const results = await Promise.allSettled(
        Array.from({ length: 60 }, (_, i) =>
          i % 3 === 0
            ? sql.unsafe('select v, id from pgw_rules_t where id = $1', [i + 1])
            : sql.unsafe('select $1::int as n', [i]),
        ),
      );
      results.forEach((r, i) => {
        if (i % 3 === 0)
          assert.equal(r.status === 'rejected' && (r.reason as { code: string }).code, '42501', `query ${i}`);
        else assert.equal(r.status === 'fulfilled' && r.value[0].n, i, `query ${i}`);
      });
    } finally {
      await sql.end();
      await lift(id);
    }
  });

  test('psql gets the block too, and the rule can be narrowed to one application_name', async () => {
    const fp = await fingerprintOf(pgw, 'select count(*) from pgw_rules_t where v like $1', ['v1%']);
    const id = await block(fp, { application_name: 'blocked-app' });
    const db = testDatabase();
    const psql = (app: string) =>
      run(
        'psql',
        [
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
          "select count(*) from pgw_rules_t where v like 'v1%'",
        ],
        {
          env: { ...process.env, PGAPPNAME: app, PGPASSWORD: '' },
        },
      );
    await assert.rejects(psql('blocked-app'), (err: { stderr: string }) =>
      /pgwarden: query blocked by rule/.test(err.stderr),
    );
    assert.equal((await psql('other-app')).stdout.trim(), '12');
    await lift(id);
  });

  test('shed with max_concurrent 1: one runs, the rest get 53400 after the queue timeout, other shapes stay fast', async () => {
    const text = 'select pg_sleep($1::float8), 1 as shed_me';
    const fp = await fingerprintOf(pgw, text, [0]);
    const { status, body } = await pgw.api('/api/rules', {
      method: 'POST',
      body: { action: 'shed', fingerprint: fp, max_concurrent: 1, queue_timeout_ms: 200, reason: 'test shed' },
    });
    assert.equal(status, 201, JSON.stringify(body));
    const clients = await Promise.all(
      Array.from({ length: 4 }, async () => {
        const c = new pg.Client({ connectionString: pgw.url() });
        await c.connect();
        return c;
      }),
    );
    try {
      const started = Date.now();
      const slow = clients.slice(0, 3).map((c) => c.query(text, [1]));
      // While the slot is taken, another shape is not held up.
      const otherStarted = Date.now();
      await clients[3].query('select 42 as fast');
      const otherMs = Date.now() - otherStarted;
      const outcomes = await Promise.allSettled(slow);
      const ok = outcomes.filter((o) => o.status === 'fulfilled').length;
      const shed = outcomes.filter((o) => o.status === 'rejected' && (o.reason as { code: string }).code === '53400');
      assert.equal(ok, 1, 'one ran');
      assert.equal(shed.length, 2, 'two were shed');
      assert.match(((shed[0] as PromiseRejectedResult).reason as Error).message, /^pgwarden: query shed by rule/);
      assert.ok(otherMs < 500, `another shape took ${otherMs} ms`);
      assert.ok(Date.now() - started >= 900, 'the admitted query ran to completion');
    } finally {
      await lift(body.id);
      await Promise.all(clients.map((c) => c.end()));
    }
  });

  test('a rule with a TTL expires by itself', async () => {
    const fp = await fingerprintOf(pgw, 'select id from pgw_rules_t where v = $1', ['v1']);
    await block(fp, { ttl_s: 1 });
    await assert.rejects(
      withClient((c) => c.query('select id from pgw_rules_t where v = $1', ['v1']), pgw.url()),
      { code: '42501' },
    );
    await waitFor(async () => (await pgw.api('/api/rules')).body.length === 0, {
      timeoutMs: 5000,
      what: 'the rule to expire',
    });
    const { rows } = await withClient((c) => c.query('select id from pgw_rules_t where v = $1', ['v1']), pgw.url());
    assert.equal(rows[0].id, 1);
    const { body: events } = await pgw.api('/api/events?type=rule_removed');
    assert.ok((events as { summary: string }[]).some((e) => /expired/.test(e.summary)));
  });

  test('bad rules get 400 with a message that says what is wrong', async () => {
    const cases: [unknown, RegExp][] = [
      [{ action: 'block', fingerprint: 'nothex', reason: 'x' }, /fingerprint/],
      [{ action: 'shed', fingerprint: '0123456789abcdef', reason: 'x' }, /max_concurrent/],
      [
        { action: 'reroute', fingerprint: '0123456789abcdef', reason: 'x', target: 'nowhere' },
        /no replica named 'nowhere'/,
      ],
      [{ action: 'explode', fingerprint: '0123456789abcdef', reason: 'x' }, /action/],
      [{ action: 'block', fingerprint: '0123456789abcdef' }, /reason/],
      [{ action: 'block', fingerprint: '0123456789abcdef', reason: 'x', surprise: 1 }, /surprise/],
      ['not json', /JSON/],
    ];
    for (const [body, message] of cases) {
      const response = await pgw.api('/api/rules', { method: 'POST', body });
      assert.equal(response.status, 400, JSON.stringify(body));
      assert.match(response.body.error, message);
    }
    assert.equal((await pgw.api('/api/rules/r-nosuchrule', { method: 'DELETE' })).status, 404);
  });

  test('the CLI blocks, lists and deletes rules through the admin API', async () => {
    const fp = await fingerprintOf(pgw, 'select id, v from pgw_rules_t order by id limit $1', [3]);
    const out: string[] = [];
    const err: string[] = [];
    const sink = (into: string[]) => ({ write: (s: string) => into.push(s) });
    const cli = (...args: string[]) =>
      runRules(
        [...args, '--admin', `127.0.0.1:${pgw.app.adminPort}`, '--token', pgw.config.admin_token!],
        sink(out),
        sink(err),
      );
    assert.equal(await cli('block', fp, '--reason', 'from the cli test'), 0, err.join(''));
    const id = /^(r-[0-9a-f]+)/.exec(out.join(''))![1];
    await assert.rejects(
      withClient((c) => c.query('select id, v from pgw_rules_t order by id limit $1', [3]), pgw.url()),
      { code: '42501' },
    );
    out.length = 0;
    assert.equal(await cli('list'), 0);
    assert.match(out.join(''), new RegExp(`${id}\\s+block\\s+${fp}`));
    assert.equal(await cli('delete', id), 0);
    assert.equal(await cli('delete', id), 1, 'a second delete is refused');
    assert.equal(
      await runRules(
        ['block', fp, '--admin', `127.0.0.1:${pgw.app.adminPort}`, '--token', 'wrong-token-0000000000'],
        sink(out),
        sink(err),
      ),
      1,
    );
    assert.equal(await cli('shed', fp), 1, 'shed without --max-concurrent is refused by the API');
    assert.match(err.join(''), /max_concurrent/);
  });
});

describe('rules across a restart', { timeout: 60_000 }, () => {
  test('a rule survives a restart through the state file', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-restart-'));
    const stateFile = path.join(dir, 'state.json');
    try {
      const first = await startTestApp({ state_file: stateFile, mitigation: 'off' });
      const fp = await fingerprintOf(first, 'select 1 as pgw_restart_marker');
      const { body } = await first.api('/api/rules', {
        method: 'POST',
        body: { action: 'block', fingerprint: fp, reason: 'survive' },
      });
      await first.stop();
      const second = await startTestApp({ state_file: stateFile, mitigation: 'off' });
      try {
        const { body: rules } = await second.api('/api/rules');
        assert.deepEqual(
          (rules as { id: string }[]).map((r) => r.id),
          [body.id],
        );
        await assert.rejects(
          withClient((c) => c.query('select 1 as pgw_restart_marker'), second.url()),
          { code: '42501' },
        );
      } finally {
        await second.stop();
      }
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
