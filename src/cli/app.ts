// Wires the parts of a running pgwarden together, one feature builder each: the
// proxy, the rules (build-rules.ts), what runs after a query completes
// (build-observers.ts) and the admin server (build-admin.ts). The composition
// root: the only module that knows them all (with the commands); tests and the
// demo start pgwarden through it too. docs/architecture.md traces one query.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import type { Logger } from 'pino';
import type { AdminServer } from '../admin/server.ts';
import { localSessions, statementShapes } from '../admin/sessions-api.ts';
import { systemClock, type Clock } from '../clock.ts';
import { parseHostPort, type Config } from '../config.ts';
import { InFlightMerge, InFlightTracker, type InFlightView } from '../detect/inflight.ts';
import type { IncidentManager } from '../detect/incidents.ts';
import type { NewShapeWatch } from '../detect/newshapes.ts';
import type { SchemaWatcher } from '../detect/schema.ts';
import { WebhookSender } from '../detect/webhook.ts';
import { EventLog } from '../events/timeline.ts';
import { setLogLevel } from '../log.ts';
import { MonitorPool } from '../plans/monitor.ts';
import type { PlanSampler } from '../plans/sampler.ts';
import { ProxyServer, type CancelKeyDirectory } from '../proxy/server.ts';
import type { MitigationPolicy } from '../rules/policy.ts';
import type { RuleStore } from '../rules/store.ts';
import type { ShapeCollector } from '../shapes/collector.ts';
import { ShapeFinder } from '../shapes/fingerprint.ts';
import { keepGeneratedToken, startAdmin } from './build-admin.ts';
import { startObservers, type Observers } from './build-observers.ts';
import { configRules, openRules } from './build-rules.ts';
import { INFLIGHT_STALE_MS, type ClusterRole } from './workers.ts';

export interface App {
  readonly proxy: ProxyServer;
  readonly collector: ShapeCollector | null;
  readonly events: EventLog;
  readonly incidents: IncidentManager | null;
  readonly sampler: PlanSampler | null;
  readonly schema: SchemaWatcher | null;
  /** Statements forwarded and not yet completed, with --workers all workers' (null without statistics). */
  readonly inflight: InFlightView | null;
  readonly newShapes: NewShapeWatch | null;
  readonly rules: RuleStore;
  readonly admin: AdminServer | null;
  readonly adminToken: string;
  /** Ports actually bound (useful with port 0); proxyPort is 0 in a cluster primary, which relays nothing. */
  readonly proxyPort: number;
  readonly adminPort: number | null;
  readonly policy: MitigationPolicy | null;
  /**
   * Applies a reloaded configuration without touching a session: rules of the
   * config file, mitigation policy, detection and slow-query thresholds, log level,
   * TLS certificate for new connections. What can fail on bad input (certificate,
   * rules) is checked before anything changes, so a bad file changes nothing; a
   * rule store that fails midway (control database down) throws after the rules
   * before it. Returns the changed keys, split by whether a restart is needed.
   */
  reload(next: Config): Promise<{ applied: string[]; needsRestart: string[] }>;
  stop(drainMs: number): Promise<void>;
}

/** Keys a reload (SIGHUP) applies; every other key needs a restart. */
export const RELOADABLE_KEYS: ReadonlySet<string> = new Set([
  'rules',
  'mitigation',
  'mitigation_protect',
  'mitigation_max_concurrent',
  'mitigation_queue_timeout_ms',
  'mitigation_ttl_s',
  'mitigation_max_rules',
  'mitigation_max_traffic_share',
  'detect_min_samples',
  'detect_p95_ratio',
  'detect_p50_ratio',
  'detect_absolute_ms',
  'detect_min_baseline_calls',
  'slow_query_ms',
  'log_query_values',
  'log_level',
  'tls_cert',
  'tls_key',
]);

export interface AppOptions {
  readonly clock?: Clock;
  /** Serve the admin API (default true; a proxy worker never serves it). */
  readonly admin?: boolean;
  /**
   * With `--workers N` (see workers.ts): a 'worker' runs only the relay and the
   * rules it is sent, and reports summaries; the 'primary' runs everything else,
   * fed by those reports, and relays nothing. Absent: one process does it all.
   */
  readonly cluster?: ClusterRole;
  /** Cancel keys shared with the other workers of a multi-process proxy. */
  readonly cancelKeys?: CancelKeyDirectory;
}

