// Live sessions through the admin API and the CLI: who is connected, in which
// state, running which shape; cancel a running statement, terminate a session.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { runSessions } from '../../src/cli/sessions.ts';
import { waitFor } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';

interface SessionJson {
  id: number;
  client_address: string;
  user: string;
  database: string;
  application_name: string;
  since: string;
  state: string;
  statement: { fingerprint: string | null; query: string | null; running: boolean; duration_ms: number } | null;
  upstream: string;
  bytes_in: number;
  bytes_out: number;
}

describe('live sessions', () => {
  let pgw: TestApp;
  const clients: pg.Client[] = [];
  const connect = async (application: string) => {
    const c = new pg.Client({ connectionString: pgw.url(), application_name: application });
    c.on('error', () => undefined);
    await c.connect();
    clients.push(c);
    return c;
  };
  const sessions = async () => (await pgw.api('/api/sessions')).body as SessionJson[];
  const cli = async (args: string[]) => {
    let out = '';
    let err = '';
    const code = await runSessions(
      [...args, '--admin', `127.0.0.1:${pgw.app.adminPort}`, '--token', pgw.config.admin_token!],
      { write: (t: string) => (out += t) },
      { write: (t: string) => (err += t) },
    );
    return { code, out, err };
  };

  before(async () => {
    pgw = await startTestApp();
  });

  after(async () => {
    await Promise.all(clients.map((c) => c.end().catch(() => undefined)));
    await pgw?.stop();
  });

  test("a session idle in a transaction is listed with its last statement's shape, never its values", async () => {
    const c = await connect('idle-in-tx');
    await c.query('begin');
    await c.query("select 'secret-value' as s, $1::int as n", [42]);
    const s = await waitFor(
      async () =>
        (await sessions()).find((x) => x.application_name === 'idle-in-tx' && x.state === 'idle in transaction'),
      {
        what: 'the session to be idle in transaction',
      },
    );
    assert.equal(s.user, c.user);
    assert.equal(s.database, c.database);
    assert.match(s.client_address, /^127\.0\.0\.1:\d+$/);
    assert.ok(Date.parse(s.since) <= Date.now());
    assert.equal(s.upstream, pgw.config.upstream);
    assert.ok(s.bytes_in > 0 && s.bytes_out > 0);
    assert.equal(s.statement?.running, false);
    assert.match(s.statement?.fingerprint ?? '', /^[0-9a-f]{16}$/);
    assert.match(s.statement?.query ?? '', /^select \$\d as s, \$\d::int as n$/);
    assert.ok(!JSON.stringify(s).includes('secret-value'), 'literal values stay out of the API');
    await c.query('commit');
    await waitFor(async () => (await sessions()).find((x) => x.id === s.id)?.state === 'idle', {
      what: 'idle after commit',
    });
  });

  test('a running statement shows as active with how long it has run, and cancel stops it with 57014', async () => {
    const c = await connect('runner');
    const running = c.query('select pg_sleep(30)').catch((err: pg.DatabaseError) => err);
    const s = await waitFor(
      async () =>
        (await sessions()).find(
          (x) => x.application_name === 'runner' && x.state === 'active' && (x.statement?.duration_ms ?? 0) > 200,
        ),
      { what: 'the sleep to show as active' },
    );
    assert.equal(s.statement?.running, true);
    assert.match(s.statement?.query ?? '', /pg_sleep/);
    const listed = await cli([]);
    assert.equal(listed.code, 0);
    assert.match(listed.out, new RegExp(`^${s.id}\\s+127\\.0\\.0\\.1:\\d+.*runner.*active`, 'm'));
    const cancelled = await cli(['cancel', String(s.id)]);
    assert.equal(cancelled.code, 0, cancelled.err);
    const outcome = await running;
    assert.equal((outcome as pg.DatabaseError).code, '57014');
    const after = await c.query('select 1 as one');
    assert.equal(after.rows[0].one, 1, 'the session survives a cancel');
  });

  test('terminate ends one session cleanly with 57P01, and others carry on', async () => {
    const victim = await connect('to-terminate');
    const bystander = await connect('bystander');
    const told: Error[] = [];
    victim.on('error', (err) => told.push(err));
    const s = await waitFor(async () => (await sessions()).find((x) => x.application_name === 'to-terminate'));
    const { status, body } = await pgw.api(`/api/sessions/${s.id}`, { method: 'DELETE' });
    assert.equal(status, 200);
    assert.deepEqual(body, { id: s.id, user: s.user, application_name: 'to-terminate', terminated: true });
    // An operator's action is on the timeline and in the log, as one on a blocking backend is.
    const { body: events } = await pgw.api('/api/events?type=admin_action');
    assert.equal(events.at(-1).summary, `terminate session ${s.id} (user ${s.user}, application to-terminate)`);
    assert.ok(pgw.logLines.some((l) => l.msg === 'admin action on a session' && l.session === s.id));
    await waitFor(() => told.length > 0, { what: 'the client to be told' });
    assert.equal((told[0] as pg.DatabaseError).code, '57P01');
    await waitFor(async () => !(await sessions()).some((x) => x.id === s.id), {
      what: 'the session to leave the list',
    });
    assert.equal((await bystander.query('select 2 as two')).rows[0].two, 2);
    assert.equal((await pgw.api('/api/sessions/999999', { method: 'DELETE' })).status, 404);
    assert.equal((await cli(['terminate', '999999'])).code, 1);
  });

  test('the sessions API needs the admin token', async () => {
    assert.equal((await pgw.api('/api/sessions', { token: null })).status, 401);
    assert.equal((await pgw.api('/api/sessions/1', { method: 'DELETE', token: 'wrong-token-0123456789' })).status, 401);
  });
});
