// Builds pgwarden and starts it as a separate process in front of the benchmark's server.
//
// The benchmark measures the shipped artefact (bin/pgwarden.js running the
// compiled dist/), in its own process, so its CPU and memory are its own and
// not mixed with the benchmark's.

import fs from 'node:fs';
import path from 'node:path';
import { execFileAsync, freePort, spawnDaemon, tail, waitUntilListening, type Daemon } from './processes.ts';

const ROOT = path.resolve(import.meta.dirname, '..', '..');
/** The schema wants at least 16 characters; the admin API is not used by the benchmark. */
const ADMIN_TOKEN = 'pgwarden-bench-admin-token';

export interface StartedProxy {
  daemon: Daemon;
  port: number;
}

/** `npm run build`; throws with the end of its output when dist/ cannot be produced. */
export async function buildPgwarden(): Promise<void> {
  try {
    await execFileAsync('npm', ['run', 'build'], { cwd: ROOT, maxBuffer: 16 * 1024 * 1024 });
  } catch (error) {
    const { stdout = '', stderr = '' } = error as { stdout?: string; stderr?: string };
    throw new Error(`npm run build failed:\n${tail(`${stdout}${stderr}`, 15)}`);
  }
  const main = path.join(ROOT, 'dist', 'cli', 'main.js');
  if (!fs.existsSync(main)) throw new Error(`npm run build succeeded but ${main} is missing`);
}

/** package.json's version and the checked-out commit, so results name what was measured. */
export async function pgwardenVersion(): Promise<string> {
  const { version } = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
  try {
    const { stdout: commit } = await execFileAsync('git', ['rev-parse', '--short', 'HEAD'], { cwd: ROOT });
    const { stdout: changes } = await execFileAsync('git', ['status', '--porcelain', '--', 'src'], { cwd: ROOT });
    return `${version} at ${commit.trim()}${changes.trim() ? ' with uncommitted changes in src/' : ''}`;
  } catch {
    return version; // not a git checkout
  }
}

export async function startPgwarden(upstream: string, extraArgs: string[], tempDir: string): Promise<StartedProxy> {
  const port = await freePort();
  const adminPort = await freePort();
  const daemon = await spawnDaemon({
    name: 'pgwarden',
    command: process.execPath,
    args: [
      path.join(ROOT, 'bin', 'pgwarden.js'),
      'start',
      '--listen',
      `127.0.0.1:${port}`,
      '--upstream',
      upstream,
      '--admin',
      `127.0.0.1:${adminPort}`,
      ...extraArgs,
    ],
    env: { ...process.env, PGWARDEN_LOG_LEVEL: 'warn', PGWARDEN_ADMIN_TOKEN: ADMIN_TOKEN },
    cwd: ROOT,
    logFile: path.join(tempDir, 'pgwarden.log'),
  });
  try {
    await waitUntilListening(daemon, '127.0.0.1', port);
  } catch (error) {
    await daemon.stop();
    throw error;
  }
  return { daemon, port };
}
