// check-migration as a CI gate, against a real staging database and a workload
// captured by a real pgwarden without sample parameters: the skewed-column
// case is a regression by default (production's plan, reproduced with values
// from pg_stats), typed literals plan, each statement's locks and duration are
// measured and crossed with the workload, --fail-on/--strict decide the exit
// code, a captured function is never run as the check's role, and every run
// leaves the database exactly as it was.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, afterEach, before, beforeEach, describe, test } from 'node:test';
import pg from 'pg';
import { runCheckMigration } from '../../src/cli/check-migration.ts';
import { startTestApp } from '../harness/app.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';

const HOT = 'select aid, bid from accounts where abalance = $1 limit $2';
const HOT_NO_LIMIT = 'select aid from accounts where abalance = $1';
const UPDATE = 'update accounts set bid = $1 where aid = $2';
const TYPED_TEXT =
  "select id, amount from invoices where account_id = 17 and due > date '2024-06-01' order by due limit 10";
const TYPED_SHAPE = 'select id, amount from invoices where account_id = $1 and due > date $2 order by due limit $3';
const PROBE = 'select aid from accounts where aid = pgw_probe()';

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

type Shape = {
  fingerprint: string;
  query: string;
  plan: string[] | null;
  plan_fingerprint: string | null;
  calls: number;
  samples?: unknown;
};

