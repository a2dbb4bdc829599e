// One query, several tenants: schemas pgw_ta and pgw_tb hold the same accounts
// table with the same index names, and each tenant's sessions reach their own
// through search_path (a startup option), so the shape is one fingerprint with
// two sets of tables. An index dropped in pgw_tb must be attributed to pgw_tb's
// table; the identically named index of pgw_t0 (a tenant without traffic) dropped
// in the same migration, listed first by the catalog, must not be; and tenants
// whose plans differ only by schema must not read as plan changes (the control:
// the same load before the drop opens nothing).

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { waitFor, withClient } from '../harness/database.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { causeDetection, expectNoIncidentFor, waitForIncident, warmShape } from '../harness/causes.ts';
import { startWorkload, type RunningWorkload } from '../harness/workload.ts';

const TENANTS = ['pgw_ta', 'pgw_tb'];
const DECOY = 'pgw_t0';
const ROWS = 100_000;

describe('an index dropped in one tenant schema', { timeout: 150_000 }, () => {
  let pgw: TestApp;
  const workloads: RunningWorkload[] = [];

  before(async () => {
    await withClient(async (c) => {
      for (const schema of [...TENANTS, DECOY]) {
        await c.query(`drop schema if exists ${schema} cascade`);
        await c.query(`create schema ${schema}`);
        await c.query(
          `create table ${schema}.accounts (id int primary key, email text not null, pad text not null) with (autovacuum_enabled = false, parallel_workers = 0)`,
        );
        await c.query(
          `insert into ${schema}.accounts select g, 'user' || g || '@example.com', repeat('p', 60) from generate_series(1, ${ROWS}) g`,
        );
        await c.query(`create index accounts_email_idx on ${schema}.accounts (email)`);
        await c.query(`analyze ${schema}.accounts`);
      }
    });
    pgw = await startTestApp(causeDetection());
    for (const schema of TENANTS) {
      // Each tenant's sessions: search_path from the startup packet's options.
      const url = `${pgw.url()}?options=${encodeURIComponent(`-c search_path=${schema}`)}`;
      const lookup = (i: number) => ({
        text: 'select id, pad from accounts where email = $1',
        values: [`user${1 + ((i * 7919) % ROWS)}@example.com`],
      });
      workloads.push(
        await startWorkload(url, [
          { next: lookup, pauseMs: 3 },
          { next: lookup, pauseMs: 3 },
        ]),
      );
    }
  });

  after(async () => {
    for (const w of workloads) await w.stop();
    await pgw?.stop();
    await withClient(async (c) => {
      for (const schema of [...TENANTS, DECOY]) await c.query(`drop schema if exists ${schema} cascade`);
    });
  });

  test("the drop in pgw_tb is the cause, named with pgw_tb's table; pgw_t0's identical index is not", async () => {
    const fingerprint = await warmShape(pgw, 'from accounts where email', 45_000, /accounts_email_idx/);
    // Both tenants' plans are known, each with its schema.
    const plans = await waitFor(
      async () => {
        const { body } = await pgw.api(`/api/shapes/${fingerprint}`);
        const schemas = (body.plans?.history ?? []).map((r: { schemas: string[] }) => r.schemas.join(','));
        return TENANTS.every((t) => schemas.includes(t)) && body.plans;
      },
      { timeoutMs: 20_000, intervalMs: 250, what: 'plans of both tenants' },
    );
    const tenantB = plans.history.find((r: { schemas: string[] }) => r.schemas.join(',') === 'pgw_tb');
    assert.deepEqual(tenantB.relations, ['pgw_tb.accounts']);
    assert.deepEqual(tenantB.indexes, ['pgw_tb.accounts_email_idx']);
    assert.ok(
      tenantB.nodes.some((n: string) => n === 'Index Scan using accounts_email_idx on pgw_tb.accounts'),
      tenantB.nodes.join(' / '),
    );
    // The control: two tenants, two plans, the same load: no plan change, no incident.
    await expectNoIncidentFor(pgw, 10_000);
    const { body: quiet } = await pgw.api('/api/events?type=plan_change&limit=50');
    assert.deepEqual(
      (quiet as { fingerprint?: string }[]).filter((e) => e.fingerprint === fingerprint),
      [],
      'no plan change while nothing changed',
    );

    const droppedAt = Date.now();
    // One migration, straight on the database: the decoy's identical index too (the
    // catalog lists pgw_t0 first), though no session reads pgw_t0.
    await withClient((c) => c.query(`drop index ${DECOY}.accounts_email_idx; drop index pgw_tb.accounts_email_idx`));
    const incident = await waitForIncident(
      pgw,
      fingerprint,
      (i) => i.attributed && i.causes.some((c) => c.type === 'schema_change' && /pgw_tb/.test(c.summary)),
      45_000,
      "an incident attributed to pgw_tb's index drop",
    );
    console.log(`# DROP INDEX in pgw_tb -> attributed incident: ${((Date.now() - droppedAt) / 1000).toFixed(1)} s`);
    console.log(`# ${incident.summary}`);
    assert.match(
      incident.summary,
      /plan changed Index Scan using accounts_email_idx on pgw_tb\.accounts -> Seq Scan on pgw_tb\.accounts/,
    );
    assert.match(incident.summary, /the catalog showed: index accounts_email_idx on pgw_tb\.accounts dropped/);
    assert.doesNotMatch(incident.summary, /pgw_t0|pgw_ta/);
    const blamed = incident.causes.filter((c) => c.type === 'schema_change');
    assert.ok(
      blamed.every((c) => !/pgw_t0/.test(c.summary)),
      `pgw_t0's drop is not a cause: ${blamed.map((c) => c.summary).join(' | ')}`,
    );
    const plan = incident.causes.find((c) => c.type === 'plan_change')!;
    assert.ok(plan.objects.includes('pgw_tb.accounts_email_idx'), plan.objects.join(', '));
    assert.ok(!plan.objects.some((o) => o.startsWith('pgw_ta.')), plan.objects.join(', '));
  });
});
