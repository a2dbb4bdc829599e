// Wires the parts of a running pgwarden together: the proxy, the shape collector
// and the admin server. The only module that knows them all (with the commands);
// tests and the demo start pgwarden through it too.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { shapeRoutes } from '../admin/api.ts';
import { eventJson, incidentRoutes, plansJson } from '../admin/incidents-api.ts';
import { createMetrics } from '../admin/metrics.ts';
import { AdminServer, upstreamProbe } from '../admin/server.ts';
import { loadDashboard } from '../dashboard/assets.ts';
import { systemClock, type Clock } from '../clock.ts';
import { parseHostPort, type Config } from '../config.ts';
import { DEFAULT_DETECTOR_OPTIONS, type DetectorOptions } from '../detect/detector.ts';
import { DdlWatch } from '../detect/ddlwatch.ts';
import { EventLog } from '../detect/events.ts';
import { IncidentManager } from '../detect/incidents.ts';
import { RoundTripTracker } from '../detect/roundtrip.ts';
import { SchemaWatcher } from '../detect/schema.ts';
import { WebhookSender } from '../detect/webhook.ts';
import { ActivitySampler } from '../detect/activity.ts';
import { TimelineCauses, type CauseProvider } from '../detect/causes.ts';
import { InFlightTracker } from '../detect/inflight.ts';
import { LockCauses } from '../detect/locks.ts';
import { NewShapeWatch } from '../detect/newshapes.ts';
import { SaturationCauses } from '../detect/saturation.ts';
import { SettingsWatcher } from '../detect/settings.ts';
import { StatisticsWatcher } from '../detect/statistics.ts';
import { backendRoutes } from '../admin/backends-api.ts';
import { MonitorPool } from '../plans/monitor.ts';
import { PlanSampler } from '../plans/sampler.ts';
import { ProxyServer } from '../proxy/server.ts';
import { mitigationRoutes, ruleRoutes } from '../admin/rules-api.ts';
import { sessionRoutes } from '../admin/sessions-api.ts';
import { setLogLevel } from '../log.ts';
import { RulesGate } from '../rules/gate.ts';
import { MitigationPolicy, type PolicySettings } from '../rules/policy.ts';
import { ReplicaPool } from '../rules/replica.ts';
import { createRule, type Rule } from '../rules/rule.ts';
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
import { FleetPublisher } from './fleet.ts';
import type { ClusterRole } from './workers.ts';

export interface App {
  readonly proxy: ProxyServer;
  readonly collector: ShapeCollector | null;
  readonly events: EventLog;
  readonly incidents: IncidentManager | null;
  readonly sampler: PlanSampler | null;
  readonly schema: SchemaWatcher | null;
  /** Statements forwarded and not yet completed (null without statistics). */
  readonly inflight: InFlightTracker | null;
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
}

