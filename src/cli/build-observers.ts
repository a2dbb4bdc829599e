// What runs after a query completes: the shape collector and everything fed by it
// or by the monitoring connection (EXPLAIN sampling, the catalog, settings,
// statistics and activity watches, the round trip, incidents, the mitigation
// policy, the fleet publisher, the new-shape watch). Part of the composition root;
// docs/architecture.md follows one query through it.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { Config } from '../config.ts';
import { ActivitySampler } from '../detect/activity.ts';
import { touchedObjects } from '../detect/attribution.ts';
import { PreparedPlanCauses, TimelineCauses, type CauseProvider } from '../detect/causes.ts';
import { DatabaseWatches } from '../detect/databases.ts';
import { DdlWatch } from '../detect/ddlwatch.ts';
import { DEFAULT_DETECTOR_OPTIONS, type DetectorOptions } from '../detect/detector.ts';
import type { InFlightView } from '../detect/inflight.ts';
import { IncidentManager } from '../detect/incidents.ts';
import { LockCauses } from '../detect/locks.ts';
import { NewShapeWatch } from '../detect/newshapes.ts';
import { RoundTripTracker } from '../detect/roundtrip.ts';
import { SaturationCauses } from '../detect/saturation.ts';
import type { SchemaWatcher } from '../detect/schema.ts';
import { inDatabases, shapeDatabases } from '../detect/scope.ts';
import { SettingsWatcher } from '../detect/settings.ts';
import type { WebhookSender } from '../detect/webhook.ts';
import type { EventLog } from '../events/timeline.ts';
import type { MonitorPool } from '../plans/monitor.ts';
import { PlanSampler } from '../plans/sampler.ts';
import type { ProxyServer } from '../proxy/server.ts';
import { MitigationPolicy, type PolicySettings } from '../rules/policy.ts';
import { ShapeCollector } from '../shapes/collector.ts';
import type { ShapeFinder } from '../shapes/fingerprint.ts';
import { ShapeRegistry } from '../shapes/registry.ts';
import { ControlDatabase } from '../state/control.ts';
import { StateFile } from '../state/file.ts';
import type { RulesFeature } from './build-rules.ts';
import { FleetPublisher } from './fleet.ts';

export interface ObserverInputs {
  readonly config: Config;
  readonly log: Logger;
  readonly clock: Clock;
  readonly proxy: ProxyServer;
  readonly finder: ShapeFinder;
  readonly events: EventLog;
  readonly rules: RulesFeature;
  readonly monitor: MonitorPool | null;
  readonly webhook: WebhookSender | null;
  readonly inflight: InFlightView | null;
}

export interface Observers {
  readonly collector: ShapeCollector;
  readonly sampler: PlanSampler | null;
  readonly schema: SchemaWatcher | null;
  readonly activity: ActivitySampler | null;
  readonly incidents: IncidentManager;
  readonly policy: MitigationPolicy;
  readonly fleet: FleetPublisher | null;
  readonly newShapes: NewShapeWatch;
  /** Applies reloaded thresholds (detection, policy, slow-query log). */
  reconfigure(config: Config): void;
  stop(): Promise<void>;
}

/** The monitoring connection's side tasks: plans, catalog, settings, statistics, activity, round trip. */
interface Monitoring {
  readonly sampler: PlanSampler;
  /** The catalog and statistics watches, one pair per database with traffic (bounded). */
  readonly watches: DatabaseWatches;
  readonly roundTrip: RoundTripTracker;
  readonly settings: SettingsWatcher;
  readonly activity: ActivitySampler;
  readonly causeProviders: CauseProvider[];
}

