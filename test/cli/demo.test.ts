// `pgwarden demo --once`: the whole story on an embedded PostgreSQL, as a
// newcomer runs it; exit 0 means the incident was detected and attributed.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { test } from 'node:test';

test('pgwarden demo --once detects, attributes, mitigates and recovers, and exits 0', {
  timeout: 240_000,
}, async () => {
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'demo', '--once'], {
    cwd: new URL('../..', import.meta.url),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
  const [code] = await once(child, 'exit');
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
