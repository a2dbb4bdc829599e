// Where a relayed transaction's CPU goes: in the proxy's own code (user time) or
// in the kernel (system time: the socket syscalls and, on loopback, the TCP work
// for the receiving side), and how many syscalls of each kind it makes, for
// pgwarden and PgBouncer under the same pgbench run.
//
// The overhead benchmark says how much more CPU pgwarden spends per transaction
// than PgBouncer; this one says where: equal syscall counts and system time mean
// the relay's I/O pattern is already PgBouncer's, and what is left is user time,
// the runtime around each read and write.
//
//   node --import tsx bench/syscalls.ts [--mode select-prepared] [--clients 8] [--duration 5] [--stats true|false] [--strace]
//
// Without --strace: user and system CPU per transaction from /proc (no tracing
// overhead). With --strace: a second run per target under `strace -c -f`, whose
// counts per transaction are exact but whose throughput is not (tracing slows
// every syscall).

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { startPostgres } from '../test/harness/postgres.ts';
import { initPgbench, runPgbench, type Mode, MODE_NAMES, type Endpoint } from './lib/pgbench.ts';
import { findPgbouncer, startPgbouncer } from './lib/pgbouncer.ts';
import { buildPgwarden, startPgwarden, statsFlag, type StartedProxy } from './lib/pgwarden.ts';
import { clockTicksPerSecond, treeCpuSplitTicks } from './lib/procfs.ts';
import { findExecutable } from './lib/processes.ts';

interface Options {
  mode: Mode;
  clients: number;
  durationS: number;
  stats: boolean;
  strace: boolean;
}

function parse(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      mode: { type: 'string', default: 'select-prepared' },
      clients: { type: 'string', default: '8' },
      duration: { type: 'string', default: '5' },
      stats: { type: 'string', default: 'true' },
      strace: { type: 'boolean', default: false },
    },
    strict: true,
  });
  const mode = values.mode as Mode;
  if (!MODE_NAMES.includes(mode)) throw new Error(`--mode must be one of ${MODE_NAMES.join(', ')}`);
  const clients = Number(values.clients);
  const durationS = Number(values.duration);
  if (!Number.isInteger(clients) || clients < 1) throw new Error('--clients must be a positive integer');
  if (!Number.isFinite(durationS) || durationS <= 0) throw new Error('--duration must be a positive number');
  return { mode, clients, durationS, stats: statsFlag(values.stats!), strace: values.strace! };
}

/** One pgbench run through `proxy`, with the proxy's user and system CPU per transaction. */
async function measureCpu(proxy: StartedProxy, endpoint: Endpoint, o: Options, signal: AbortSignal) {
  const before = treeCpuSplitTicks(proxy.daemon.pid);
  const result = await runPgbench(endpoint, { mode: o.mode, clients: o.clients, durationS: o.durationS }, signal);
  const after = treeCpuSplitTicks(proxy.daemon.pid);
  const us = (ticks: number) => (ticks / clockTicksPerSecond()) * 1e6;
  return {
    tps: result.tps,
    userUs: us(after.user - before.user) / result.transactions,
    systemUs: us(after.system - before.system) / result.transactions,
  };
}

/** One pgbench run with `strace -c -f` attached to the proxy: syscalls per transaction, by name. */
async function countSyscalls(proxy: StartedProxy, endpoint: Endpoint, o: Options, dir: string, signal: AbortSignal) {
  const out = path.join(dir, `strace-${proxy.daemon.pid}.txt`);
  const tracer = spawn('strace', ['-c', '-f', '-o', out, '-p', String(proxy.daemon.pid)], { stdio: 'ignore' });
  const exited = new Promise((resolve) => tracer.once('exit', resolve));
  await new Promise((resolve) => setTimeout(resolve, 500)); // attached before the run starts
  const result = await runPgbench(endpoint, { mode: o.mode, clients: o.clients, durationS: o.durationS }, signal);
  tracer.kill('SIGINT');
  await exited;
  const counts = new Map<string, number>();
  // "% time  seconds  usecs/call  calls  [errors]  syscall"
  for (const line of fs.readFileSync(out, 'utf8').split('\n')) {
    const m = /^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$/.exec(line);
    if (m && m[2] !== 'total') counts.set(m[2], Number(m[1]) / result.transactions);
  }
  return counts;
}

async function main(): Promise<void> {
  const o = parse(process.argv.slice(2));
  const pgbouncer = findPgbouncer();
  if (pgbouncer === undefined) throw new Error('PgBouncer is not installed (apt-get install -y pgbouncer)');
  if (o.strace && findExecutable('strace') === undefined) throw new Error('--strace needs strace on PATH');
  await buildPgwarden();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgwarden-syscalls-'));
  fs.chmodSync(dir, 0o755); // PgBouncer runs as 'postgres' under root
  const abort = new AbortController();
  const server = await startPostgres();
  const proxies: StartedProxy[] = [];
  try {
    const database: Endpoint = { host: server.host, port: server.port, user: server.superuser, database: 'postgres' };
    await initPgbench(database, 1, abort.signal);
    const targets: [string, StartedProxy][] = [
      [
        o.stats ? 'pgwarden-stats' : 'pgwarden',
        await startPgwarden(`${server.host}:${server.port}`, {
          name: 'pgwarden',
          stats: o.stats,
          extraArgs: [],
          tempDir: dir,
        }),
      ],
      ['pgbouncer', await startPgbouncer(pgbouncer, database, dir)],
    ];
    for (const [, proxy] of targets) proxies.push(proxy);
    console.log(`${o.mode}, ${o.clients} clients, ${o.durationS} s per run`);
    console.log('target           tps      user us/txn  system us/txn  syscalls per txn (strace)');
    for (const [name, proxy] of targets) {
      const endpoint = { ...database, host: '127.0.0.1', port: proxy.port };
      // Warm up first: the first seconds pay for JIT compilation, not for the relay.
      await runPgbench(endpoint, { mode: o.mode, clients: o.clients, durationS: 2 }, abort.signal);
      const cpu = await measureCpu(proxy, endpoint, o, abort.signal);
      let calls = '';
      if (o.strace) {
        const counts = await countSyscalls(proxy, endpoint, o, dir, abort.signal);
        calls = [...counts]
          .filter(([, n]) => n >= 0.01)
          .sort((a, b) => b[1] - a[1])
          .map(([call, n]) => `${call} ${n.toFixed(2)}`)
          .join(', ');
      }
      console.log(
        `${name.padEnd(16)} ${cpu.tps.toFixed(0).padStart(6)}  ${cpu.userUs.toFixed(1).padStart(11)}  ${cpu.systemUs.toFixed(1).padStart(13)}  ${calls}`,
      );
    }
  } finally {
    for (const proxy of proxies) await proxy.daemon.stop();
    await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((error: unknown) => {
  console.error(error instanceof Error ? error.message : error);
  process.exitCode = 1;
});
