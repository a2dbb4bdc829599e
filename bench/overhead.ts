// The overhead benchmark: what does putting pgwarden in front of PostgreSQL cost,
// next to going direct and next to PgBouncer?
//
// One command starts a throwaway PostgreSQL (or uses PGWARDEN_BENCH_DATABASE_URL),
// starts two pgwardens (a plain proxy with --stats false, and one with
// fingerprints and statistics on) and PgBouncer as separate processes, runs
// pgbench against the targets interleaved (so drift hits all of them alike),
// measures each proxy's CPU per transaction and memory from /proc, prints one
// table per mode and, with --json, writes every number to a file. See bench/README.md.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pg from 'pg';
import { startPostgres } from '../test/harness/postgres.ts';
import { Cleanup } from './lib/cleanup.ts';
import {
  isPgwardenTarget,
  parseOptions,
  PGWARDEN_TARGETS,
  UsageError,
  USAGE,
  type BenchOptions,
  type Target,
} from './lib/options.ts';
import { initPgbench, pgbenchVersion, runPgbench, type Endpoint, type Mode } from './lib/pgbench.ts';
import { findPgbouncer, pgbouncerVersion, startPgbouncer } from './lib/pgbouncer.ts';
import { buildPgwarden, pgwardenVersion, startPgwarden, type StartedProxy } from './lib/pgwarden.ts';
import { clockTicksPerSecond, treeCpuTicks, treeRssKib } from './lib/procfs.ts';
import { findExecutable, tailOfFile, type Daemon } from './lib/processes.ts';
import {
  machineDescription,
  printHeader,
  printModeTable,
  writeJson,
  type Failure,
  type Measurement,
  type ProxyUsage,
} from './lib/report.ts';

/** A target pgbench can be pointed at; proxies also have the process we measure. */
interface ActiveTarget {
  name: Target;
  endpoint: Endpoint;
  daemon?: Daemon;
}

/**
 * The warm-up load: enough clients to exercise every proxy path, JIT included.
 * select-simple is there for pgwarden-stats: its literal changes on every
 * query, so every query takes the path that finds the shape of a new text,
 * which -M prepared takes once per connection.
 */
const WARMUP_MODES: Mode[] = ['select-prepared', 'select-simple'];
const WARMUP_CLIENTS = 8;
const RSS_SAMPLE_INTERVAL_MS = 1_000;

async function main(argv: string[]): Promise<number> {
  let options: BenchOptions | undefined;
  try {
    options = parseOptions(argv, process.env);
  } catch (error) {
    if (!(error instanceof UsageError)) throw error;
    process.stderr.write(`bench: ${error.message}\n${USAGE}`);
    return 2;
  }
  if (!options) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (!findExecutable('pgbench')) {
    process.stderr.write('bench: pgbench is not on PATH; install it with: apt-get install -y postgresql-client\n');
    return 1;
  }
  const cleanup = new Cleanup();
  try {
    await benchmark(options, cleanup);
    return 0;
  } catch (error) {
    if (cleanup.signal.aborted) return 130;
    process.stderr.write(`bench: ${(error as Error).message}\n`);
    return 1;
  } finally {
    await cleanup.releaseAll();
  }
}

