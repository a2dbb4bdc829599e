// Two pgwarden instances sharing a control database: a rule added on one is
// enforced by both within a second.

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
    a = await startTestApp({ control_url: url.toString(), instance_name: 'a', mitigation: 'off' });
    b = await startTestApp({ control_url: url.toString(), instance_name: 'b', mitigation: 'off' });
    await loadParser();
  });

  after(async () => {
    await a?.stop();
    await b?.stop();
    await withClient((c) => c.query(`drop database if exists ${CONTROL_DB} with (force)`));
  });

  test('a rule added on one instance is enforced by both within 1 s, and lifted on both', async () => {
    const added = Date.now();
    const { status, body } = await a.api('/api/rules', { method: 'POST', body: { action: 'block', fingerprint: fingerprintSync(QUERY), reason: 'fleet test' } });
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
    await assert.rejects(withClient((c) => c.query(QUERY), a.url()), { code: '42501' });
    assert.equal((await a.api(`/api/rules/${body.id}`, { method: 'DELETE' })).status, 200);
    await waitFor(async () => (await withClient((c) => c.query(QUERY), b.url())).rows[0].pgw_fleet_marker === 7, {
      timeoutMs: 1000,
      intervalMs: 20,
      what: 'instance b to lift the rule',
    });
  });
});
