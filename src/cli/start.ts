// `pgwarden start`: load the configuration, run the proxy (in several worker
// processes when asked, to use every core), and drain gracefully on SIGTERM.

import cluster from 'node:cluster';
import os from 'node:os';
import type { Logger } from 'pino';
import { parseHostPort, type Config } from '../config.ts';
import { createLogger } from '../log.ts';
import type { CancelKeyDirectory, ProxyServer } from '../proxy/server.ts';
import { startApp } from './app.ts';

export async function runStart(config: Config): Promise<void> {
  const log = createLogger(config.log_level);
  const workers = config.workers === 0 ? os.availableParallelism() : config.workers;
  if (workers > 1 && cluster.isPrimary) return superviseWorkers(workers, log);
  // With several workers only the first serves the admin API (its statistics are
  // that worker's own; aggregation across workers is not built yet).
  const cancelKeys = cluster.isWorker ? workerCancelKeys(() => app.proxy) : undefined;
  const app = await startApp(config, log, { admin: cluster.isPrimary || cluster.worker?.id === 1, cancelKeys });
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
 * Cancel keys across workers. Each worker tells the primary which keys its
 * sessions handed out; a CancelRequest for a key the receiving worker does not
 * hold goes to the primary, which hands it to the owner or drops it. One message
 * per session start and end, none per query.
 */
type CancelMessage = { pgwarden: 'cancel-key' | 'cancel-key-gone' | 'cancel'; pid: number; key: string };

function isCancelMessage(message: unknown): message is CancelMessage {
  return typeof message === 'object' && message !== null && typeof (message as CancelMessage).pgwarden === 'string';
}

function workerCancelKeys(proxy: () => ProxyServer): CancelKeyDirectory {
  const send = (kind: CancelMessage['pgwarden'], pid: number, key: Buffer) => {
    if (process.connected) process.send?.({ pgwarden: kind, pid, key: key.toString('hex') } satisfies CancelMessage);
  };
  process.on('message', (message: unknown) => {
    if (isCancelMessage(message) && message.pgwarden === 'cancel') proxy().cancelLocal(message.pid, Buffer.from(message.key, 'hex'));
  });
  return {
    handedOut: (pid, key) => send('cancel-key', pid, key),
    withdrawn: (pid, key) => send('cancel-key-gone', pid, key),
    route: (pid, key) => send('cancel', pid, key),
  };
}

/** The primary's side: which worker owns which key. */
function routeCancelKeys(): void {
  const owners = new Map<string, number>();
  cluster.on('message', (worker, message: unknown) => {
    if (!isCancelMessage(message)) return;
    const id = `${message.pid}:${message.key}`;
    if (message.pgwarden === 'cancel-key') owners.set(id, worker.id);
    else if (message.pgwarden === 'cancel-key-gone') {
      if (owners.get(id) === worker.id) owners.delete(id);
    } else {
      const owner = owners.get(id);
      if (owner !== undefined) cluster.workers?.[owner]?.send(message); // unknown keys are dropped
    }
  });
  cluster.on('exit', (worker) => {
    for (const [id, owner] of owners) if (owner === worker.id) owners.delete(id);
  });
}

/** The primary of a multi-process proxy: forks workers, restarts crashed ones, relays SIGTERM. */
function superviseWorkers(count: number, log: Logger): void {
  let stopping = false;
  routeCancelKeys();
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
