// Two pgwarden instances sharing a control database: a rule added on one is
// enforced by both within a second, and each sees the other's shapes in its
// fleet view.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { fingerprintSync } from 'libpg-query';
import { loadParser } from '../../src/shapes/fingerprint.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';

const CONTROL_DB = `pgw_fleet_${randomBytes(4).toString('hex')}`;
const QUERY = 'select 7 as pgw_fleet_marker';

describe('a fleet sharing a control database', { timeout: 60_000 }, () => {
  let a: TestApp;
  let b: TestApp;

  before(async () => {
    await withClient((c) => c.query(`create database ${CONTROL_DB}`));
    const url = new URL(testDatabase().url);
    url.pathname = `/${CONTROL_DB}`;
    a = await startTestApp({
      control_url: url.toString(),
      instance_name: 'a',
      mitigation: 'off',
      fleet_publish_interval_s: 1,
    });
    b = await startTestApp({
      control_url: url.toString(),
      instance_name: 'b',
      mitigation: 'off',
      fleet_publish_interval_s: 1,
    });
    await loadParser();
  });

  after(async () => {
    await a?.stop();
    await b?.stop();
    await withClient((c) => c.query(`drop database if exists ${CONTROL_DB} with (force)`));
  });

  test('a rule added on one instance is enforced by both within 1 s, and lifted on both', async () => {
    const added = Date.now();
    const { status, body } = await a.api('/api/rules', {
      method: 'POST',
      body: { action: 'block', fingerprint: fingerprintSync(QUERY), reason: 'fleet test' },
    });
    assert.equal(status, 201);
    const enforcedOnB = await waitFor(
      async () => {
        try {
          await withClient((c) => c.query(QUERY), b.url());
          return undefined;
        } catch (err) {
          return (err as { code: string }).code === '42501' ? Date.now() - added : undefined;
        }
      },
      { timeoutMs: 1000, intervalMs: 20, what: 'instance b to enforce the rule' },
    );
    console.log(`# rule added on a enforced by b after ${enforcedOnB} ms`);
    await assert.rejects(
      withClient((c) => c.query(QUERY), a.url()),
      { code: '42501' },
    );
    assert.equal((await a.api(`/api/rules/${body.id}`, { method: 'DELETE' })).status, 200);
    await waitFor(async () => (await withClient((c) => c.query(QUERY), b.url())).rows[0].pgw_fleet_marker === 7, {
      timeoutMs: 1000,
      intervalMs: 20,
      what: 'instance b to lift the rule',
    });
  });

  test("a shape run only through instance a appears with its calls in b's fleet view", async () => {
    const text = 'select abs(11) as pgw_fleet_view_marker';
    const runs = 7;
    await withClient(async (c) => {
      for (let i = 0; i < runs; i++) await c.query(text);
    }, a.url());
    const fingerprint = fingerprintSync(text);
    assert.equal((await b.api(`/api/shapes/${fingerprint}`)).status, 404, 'b never ran it');
    const shape = await waitFor(
      async () => {
        const { body } = await b.api('/api/shapes?scope=fleet&sort=calls&limit=10000');
        return (body as { fingerprint: string; calls: number }[]).find(
          (s) => s.fingerprint === fingerprint && s.calls === runs,
        );
      },
      { timeoutMs: 15_000, intervalMs: 200, what: `the shape with ${runs} calls in b's fleet view` },
    );
    assert.equal((shape as unknown as { instances: number }).instances, 1);
    const { status, body } = await b.api(`/api/shapes/${fingerprint}?scope=fleet`);
    assert.equal(status, 200);
    assert.equal(body.calls, runs);
    assert.deepEqual(
      body.by_instance.map((i: { instance: string; calls: number }) => [i.instance, i.calls]),
      [['a', runs]],
    );
    assert.ok(body.p95_ms > 0, 'percentiles come from the published sketch');

    // Run through b as well: one shape, both instances, calls summed.
    await withClient((c) => c.query(text), b.url());
    await waitFor(
      async () => {
        const { body } = await a.api(`/api/shapes/${fingerprint}?scope=fleet`);
        return body.calls === runs + 1 && body.instances === 2;
      },
      { timeoutMs: 15_000, intervalMs: 200, what: "both instances merged in a's fleet view" },
    );
    assert.equal((await b.api('/api/shapes?scope=bogus')).status, 400);
  });
});
