// Builds pgwarden and starts it as a separate process in front of the benchmark's server.
//
// The benchmark measures the shipped artefact (bin/pgwarden.js running the
// compiled dist/), in its own process, so its CPU and memory are its own and
// not mixed with the benchmark's.

import fs from 'node:fs';
import path from 'node:path';
import { execFileAsync, freePort, spawnDaemon, tail, listeningOrStopped, type Daemon } from './processes.ts';

const ROOT = path.resolve(import.meta.dirname, '..', '..');
/** The schema wants at least 16 characters; only the memory benchmark reads the admin API. */
export const ADMIN_TOKEN = 'pgwarden-bench-admin-token';

export interface StartedProxy {
  daemon: Daemon;
  port: number;
  /** pgwarden's admin API (PgBouncer has none: 0). */
  adminPort: number;
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

/** How one pgwarden target is started; two of them can run side by side. */
export interface PgwardenSpec {
  /** The target's name: names the process, its log and its state file. */
  name: string;
  /** The `stats` option: fingerprints and per-shape statistics on or off. */
  stats: boolean;
  /** --pgwarden-args; they come last, so they can override the benchmark's other defaults. */
  extraArgs: string[];
  tempDir: string;
  /** Node's own flags, before the script (--cpu-prof for the profile). */
  nodeArgs?: string[];
}

/** --stats as pgwarden takes it: true or false, nothing else. */
export function statsFlag(value: string): boolean {
  if (value !== 'true' && value !== 'false') throw new Error(`--stats must be true or false; got '${value}'`);
  return value === 'true';
}

/** The flags the benchmark gives `pgwarden start` besides --listen, --upstream and --admin. */
export function pgwardenFlags(spec: PgwardenSpec): string[] {
  return [
    '--stats',
    String(spec.stats),
    // Its own rules file, so that neither a developer's .pgwarden-state.json in
    // the checkout nor the other pgwarden target can put rules in the path.
    '--state-file',
    path.join(spec.tempDir, `${spec.name}-state.json`),
    ...spec.extraArgs,
  ];
}

export async function startPgwarden(upstream: string, spec: PgwardenSpec): Promise<StartedProxy> {
  const port = await freePort();
  const adminPort = await freePort();
  const daemon = await spawnDaemon({
    name: spec.name,
    command: process.execPath,
    args: [
      ...(spec.nodeArgs ?? []),
      path.join(ROOT, 'bin', 'pgwarden.js'),
      'start',
      '--listen',
      `127.0.0.1:${port}`,
      '--upstream',
      upstream,
      '--admin',
      `127.0.0.1:${adminPort}`,
      ...pgwardenFlags(spec),
    ],
    env: { ...process.env, PGWARDEN_LOG_LEVEL: 'warn', PGWARDEN_ADMIN_TOKEN: ADMIN_TOKEN },
    cwd: ROOT,
    logFile: path.join(spec.tempDir, `${spec.name}.log`),
  });
  await listeningOrStopped(daemon, '127.0.0.1', port);
  return { daemon, port, adminPort };
}
