// `pgwarden start`: load the configuration, run the proxy (in several worker
// processes when asked, to use every core), and drain gracefully on SIGTERM.

import cluster from 'node:cluster';
import os from 'node:os';
import type { Logger } from 'pino';
import { parseHostPort, type Config } from '../config.ts';
import { createLogger } from '../log.ts';
import { startApp } from './app.ts';

export async function runStart(config: Config): Promise<void> {
  const log = createLogger(config.log_level);
  const workers = config.workers === 0 ? os.availableParallelism() : config.workers;
  if (workers > 1 && cluster.isPrimary) return superviseWorkers(workers, log);
  // With several workers only the first serves the admin API (its statistics are
  // that worker's own; aggregation across workers is not built yet).
  const app = await startApp(config, log, { admin: cluster.isPrimary || cluster.worker?.id === 1 });
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

/** The primary of a multi-process proxy: forks workers, restarts crashed ones, relays SIGTERM. */
function superviseWorkers(count: number, log: Logger): void {
  let stopping = false;
  for (let i = 0; i < count; i++) cluster.fork();
  cluster.on('exit', (worker, code, signal) => {
    if (stopping) {
      if (Object.keys(cluster.workers ?? {}).length === 0) process.exit(0);
      return;
    }
    log.error({ worker: worker.id, code, signal }, 'worker exited; starting another');
    cluster.fork();
  });
  onShutdownSignal((signal) => {
    stopping = true;
    log.info({ signal }, 'stopping workers');
    for (const worker of Object.values(cluster.workers ?? {})) worker?.process.kill('SIGTERM');
  });
  log.info({ workers: count }, 'pgwarden supervising proxy workers');
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
