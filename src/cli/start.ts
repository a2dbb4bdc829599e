// `pgwarden start`: load the configuration, run the proxy (in several worker
// processes when asked, to use every core), and drain gracefully on SIGTERM.

import cluster from 'node:cluster';
import fs from 'node:fs';
import os from 'node:os';
import type { Logger } from 'pino';
import { parseHostPort, type Config } from '../config.ts';
import { createLogger } from '../log.ts';
import { ProxyServer } from '../proxy/server.ts';

export async function runStart(config: Config): Promise<void> {
  const log = createLogger(config.log_level);
  const workers = config.workers === 0 ? os.availableParallelism() : config.workers;
  if (workers > 1 && cluster.isPrimary) return superviseWorkers(workers, log);
  const proxy = buildProxy(config, log);
  const address = await proxy.listen();
  log.info({ listen: `${address.address}:${address.port}`, upstream: config.upstream, worker: cluster.worker?.id }, 'pgwarden proxy listening');
  onShutdownSignal(async (signal) => {
    log.info({ signal, sessions: proxy.sessionCount }, 'draining');
    await proxy.drain(config.drain_timeout_ms);
    log.info('stopped');
    process.exit(0);
  });
}

export function buildProxy(config: Config, log: Logger): ProxyServer {
  const listen = parseHostPort(config.listen);
  const upstream = parseHostPort(config.upstream);
  return new ProxyServer({
    host: listen.host,
    port: listen.port,
    upstream: {
      name: 'primary',
      host: upstream.host,
      port: upstream.port,
      tls: config.upstream_tls,
      ca: config.upstream_tls_ca ? fs.readFileSync(config.upstream_tls_ca) : undefined,
      connectTimeoutMs: config.connect_timeout_ms,
    },
    maxMessageBytes: config.max_message_bytes,
    startupTimeoutMs: config.startup_timeout_ms,
    tlsCert: config.tls_cert ? fs.readFileSync(config.tls_cert) : undefined,
    tlsKey: config.tls_key ? fs.readFileSync(config.tls_key) : undefined,
    log,
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
