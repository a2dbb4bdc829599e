// `pgwarden start`: load the configuration, run the proxy (in several worker
// processes when asked, to use every core), and drain gracefully on SIGTERM.

import cluster from 'node:cluster';
import os from 'node:os';
import type { Logger } from 'pino';
import { systemClock } from '../clock.ts';
import { parseHostPort, type Config } from '../config.ts';
import { createLogger } from '../log.ts';
import { startApp } from './app.ts';
import { WorkerHub, WorkerLink } from './workers.ts';

export async function runStart(config: Config): Promise<void> {
  const log = createLogger(config.log_level);
  const workers = config.workers === 0 ? os.availableParallelism() : config.workers;
  if (workers > 1 && cluster.isPrimary) return runPrimary(config, workers, log);
  // A worker relays and reports to the primary, which owns statistics and the admin API.
  const role = cluster.isWorker ? { role: 'worker' as const, link: new WorkerLink({ clock: systemClock }) } : undefined;
  const app = await startApp(config, log, { cluster: role });
  log.info(
    { listen: `${parseHostPort(config.listen).host}:${app.proxyPort}`, upstream: config.upstream, admin: app.adminPort, worker: cluster.worker?.id },
    'pgwarden proxy listening',
  );
  onShutdownSignal(async (signal) => {
    log.info({ signal, sessions: app.proxy.sessionCount }, 'draining');
    await app.stop(config.drain_timeout_ms);
    log.info('stopped');
    process.exit(0);
  });
}

/**
 * The primary of a multi-process proxy: forks the workers (they start while it
 * opens its databases), runs everything but the relay (see workers.ts), restarts
 * crashed workers, and on SIGTERM drains the workers before stopping itself.
 */
async function runPrimary(config: Config, count: number, log: Logger): Promise<void> {
  const hub = new WorkerHub({ workers: count, log });
  let stopping = false;
  let stopped: (() => void) | null = null;
  for (let i = 0; i < count; i++) cluster.fork();
  cluster.on('exit', (worker, code, signal) => {
    if (stopping) {
      if (Object.keys(cluster.workers ?? {}).length === 0) stopped?.();
      return;
    }
    log.error({ worker: worker.id, code, signal }, 'worker exited; starting another');
    cluster.fork();
  });
  let app: Awaited<ReturnType<typeof startApp>>;
  try {
    app = await startApp(config, log, { cluster: { role: 'primary', hub } });
  } catch (err) {
    // The primary could not start (e.g. its admin port is taken): take the workers down with it.
    stopping = true;
    for (const worker of Object.values(cluster.workers ?? {})) worker?.process.kill('SIGTERM');
    throw err;
  }
  onShutdownSignal(async (signal) => {
    stopping = true;
    log.info({ signal }, 'stopping workers');
    const allGone = new Promise<void>((resolve) => (stopped = resolve));
    const workers = Object.values(cluster.workers ?? {});
    for (const worker of workers) worker?.process.kill('SIGTERM');
    if (workers.length > 0) await allGone;
    await app.stop(0);
    log.info('stopped');
    process.exit(0);
  });
  log.info({ workers: count, admin: app.adminPort }, 'pgwarden supervising proxy workers');
}

function onShutdownSignal(handler: (signal: NodeJS.Signals) => void | Promise<void>): void {
  let handled = false;
  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    process.on(signal, () => {
      if (handled) return;
      handled = true;
      void handler(signal);
    });
  }
}