async function benchmark(options: BenchOptions, cleanup: Cleanup): Promise<void> {
  const tempDir = makeTempDir(cleanup);
  const database = await startDatabase(options, cleanup);
  cleanup.check();
  progress(`pgbench -i -s ${options.scale} on ${database.host}:${database.port}/${database.database}`);
  await initPgbench(database, options.scale, cleanup.signal);

  const skipped: Record<string, string> = {};
  const targets: ActiveTarget[] = [];
  // Both pgwarden targets run the same dist/, built once.
  const build = once(async () => {
    progress('building pgwarden (npm run build)');
    await buildPgwarden();
  });
  for (const name of options.targets) {
    cleanup.check();
    try {
      targets.push(await startTarget(name, database, options, tempDir, build, cleanup));
    } catch (error) {
      if (cleanup.signal.aborted) throw error;
      skipped[name] = (error as Error).message;
    }
  }

  const machine = machineDescription(await versions(database, targets));
  printHeader(machine, options);
  for (const [name, reason] of Object.entries(skipped)) console.log(`\n${name} SKIPPED: ${reason}`);
  if (targets.length === 0) throw new Error('no target could be started');

  await warmUp(targets, options, cleanup);
  const measurements: Measurement[] = [];
  const failures: Failure[] = [];
  const ticksPerSecond = clockTicksPerSecond();
  for (const mode of options.modes) {
    for (const clients of options.clients) {
      for (const target of targets) {
        cleanup.check();
        const run = { mode, clients, durationS: options.durationS };
        try {
          const measurement = await measure(target, run, ticksPerSecond, cleanup.signal);
          measurements.push(measurement);
          progress(`${mode} ${clients} clients ${target.name}: ${measurement.tps.toFixed(0)} tps`);
        } catch (error) {
          if (cleanup.signal.aborted) throw error;
          failures.push({ mode, clients, target: target.name, error: (error as Error).message });
          progress(`${mode} ${clients} clients ${target.name}: FAILED`);
        }
      }
    }
    printModeTable(mode, options.clients, measurements, failures);
  }
  if (options.jsonFile) {
    writeJson(options.jsonFile, { machine, options, measurements, failures, skipped });
    console.log(`\nresults written to ${options.jsonFile}`);
  }
}

function makeTempDir(cleanup: Cleanup): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgwarden-bench-'));
  // PgBouncer runs as 'postgres' when we are root and must reach its files below.
  fs.chmodSync(dir, 0o711);
  const remove = (): void => fs.rmSync(dir, { recursive: true, force: true });
  cleanup.add({ name: dir, release: async () => remove(), releaseNow: remove });
  return dir;
}

async function startDatabase(options: BenchOptions, cleanup: Cleanup): Promise<Endpoint> {
  if (options.databaseUrl) return endpointFromUrl(options.databaseUrl);
  progress('starting a throwaway PostgreSQL');
  const server = await startPostgres();
  // test/harness/postgres.ts has its own synchronous backstop on 'exit'.
  cleanup.add({ name: 'PostgreSQL', release: () => server.stop(), releaseNow: () => {} });
  return { host: server.host, port: server.port, user: server.superuser, database: 'postgres' };
}

function endpointFromUrl(url: string): Endpoint {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    throw new Error('PGWARDEN_BENCH_DATABASE_URL is not a URL (expected postgres://user:password@host:port/database)');
  }
  const user = decodeURIComponent(parsed.username) || 'postgres';
  return {
    host: parsed.hostname.replace(/^\[(.*)\]$/, '$1') || '127.0.0.1',
    port: Number(parsed.port || 5432),
    user,
    database: decodeURIComponent(parsed.pathname.slice(1)) || user,
    password: parsed.password ? decodeURIComponent(parsed.password) : undefined,
  };
}

async function startTarget(
  name: Target,
  database: Endpoint,
  options: BenchOptions,
  tempDir: string,
  build: () => Promise<void>,
  cleanup: Cleanup,
): Promise<ActiveTarget> {
  if (name === 'direct') return { name, endpoint: database };
  let started: StartedProxy;
  if (isPgwardenTarget(name)) {
    await build();
    const { stats } = PGWARDEN_TARGETS[name];
    progress(`starting ${name} (--stats ${stats})`);
    const upstream = `${database.host.includes(':') ? `[${database.host}]` : database.host}:${database.port}`;
    started = await startPgwarden(upstream, { name, stats, extraArgs: options.pgwardenArgs, tempDir });
  } else {
    const binary = findPgbouncer();
    if (!binary) throw new Error('pgbouncer is not installed (apt-get install -y pgbouncer)');
    progress('starting PgBouncer');
    started = await startPgbouncer(binary, database, tempDir);
  }
  const { daemon } = started;
  cleanup.add({ name, release: () => daemon.stop(), releaseNow: () => daemon.killNow() });
  return { name, endpoint: { ...database, host: '127.0.0.1', port: started.port }, daemon };
}

