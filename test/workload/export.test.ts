// GET /api/workload and `pgwarden workload export` on a real pgwarden: every
// parsed shape with its statistics and current plan, heaviest first, and no
// literal value anywhere unless workload_sample_params is on.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';
import { runWorkload } from '../../src/cli/workload.ts';
import { parseWorkload } from '../../src/workload/format.ts';
import {
  captureWorkload,
  createWorkloadDatabase,
  NAME_LITERAL,
  QUERIES,
  SECRET,
  type CapturedWorkload,
  type WorkloadDatabase,
  type WorkloadShapeJson,
} from './fixture.ts';

function capture() {
  let text = '';
  return {
    write: (chunk: string) => (text += chunk),
    get text() {
      return text;
    },
  };
}

function shapeOf(shapes: WorkloadShapeJson[], query: string): WorkloadShapeJson {
  const shape = shapes.find((s) => s.query === query);
  assert.ok(shape, `a shape for ${query} in ${shapes.map((s) => s.query).join(' | ')}`);
  return shape;
}

describe('the workload export', { timeout: 90_000 }, () => {
  let db: WorkloadDatabase;
  let tmp: string;

  before(async () => {
    db = await createWorkloadDatabase();
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-workload-'));
  });

  after(async () => {
    await db?.drop();
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  describe('without workload_sample_params', () => {
    let captured: CapturedWorkload;
    before(async () => {
      captured = await captureWorkload(db);
    });
    after(() => captured?.pgw.stop());

    test('every parsed shape is exported with its statistics and current plan, heaviest first', () => {
      const { workload } = captured;
      assert.equal(workload.format, 'pgwarden-workload/1');
      assert.doesNotThrow(() => parseWorkload(workload));
      const byEmail = shapeOf(workload.shapes, QUERIES.byEmail);
      assert.equal(byEmail.command, 'SELECT');
      assert.equal(byEmail.calls, 30);
      assert.deepEqual(byEmail.databases, [db.name]);
      assert.ok(byEmail.total_ms > 0 && byEmail.p95_ms > 0);
      assert.match(byEmail.plan_fingerprint ?? '', /^[0-9a-f]{16}$/);
      assert.ok(byEmail.plan?.includes('Index Scan using users_email_idx on users'), String(byEmail.plan));
      assert.deepEqual(byEmail.param_types, [], 'node-postgres declares no parameter types');
      const extra = byEmail as unknown as {
        plan_cost: number;
        relations: string[];
        first_seen: string;
        last_seen: string;
        calls_per_s: number;
      };
      assert.ok(extra.plan_cost > 0, "the production plan's cost");
      assert.deepEqual(extra.relations, ['users']);
      assert.ok(Date.parse(extra.first_seen) <= Date.parse(extra.last_seen));
      assert.ok(extra.calls_per_s > 0, 'a rate check-migration weighs locks against');
      assert.equal(
        shapeOf(workload.shapes, 'select count(*) from users where name = $1').param_types,
        null,
        'a simple Query has no Parse',
      );
      shapeOf(workload.shapes, QUERIES.insert);
      shapeOf(workload.shapes, QUERIES.byId);
      const totals = workload.shapes.map((s) => s.total_ms);
      assert.deepEqual(
        totals,
        [...totals].sort((a, b) => b - a),
        'heaviest first',
      );
    });

    test('fallback shapes are not exported', () => {
      assert.ok(captured.workload.shapes.every((s) => !s.query.startsWith('selec ')));
      assert.ok(captured.workload.shapes.every((s) => /^[0-9a-f]{16}$/.test(s.fingerprint)));
    });

    test('no literal value is exported and there are no samples', () => {
      const text = JSON.stringify(captured.workload);
      for (const value of [SECRET, NAME_LITERAL, 'user1@example.com', '@example.'])
        assert.ok(!text.includes(value), `${value} leaked into the workload`);
      assert.ok(captured.workload.shapes.every((s) => !('samples' in s)));
    });

    test('pgwarden workload export writes the same workload to a file', async () => {
      const file = path.join(tmp, 'workload.json');
      const out = capture();
      const err = capture();
      const code = await runWorkload(
        [
          'export',
          '--admin',
          `127.0.0.1:${captured.pgw.app.adminPort}`,
          '--token',
          captured.pgw.config.admin_token!,
          '--output',
          file,
        ],
        out,
        err,
      );
      assert.equal(code, 0, err.text);
      assert.equal(out.text, '');
      assert.match(err.text, /wrote \d+ shapes to /);
      const written = parseWorkload(JSON.parse(fs.readFileSync(file, 'utf8')));
      assert.deepEqual(
        written.shapes.map((s) => s.fingerprint).sort(),
        captured.workload.shapes.map((s) => s.fingerprint).sort(),
      );
      assert.ok(!fs.readFileSync(file, 'utf8').includes(SECRET));
    });

    test('pgwarden workload export writes to stdout by default', async () => {
      const out = capture();
      const code = await runWorkload(
        ['export', '--admin', `127.0.0.1:${captured.pgw.app.adminPort}`, '--token', captured.pgw.config.admin_token!],
        out,
        capture(),
      );
      assert.equal(code, 0);
      assert.equal(parseWorkload(JSON.parse(out.text)).format, 'pgwarden-workload/1');
    });

    test('a refused token exits 1, an unreachable admin API and bad usage exit 2', async () => {
      const admin = `127.0.0.1:${captured.pgw.app.adminPort}`;
      const err = capture();
      assert.equal(
        await runWorkload(['export', '--admin', admin, '--token', 'wrong-token-0123456789'], capture(), err),
        1,
      );
      assert.match(err.text, /admin token was refused \(HTTP 401\)/);
      const unreachable = capture();
      assert.equal(await runWorkload(['export', '--admin', '127.0.0.1:1', '--token', 't'], capture(), unreachable), 2);
      assert.match(unreachable.text, /cannot reach the admin API at http:\/\/127\.0\.0\.1:1/);
      assert.equal(await runWorkload(['import', '--token', 't'], capture(), capture()), 2);
      assert.equal(await runWorkload(['export', '--bogus'], capture(), capture()), 2);
    });
  });

  describe('with workload_sample_params', () => {
    let captured: CapturedWorkload;
    before(async () => {
      captured = await captureWorkload(db, { workload_sample_params: true });
    });
    after(() => captured?.pgw.stop());

    test('each shape carries sample values for its $n, Bind parameters and literals alike', () => {
      const { shapes } = captured.workload;
      const byEmail = shapeOf(shapes, QUERIES.byEmail);
      assert.ok(byEmail.samples!.length >= 1 && byEmail.samples!.length <= 3);
      for (const sample of byEmail.samples!) assert.match(sample[0] ?? '', /^user\d+@example\.com$/);
      const insert = shapeOf(shapes, QUERIES.insert);
      assert.ok(insert.samples!.some((s) => s.length === 2 && s[0]!.startsWith(SECRET) && s[1] === 'inserted'));
      assert.deepEqual(shapeOf(shapes, 'select count(*) from users where name = $1').samples![0], [NAME_LITERAL]);
    });
  });
});