export async function startObservers(inputs: ObserverInputs): Promise<Observers> {
  const { config, log, clock, events, rules } = inputs;
  const bucketMs = config.series_bucket_s * 1000;
  const registry = new ShapeRegistry({
    maxShapes: config.max_shapes,
    clock,
    series: { bucketMs, buckets: config.series_buckets, sketchBuckets: 6 },
  });
  const collector = new ShapeCollector(inputs.finder, registry, collectorSettings(config, log));
  // Recorded off the relay's critical path: queued, then processed in a batch on the next turn.
  inputs.proxy.onQueryComplete(collector.deferred);

  const monitoring = inputs.monitor ? startMonitoring(inputs, collector, registry, bucketMs) : null;
  const sampler = monitoring?.sampler ?? null;
  collector.onShape(new DdlWatch(events, sampler).observe);

  const incidents = new IncidentManager({
    registry,
    events,
    clock,
    log: log.child({ component: 'incidents' }),
    detector: detectorOptions(config),
    bucketMs,
    evaluateEveryMs: config.detect_evaluate_ms,
    sampler,
    roundTrip: monitoring?.roundTrip ?? null,
    webhook: inputs.webhook,
    causeProviders: monitoring?.causeProviders ?? [],
    inflight: inputs.inflight,
    // Baselines and incident history go where the rules go.
    store:
      rules.persistence instanceof ControlDatabase || rules.persistence instanceof StateFile ? rules.persistence : null,
  });
  await incidents.restore();
  collector.onShape(incidents.observe, 'latencies');

  const policy = new MitigationPolicy({
    ...policySettings(config),
    shapes: {
      lookup: (fp) => registry.get(fp),
      trafficShare: (fps) => {
        // Calls of the last minute: the traffic a shed rule would now meet.
        const now = clock.now();
        const from = now - 60_000;
        let all = 0;
        for (const s of registry.all()) all += s.series.callsBetween(from, now);
        let part = 0;
        for (const fp of new Set(fps)) part += registry.get(fp)?.series.callsBetween(from, now) ?? 0;
        return all === 0 ? 0 : part / all;
      },
    },
    store: rules.store,
    events,
    clock,
    log: rules.log,
    alert: inputs.webhook ? (payload) => inputs.webhook!.send(payload) : undefined,
  });
  incidents.onChange(policy.onIncident);

  let fleet: FleetPublisher | null = null;
  if (rules.persistence instanceof ControlDatabase) {
    // The fleet sees every instance's incidents and shapes through the control database.
    const control = rules.persistence;
    incidents.onChange((incident) =>
      control
        .publishIncident(incident as unknown as { id: string } & Record<string, unknown>)
        .catch((err: Error) =>
          rules.log.warn({ err, incident: incident.id }, 'incident not shared: control database unreachable'),
        ),
    );
    fleet = new FleetPublisher({
      registry,
      control,
      intervalMs: config.fleet_publish_interval_s * 1000,
      topShapes: config.fleet_top_shapes,
      log: log.child({ component: 'fleet' }),
    });
  }
  incidents.start();
  fleet?.start();

  const newShapes = new NewShapeWatch({
    registry,
    events,
    clock,
    log: log.child({ component: 'detect' }),
    sampler,
    webhook: inputs.webhook,
    graceMs: config.new_shape_grace_s * 1000,
    windowMs: config.new_shape_window_s * 1000,
    slowMs: config.new_shape_slow_ms,
    share: config.new_shape_share,
    minCalls: 3,
  });
  newShapes.start();

  return {
    collector,
    sampler,
    schema: monitoring?.watches.schema ?? null,
    activity: monitoring?.activity ?? null,
    incidents,
    policy,
    fleet,
    newShapes,
    reconfigure(next) {
      policy.reconfigure(policySettings(next));
      incidents.setDetectorOptions(detectorOptions(next));
      collector.reconfigure(collectorSettings(next, log));
    },
    async stop() {
      incidents.stop();
      fleet?.stop();
      await incidents.save();
      // Not awaited, as before: a catalog check in flight finishes (or fails) on its own.
      void monitoring?.watches.stop();
      monitoring?.roundTrip.stop();
      monitoring?.activity.stop();
      monitoring?.settings.stop();
      newShapes.stop();
      sampler?.stop();
    },
  };
}

function startMonitoring(
  inputs: ObserverInputs,
  collector: ShapeCollector,
  registry: ShapeRegistry,
  bucketMs: number,
): Monitoring {
  const { config, log, clock, events } = inputs;
  const monitor = inputs.monitor!;
  const plansLog = log.child({ component: 'plans' });
  const sampler = new PlanSampler({
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
  const checkMs = config.schema_check_interval_s * 1000;
  const detectLog = log.child({ component: 'detect' });
  // Catalog and statistics per database: the monitor URL's, then each one seen in
  // traffic, as many as the monitor keeps pools for (a watch beyond that would
  // reopen a connection at each check).
  const watches = new DatabaseWatches({
    monitor,
    events,
    clock,
    schemaLog: log.child({ component: 'schema' }),
    detectLog,
    intervalMs: checkMs,
    maxDatabases: config.monitor_max_databases,
  });
  collector.onShape(watches.observe);
  watches.start();
  const roundTrip = new RoundTripTracker({ monitor, clock, log: plansLog, intervalMs: 2000 });
  roundTrip.start();
  const settings = new SettingsWatcher({ monitor, events, clock, log: detectLog, intervalMs: checkMs });
  settings.start();
  const tracker = inputs.inflight;
  const activity = new ActivitySampler({
    monitor,
    finder: inputs.finder,
    clock,
    log: detectLog,
    intervalMs: config.activity_sample_ms,
    inFlightByShape: tracker ? () => tracker.countsByShape() : undefined,
  });
  activity.start();
  const causeProviders: CauseProvider[] = [
    new TimelineCauses(events, (databases) =>
      Math.min(settings.watchedUntil, watches.statisticsWatchedUntil(databases)),
    ),
    new PreparedPlanCauses(),
    new LockCauses(activity),
    new SaturationCauses({ activity, registry, bucketMs, roundTrip }),
  ];
  // A schema change found in the catalog gets the affected shapes re-explained at
  // once; so does a table's new statistics, and a setting change every shape: each
  // only among the shapes of the change's database when it names one.
  const ofDatabase = (e: Parameters<typeof inDatabases>[0]) => (fingerprint: string) =>
    inDatabases(e, shapeDatabases(registry.get(fingerprint)));
  events.onEvent((e) => {
    if (e.type === 'schema_change' || e.type === 'statistics_change')
      sampler.resampleTouching(touchedObjects(e), ofDatabase(e));
    else if (e.type === 'setting_change') sampler.resampleTouching([], ofDatabase(e));
  });
  return { sampler, watches, roundTrip, settings, activity, causeProviders };
}

function collectorSettings(config: Config, log: Logger) {
  return {
    slowQueryMs: config.slow_query_ms,
    logQueryValues: config.log_query_values,
    log: log.child({ component: 'shapes' }),
  };
}

export function detectorOptions(config: Config): DetectorOptions {
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
