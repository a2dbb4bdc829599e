// `pgwarden demo --once`: the whole story on an embedded PostgreSQL, as a
// newcomer runs it; exit 0 means the incident was detected and attributed.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { test } from 'node:test';

/** The demo's steps wait up to 60 s each; on a busy machine the whole may take minutes. */
const DEMO_DEADLINE_MS = 270_000;

test('pgwarden demo --once detects, attributes, mitigates and recovers, and exits 0', {
  timeout: DEMO_DEADLINE_MS + 30_000,
}, async () => {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'demo', '--once'], {
    cwd: new URL('../..', import.meta.url),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const started = Date.now();
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
  // Past the deadline the demo is stopped, and the failure shows how far it got.
  // SIGTERM lets it stop its PostgreSQL and pgwarden; SIGKILL if even that hangs.
  const killer = setTimeout(() => {
    child.kill('SIGTERM');
    setTimeout(() => child.kill('SIGKILL'), 15_000).unref();
  }, DEMO_DEADLINE_MS);
  const [code, signal] = await once(child, 'exit');
  clearTimeout(killer);
  assert.ok(
    Date.now() - started < DEMO_DEADLINE_MS && signal === null,
    `the demo did not finish within ${DEMO_DEADLINE_MS / 1000} s; its output:\n${output}`,
  );
  for (const line of output.split('\n').filter((l) => /DETECTED|ATTRIBUTED|MITIGATED|RECOVERED|->/.test(l)))
    console.log(`# ${line}`);
  assert.equal(code, 0, output);
  assert.match(output, /DETECTED [\d.]+ s after the migration/);
  assert.match(output, /plan changed Index Scan using users_email_idx on users -> Seq Scan on users/);
  assert.match(output, /ruled out: the shape's own traffic did not jump/);
  assert.match(output, /MITIGATED/);
  assert.match(output, /RECOVERED/);
  // Never silent for long: consecutive lines at most ~5 s apart.
  const times = [...output.matchAll(/^\[\s*([\d.]+)s\]/gm)].map((m) => Number(m[1]));
  const gaps = times.slice(1).map((t, i) => t - times[i]);
  assert.ok(Math.max(...gaps) <= 5, `longest silence ${Math.max(...gaps)} s`);
});
