// Wires the parts of a running pgwarden together: the proxy, the shape collector
// and the admin server. The only module that knows them all (with the commands);
// tests and the demo start pgwarden through it too.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import type { Logger } from 'pino';
import { shapeRoutes } from '../admin/api.ts';
import { eventJson, incidentRoutes, plansJson } from '../admin/incidents-api.ts';
import { createMetrics } from '../admin/metrics.ts';
import { AdminServer, upstreamProbe } from '../admin/server.ts';
import { loadDashboard } from '../dashboard/assets.ts';
import { systemClock, type Clock } from '../clock.ts';
import { parseHostPort, type Config } from '../config.ts';
import { DEFAULT_DETECTOR_OPTIONS } from '../detect/detector.ts';
import { DdlWatch } from '../detect/ddlwatch.ts';
import { EventLog } from '../detect/events.ts';
import { IncidentManager } from '../detect/incidents.ts';
import { RoundTripTracker } from '../detect/roundtrip.ts';
import { SchemaWatcher } from '../detect/schema.ts';
import { WebhookSender } from '../detect/webhook.ts';
import { MonitorPool } from '../plans/monitor.ts';
import { PlanSampler } from '../plans/sampler.ts';
import { ProxyServer, type CancelKeyDirectory } from '../proxy/server.ts';
import { ruleRoutes } from '../admin/rules-api.ts';
import { RulesGate } from '../rules/gate.ts';
import { MitigationPolicy } from '../rules/policy.ts';
import { ReplicaPool } from '../rules/replica.ts';
import { createRule } from '../rules/rule.ts';
import { RuleStore } from '../rules/store.ts';
import { ControlDatabase } from '../state/control.ts';
import { StateFile } from '../state/file.ts';
import type { RulePersistence } from '../state/persistence.ts';
import { createHash } from 'node:crypto';
import os from 'node:os';
import { ShapeCollector } from '../shapes/collector.ts';
import { ShapeFinder } from '../shapes/fingerprint.ts';
import { ShapeRegistry } from '../shapes/registry.ts';
import { workloadRoutes } from '../workload/export.ts';

export interface App {
  readonly proxy: ProxyServer;
  readonly collector: ShapeCollector | null;
  readonly events: EventLog;
  readonly incidents: IncidentManager | null;
  readonly sampler: PlanSampler | null;
  readonly schema: SchemaWatcher | null;
  readonly rules: RuleStore;
  readonly admin: AdminServer | null;
  readonly adminToken: string;
  /** Ports actually bound (useful with port 0). */
  readonly proxyPort: number;
  readonly adminPort: number | null;
  stop(drainMs: number): Promise<void>;
}

export interface AppOptions {
  readonly clock?: Clock;
  /** Serve the admin API (false in all but one worker of a multi-process proxy). */
  readonly admin?: boolean;
  /** Cancel keys shared with the other workers of a multi-process proxy. */
  readonly cancelKeys?: CancelKeyDirectory;
}