export async function startApp(config: Config, log: Logger, options: AppOptions = {}): Promise<App> {
  const clock = options.clock ?? systemClock;
  const proxy = buildProxy(config, log, options.cancelKeys);
  const worker = options.cluster?.role === 'worker' ? options.cluster.link : null;
  const hub = options.cluster?.role === 'primary' ? options.cluster.hub : null;
  const events = new EventLog(clock);
  const finder = await ShapeFinder.create({
    cacheEntries: config.shape_cache_entries,
    cacheBytes: config.shape_cache_mb * 1024 * 1024,
    maxTextBytes: config.max_shape_text_bytes,
  });
  let current = config;

  const rules = await openRules(config, log, clock, events, finder, worker);
  // The in-flight tracker wraps the rules' gate: it sees every statement forwarded.
  // A cluster worker reports its statements in flight; the primary merges them with its own.
  const tracker = config.stats ? new InFlightTracker(rules.gate, finder) : null;
  proxy.setGate(tracker ?? rules.gate);
  const merged = tracker && hub ? new InFlightMerge(tracker, INFLIGHT_STALE_MS) : null;
  const inflight: InFlightView | null = merged ?? tracker;

  // A cluster worker only relays and reports; everything after a query completes runs where the statistics are.
  const monitor = config.monitor_url && !worker ? openMonitor(config, log) : null;
  const webhook =
    config.alert_webhook_url && !worker
      ? new WebhookSender({ url: config.alert_webhook_url, log: log.child({ component: 'webhook' }) })
      : null;
  let observers: Observers | null = null;
  if (worker) {
    worker.start(proxy, rules.gate, config.stats ? finder : null, tracker);
    worker.serveSessions(
      localSessions(proxy, config.stats ? statementShapes(finder) : null, config.upstream, worker.id),
    );
  } else if (config.stats)
    observers = await startObservers({ config, log, clock, proxy, finder, events, rules, monitor, webhook, inflight });

  hub?.attach({ collector: observers?.collector ?? null, rules: rules.store, gate: rules.gate, inflight: merged });
  const proxyPort = hub ? 0 : (await proxy.listen()).port;
  const adminToken = config.admin_token ?? randomBytes(18).toString('base64url');
  let admin: { server: AdminServer; port: number } | null = null;
  if (options.admin !== false && !worker) {
    if (config.admin_token === undefined) keepGeneratedToken(config, adminToken, log);
    const counters = hub ? hub.proxyCounters : proxy;
    admin = await startAdmin({
      config,
      log,
      clock,
      token: adminToken,
      counters,
      sessions: hub
        ? hub.sessions
        : localSessions(proxy, config.stats ? statementShapes(finder) : null, config.upstream),
      inflight,
      events,
      rules,
      observers,
      monitor,
    });
  }

  return {
    proxy,
    collector: observers?.collector ?? null,
    events,
    incidents: observers?.incidents ?? null,
    sampler: observers?.sampler ?? null,
    schema: observers?.schema ?? null,
    inflight,
    newShapes: observers?.newShapes ?? null,
    rules: rules.store,
    admin: admin?.server ?? null,
    adminToken,
    proxyPort,
    adminPort: admin?.port ?? null,
    policy: observers?.policy ?? null,
    async reload(next: Config) {
      // Everything that can fail is prepared first, so a bad config changes nothing.
      const tls =
        next.tls_cert && next.tls_key
          ? { cert: fs.readFileSync(next.tls_cert), key: fs.readFileSync(next.tls_key) }
          : null;
      const nextRules = configRules(next, clock.now());
      proxy.setTlsCertificate(tls?.cert, tls?.key);
      await rules.applyConfigRules(nextRules);
      observers?.reconfigure(next);
      setLogLevel(log, next.log_level);
      const changed = (Object.keys(next) as (keyof Config)[]).filter(
        (k) => JSON.stringify(next[k]) !== JSON.stringify(current[k]),
      );
      for (const k of Object.keys(current) as (keyof Config)[])
        if (!(k in next) && !changed.includes(k)) changed.push(k);
      current = next;
      return {
        applied: changed.filter((k) => RELOADABLE_KEYS.has(k)),
        needsRestart: changed.filter((k) => !RELOADABLE_KEYS.has(k)),
      };
    },
    async stop(drainMs: number) {
      await proxy.drain(drainMs);
      await worker?.close();
      await observers?.stop();
      await admin?.server.close();
      await monitor?.close();
      await rules.close();
    },
  };
}

function openMonitor(config: Config, log: Logger): MonitorPool {
  return new MonitorPool({
    url: config.monitor_url!,
    concurrency: config.monitor_concurrency,
    statementTimeoutMs: config.monitor_statement_timeout_ms,
    maxDatabases: config.monitor_max_databases,
    lockTimeoutMs: config.monitor_lock_timeout_ms,
    log: log.child({ component: 'monitor' }),
  });
}

function buildProxy(config: Config, log: Logger, cancelKeys: CancelKeyDirectory | undefined): ProxyServer {
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
    maxClientConnections: config.max_client_connections ?? defaultMaxClientConnections(),
    unixSocketDir: config.listen_unix,
    cancelKeys,
    tlsCert: config.tls_cert ? fs.readFileSync(config.tls_cert) : undefined,
    tlsKey: config.tls_key ? fs.readFileSync(config.tls_key) : undefined,
    log,
  });
}

/**
 * 10000 clients, or as many as the open-file limit holds at two descriptors each
 * (client and upstream) with some left for everything else.
 */
function defaultMaxClientConnections(): number {
  try {
    const limits = fs.readFileSync('/proc/self/limits', 'utf8');
    const soft = /^Max open files\s+(\d+)/m.exec(limits)?.[1];
    if (soft !== undefined) return Math.max(1, Math.min(10_000, Math.floor((Number(soft) - 128) / 2)));
  } catch {
    // not Linux: keep the fixed default
  }
  return 10_000;
}