async function versions(database: Endpoint, targets: ActiveTarget[]): Promise<Record<string, string>> {
  const result: Record<string, string> = {
    PostgreSQL: await serverVersion(database),
    pgbench: await pgbenchVersion(),
  };
  if (targets.some((target) => isPgwardenTarget(target.name))) result.pgwarden = await pgwardenVersion();
  const pgbouncer = findPgbouncer();
  if (pgbouncer) result.pgbouncer = await pgbouncerVersion(pgbouncer);
  return result;
}

async function serverVersion(database: Endpoint): Promise<string> {
  const client = new pg.Client({ ...database, ssl: false });
  client.on('error', () => {}); // a late connection error must not crash the benchmark
  await client.connect();
  try {
    const { rows } = await client.query<{ server_version: string }>('SHOW server_version');
    return rows[0].server_version;
  } finally {
    await client.end();
  }
}

/** Unrecorded load on each target, so that no target's first run pays for cold caches or JIT. */
async function warmUp(targets: ActiveTarget[], options: BenchOptions, cleanup: Cleanup): Promise<void> {
  if (options.warmupS === 0) return;
  for (const target of targets) {
    for (const mode of WARMUP_MODES) {
      cleanup.check();
      progress(`warming up ${target.name} with ${mode} (${options.warmupS} s)`);
      try {
        await runPgbench(
          target.endpoint,
          { mode, clients: WARMUP_CLIENTS, durationS: options.warmupS },
          cleanup.signal,
        );
      } catch (error) {
        if (cleanup.signal.aborted) throw error;
        progress(`warm-up of ${target.name} failed (its runs will show why): ${(error as Error).message}`);
        break;
      }
    }
  }
}

async function measure(
  target: ActiveTarget,
  run: { mode: Mode; clients: number; durationS: number },
  ticksPerSecond: number,
  signal: AbortSignal,
): Promise<Measurement> {
  const { daemon } = target;
  if (daemon) assertRunning(daemon);
  const cpuBefore = daemon ? treeCpuTicks(daemon.pid) : 0;
  const rss = daemon ? sampleRss(daemon.pid) : undefined;
  let result;
  try {
    result = await runPgbench(target.endpoint, run, signal);
  } catch (error) {
    if (daemon && daemon.exitReason() !== undefined) assertRunning(daemon); // the real cause
    throw error;
  } finally {
    rss?.stop();
  }
  const measurement: Measurement = { mode: run.mode, clients: run.clients, target: target.name, ...result };
  if (daemon && rss) {
    assertRunning(daemon);
    const cpuUs = ((treeCpuTicks(daemon.pid) - cpuBefore) * 1e6) / ticksPerSecond;
    const usage: ProxyUsage = {
      cpuUs,
      cpuUsPerTxn: result.transactions > 0 ? cpuUs / result.transactions : 0,
      rssPeakKib: rss.peak(),
      rssEndKib: rss.last(),
    };
    measurement.proxy = usage;
  }
  return measurement;
}

function assertRunning(daemon: Daemon): void {
  const exited = daemon.exitReason();
  if (exited !== undefined) {
    throw new Error(
      `${daemon.name} is not running (exited: ${exited}); end of its log:\n${tailOfFile(daemon.logFile)}`,
    );
  }
}

/** Polls the RSS of a process tree while pgbench runs. */
function sampleRss(pid: number): { stop(): void; peak(): number; last(): number } {
  let peak = treeRssKib(pid);
  let last = peak;
  const timer = setInterval(() => {
    last = treeRssKib(pid);
    peak = Math.max(peak, last);
  }, RSS_SAMPLE_INTERVAL_MS);
  return { stop: () => clearInterval(timer), peak: () => peak, last: () => last };
}

/** Runs fn the first time it is called; later calls share its promise (and its failure). */
function once(fn: () => Promise<void>): () => Promise<void> {
  let promise: Promise<void> | undefined;
  return () => (promise ??= fn());
}

function progress(message: string): void {
  process.stderr.write(`# ${message}\n`);
}

process.exitCode = await main(process.argv.slice(2));
