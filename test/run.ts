// `npm test`: runs the test files against a real PostgreSQL.
//
// Usage: node --import tsx test/run.ts [file.test.ts ...] [--node-test-flag ...]
//
// Uses $PGWARDEN_TEST_DATABASE_URL when set; otherwise starts one throwaway
// server for the whole run (one initdb instead of one per file) and hands it to
// the test processes through the environment. Node 20's test runner does not
// expand globs, so the default file list is found by walking test/.

import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { withClient } from './harness/database.ts';
import { startPostgres, type PostgresServer } from './harness/postgres.ts';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const testDir = path.join(root, 'test');

function findTestFiles(dir: string): string[] {
  const found: string[] = [];
  for (const entry of fs.readdirSync(dir, { withFileTypes: true })) {
    if (entry.name === 'node_modules' || entry.name.startsWith('.')) continue;
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) found.push(...findTestFiles(full));
    else if (entry.isFile() && entry.name.endsWith('.test.ts')) found.push(path.relative(root, full));
  }
  return found;
}

const args = process.argv.slice(2);
const flags = args.filter((arg) => arg.startsWith('--'));
const requested = args.filter((arg) => !arg.startsWith('--'));
const files = requested.length > 0 ? requested : findTestFiles(testDir).sort();
if (files.length === 0) {
  console.error(`pgwarden tests: no *.test.ts files under ${testDir}`);
  process.exit(1);
}

let server: PostgresServer | undefined;
if (process.env.PGWARDEN_TEST_DATABASE_URL) {
  const url = new URL(process.env.PGWARDEN_TEST_DATABASE_URL);
  const versionNum = await withClient(async (client) => {
    const { rows } = await client.query<{ server_version_num: string }>('show server_version_num');
    return Number(rows[0].server_version_num);
  }).catch((error: Error) => {
    console.error(
      `pgwarden tests: cannot query PGWARDEN_TEST_DATABASE_URL (${url.hostname}:${url.port || 5432}): ${error.message}`,
    );
    process.exit(1);
  });
  const version = Math.floor(versionNum / 10_000);
  process.env.PGWARDEN_TEST_PG_VERSION ??= String(version);
  console.error(
    `pgwarden tests: PostgreSQL ${version} from PGWARDEN_TEST_DATABASE_URL ` +
      `(${url.hostname}:${url.port || 5432}, binDir ${process.env.PGWARDEN_TEST_PG_BIN_DIR ?? 'unknown'})`,
  );
} else {
  const started = performance.now();
  server = await startPostgres();
  const ms = Math.round(performance.now() - started);
  process.env.PGWARDEN_TEST_DATABASE_URL = server.url();
  process.env.PGWARDEN_TEST_PG_BIN_DIR = server.binDir;
  process.env.PGWARDEN_TEST_PG_VERSION = String(server.version);
  console.error(
    `pgwarden tests: PostgreSQL ${server.version} from ${server.binDir} on ${server.host}:${server.port} ` +
      `(started in ${ms} ms, data ${server.dataDir})`,
  );
}

const nodeArgs = ['--import', 'tsx', '--test', '--test-concurrency=1'];
if (process.env.PGWARDEN_TEST_PATTERN) nodeArgs.push(`--test-name-pattern=${process.env.PGWARDEN_TEST_PATTERN}`);
nodeArgs.push(...flags, ...files);

const child: ChildProcess = spawn(process.execPath, nodeArgs, { cwd: root, stdio: 'inherit' });

// Our listeners also tell startPostgres's crash guard that we own the shutdown
// order: the tests end first, then the server, then we exit with their code.
let interrupts = 0;
const onSignal = (signal: NodeJS.Signals): void => {
  interrupts++;
  // A terminal's Ctrl-C already reached the child (same process group); a
  // targeted kill of this process did not. A second interrupt means "now".
  child.kill(interrupts > 1 ? 'SIGKILL' : signal);
};
process.on('SIGINT', onSignal);
process.on('SIGTERM', onSignal);

const exitCode = await new Promise<number>((resolve) => {
  child.once('error', (error) => {
    console.error(`pgwarden tests: could not start the test runner: ${error.message}`);
    resolve(1);
  });
  child.once('exit', (code, signal) => resolve(code ?? 128 + (signal ? os.constants.signals[signal] : 0)));
});

await server?.stop();
process.exit(exitCode);
