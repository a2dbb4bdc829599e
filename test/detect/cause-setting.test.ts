// A setting changed on the database, not through the proxy: ALTER SYSTEM SET
// random_page_cost and a reload flip the hot lookup from its index to a seq scan.
// The incident's cause must be the setting change (with its old and new values, how
// it was made, and the plan change after it), not an old or unrelated DDL. The same
// load before the change (the control) opens nothing; a per-role setting (ALTER
// ROLE ... SET) shows on the timeline too.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { causeDetection, expectNoIncidentFor, waitForIncident, warmShape } from '../harness/causes.ts';
import { createUsersTable, dropUsersTable } from '../harness/incident.ts';
import { startWorkload, type RunningWorkload } from '../harness/workload.ts';

const TABLE = 'pgw_setting_users';
const ROLE = 'pgw_setting_role';
const ROWS = 150_000;

describe('a setting changed on the database', { timeout: 90_000 }, () => {
  let pgw: TestApp;
  let workload: RunningWorkload;

  before(async () => {
    await createUsersTable(TABLE, `${TABLE}_email_idx`, ROWS);
    await withClient(async (c) => {
      await c.query(`drop role if exists ${ROLE}`);
      await c.query(`create role ${ROLE}`);
    });
    pgw = await startTestApp(causeDetection());
    const lookup = (i: number) => ({
      text: `select id, name from ${TABLE} where email = $1`,
      values: [`user${1 + ((i * 7919) % ROWS)}@example.com`],
    });
    workload = await startWorkload(pgw.url(), [
      { next: lookup, pauseMs: 2 },
      { next: lookup, pauseMs: 2 },
      { next: (i) => ({ text: `select email from ${TABLE} where id = $1`, values: [1 + (i % ROWS)] }), pauseMs: 5 },
    ]);
  });

  after(async () => {
    await withClient(async (c) => {
      await c.query('alter system reset random_page_cost');
      await c.query('select pg_reload_conf()');
      await c.query(`drop role if exists ${ROLE}`);
    });
    await workload?.stop();
    await pgw?.stop();
    await dropUsersTable(TABLE);
  });

  test('ALTER SYSTEM SET random_page_cost and a reload is the named cause of the plan flip', async () => {
    const fingerprint = await warmShape(
      pgw,
      `from ${TABLE} where email`,
      45_000,
      /Index Scan using pgw_setting_users_email_idx/,
    );
    await withClient((c) => c.query(`alter role ${ROLE} set work_mem = '64MB'`));
    await expectNoIncidentFor(pgw, 10_000);
    const roleEvent = (await pgw.api('/api/events?type=setting_change')).body as { summary: string }[];
    assert.ok(
      roleEvent.some((e) => e.summary === `ALTER ROLE ${ROLE} SET work_mem = 64MB`),
      JSON.stringify(roleEvent),
    );

    const changedAt = Date.now();
    await withClient(async (c) => {
      await c.query('alter system set random_page_cost = 100000');
      await c.query('select pg_reload_conf()');
    });
    const incident = await waitForIncident(
      pgw,
      fingerprint,
      (i) => i.attributed && i.causes.some((c) => c.type === 'setting_change' && c.conclusive === true),
      40_000,
      'an incident attributed to the setting change',
    );
    console.log(`# ALTER SYSTEM + reload -> attributed incident: ${((Date.now() - changedAt) / 1000).toFixed(1)} s`);
    console.log(`# ${incident.summary}`);
    assert.match(incident.summary, /plan changed .*Seq Scan on pgw_setting_users/);
    assert.match(
      incident.summary,
      /cause: setting changed: random_page_cost 4 -> 100000 \(ALTER SYSTEM, reloaded at \d{4}-/,
    );
    assert.ok(
      !incident.causes.some((c) => c.type === 'setting_change' && c.summary.includes('work_mem') && c.conclusive),
      'the earlier role setting is not the cause',
    );
    await waitFor(async () => (await pgw.api('/api/incidents')).body.length >= 1, { what: 'incident listed' });
  });
});
