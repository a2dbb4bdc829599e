// Runs pgbench (the one from postgresql-client, version 15) and reads its summary.
//
// pgbench is the load generator every PostgreSQL proxy is judged with, so our
// numbers compare directly with anyone else's. We use only its built-in scripts
// and parse the summary lines of pgbench 15.

import { tail, execFileAsync } from './processes.ts';

export const MODES = {
  'select-simple': { args: ['-S', '-M', 'simple'], vacuum: false },
  'select-extended': { args: ['-S', '-M', 'extended'], vacuum: false },
  'select-prepared': { args: ['-S', '-M', 'prepared'], vacuum: false },
  // Vacuum (and truncation of pgbench_history) before each run keeps the
  // back-to-back runs of the write workload comparable.
  'tpcb-prepared': { args: ['-b', 'tpcb-like', '-M', 'prepared'], vacuum: true },
} as const;

export type Mode = keyof typeof MODES;
export const MODE_NAMES = Object.keys(MODES) as Mode[];

/** Where pgbench connects: a server, directly or through a proxy. */
export interface Endpoint {
  host: string;
  port: number;
  user: string;
  database: string;
  password?: string;
}

export interface PgbenchResult {
  tps: number;
  latencyAvgMs: number;
  transactions: number;
  failedTransactions: number;
  initialConnectionMs: number | undefined;
}

/** Slack on top of -T before a hung pgbench (a stuck proxy) is killed. */
const RUN_GRACE_MS = 60_000;

export async function runPgbench(
  endpoint: Endpoint,
  run: { mode: Mode; clients: number; durationS: number },
  signal: AbortSignal,
): Promise<PgbenchResult> {
  const { args, vacuum } = MODES[run.mode];
  const threads = Math.min(run.clients, 2);
  const argv = ['-T', String(run.durationS), '-c', String(run.clients), '-j', String(threads), ...args];
  if (!vacuum) argv.push('--no-vacuum');
  const stdout = await pgbench(endpoint, argv, run.durationS * 1000 + RUN_GRACE_MS, signal);
  return parseSummary(stdout);
}

/** `pgbench -i -s scale`: (re)creates the pgbench_* tables. */
export async function initPgbench(endpoint: Endpoint, scale: number, signal: AbortSignal): Promise<void> {
  await pgbench(endpoint, ['-i', '-s', String(scale), '--quiet'], 30 * 60_000, signal);
}

export async function pgbenchVersion(): Promise<string> {
  const { stdout } = await execFileAsync('pgbench', ['--version']);
  return stdout.trim();
}

async function pgbench(endpoint: Endpoint, argv: string[], timeoutMs: number, signal: AbortSignal): Promise<string> {
  try {
    const { stdout } = await execFileAsync('pgbench', argv, {
      env: pgbenchEnv(endpoint),
      timeout: timeoutMs,
      killSignal: 'SIGKILL',
      maxBuffer: 16 * 1024 * 1024,
      signal,
    });
    return stdout;
  } catch (error) {
    if (signal.aborted) throw error;
    const {
      stdout = '',
      stderr = '',
      code,
      killed,
    } = error as { stdout?: string; stderr?: string; code?: unknown; killed?: boolean };
    const why = killed ? `killed after ${timeoutMs / 1000} s` : `exit ${String(code)}`;
    throw new Error(`pgbench ${argv.join(' ')} failed (${why}):\n${tail(`${stdout}${stderr}`, 12)}`);
  }
}

/** Only our PG* variables: the developer's shell must not redirect or slow the run. */
function pgbenchEnv(endpoint: Endpoint): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!key.startsWith('PG')) env[key] = value;
  }
  env.PGHOST = endpoint.host;
  env.PGPORT = String(endpoint.port);
  env.PGUSER = endpoint.user;
  env.PGDATABASE = endpoint.database;
  if (endpoint.password !== undefined) env.PGPASSWORD = endpoint.password;
  // TLS would cost the targets unequally; all three speak plain TCP on loopback.
  env.PGSSLMODE = 'disable';
  env.PGGSSENCMODE = 'disable';
  return env;
}

/** Reads the summary pgbench 15 prints after a run. */
export function parseSummary(stdout: string): PgbenchResult {
  const number = (pattern: RegExp): number | undefined => {
    const match = pattern.exec(stdout);
    return match ? Number(match[1]) : undefined;
  };
  const tps = number(/^tps = ([\d.]+) \(without initial connection time\)$/m);
  const latencyAvgMs = number(/^latency average = ([\d.]+) ms$/m);
  const transactions = number(/^number of transactions actually processed: (\d+)/m);
  if (tps === undefined || latencyAvgMs === undefined || transactions === undefined) {
    throw new Error(`unexpected pgbench output:\n${tail(stdout, 12)}`);
  }
  return {
    tps,
    latencyAvgMs,
    transactions,
    failedTransactions: number(/^number of failed transactions: (\d+)/m) ?? 0,
    initialConnectionMs: number(/^initial connection time = ([\d.]+) ms$/m),
  };
}