export async function startApp(config: Config, log: Logger, options: AppOptions = {}): Promise<App> {
  const clock = options.clock ?? systemClock;
  const upstream = parseHostPort(config.upstream);
  const proxy = buildProxy(config, log);
  const worker = options.cluster?.role === 'worker' ? options.cluster.link : null;
  const hub = options.cluster?.role === 'primary' ? options.cluster.hub : null;

  const events = new EventLog(clock);
  let collector: ShapeCollector | null = null;
  let incidents: IncidentManager | null = null;
  let sampler: PlanSampler | null = null;
  let schema: SchemaWatcher | null = null;
  let roundTrip: RoundTripTracker | null = null;
  let policy: MitigationPolicy | null = null;
  let current = config;
  const webhook =
    config.alert_webhook_url && !worker ? new WebhookSender({ url: config.alert_webhook_url, log: log.child({ component: 'webhook' }) }) : null;
  let fleet: FleetPublisher | null = null;
  const monitor = config.monitor_url && !worker
    ? new MonitorPool({
        url: config.monitor_url,
        concurrency: config.monitor_concurrency,
        statementTimeoutMs: config.monitor_statement_timeout_ms,
        maxDatabases: config.monitor_max_databases,
        lockTimeoutMs: config.monitor_lock_timeout_ms,
        log: log.child({ component: 'monitor' }),
      })
    : null;
  const finder = await ShapeFinder.create({ cacheEntries: config.shape_cache_entries, cacheBytes: config.shape_cache_mb * 1024 * 1024, maxTextBytes: config.max_shape_text_bytes });

  // Rules: persisted in the control database when there is one, else in the state file.
  const rulesLog = log.child({ component: 'rules' });
  const persistence: RulePersistence = worker
    ? worker.rules
    : config.control_url
    ? await ControlDatabase.open({ url: config.control_url, instance: config.instance_name ?? `${os.hostname()}:${process.pid}`, log: rulesLog })
    : new StateFile(config.state_file, rulesLog);
  const rules = new RuleStore({ clock, log: rulesLog, events, persistence });
  await rules.start();
  // A worker's rules come from the primary, config-file rules included.
  if (!worker) await syncConfigRules(rules, configRules(config, clock.now()));
  const replicas = new Map(
    Object.entries(config.replicas).map(([name, r]) => [
      name,
      new ReplicaPool({ name, url: r.url, size: r.pool_size, connectTimeoutMs: config.connect_timeout_ms, log: log.child({ component: 'replica', replica: name }) }),
    ]),
  );
  const gate = new RulesGate({ store: rules, finder, replicas, log: rulesLog });
  // The in-flight tracker wraps the rules' gate: it sees every statement forwarded.
  // (Not in a cluster worker: statements stuck in a worker are not reported to the primary yet.)
  const inflight = config.stats && !worker ? new InFlightTracker(gate, finder) : null;
  proxy.setGate(inflight ?? gate);
  let activity: ActivitySampler | null = null;
  let settings: SettingsWatcher | null = null;
  let statistics: StatisticsWatcher | null = null;
  let newShapes: NewShapeWatch | null = null;
  const causeProviders: CauseProvider[] = [];

  if (worker) worker.start(proxy, gate, config.stats ? finder : null);
  else if (config.stats) {
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
    proxy.onQueryComplete(collector.deferred);

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
      const detectLog = log.child({ component: 'detect' });
      const checkMs = config.schema_check_interval_s * 1000;
      settings = new SettingsWatcher({ monitor, events, clock, log: detectLog, intervalMs: checkMs });
      settings.start();
      statistics = new StatisticsWatcher({ monitor, events, clock, log: detectLog, intervalMs: checkMs });
      statistics.start();
      const tracker = inflight;
      activity = new ActivitySampler({ monitor, finder, clock, log: detectLog, intervalMs: config.activity_sample_ms, inFlightByShape: tracker ? () => tracker.countsByShape() : undefined });
      activity.start();
      causeProviders.push(
        new TimelineCauses(events),
        new LockCauses(activity),
        new SaturationCauses({ activity, registry, bucketMs, roundTrip }),
      );
      // A schema change found in the catalog gets the affected shapes re-explained at
      // once; so does a table's new statistics, and a setting change every shape.
      const plans = sampler;
      events.onEvent((e) => {
        if (e.type === 'schema_change' || e.type === 'statistics_change') plans.resampleTouching(e.objects ?? []);
        else if (e.type === 'setting_change') plans.resampleTouching([]);
      });
    }
    collector.onShape(new DdlWatch(events, sampler).observe);
    incidents = new IncidentManager({
      registry,
      events,
      clock,
      log: log.child({ component: 'incidents' }),
      detector: detectorOptions(config),
      bucketMs,
      evaluateEveryMs: config.detect_evaluate_ms,
      sampler,
      roundTrip,
      webhook,
      causeProviders,
      inflight,
      // Baselines and incident history go where the rules go.
      store: persistence instanceof ControlDatabase || persistence instanceof StateFile ? persistence : null,
    });
    await incidents.restore();
    collector.onShape(incidents.observe, 'latencies');
    const shapes = registry;
    policy = new MitigationPolicy({
      ...policySettings(config),
      shapes: {
        lookup: (fp) => shapes.get(fp),
        trafficShare: (fps) => {
          // Calls of the last minute: the traffic a shed rule would now meet.
          const now = clock.now();
          const from = now - 60_000;
          let all = 0;
          for (const s of shapes.all()) all += s.series.callsBetween(from, now);
          let part = 0;
          for (const fp of new Set(fps)) part += shapes.get(fp)?.series.callsBetween(from, now) ?? 0;
          return all === 0 ? 0 : part / all;
        },
      },
      store: rules,
      events,
      clock,
      log: rulesLog,
      alert: webhook ? (payload) => webhook.send(payload) : undefined,
    });
    incidents.onChange(policy.onIncident);
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
    if (persistence instanceof ControlDatabase) {
      fleet = new FleetPublisher({
        registry,
        control: persistence,
        intervalMs: config.fleet_publish_interval_s * 1000,
        topShapes: config.fleet_top_shapes,
        log: log.child({ component: 'fleet' }),
      });
      fleet.start();
    }
    newShapes = new NewShapeWatch({
      registry,
      events,
      clock,
      log: log.child({ component: 'detect' }),
      sampler,
      webhook,
      graceMs: config.new_shape_grace_s * 1000,
      windowMs: config.new_shape_window_s * 1000,
      slowMs: config.new_shape_slow_ms,
      share: config.new_shape_share,
      minCalls: 3,
    });
    newShapes.start();
  }

  /** What a shape's status is: a rule on it, else an active incident, else ok. */
  const statusOf = (fp: string): string => {
    const actions = new Set((rules.forFingerprint(fp) ?? []).map((r) => r.action));
    if (actions.has('block')) return 'blocked';
    if (actions.has('shed')) return 'shed';
    if (actions.has('reroute')) return 'rerouted';
    const incident = incidents?.activeFor(fp);
    if (incident) return incident.root === fp ? 'regressed' : 'slowed';
    return newShapes?.get(fp) ? 'new' : 'ok';
  };

  hub?.attach({ collector, rules, gate });
  const proxyPort = hub ? 0 : (await proxy.listen()).port;
  let admin: AdminServer | null = null;
  let adminPort: number | null = null;
  const adminToken = config.admin_token ?? randomBytes(18).toString('base64url');
  if (options.admin !== false && !worker) {
    if (config.admin_token === undefined) {
      // Not printed: logs travel further than the operator's terminal. A file only its owner can read.
      const tokenFile = path.join(path.dirname(config.state_file), '.pgwarden-admin-token');
      try {
        fs.writeFileSync(tokenFile, `${adminToken}\n`, { mode: 0o600 });
        fs.chmodSync(tokenFile, 0o600);
        log.warn({ token_file: tokenFile }, `no admin_token configured: generated one for this run, in ${tokenFile} (set PGWARDEN_ADMIN_TOKEN to choose it)`);
      } catch (err) {
        log.warn({ err }, 'no admin_token configured and the generated one could not be written to a file: set PGWARDEN_ADMIN_TOKEN to use the admin API');
      }
    }
    const adminAddress = parseHostPort(config.admin);
    admin = new AdminServer({
      host: adminAddress.host,
      port: adminAddress.port,
      token: adminToken,
      maxConnections: config.admin_max_connections,
      metrics: createMetrics(hub ? hub.proxyCounters : proxy, { collector, incidents, sampler, rules: { store: rules, gate } }, { topShapes: config.metrics_top_shapes }),
      routes: [
        ...(collector
          ? shapeRoutes(collector.registry, clock, statusOf, {
              plansOf: sampler ? (fp) => plansJson(sampler!, fp) : undefined,
              eventsOf: (fp) => events.recent(50, { fingerprint: fp }).map(eventJson),
              incidentsOf: incidents ? (fp) => incidents!.list().filter((i) => i.root === fp || i.victims.some((v) => v.fingerprint === fp)) : undefined,
              rulesOf: (fp) => rules.forFingerprint(fp) ?? [],
              fleet: fleet ? () => fleet!.fleet() : undefined,
              newSinceOf: (fp) => newShapes?.get(fp)?.new_since ?? null,
              detectorOf: incidents ? (fp) => incidents!.detectorView(fp) : undefined,
            })
          : []),
        ...(collector ? workloadRoutes({ registry: collector.registry, sampler, clock, sampleParams: config.workload_sample_params }) : []),
        ...ruleRoutes(rules, gate, [...replicas.keys()], clock, collector ? (fp) => collector!.registry.get(fp) : null),
        ...(policy ? mitigationRoutes(policy) : []),
        ...sessionRoutes(
          proxy,
          collector
            ? (text, index) => {
                const shapes = finder.shapesOfText(text);
                return shapes[Math.min(index, shapes.length - 1)];
              }
            : null,
          config.upstream,
        ),
        ...(activity && monitor ? backendRoutes({ activity, monitor, events, log: log.child({ component: 'admin' }) }) : []),
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
    inflight,
    newShapes,
    rules,
    admin,
    adminToken,
    proxyPort,
    adminPort,
    policy,
    async reload(next: Config) {
      // Everything that can fail is prepared first, so a bad config changes nothing.
      const tls = next.tls_cert && next.tls_key ? { cert: fs.readFileSync(next.tls_cert), key: fs.readFileSync(next.tls_key) } : null;
      const nextRules = configRules(next, clock.now());
      proxy.setTlsCertificate(tls?.cert, tls?.key);
      if (!worker) await syncConfigRules(rules, nextRules);
      policy?.reconfigure(policySettings(next));
      incidents?.setDetectorOptions(detectorOptions(next));
      collector?.reconfigure({ slowQueryMs: next.slow_query_ms, logQueryValues: next.log_query_values, log: log.child({ component: 'shapes' }) });
      setLogLevel(log, next.log_level);
      const changed = (Object.keys(next) as (keyof Config)[]).filter((k) => JSON.stringify(next[k]) !== JSON.stringify(current[k]));
      for (const k of Object.keys(current) as (keyof Config)[]) if (!(k in next) && !changed.includes(k)) changed.push(k);
      current = next;
      return { applied: changed.filter((k) => RELOADABLE_KEYS.has(k)), needsRestart: changed.filter((k) => !RELOADABLE_KEYS.has(k)) };
    },
    async stop(drainMs: number) {
      await proxy.drain(drainMs);
      await worker?.close();
      incidents?.stop();
      fleet?.stop();
      await incidents?.save();
      schema?.stop();
      roundTrip?.stop();
      activity?.stop();
      settings?.stop();
      statistics?.stop();
      newShapes?.stop();
      sampler?.stop();
      rules.stop();
      await admin?.close();
      await monitor?.close();
      await Promise.all([...replicas.values()].map((r) => r.close()));
      await persistence.close();
    },
  };
}

function detectorOptions(config: Config): DetectorOptions {
  return {
    ...DEFAULT_DETECTOR_OPTIONS,
    minRecentSamples: config.detect_min_samples,
    p95Ratio: config.detect_p95_ratio,
    p50Ratio: config.detect_p50_ratio,
    absoluteMs: config.detect_absolute_ms,
    minBaselineCalls: config.detect_min_baseline_calls,
  };
}

function policySettings(config: Config): PolicySettings {
  return {
    mode: config.mitigation,
    protect: new Set(config.mitigation_protect),
    maxConcurrent: config.mitigation_max_concurrent,
    queueTimeoutMs: config.mitigation_queue_timeout_ms,
    ttlS: config.mitigation_ttl_s,
    maxRules: config.mitigation_max_rules,
    maxTrafficShare: config.mitigation_max_traffic_share,
  };
}

/** The config file's rules, each with an id derived from its content (throws RuleError on a bad one). */
function configRules(config: Config, now: number): Rule[] {
  return config.rules.map((input) => {
    const id = `cfg-${createHash('sha256').update(JSON.stringify(input)).digest('hex').slice(0, 10)}`;
    return createRule({ created_by: 'config', ...input }, now, 'config', id);
  });
}

/** Makes the config's rules the ones in force: adds new ones, lifts those no longer in the config. */
async function syncConfigRules(store: RuleStore, wanted: readonly Rule[]): Promise<void> {
  const ids = new Set(wanted.map((r) => r.id));
  for (const rule of wanted) if (!store.get(rule.id)) await store.add(rule);
  for (const rule of store.list()) if (rule.id.startsWith('cfg-') && !ids.has(rule.id)) await store.remove(rule.id, 'config', 'no longer in the configuration');
}

function buildProxy(config: Config, log: Logger): ProxyServer {
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
