// Clients the proxy tests drive besides node-postgres and postgres.js: libpq's
// psql and pgbench as child processes. The raw socket client is in wire.ts.

import { spawn, type ChildProcess } from 'node:child_process';
import os from 'node:os';
import path from 'node:path';

export const PSQL = '/usr/bin/psql';
export const PGBENCH = '/usr/bin/pgbench';

export interface ProcessResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunningProcess {
  child: ChildProcess;
  /** Settles when the process has exited; it is killed at timeoutMs. */
  done: Promise<ProcessResult>;
}

/**
 * The environment for libpq tools: nothing inherited that starts with PG (no
 * stray PGHOST, PGSSLMODE or service file), no password file, and the password
 * only when given.
 */
export function libpqEnv(password?: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) if (!key.startsWith('PG')) env[key] = value;
  env.PGPASSFILE = path.join(os.tmpdir(), 'pgwarden-test-no-such-pgpass');
  env.PGCONNECT_TIMEOUT = '10';
  if (password !== undefined) env.PGPASSWORD = password;
  return env;
}

/** Starts a program and collects its output; a program still running at timeoutMs is killed. */
export function startProcess(file: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs = 30_000): RunningProcess {
  const child = spawn(file, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const done = new Promise<ProcessResult>((resolve, reject) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
  return { child, done };
}

/** A libpq key=value connection string (values quoted, so any role or database name works). */
export function conninfo(params: Record<string, string | number>): string {
  return Object.entries(params)
    .map(([key, value]) => `${key}='${String(value).replaceAll('\\', '\\\\').replaceAll("'", "\\'")}'`)
    .join(' ');
}

/** Runs `psql -X -A -t` with the given connection string and commands (`-c` each). */
export function psql(
  connection: string,
  commands: string[],
  options: { password?: string; timeoutMs?: number } = {},
): RunningProcess {
  const args = ['-X', '-A', '-t', '-d', connection];
  for (const command of commands) args.push('-c', command);
  return startProcess(PSQL, args, libpqEnv(options.password), options.timeoutMs);
}