describe('check-migration as a CI gate', { timeout: 240_000 }, () => {
  let name: string;
  let url: string;
  let tmp: string;
  let workloadFile: string;
  let probeWorkloadFile: string;
  let shapes: Shape[];
  let snapshot: string[];
  const role = `pgw_app_${randomBytes(3).toString('hex')}`;

  before(async () => {
    name = `pgw_gate_${randomBytes(4).toString('hex')}`;
    await withClient((c) => c.query(`create database ${name}`));
    const u = new URL(testDatabase().url);
    u.pathname = `/${name}`;
    url = u.toString();
    await withClient(async (c) => {
      // pgbench-like accounts with a skewed abalance: 99.5% zero, a few rare balances.
      await c.query(
        `create table accounts (aid int primary key, bid int not null, abalance int not null, filler char(84))`,
      );
      await c.query(
        `insert into accounts select g, g % 10, case when g % 200 = 0 then 2 else 0 end, '' from generate_series(1, 100000) g order by md5(g::text)`,
      );
      await c.query('create index accounts_abalance_idx on accounts (abalance)');
      await c.query(
        'create table invoices (id serial primary key, account_id int not null, due date not null, amount numeric not null)',
      );
      await c.query(
        `insert into invoices (account_id, due, amount) select g % 1000, date '2024-01-01' + (g % 365), g from generate_series(1, 50000) g`,
      );
      await c.query('create index invoices_account_due_idx on invoices (account_id, due)');
      await c.query('analyze accounts; analyze invoices');
      await c.query('create sequence pgw_probe_seq');
      // What an attacker who can create functions plants: planning folds it, as whoever plans.
      await c.query(
        `create function pgw_probe() returns int language plpgsql immutable as $$ begin perform nextval('pgw_probe_seq'); return 1; end $$`,
      );
      await c.query(`create role ${role}`);
      await c.query(`grant select, update on accounts, invoices to ${role}`);
      await c.query(`revoke all on function pgw_probe() from public`);
      await c.query(`grant execute on function pgw_probe() to ${role}`);
    }, url);

    const pgw = await startTestApp({ monitor_url: url, mitigation: 'off', workload_sample_params: false });
    try {
      const client = new pg.Client({ connectionString: pgw.url(undefined, name) });
      await client.connect();
      try {
        for (let i = 0; i < 20; i++) {
          await client.query(HOT, [2, 10]);
          await client.query(HOT_NO_LIMIT, [2]);
          await client.query(UPDATE, [i % 10, i + 1]);
          await client.query(TYPED_TEXT);
        }
      } finally {
        await client.end();
      }
      const workload = await waitFor(
        async () => {
          const { body } = await pgw.api('/api/workload');
          const all = (body as { shapes: Shape[] }).shapes;
          const wanted = [HOT, HOT_NO_LIMIT, UPDATE, TYPED_SHAPE].map((q) => all.find((s) => s.query === q));
          return wanted.every((s) => s !== undefined && s.plan_fingerprint !== null)
            ? (body as { shapes: Shape[] })
            : undefined;
        },
        { timeoutMs: 30_000, intervalMs: 100, what: 'production plans for every shape' },
      );
      shapes = workload.shapes;
      tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-gate-'));
      workloadFile = path.join(tmp, 'workload.json');
      fs.writeFileSync(workloadFile, JSON.stringify(workload));
      probeWorkloadFile = path.join(tmp, 'probe.json');
      const probe = {
        ...shapes[0],
        fingerprint: 'aaaaaaaaaaaaaaaa',
        query: PROBE,
        plan: null,
        plan_fingerprint: null,
        relations: null,
      };
      fs.writeFileSync(probeWorkloadFile, JSON.stringify({ ...workload, shapes: [...workload.shapes, probe] }));
    } finally {
      await pgw.stop();
    }
  });

  after(async () => {
    await withClient((c) => c.query(`drop database if exists ${name} with (force)`));
    await withClient((c) => c.query(`drop role if exists ${role}`));
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  beforeEach(async () => {
    snapshot = await catalogSnapshot(url);
  });

  afterEach(async () => {
    assert.deepEqual(await catalogSnapshot(url), snapshot, 'the check left the database as it was');
    await waitFor(
      () =>
        withClient(
          async (c) =>
            (await c.query("select 1 from pg_stat_activity where application_name = 'pgwarden-check-migration'"))
              .rowCount === 0,
        ),
      { what: 'no session of check-migration left on the server' },
    );
  });

  async function check(migration: string, extra: string[] = [], workload = workloadFile): Promise<Run> {
    const file = path.join(tmp, `m-${randomBytes(3).toString('hex')}.sql`);
    fs.writeFileSync(file, migration);
    let stdout = '';
    let stderr = '';
    const code = await runCheckMigration(
      ['--database-url', url, '--workload', workload, file, ...extra],
      { write: (s: string) => (stdout += s) },
      { write: (s: string) => (stderr += s) },
      new AbortController().signal,
    );
    return { code, stdout, stderr };
  }

  const shapeOf = (query: string) => shapes.find((s) => s.query === query)!;
  const jsonShape = (report: { shapes: { fingerprint: string }[] }, query: string) =>
    report.shapes.find((s) => s.fingerprint === shapeOf(query).fingerprint) as Record<string, unknown>;

  test('the export has no literal values and records production plans', () => {
    assert.ok(shapes.every((s) => s.samples === undefined));
    assert.ok(
      shapeOf(HOT).plan!.includes('Index Scan using accounts_abalance_idx on accounts'),
      String(shapeOf(HOT).plan),
    );
    assert.ok(
      shapeOf(HOT_NO_LIMIT).plan!.includes('Index Scan using accounts_abalance_idx on accounts'),
      String(shapeOf(HOT_NO_LIMIT).plan),
    );
    assert.equal(fs.readFileSync(workloadFile, 'utf8').includes('2024-06-01'), false);
  });

  test('dropping the index of the skewed column exits 1 by default, naming the shapes and the plan change', async () => {
    const run = await check('DROP INDEX accounts_abalance_idx;\n');
    console.log(run.stdout);
    assert.equal(run.code, 1, run.stdout + run.stderr);
    assert.match(run.stdout, /^REGRESSION: \d+ of \d+ shapes regressed/);
    for (const query of [HOT, HOT_NO_LIMIT]) {
      const block = run.stdout.split('\n\n').find((b) => b.includes(`  ${query}\n`));
      assert.ok(block?.startsWith('REGRESSION  '), `${query} in\n${run.stdout}`);
      assert.match(block!, /Index Scan using accounts_abalance_idx on accounts -> Seq Scan on accounts/);
      assert.match(block!, /plan mode: .*reproduces production's plan/);
    }
  });

  test("when the generic plan is not production's, values from pg_stats reproduce it, and the JSON says so", async () => {
    const run = await check('DROP INDEX accounts_abalance_idx;', ['--format', 'json']);
    assert.equal(run.code, 1, run.stderr);
    const report = JSON.parse(run.stdout);
    assert.equal(report.failed, true);
    const shape = jsonShape(report, HOT_NO_LIMIT);
    assert.equal(shape.verdict, 'regression');
    assert.equal(shape.plan_mode, 'stats', JSON.stringify(shape));
    assert.match(String(shape.plan_mode_detail), /accounts\.abalance/);
    assert.equal(shape.reproduces_production, true);
    assert.ok((shape.cost_ratio as number) >= 2);
    assert.equal(run.stdout.includes('"2"'), false, 'no staging value in the report');
  });

  test('a typed-literal shape is planned with a parameter of its type, and dropping its index fails', async () => {
    const clean = await check('ALTER TABLE accounts ADD COLUMN note text;', ['--format', 'json']);
    const typed = jsonShape(JSON.parse(clean.stdout), TYPED_SHAPE);
    assert.equal(typed.verdict, 'unchanged', JSON.stringify(typed));
    assert.equal(typed.typed_literals, 1);
    const run = await check('DROP INDEX invoices_account_due_idx;');
    assert.equal(run.code, 1, run.stdout + run.stderr);
    const block = run.stdout.split('\n\n').find((b) => b.includes(TYPED_SHAPE));
    assert.ok(block?.startsWith('REGRESSION  '), run.stdout);
    assert.match(block!, /invoices_account_due_idx/);
  });

  test('ADD COLUMN with a volatile default is reported with its lock, duration and rewrite, crossed with the workload', async () => {
    const run = await check('ALTER TABLE accounts ADD COLUMN touched double precision DEFAULT random();\n');
    console.log(run.stdout);
    assert.equal(run.code, 0, 'locks do not fail the default --fail-on regression');
    assert.match(run.stdout, /takes ACCESS EXCLUSIVE on accounts \(in [\d.]+ (ms|s) on staging\); rewrote accounts/);
    assert.match(run.stdout, /3 shapes touch accounts at [\d.,]+ calls\/s in production and would queue behind it/);
    assert.match(run.stdout, /^LOCK {2}statement 1 \(line 1\): rewrites accounts under ACCESS EXCLUSIVE/m);
    assert.match(run.stdout, /safer: add the column without the volatile DEFAULT/);
    assert.match(run.stdout, /no lock_timeout set/);
    const failing = await check('ALTER TABLE accounts ADD COLUMN touched double precision DEFAULT random();\n', [
      '--fail-on',
      'regression,lock',
      '--format',
      'json',
    ]);
    assert.equal(failing.code, 1);
    const report = JSON.parse(failing.stdout);
    const statement = report.locks.statements[0];
    assert.equal(statement.source, 'observed');
    assert.ok(statement.duration_ms > 0);
    assert.deepEqual(statement.rewrote, ['accounts']);
    assert.ok(
      statement.locks.some(
        (l: { relation: string; lock: string }) => l.relation === 'accounts' && l.lock === 'ACCESS EXCLUSIVE',
      ),
    );
    assert.deepEqual(report.locks.findings.map((f: { pattern: string }) => f.pattern).sort(), [
      'missing_lock_timeout',
      'table_rewrite',
    ]);
  });

  test('a plain CREATE INDEX on a hot table is reported with its SHARE lock and the CONCURRENTLY form', async () => {
    const run = await check("SET lock_timeout = '2s';\nCREATE INDEX accounts_bid_idx ON accounts (bid);\n", [
      '--fail-on',
      'lock',
    ]);
    console.log(run.stdout);
    assert.equal(run.code, 1);
    assert.match(run.stdout, /takes SHARE on accounts \(in [\d.]+ (ms|s) on staging\)/);
    assert.match(run.stdout, /1 shape touches accounts at [\d.,]+ calls\/s in production and would queue behind it/);
    assert.match(run.stdout, /CREATE INDEX without CONCURRENTLY blocks every write to accounts/);
    assert.match(run.stdout, /safer: CREATE INDEX CONCURRENTLY/);
    const concurrent = await check('CREATE INDEX CONCURRENTLY accounts_bid_idx ON accounts (bid);\n', [
      '--fail-on',
      'lock',
      '--format',
      'json',
    ]);
    assert.equal(concurrent.code, 0, concurrent.stdout);
    const statement = JSON.parse(concurrent.stdout).locks.statements[0];
    assert.equal(statement.source, 'documented');
    assert.ok(
      statement.locks.some(
        (l: { relation: string; lock: string }) => l.relation === 'accounts' && l.lock === 'SHARE UPDATE EXCLUSIVE',
      ),
    );
  });

  test('a production plan staging cannot reproduce is warned about, and losing its index is a regression', async () => {
    const workload = JSON.parse(fs.readFileSync(workloadFile, 'utf8'));
    const typed = workload.shapes.find((s: Shape) => s.query === TYPED_SHAPE);
    // As if production's planner had chosen the primary key for it.
    typed.plan_fingerprint = '0123456789abcdef';
    typed.plan = ['Limit', 'Index Scan using invoices_pkey on invoices'];
    const file = path.join(tmp, 'unreproducible.json');
    fs.writeFileSync(file, JSON.stringify(workload));
    const harmless = await check('ALTER TABLE invoices ADD COLUMN note text;', [], file);
    assert.equal(harmless.code, 0, harmless.stdout + harmless.stderr);
    assert.match(
      harmless.stdout,
      /^warning: [0-9a-f]{16} select id, amount from invoices.*: staging cannot reproduce production's plan \(Limit \/ Index Scan using invoices_pkey on invoices\)/m,
    );
    const run = await check('ALTER TABLE invoices DROP CONSTRAINT invoices_pkey;', ['--format', 'json'], file);
    assert.equal(run.code, 1, run.stdout + run.stderr);
    const shape = JSON.parse(run.stdout).shapes.find((s: { query: string }) => s.query === TYPED_SHAPE);
    assert.equal(shape.verdict, 'regression');
    assert.equal(shape.reproduces_production, false);
    assert.match(shape.error, /production's plan uses invoices_pkey, which the migration drops/);
  });

  test('a harmless migration exits 0, even failing on locks and unchecked shapes', async () => {
    const run = await check("SET lock_timeout = '2s';\nALTER TABLE invoices ADD COLUMN note text;\n", [
      '--fail-on',
      'regression,lock',
      '--strict',
    ]);
    console.log(run.stdout);
    assert.equal(run.code, 0, run.stdout + run.stderr);
    assert.match(run.stdout, /^OK: no regression in \d+ shapes/);
    assert.match(run.stdout, /^locks: no outage pattern found; result: pass/m);
  });

  test("a captured function is not run as the check's role: the shape is not checked, and --strict fails on it", async () => {
    const run = await check('ALTER TABLE invoices ADD COLUMN note text;', [], probeWorkloadFile);
    assert.equal(run.code, 0, run.stdout + run.stderr);
    assert.match(
      run.stdout,
      /not checked: aaaaaaaaaaaaaaaa .*calls function pgw_probe\(\), implemented outside pg_catalog/,
    );
    assert.deepEqual(await probeSequence(), { last_value: '1', is_called: false }, 'pgw_probe() never ran');
    assert.equal((await check('ALTER TABLE invoices ADD COLUMN note text;', ['--strict'], probeWorkloadFile)).code, 1);
    assert.deepEqual(await probeSequence(), { last_value: '1', is_called: false });
  });

  test('--explain-role plans it as that role, which cannot do what the function tries', async () => {
    const run = await check(
      'ALTER TABLE invoices ADD COLUMN note text;',
      ['--explain-role', role, '--format', 'json'],
      probeWorkloadFile,
    );
    assert.equal(run.code, 0, run.stdout + run.stderr);
    const report = JSON.parse(run.stdout);
    assert.equal(report.planning.explain_role, role);
    const probe = report.shapes.find((s: { fingerprint: string }) => s.fingerprint === 'aaaaaaaaaaaaaaaa');
    assert.equal(probe.verdict, 'not_checked');
    assert.match(probe.error, /permission denied for sequence pgw_probe_seq/);
    assert.deepEqual(await probeSequence(), { last_value: '1', is_called: false });
    assert.equal(jsonShape(report, HOT).verdict, 'unchanged', 'the other shapes plan as the role');
    const unknown = await check('ALTER TABLE invoices ADD COLUMN note text;', ['--explain-role', 'pgw_no_such_role']);
    assert.equal(unknown.code, 2);
    assert.match(
      unknown.stderr,
      /cannot plan as --explain-role pgw_no_such_role: role "pgw_no_such_role" does not exist/,
    );
  });

  test('the attack is real: with --allow-user-functions planning runs the function', async () => {
    await check('ALTER TABLE invoices ADD COLUMN note text;', ['--allow-user-functions'], probeWorkloadFile);
    const after = await probeSequence();
    assert.equal(after.is_called, true, 'planning ran pgw_probe() as the check role');
    await withClient((c) => c.query("select setval('pgw_probe_seq', 1, false)"), url);
  });

  async function probeSequence(): Promise<{ last_value: string; is_called: boolean }> {
    return withClient(
      async (c) =>
        (
          await c.query<{ last_value: string; is_called: boolean }>(
            'select last_value::text, is_called from pgw_probe_seq',
          )
        ).rows[0],
      url,
    );
  }
});

/** Relations with their relfilenodes, columns, indexes and functions: compared before and after a check. */
function catalogSnapshot(url: string): Promise<string[]> {
  return withClient(async (c) => {
    const { rows } = await c.query<{ line: string }>(`
      select 'relation ' || c.relname || ' ' || c.relkind::text || ' ' || pg_relation_filenode(c.oid)::text as line
        from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = 'public'
      union all
      select 'index ' || pg_get_indexdef(i.indexrelid)
        from pg_index i join pg_class t on t.oid = i.indrelid join pg_namespace n on n.oid = t.relnamespace where n.nspname = 'public'
      union all
      select 'column ' || table_name || '.' || column_name || ' ' || data_type || ' ' || coalesce(column_default, '')
        from information_schema.columns where table_schema = 'public'
      union all
      select 'function ' || p.oid::regprocedure::text from pg_proc p where p.pronamespace = 'public'::regnamespace
      order by 1`);
    return rows.map((r) => r.line);
  }, url);
}
