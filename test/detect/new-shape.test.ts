// A deploy ships an unindexed query: a shape first seen after pgwarden learned the
// workload, slow from its first call and taking most of the database time. It has
// no baseline, so it never "regresses"; it must be surfaced as new (API status and
// new_since, the timeline, a log line and a webhook message, with its plan). A new
// fast shape appearing at the same time (the control) is not flagged.

import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, describe, test } from 'node:test';
import { waitFor } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { causeDetection } from '../harness/causes.ts';
import { createUsersTable, dropUsersTable } from '../harness/incident.ts';
import { startWorkload, type RunningWorkload } from '../harness/workload.ts';

const TABLE = 'pgw_new_users';
const ROWS = 100_000;

describe('a new slow shape', { timeout: 90_000 }, () => {
  let pgw: TestApp;
  const workloads: RunningWorkload[] = [];
  const hooks: { event: string; shape?: { fingerprint: string; plan: string | null; new_since: string } }[] = [];
  let receiver: http.Server;
  let startedAt = 0;

  before(async () => {
    await createUsersTable(TABLE, `${TABLE}_email_idx`, ROWS);
    receiver = http.createServer((req, res) => {
      let body = '';
      req.on('data', (chunk) => (body += chunk));
      req.on('end', () => {
        hooks.push(JSON.parse(body));
        res.end();
      });
    });
    await new Promise<void>((resolve) => receiver.listen(0, '127.0.0.1', resolve));
    const port = (receiver.address() as { port: number }).port;
    // The known workload is what runs in the first 8 s (the default grace is 60 s).
    startedAt = Date.now();
    pgw = await startTestApp(
      causeDetection({ new_shape_grace_s: 8, alert_webhook_url: `http://127.0.0.1:${port}/hook` }),
    );
    workloads.push(
      await startWorkload(pgw.url(), [
        {
          next: (i) => ({
            text: `select id, name from ${TABLE} where email = $1`,
            values: [`user${1 + ((i * 7919) % ROWS)}@example.com`],
          }),
          pauseMs: 2,
        },
        { next: (i) => ({ text: `select bio from ${TABLE} where id = $1`, values: [1 + (i % ROWS)] }), pauseMs: 2 },
      ]),
    );
  });

  after(async () => {
    await Promise.all(workloads.map((w) => w.stop()));
    await pgw?.stop();
    receiver?.close();
    await dropUsersTable(TABLE);
  });

  test('an unindexed query shipped after start is flagged as new with its plan; a new fast one is not', async () => {
    await waitFor(() => Date.now() - startedAt > 9000, {
      timeoutMs: 15_000,
      intervalMs: 200,
      what: 'the grace period',
    });
    const deployedAt = Date.now();
    workloads.push(
      await startWorkload(pgw.url(), [
        {
          next: (i) => ({
            text: `select id from ${TABLE} where name = $1 and bio <> ''`,
            values: [`name ${i % 1000}`],
          }),
          pauseMs: 5,
        },
        {
          next: (i) => ({ text: `select email, name from ${TABLE} where id = $1`, values: [1 + (i % ROWS)] }),
          pauseMs: 5,
        },
      ]),
    );
    const flagged = await waitFor(
      async () => {
        const { body } = await pgw.api('/api/shapes?status=new');
        return (body as { query: string; new_since: string | null; status: string; fingerprint: string }[]).find((s) =>
          s.query.includes('where name ='),
        );
      },
      { timeoutMs: 30_000, intervalMs: 250, what: 'the unindexed shape to be flagged as new' },
    );
    console.log(`# new unindexed shape -> flagged: ${((Date.now() - deployedAt) / 1000).toFixed(1)} s`);
    assert.equal(flagged.status, 'new');
    assert.ok(Date.parse(flagged.new_since!) >= deployedAt - 1000, `new since ${flagged.new_since}`);
    const { body: events } = await pgw.api(`/api/events?type=new_shape`);
    const event = (events as { fingerprint: string; summary: string }[]).find(
      (e) => e.fingerprint === flagged.fingerprint,
    )!;
    console.log(`# ${event.summary}`);
    assert.match(
      event.summary,
      /^new since \d{4}-.*: shape \w+ `select id from pgw_new_users where name = \$1 and bio <> \$2` is (slow from its first calls|taking \d+% of the database time).*; plan: Seq Scan on pgw_new_users/,
    );
    assert.ok(pgw.logLines.some((l) => l.msg === 'new shape' && l.fingerprint === flagged.fingerprint));
    await waitFor(() => hooks.find((h) => h.event === 'new_shape' && h.shape?.fingerprint === flagged.fingerprint), {
      timeoutMs: 10_000,
      what: 'the webhook message',
    });

    // The control: the new fast lookup ran just as long and is not flagged; neither is the known workload.
    const fast = await waitFor(
      async () => {
        const { body: all } = await pgw.api('/api/shapes?sort=calls&limit=100');
        const shape = (all as { query: string; status: string; new_since: string | null; calls: number }[]).find((s) =>
          s.query.includes('select email, name from'),
        );
        return shape && shape.calls >= 200 ? shape : undefined;
      },
      { timeoutMs: 20_000, intervalMs: 250, what: 'the fast new shape to run 200 times' },
    );
    assert.equal(fast.new_since, null);
    assert.equal(((await pgw.api('/api/shapes?status=new')).body as unknown[]).length, 1);
  });
});
