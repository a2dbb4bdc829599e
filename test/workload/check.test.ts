// `pgwarden check-migration` against a real staging database, with a workload
// captured by a real pgwarden: a dropped index is caught and attributed, harmless
// migrations pass, bad input and unreachable databases exit 2, and whatever
// happens (success, failure, timeout, Ctrl-C) the database is left as it was.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, afterEach, before, beforeEach, describe, test } from 'node:test';
import pg from 'pg';
import { runCheckMigration } from '../../src/cli/check-migration.ts';
import { waitFor, withClient } from '../harness/database.ts';
import { captureWorkload, catalogOf, createWorkloadDatabase, QUERIES, type WorkloadDatabase } from './fixture.ts';
import { freePort } from '../harness/postgres.ts';

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

describe('pgwarden check-migration', { timeout: 180_000 }, () => {
  let db: WorkloadDatabase;
  let tmp: string;
  let workloadFile: string;
  let sampledWorkloadFile: string;
  let catalog: string[];
  let emailFingerprint: string;

  before(async () => {
    db = await createWorkloadDatabase();
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-check-'));
    for (const [file, samples] of [
      ['workload.json', false],
      ['sampled.json', true],
    ] as const) {
      const { pgw, workload } = await captureWorkload(db, { workload_sample_params: samples });
      await pgw.stop();
      fs.writeFileSync(path.join(tmp, file), JSON.stringify(workload));
      emailFingerprint = workload.shapes.find((s) => s.query === QUERIES.byEmail)!.fingerprint;
    }
    workloadFile = path.join(tmp, 'workload.json');
    sampledWorkloadFile = path.join(tmp, 'sampled.json');
  });

  after(async () => {
    await db?.drop();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  beforeEach(async () => {
    catalog = await catalogOf(db.url);
  });

  afterEach(async () => {
    assert.deepEqual(await catalogOf(db.url), catalog, 'the check left the catalog as it was');
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

  async function check(
    migration: string,
    extra: string[] = [],
    options: { workload?: string; url?: string; signal?: AbortSignal } = {},
  ): Promise<Run> {
    const file = path.join(tmp, `migration-${Math.random().toString(36).slice(2)}.sql`);
    fs.writeFileSync(file, migration);
    let stdout = '';
    let stderr = '';
    const code = await runCheckMigration(
      ['--database-url', options.url ?? db.url, '--workload', options.workload ?? workloadFile, file, ...extra],
      { write: (s: string) => (stdout += s) },
      { write: (s: string) => (stderr += s) },
      options.signal ?? new AbortController().signal,
    );
    return { code, stdout, stderr };
  }

  test('dropping the index of the email lookup is a regression naming that shape and the Seq Scan', async () => {
    const run = await check('drop index users_email_idx;\n');
    console.log(run.stdout);
    assert.equal(run.code, 1, run.stderr);
    assert.equal(run.stderr, '');
    assert.match(run.stdout, /^REGRESSION: 1 of 4 shapes regressed/);
    const block = run.stdout.split('\n\n').find((b) => b.startsWith('REGRESSION  '));
    assert.ok(block, run.stdout);
    assert.match(block, new RegExp(`^REGRESSION  ${emailFingerprint}  ${QUERIES.byEmail.replace('$', '\\$')}$`, 'm'));
    assert.match(block, /calls 30 \([\d.]+\/s\), p95 \d/);
    assert.match(block, /plan mode: generic plan, reproduces production.s plan/);
    assert.match(block, /^ {2}Index Scan using users_email_idx on users -> Seq Scan on users$/m);
    const [, before, afterCost, ratio] = /cost ([\d.]+) -> ([\d.]+) \(([\d.]+)x\)/.exec(block) ?? [];
    assert.ok(Number(afterCost) > Number(before) * 2 && Number(ratio) >= 2, block);
  });

  test('the same check in JSON names the regression for CI', async () => {
    const run = await check('drop index users_email_idx;', ['--format', 'json']);
    assert.equal(run.code, 1);
    const report = JSON.parse(run.stdout);
    assert.equal(report.result, 'regression');
    assert.equal(report.summary.regressions, 1);
    const shape = report.shapes.find((s: { fingerprint: string }) => s.fingerprint === emailFingerprint);
    assert.equal(shape.verdict, 'regression');
    assert.equal(shape.headline, 'Index Scan using users_email_idx on users -> Seq Scan on users');
    assert.ok(shape.cost_ratio >= 2);
    const totals = report.shapes.map((s: { total_ms: number }) => s.total_ms);
    assert.deepEqual(
      totals,
      [...totals].sort((a: number, b: number) => b - a),
      'heaviest shapes first',
    );
  });

  test('with sample parameters the shapes are explained with the captured values', async () => {
    const run = await check('drop index users_email_idx;', ['--format', 'json'], { workload: sampledWorkloadFile });
    assert.equal(run.code, 1, run.stderr);
    const shape = JSON.parse(run.stdout).shapes.find(
      (s: { fingerprint: string }) => s.fingerprint === emailFingerprint,
    );
    assert.equal(shape.verdict, 'regression');
    assert.equal(typeof shape.sample, 'number');
    assert.match(shape.headline, /Index Scan using users_email_idx on users -> Seq Scan on users/);
  });

  test('adding a column is clean', async () => {
    const run = await check('alter table users add column nickname text;');
    assert.equal(run.code, 0, run.stdout + run.stderr);
    assert.match(
      run.stdout,
      /^OK: no regression in 4 shapes \(0 plan changes under the 2x cost threshold, 4 unchanged, 0 not checked\) after migration-\w+\.sql \(1 statement\), rolled back/,
    );
  });

  test('CREATE INDEX CONCURRENTLY runs as CREATE INDEX and its better plan is a change, not a regression', async () => {
    const run = await check(
      '-- a new index for the count by name\nCREATE INDEX CONCURRENTLY users_name_idx ON users (name);\n',
    );
    console.log(run.stdout);
    assert.equal(run.code, 0, run.stdout + run.stderr);
    assert.match(run.stdout, /^OK: no regression in 4 shapes \(1 plan change under the 2x cost threshold, 3 unchanged/);
    assert.match(run.stdout, /^changed {5}[0-9a-f]{16} {2}select count\(\*\) from users where name = \$1$/m);
    assert.match(run.stdout, /Seq Scan on users -> .*users_name_idx/);
    assert.match(
      run.stdout,
      /^note: statement 1 \(line 2\): CREATE INDEX CONCURRENTLY runs as CREATE INDEX inside the check's transaction$/m,
    );
  });

  test('dropping a column a shape reads is a regression carrying the error', async () => {
    const run = await check('alter table users drop column name;', ['--format', 'json']);
    assert.equal(run.code, 1);
    const shape = JSON.parse(run.stdout).shapes.find(
      (s: { fingerprint: string }) => s.fingerprint === emailFingerprint,
    );
    assert.equal(shape.verdict, 'regression');
    assert.equal(shape.after, null);
    assert.match(shape.error, /column "name" does not exist/);
  });

  test('transaction control in the migration is skipped, so nothing is ever committed', async () => {
    const run = await check('BEGIN;\nALTER TABLE users ADD COLUMN committed_by_mistake int;\nCOMMIT;\n');
    assert.equal(run.code, 0, run.stdout + run.stderr);
    assert.match(run.stdout, /^note: statement 3 \(line 3\): skipped COMMIT/m);
    assert.match(run.stdout, /\(1 of 3 statements run\)/);
  });

  test('VACUUM ANALYZE runs as ANALYZE, a plain VACUUM is skipped with a note', async () => {
    const run = await check('VACUUM ANALYZE users;\nVACUUM users;\n');
    assert.equal(run.code, 0, run.stdout + run.stderr);
    assert.match(run.stdout, /^note: statement 1 \(line 1\): VACUUM ANALYZE runs as ANALYZE users/m);
    assert.match(run.stdout, /^note: statement 2 \(line 2\): skipped VACUUM/m);
  });

  test('a migration that does not parse exits 2 with one line naming its line', async () => {
    const run = await check('alter table users add column ok int;\nalter tabel users drop column email;\n');
    assert.equal(run.code, 2);
    assert.equal(run.stdout, '');
    assert.match(
      run.stderr,
      /^pgwarden check-migration: the migration \S*migration-\w+\.sql does not parse \(line 2\): syntax error at or near "tabel"\n$/,
    );
  });

  test('a migration that fails on the staging database exits 2 and changes nothing', async () => {
    const run = await check('alter table users add column fine int;\nalter table users drop column no_such_column;\n');
    assert.equal(run.code, 2);
    assert.match(
      run.stderr,
      /the migration failed at statement 2 \(line 2\): column "no_such_column" of relation "users" does not exist; nothing was changed/,
    );
  });

  test('an unreachable database exits 2 with one line', async () => {
    const port = await freePort();
    const run = await check('drop index users_email_idx;', [], { url: `postgres://postgres@127.0.0.1:${port}/x` });
    assert.equal(run.code, 2);
    assert.match(
      run.stderr,
      new RegExp(`^pgwarden check-migration: cannot connect to 127\\.0\\.0\\.1:${port}/x: .*ECONNREFUSED.*\\n$`),
    );
  });

  test('bad flags and an unreadable workload exit 2', async () => {
    assert.equal((await check('select 1', ['--format', 'yaml'])).code, 2);
    assert.equal((await check('select 1', ['--cost-ratio', '0'])).code, 2);
    const failOn = await check('select 1', ['--fail-on', 'regression,typo']);
    assert.equal(failOn.code, 2);
    assert.match(failOn.stderr, /--fail-on takes a comma list of regression, lock, not-checked; got 'typo'/);
    const missing = await check('select 1', [], { workload: path.join(tmp, 'missing.json') });
    assert.equal(missing.code, 2);
    assert.match(missing.stderr, /cannot use the workload .*missing\.json: ENOENT/);
    const notWorkload = path.join(tmp, 'not-workload.json');
    fs.writeFileSync(notWorkload, JSON.stringify({ format: 'something/else', shapes: [] }));
    assert.match(
      (await check('select 1', [], { workload: notWorkload })).stderr,
      /not a pgwarden workload \(pgwarden-workload\/1\): format/,
    );
  });

  test('a migration waiting for a lock gives up after --lock-timeout', async () => {
    const holder = new pg.Client({ connectionString: db.url });
    await holder.connect();
    try {
      await holder.query('begin');
      await holder.query('select 1 from users limit 1'); // AccessShareLock: EXPLAIN is fine, ALTER TABLE waits
      const started = Date.now();
      const run = await check('alter table users add column blocked int;', ['--lock-timeout', '0.5']);
      assert.equal(run.code, 2);
      assert.match(
        run.stderr,
        /failed at statement 1 \(line 1\): canceling statement due to lock timeout \(--lock-timeout/,
      );
      assert.ok(Date.now() - started < 10_000);
    } finally {
      await holder.query('rollback');
      await holder.end();
    }
  });

  test('--timeout stops a long migration and rolls it back', async () => {
    const started = Date.now();
    const run = await check('alter table users add column slow int;\nselect pg_sleep(30);\n', ['--timeout', '2']);
    assert.equal(run.code, 2);
    assert.match(run.stderr, /did not finish within 2 s \(--timeout\); it was stopped and rolled back/);
    assert.ok(Date.now() - started < 10_000, `took ${Date.now() - started} ms`);
  });

  test('Ctrl-C stops the check and rolls it back', async () => {
    const controller = new AbortController();
    const running = check('alter table users add column interrupted int;\nselect pg_sleep(30);\n', [], {
      signal: controller.signal,
    });
    await waitFor(
      () =>
        withClient(
          async (c) =>
            (
              await c.query(
                "select 1 from pg_stat_activity where query like 'select pg_sleep(30)%' and application_name = 'pgwarden-check-migration'",
              )
            ).rowCount === 1,
        ),
      { what: 'the migration to be running' },
    );
    controller.abort();
    const run = await running;
    assert.equal(run.code, 130);
    assert.match(run.stderr, /interrupted; the transaction was rolled back, nothing was changed/);
  });
});
