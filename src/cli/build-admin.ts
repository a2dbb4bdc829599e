// The admin feature: the HTTP server with its token, the JSON API routes of each
// feature that runs, /metrics and the dashboard. Part of the composition root.

import fs from 'node:fs';
import path from 'node:path';
import type { Logger } from 'pino';
import { shapeRoutes } from '../admin/api.ts';
import { backendRoutes } from '../admin/backends-api.ts';
import { eventJson, incidentRoutes, plansJson } from '../admin/incidents-api.ts';
import { createMetrics, type ProxyCounters } from '../admin/metrics.ts';
import { mitigationRoutes, ruleRoutes } from '../admin/rules-api.ts';
import { AdminServer, upstreamProbe } from '../admin/server.ts';
import { inFlightRoutes, sessionRoutes, type SessionDirectory } from '../admin/sessions-api.ts';
import { workloadRoutes } from '../admin/workload-api.ts';
import type { Clock } from '../clock.ts';
import { parseHostPort, type Config } from '../config.ts';
import { loadDashboard } from '../dashboard/assets.ts';
import type { InFlightView } from '../detect/inflight.ts';
import type { EventLog } from '../events/timeline.ts';
import type { MonitorPool } from '../plans/monitor.ts';
import { ControlDatabase } from '../state/control.ts';
import type { Observers } from './build-observers.ts';
import type { RulesFeature } from './build-rules.ts';

export interface AdminInputs {
  readonly config: Config;
  readonly log: Logger;
  readonly clock: Clock;
  readonly token: string;
  /** The proxy's counters: this process's, or with --workers all workers' (see workers.ts). */
  readonly counters: ProxyCounters;
  readonly events: EventLog;
  readonly rules: RulesFeature;
  readonly observers: Observers | null;
  readonly monitor: MonitorPool | null;
  /** The live sessions: this process's, or with --workers every worker's. */
  readonly sessions: SessionDirectory;
  /** Statements in flight (null with statistics off). */
  readonly inflight: InFlightView | null;
}

/** Writes a generated token where only its owner can read it: logs travel further than the operator's terminal. */
export function keepGeneratedToken(config: Config, token: string, log: Logger): void {
  const tokenFile = path.join(path.dirname(config.state_file), '.pgwarden-admin-token');
  try {
    fs.writeFileSync(tokenFile, `${token}\n`, { mode: 0o600 });
    fs.chmodSync(tokenFile, 0o600);
    log.warn(
      { token_file: tokenFile },
      `no admin_token configured: generated one for this run, in ${tokenFile} (set PGWARDEN_ADMIN_TOKEN to choose it)`,
    );
  } catch (err) {
    log.warn(
      { err },
      'no admin_token configured and the generated one could not be written to a file: set PGWARDEN_ADMIN_TOKEN to use the admin API',
    );
  }
}

export async function startAdmin(inputs: AdminInputs): Promise<{ server: AdminServer; port: number }> {
  const { config, log, clock, events, rules, observers } = inputs;
  const o = observers;
  /** What a shape's status is: a rule on it, else an active incident, else new, else ok. */
  const statusOf = (fp: string): string => {
    const actions = new Set((rules.store.forFingerprint(fp) ?? []).map((r) => r.action));
    if (actions.has('block')) return 'blocked';
    if (actions.has('shed')) return 'shed';
    if (actions.has('reroute')) return 'rerouted';
    const incident = o?.incidents.activeFor(fp);
    if (incident) return incident.root === fp ? 'regressed' : 'slowed';
    return o?.newShapes.get(fp) ? 'new' : 'ok';
  };
  const sampler = o?.sampler ?? null;
  const persistence = rules.persistence;
  const routes = [
    ...(o
      ? shapeRoutes(o.collector.registry, clock, statusOf, {
          plansOf: sampler ? (fp) => plansJson(sampler, fp) : undefined,
          eventsOf: (fp) => events.recent(50, { fingerprint: fp }).map(eventJson),
          incidentsOf: (fp) =>
            o.incidents.list().filter((i) => i.root === fp || i.victims.some((v) => v.fingerprint === fp)),
          rulesOf: (fp) => rules.store.forFingerprint(fp) ?? [],
          fleet: o.fleet ? () => o.fleet!.fleet() : undefined,
          newSinceOf: (fp) => o.newShapes.get(fp)?.new_since ?? null,
          detectorOf: (fp) => o.incidents.detectorView(fp),
        })
      : []),
    ...(o
      ? workloadRoutes({ registry: o.collector.registry, sampler, clock, sampleParams: config.workload_sample_params })
      : []),
    ...ruleRoutes(
      rules.store,
      rules.gate,
      [...rules.replicas.keys()],
      clock,
      o ? (fp) => o.collector.registry.get(fp) : null,
    ),
    ...(o ? mitigationRoutes(o.policy) : []),
    ...sessionRoutes(inputs.sessions, { events, log: log.child({ component: 'admin' }) }),
    ...(inputs.inflight ? inFlightRoutes(inputs.inflight) : []),
    ...(o?.activity && inputs.monitor
      ? backendRoutes({ activity: o.activity, monitor: inputs.monitor, events, log: log.child({ component: 'admin' }) })
      : []),
    ...(o
      ? incidentRoutes(
          o.incidents,
          events,
          persistence instanceof ControlDatabase ? () => persistence.sharedIncidents() : undefined,
        )
      : []),
  ];
  const address = parseHostPort(config.admin);
  const upstream = parseHostPort(config.upstream);
  const server = new AdminServer({
    host: address.host,
    port: address.port,
    token: inputs.token,
    maxConnections: config.admin_max_connections,
    metrics: createMetrics(
      inputs.counters,
      {
        collector: o?.collector ?? null,
        incidents: o?.incidents ?? null,
        sampler,
        rules: { store: rules.store, gate: rules.gate },
      },
      { topShapes: config.metrics_top_shapes },
    ),
    routes,
    upstreamReady: upstreamProbe(upstream.host, upstream.port),
    files: loadDashboard(),
    log: log.child({ component: 'admin' }),
  });
  return { server, port: (await server.listen()).port };
}