export async function startApp(config: Config, log: Logger, options: AppOptions = {}): Promise<App> {
  const clock = options.clock ?? systemClock;
  const upstream = parseHostPort(config.upstream);
  const proxy = buildProxy(config, log, options.cancelKeys);

  const events = new EventLog(clock);
  let collector: ShapeCollector | null = null;
  let incidents: IncidentManager | null = null;
  let sampler: PlanSampler | null = null;
  let schema: SchemaWatcher | null = null;
  let roundTrip: RoundTripTracker | null = null;
  const monitor = config.monitor_url
    ? new MonitorPool({
        url: config.monitor_url,
        concurrency: config.monitor_concurrency,
        statementTimeoutMs: config.monitor_statement_timeout_ms,
        log: log.child({ component: 'monitor' }),
      })
    : null;
  const finder = await ShapeFinder.create({ cacheEntries: config.shape_cache_entries, maxTextBytes: config.max_shape_text_bytes });

  // Rules: persisted in the control database when there is one, else in the state file.
  const rulesLog = log.child({ component: 'rules' });
  const persistence: RulePersistence = config.control_url
    ? await ControlDatabase.open({ url: config.control_url, instance: config.instance_name ?? `${os.hostname()}:${process.pid}`, log: rulesLog })
    : new StateFile(config.state_file, rulesLog);
  const rules = new RuleStore({ clock, log: rulesLog, events, persistence });
  await rules.start();
  for (const input of config.rules) {
    const id = `cfg-${createHash('sha256').update(JSON.stringify(input)).digest('hex').slice(0, 10)}`;
    if (!rules.get(id)) await rules.add(createRule({ created_by: 'config', ...input }, clock.now(), 'config', id));
  }
  const replicas = new Map(
    Object.entries(config.replicas).map(([name, r]) => [
      name,
      new ReplicaPool({ name, url: r.url, size: r.pool_size, connectTimeoutMs: config.connect_timeout_ms, log: log.child({ component: 'replica', replica: name }) }),
    ]),
  );
  const gate = new RulesGate({ store: rules, finder, replicas, log: rulesLog });
  proxy.setGate(gate);

  if (config.stats) {
    const bucketMs = config.series_bucket_s * 1000;
    const registry = new ShapeRegistry({
      maxShapes: config.max_shapes,
      clock,
      series: { bucketMs, buckets: config.series_buckets, sketchBuckets: 6 },
    });
    collector = new ShapeCollector(finder, registry, {
      slowQueryMs: config.slow_query_ms,
      logQueryValues: config.log_query_values,
      log: log.child({ component: 'shapes' }),
    });
    proxy.onQueryComplete(collector.observe);

    if (monitor) {
      const plansLog = log.child({ component: 'plans' });
      sampler = new PlanSampler({
        monitor,
        events,
        clock,
        log: plansLog,
        periodMs: config.plan_sample_period_s * 1000,
        maxPerSecond: config.plan_samples_per_second,
        queueLimit: 100,
        concurrency: config.monitor_concurrency,
        keepSamples: config.workload_sample_params ? 3 : 0,
      });
      collector.onShape(sampler.observe);
      schema = new SchemaWatcher({ monitor, events, clock, log: log.child({ component: 'schema' }), intervalMs: config.schema_check_interval_s * 1000 });
      schema.start();
      roundTrip = new RoundTripTracker({ monitor, clock, log: plansLog, intervalMs: 2000 });
      roundTrip.start();
      // A schema change found in the catalog gets the affected shapes re-explained at once.
      const plans = sampler;
      events.onEvent((e) => {
        if (e.type === 'schema_change') plans.resampleTouching(e.objects ?? []);
      });
    }
    collector.onShape(new DdlWatch(events, sampler).observe);
    incidents = new IncidentManager({
      registry,
      events,
      clock,
      log: log.child({ component: 'incidents' }),
      detector: {
        ...DEFAULT_DETECTOR_OPTIONS,
        minRecentSamples: config.detect_min_samples,
        p95Ratio: config.detect_p95_ratio,
        p50Ratio: config.detect_p50_ratio,
        absoluteMs: config.detect_absolute_ms,
      },
      bucketMs,
      evaluateEveryMs: config.detect_evaluate_ms,
      sampler,
      roundTrip,
      webhook: config.alert_webhook_url ? new WebhookSender({ url: config.alert_webhook_url, log: log.child({ component: 'webhook' }) }) : null,
    });
    collector.onShape(incidents.observe);
    incidents.onChange(
      new MitigationPolicy({
        mode: config.mitigation,
        protect: new Set(config.mitigation_protect),
        maxConcurrent: config.mitigation_max_concurrent,
        queueTimeoutMs: config.mitigation_queue_timeout_ms,
        ttlS: config.mitigation_ttl_s,
        store: rules,
        events,
        clock,
        log: rulesLog,
      }).onIncident,
    );
    if (persistence instanceof ControlDatabase) {
      // The fleet sees every instance's incidents through the control database.
      const control = persistence;
      incidents.onChange((incident) =>
        control.publishIncident(incident as unknown as { id: string } & Record<string, unknown>).catch((err: Error) =>
          rulesLog.warn({ err, incident: incident.id }, 'incident not shared: control database unreachable'),
        ),
      );
    }
    incidents.start();
  }

  /** What a shape's status is: a rule on it, else an active incident, else ok. */
  const statusOf = (fp: string): string => {
    const actions = new Set((rules.forFingerprint(fp) ?? []).map((r) => r.action));
    if (actions.has('block')) return 'blocked';
    if (actions.has('shed')) return 'shed';
    if (actions.has('reroute')) return 'rerouted';
    return incidents?.activeFor(fp) ? 'regressed' : 'ok';
  };

  const proxyAddress = await proxy.listen();
  let admin: AdminServer | null = null;
  let adminPort: number | null = null;
  const adminToken = config.admin_token ?? randomBytes(18).toString('base64url');
  if (options.admin !== false) {
    if (config.admin_token === undefined) {
      log.warn({ admin_token: adminToken }, 'no admin_token configured: generated one for this run (set PGWARDEN_ADMIN_TOKEN to choose it)');
    }
    const adminAddress = parseHostPort(config.admin);
    admin = new AdminServer({
      host: adminAddress.host,
      port: adminAddress.port,
      token: adminToken,
      metrics: createMetrics(proxy, { collector, incidents, sampler, rules: { store: rules, gate } }, { topShapes: config.metrics_top_shapes }),
      routes: [
        ...(collector
          ? shapeRoutes(collector.registry, clock, statusOf, {
              plansOf: sampler ? (fp) => plansJson(sampler!, fp) : undefined,
              eventsOf: (fp) => events.recent(50, { fingerprint: fp }).map(eventJson),
              incidentsOf: incidents ? (fp) => incidents!.list().filter((i) => i.fingerprint === fp) : undefined,
              rulesOf: (fp) => rules.forFingerprint(fp) ?? [],
            })
          : []),
        ...(collector ? workloadRoutes({ registry: collector.registry, sampler, clock, sampleParams: config.workload_sample_params }) : []),
        ...ruleRoutes(rules, gate, [...replicas.keys()], clock),
        ...(incidents ? incidentRoutes(incidents, events, persistence instanceof ControlDatabase ? () => persistence.sharedIncidents() : undefined) : []),
      ],
      upstreamReady: upstreamProbe(upstream.host, upstream.port),
      files: loadDashboard(),
      log: log.child({ component: 'admin' }),
    });
    adminPort = (await admin.listen()).port;
  }

  return {
    proxy,
    collector,
    events,
    incidents,
    sampler,
    schema,
    rules,
    admin,
    adminToken,
    proxyPort: proxyAddress.port,
    adminPort,
    async stop(drainMs: number) {
      await proxy.drain(drainMs);
      incidents?.stop();
      schema?.stop();
      roundTrip?.stop();
      sampler?.stop();
      rules.stop();
      await admin?.close();
      await monitor?.close();
      await Promise.all([...replicas.values()].map((r) => r.close()));
      await persistence.close();
    },
  };
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
