// `pgwarden start`: load the configuration, run the proxy (in several worker
// processes when asked, to use every core), drain gracefully on SIGTERM/SIGINT and
// reload the configuration on SIGHUP. Every signal received is logged: an operator
// reading the log after a restart or a logrotate run should see why.

import cluster from 'node:cluster';
import os from 'node:os';
import type { Logger } from 'pino';
import { systemClock } from '../clock.ts';
import { loadConfig, parseHostPort, type Config, type ConfigSources } from '../config.ts';
import { createLogger } from '../log.ts';
import { VERSION } from '../version.ts';
import { startApp, type App } from './app.ts';
import { WorkerHub, WorkerLink } from './workers.ts';
import type { CancelKeyDirectory, ProxyServer } from '../proxy/server.ts';

export async function runStart(config: Config, sources: ConfigSources = {}): Promise<void> {
  const log = createLogger(config.log_level, config.log_format);
  const workers = config.workers === 0 ? os.availableParallelism() : config.workers;
  if (workers > 1 && cluster.isPrimary) return runPrimary(config, workers, sources, log);
  // A worker relays and reports to the primary, which owns statistics and the admin API.
  const role = cluster.isWorker
    ? { role: 'worker' as const, link: new WorkerLink({ clock: systemClock, log }) }
    : undefined;
  const cancelKeys = cluster.isWorker ? workerCancelKeys(() => app.proxy) : undefined;
  const app = await startApp(config, log, { cluster: role, cancelKeys });
  logReady(config, app, log);
  onSignals(log, {
    async shutdown(signal) {
      log.info({ signal, sessions: app.proxy.sessionCount }, 'draining');
      await app.stop(config.drain_timeout_ms);
      log.info('stopped');
      process.exit(0);
    },
    reload: () => reload(app, sources, log),
  });
}

/** The line an operator looks for: where clients connect and where the dashboard is. */
function logReady(config: Config, app: App, log: Logger): void {
  const listen = `${hostForUrl(parseHostPort(config.listen).host)}:${app.proxyPort}`;
  const fields = { version: VERSION, listen, upstream: config.upstream, worker: cluster.worker?.id };
  if (app.adminPort === null) {
    log.info(
      fields,
      `pgwarden proxy listening on ${listen} (worker ${cluster.worker?.id ?? 1}; the primary serves the admin API)`,
    );
    return;
  }
  const dashboard = dashboardUrl(config, app);
  log.info(
    { ...fields, admin: app.adminPort, dashboard },
    `pgwarden proxy listening on ${listen}; dashboard at ${dashboard}`,
  );
}

/** The dashboard's address; the token goes into it only when the operator opted in: logs are often shipped elsewhere. */
function dashboardUrl(config: Config, app: App): string {
  const admin = `http://${hostForUrl(parseHostPort(config.admin).host)}:${app.adminPort}/`;
  return config.print_dashboard_token ? `${admin}#token=${encodeURIComponent(app.adminToken)}` : admin;
}

const hostForUrl = (host: string) => (host.includes(':') ? `[${host}]` : host);

/** SIGHUP: re-read the configuration from the same sources; a bad one is refused in one line and the old one stays. */
async function reload(app: App, sources: ConfigSources, log: Logger): Promise<void> {
  let next: Config;
  try {
    next = loadConfig(sources);
  } catch (err) {
    log.error(
      { reason: (err as Error).message },
      `configuration reload refused, the running configuration stays: ${(err as Error).message}`,
    );
    return;
  }
  try {
    const { applied, needsRestart } = await app.reload(next);
    log.info(
      { applied, needs_restart: needsRestart },
      `configuration reloaded${applied.length ? `: ${applied.join(', ')} changed` : ': no change'}`,
    );
    if (needsRestart.length)
      log.warn({ keys: needsRestart }, `changed but only applied by a restart: ${needsRestart.join(', ')}`);
  } catch (err) {
    log.error(
      { reason: (err as Error).message },
      `configuration reload refused, the running configuration stays: ${(err as Error).message}`,
    );
  }
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
    if (isCancelMessage(message) && message.pgwarden === 'cancel')
      proxy().cancelLocal(message.pid, Buffer.from(message.key, 'hex'));
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

/**
 * The primary of a multi-process proxy: forks the workers (they start while it
 * opens its databases), runs everything but the relay (see workers.ts), restarts
 * crashed workers, drains the workers on SIGTERM before stopping itself, and on
 * SIGHUP reloads its own parts and forwards the reload to the workers.
 */
async function runPrimary(config: Config, count: number, sources: ConfigSources, log: Logger): Promise<void> {
  const hub = new WorkerHub({ workers: count, log });
  routeCancelKeys();
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
  const workers = () => Object.values(cluster.workers ?? {});
  let app: App;
  try {
    app = await startApp(config, log, { cluster: { role: 'primary', hub } });
  } catch (err) {
    // The primary could not start (e.g. its admin port is taken): take the workers down with it.
    stopping = true;
    for (const worker of workers()) worker?.process.kill('SIGTERM');
    throw err;
  }
  onSignals(log, {
    async shutdown(signal) {
      stopping = true;
      log.info({ signal }, 'stopping workers');
      const allGone = new Promise<void>((resolve) => (stopped = resolve));
      const running = workers();
      for (const worker of running) worker?.process.kill('SIGTERM');
      if (running.length > 0) await allGone;
      await app.stop(0);
      log.info('stopped');
      process.exit(0);
    },
    async reload() {
      // Checked here first, so a bad file gives one message rather than one per worker.
      try {
        loadConfig(sources);
      } catch (err) {
        log.error(
          { reason: (err as Error).message },
          `configuration reload refused, the running configuration stays: ${(err as Error).message}`,
        );
        return;
      }
      await reload(app, sources, log);
      log.info({ workers: workers().length }, 'forwarding the reload to the workers');
      for (const worker of workers()) worker?.process.kill('SIGHUP');
    },
  });
  const dashboard = dashboardUrl(config, app);
  log.info(
    { workers: count, version: VERSION, listen: config.listen, admin: app.adminPort, dashboard },
    `pgwarden supervising proxy workers on ${config.listen}; dashboard at ${dashboard}`,
  );
}

interface SignalHandlers {
  shutdown(signal: NodeJS.Signals): void | Promise<void>;
  reload(): void | Promise<void>;
}

/** Logs every signal pgwarden handles; SIGTERM/SIGINT drain once, SIGHUP reloads, SIGUSR2 is ignored. */
function onSignals(log: Logger, handlers: SignalHandlers): void {
  let shuttingDown = false;
  let reloading: Promise<void> | null = null;
  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    process.on(signal, () => {
      log.info(
        { signal },
        shuttingDown ? `received ${signal}: already shutting down` : `received ${signal}: shutting down`,
      );
      if (shuttingDown) return;
      shuttingDown = true;
      void handlers.shutdown(signal);
    });
  }
  process.on('SIGHUP', () => {
    log.info({ signal: 'SIGHUP' }, 'received SIGHUP: reloading the configuration');
    if (shuttingDown) return;
    // Reloads run one at a time; a SIGHUP during one runs after it.
    reloading = (reloading ?? Promise.resolve())
      .then(() => handlers.reload())
      .catch((err: Error) => log.error({ err }, 'reload failed'));
  });
  process.on('SIGUSR2', () => log.info({ signal: 'SIGUSR2' }, 'received SIGUSR2: ignored'));
}
