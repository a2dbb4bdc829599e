// Prometheus metrics (prom-client). Nothing is pushed per query: every value is
// read from the proxy's counters and the shape registry at scrape time. Per-shape
// series exist only for the top N shapes by total time; the rest are summed under
// fingerprint="other", so label cardinality stays bounded however many shapes exist.
// The per-shape latency histogram is counted on the completion path (a bucket
// increment in ShapeStats.record) and only read here. Also prom-client's default
// process and runtime metrics (CPU, memory, heap, event-loop lag, open fds) and
// pgwarden_build_info. Every metric is documented in docs/metrics.md.

import client from 'prom-client';
import type { IncidentManager } from '../detect/incidents.ts';
import type { PlanSampler } from '../plans/sampler.ts';
import type { RulesGate } from '../rules/gate.ts';
import type { RuleStore } from '../rules/store.ts';
import type { ProxyServer } from '../proxy/server.ts';
import { REJECT_REASONS, type ClientConnections } from '../proxy/connections.ts';
import type { ShapeCollector } from '../shapes/collector.ts';
import { LATENCY_BUCKETS_MS, type ShapeStats } from '../shapes/registry.ts';
import { VERSION } from '../version.ts';

export interface MetricsOptions {
  readonly topShapes: number;
}

const CONNECT_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];

export interface MetricSources {
  readonly collector: ShapeCollector | null;
  readonly incidents?: IncidentManager | null;
  readonly sampler?: PlanSampler | null;
  readonly rules?: { store: RuleStore; gate: RulesGate } | null;
}

/** The proxy counters the metrics read: one ProxyServer's, or the sum over proxy workers. */
export type ProxyCounters = Pick<ProxyServer, 'stats' | 'sessionCount' | 'bytesRelayed'> & {
  readonly connections: Pick<ClientConnections, 'byPhase' | 'rejected'>;
};

export function createMetrics(proxy: ProxyCounters, sources: MetricSources, options: MetricsOptions): client.Registry {
  const { collector, incidents, sampler, rules } = sources;
  const registry = new client.Registry();
  client.collectDefaultMetrics({ register: registry });
  // Gauges named like counters (promtool check metrics rejects them); each repeats
  // nodejs_active_handles / _requests / _resources, which stay.
  for (const name of ['nodejs_active_handles_total', 'nodejs_active_requests_total', 'nodejs_active_resources_total'])
    registry.removeSingleMetric(name);
  new client.Gauge({
    name: 'pgwarden_build_info',
    help: 'Build of this pgwarden (value 1): version, Node.js version, platform.',
    labelNames: ['version', 'node', 'platform'],
    registers: [registry],
  }).set({ version: VERSION, node: process.versions.node, platform: `${process.platform}-${process.arch}` }, 1);
  const stats = proxy.stats;
  const counter = (name: string, help: string, read: () => number) =>
    new client.Counter({
      name,
      help,
      registers: [registry],
      collect() {
        this.reset();
        this.inc(read());
      },
    });
  const gauge = (name: string, help: string, read: () => number) =>
    new client.Gauge({
      name,
      help,
      registers: [registry],
      collect() {
        this.set(read());
      },
    });

  counter('pgwarden_connections_total', 'Client connections that reached a session.', () => stats.connectionsAccepted);
  const connections = proxy.connections;
  new client.Gauge({
    name: 'pgwarden_connections_open',
    help: 'Client sockets held now, by phase (startup, authenticating, active, closing).',
    labelNames: ['phase'],
    registers: [registry],
    collect() {
      for (const [phase, n] of Object.entries(connections.byPhase())) this.set({ phase }, n);
    },
  });
  new client.Counter({
    name: 'pgwarden_connections_rejected_total',
    help: 'Connections refused or closed before becoming a working session, and cancel requests dropped, by reason.',
    labelNames: ['reason'],
    registers: [registry],
    collect() {
      this.reset();
      for (const reason of REJECT_REASONS) this.inc({ reason }, connections.rejected(reason));
    },
  });
  gauge('pgwarden_connections_active', 'Client sessions open now.', () => proxy.sessionCount);
  counter('pgwarden_cancel_requests_total', 'CancelRequests received and forwarded.', () => stats.cancelRequests);
  counter(
    'pgwarden_upstream_connect_failures_total',
    'Upstream connections that could not be opened (client got 08006).',
    () => stats.upstreamConnectFailures,
  );
  counter(
    'pgwarden_upstream_lost_total',
    'Sessions whose upstream connection went away under them (client got 08006).',
    () => stats.upstreamLost,
  );
  new client.Counter({
    name: 'pgwarden_bytes_total',
    help: 'Bytes relayed, by direction.',
    labelNames: ['direction'],
    registers: [registry],
    collect() {
      const bytes = proxy.bytesRelayed();
      this.reset();
      this.inc({ direction: 'client_to_server' }, bytes.fromClient);
      this.inc({ direction: 'server_to_client' }, bytes.fromServer);
    },
  });
  const connectTime = new client.Histogram({
    name: 'pgwarden_upstream_connect_seconds',
    help: 'Time to open an upstream connection (TCP, and TLS when configured).',
    buckets: CONNECT_BUCKETS,
    registers: [registry],
    collect() {
      for (const ms of stats.connectTimes) connectTime.observe(ms / 1000);
      stats.connectTimes.length = 0;
    },
  });

  if (collector !== null) registerShapeMetrics(registry, collector, options, counter, gauge);
  if (incidents) {
    // Incidents, not shapes: a root and its victims count once.
    gauge(
      'pgwarden_incidents_active',
      'Regression incidents currently active (one per cause: a root shape and its victims count once).',
      () => incidents.activeCount,
    );
    counter('pgwarden_incidents_opened_total', 'Regression incidents opened since start.', () => incidents.opened);
    gauge('pgwarden_incident_shapes_affected', 'Shapes in active incidents (roots and victims).', () =>
      incidents.list('active').reduce((sum, i) => sum + i.impact.shapes, 0),
    );
    new client.Gauge({
      name: 'pgwarden_shape_in_incident',
      help: 'Shapes in an active incident (1), as its root or as a victim: lets per-shape alerts skip what an incident already covers.',
      labelNames: ['fingerprint', 'role'],
      registers: [registry],
      collect() {
        this.reset();
        for (const i of incidents.list('active')) {
          if (i.root) this.set({ fingerprint: i.root, role: 'root' }, 1);
          for (const v of i.victims) this.set({ fingerprint: v.fingerprint, role: 'victim' }, 1);
        }
      },
    });
    new client.Gauge({
      name: 'pgwarden_shape_regression_ratio',
      help: 'Recent p95 over baseline p95, for shapes with an active incident and the top shapes by total time.',
      labelNames: ['fingerprint'],
      registers: [registry],
      collect() {
        this.reset();
        const shapes = new Set(
          incidents
            .list('active')
            .flatMap((i) => [...(i.root ? [i.root] : []), ...i.victims.map((v) => v.fingerprint)]),
        );
        if (collector)
          for (const s of collector.registry
            .all()
            .sort((a, b) => b.totalMs - a.totalMs)
            .slice(0, options.topShapes))
            shapes.add(s.fingerprint);
        for (const fp of shapes) {
          const ratio = incidents.regressionRatio(fp);
          if (ratio !== null) this.set({ fingerprint: fp }, ratio);
        }
      },
    });
  }
  if (rules) {
    gauge('pgwarden_rules_active', 'Rules in force (block, shed, reroute).', () => rules.store.list().length);
    new client.Counter({
      name: 'pgwarden_rule_applied_total',
      help: 'Queries a rule refused (block, shed) or rerouted, by rule id and action, for the rules in force.',
      labelNames: ['rule', 'action'],
      registers: [registry],
      collect() {
        this.reset();
        for (const rule of rules.store.list())
          this.inc({ rule: rule.id, action: rule.action }, rules.gate.applied.get(rule.id) ?? 0);
      },
    });
  }
  if (sampler) {
    counter(
      'pgwarden_plan_samples_total',
      'EXPLAIN samples taken through the monitoring connection.',
      () => sampler.explained,
    );
    counter(
      'pgwarden_plan_sample_failures_total',
      'EXPLAIN samples that failed (timeouts, unusable parameters, monitor down).',
      () => sampler.failed,
    );
    counter(
      'pgwarden_plan_samples_refused_total',
      'Statements not explained because planning them could run code the monitor must not run.',
      () => sampler.refused,
    );
  }
  return registry;
}

function registerShapeMetrics(
  registry: client.Registry,
  collector: ShapeCollector,
  options: MetricsOptions,
  counter: (name: string, help: string, read: () => number) => client.Counter,
  gauge: (name: string, help: string, read: () => number) => client.Gauge,
): void {
  counter('pgwarden_queries_total', 'Statements completed through the proxy.', () => collector.queries);
  new client.Counter({
    name: 'pgwarden_query_errors_total',
    help: 'Statements that ended in an error, by SQLSTATE class (first two characters).',
    labelNames: ['class'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [errorClass, n] of collector.errorsByClass) this.inc({ class: errorClass }, n);
    },
  });
  gauge('pgwarden_shapes_tracked', 'Distinct query shapes currently tracked.', () => collector.registry.size);
  counter(
    'pgwarden_shapes_evicted_total',
    'Shapes folded into the overflow shape by the shape cap.',
    () => collector.registry.evicted,
  );

  // Top-N selection is computed once per scrape and shared by the per-shape metrics.
  let scrape: { top: ShapeStats[]; rest: ShapeStats[] } | null = null;
  const select = () => {
    if (scrape === null) {
      const all = collector.registry.all().sort((a, b) => b.totalMs - a.totalMs);
      scrape = { top: all.slice(0, options.topShapes), rest: all.slice(options.topShapes) };
      setImmediate(() => (scrape = null));
    }
    return scrape;
  };
  const perShape = (name: string, help: string, read: (s: ShapeStats) => number) =>
    new client.Counter({
      name,
      help,
      labelNames: ['fingerprint'],
      registers: [registry],
      collect() {
        const { top, rest } = select();
        this.reset();
        for (const s of top) this.inc({ fingerprint: s.fingerprint }, read(s));
        const other = rest.reduce((sum, s) => sum + read(s), 0);
        if (rest.length > 0) this.inc({ fingerprint: 'other' }, other);
      },
    });
  perShape(
    'pgwarden_shape_calls_total',
    'Calls per shape (top shapes by total time; the rest as fingerprint="other").',
    (s) => s.calls,
  );
  perShape('pgwarden_shape_errors_total', 'Errors per shape (top shapes; the rest as "other").', (s) => s.errors);
  perShape('pgwarden_shape_rows_total', 'Rows per shape (top shapes; the rest as "other").', (s) => s.rows);
  perShape(
    'pgwarden_shape_time_seconds_total',
    'Total execution time per shape (top shapes; the rest as "other").',
    (s) => s.totalMs / 1000,
  );
  registry.registerMetric(
    bucketHistogram({
      name: 'pgwarden_shape_latency_seconds',
      help: 'Latency per shape as a histogram (top shapes by total time; the rest as fingerprint="other"); use rate() over _bucket.',
      labelName: 'fingerprint',
      read() {
        const { top, rest } = select();
        const rows = top.map((s) => ({
          label: s.fingerprint,
          buckets: s.latencyBuckets,
          sumMs: s.totalMs,
          count: s.timedCalls,
        }));
        if (rest.length > 0) {
          const buckets = new Float64Array(LATENCY_BUCKETS_MS.length + 1);
          let sumMs = 0;
          let count = 0;
          for (const s of rest) {
            for (let b = 0; b < buckets.length; b++) buckets[b] += s.latencyBuckets[b];
            sumMs += s.totalMs;
            count += s.timedCalls;
          }
          rows.push({ label: 'other', buckets, sumMs, count });
        }
        return rows;
      },
    }),
  );
  new client.Gauge({
    name: 'pgwarden_shape_info',
    help: 'Normalized text of each top shape (value 1), to join on fingerprint.',
    labelNames: ['fingerprint', 'command', 'query'],
    registers: [registry],
    collect() {
      this.reset();
      for (const s of select().top)
        this.set({ fingerprint: s.fingerprint, command: s.command, query: s.query.slice(0, 200) }, 1);
    },
  });
}

interface HistogramRow {
  readonly label: string;
  /** Non-cumulative counts per LATENCY_BUCKETS_MS bucket, then +Inf. */
  readonly buckets: Float64Array;
  readonly sumMs: number;
  readonly count: number;
}

/**
 * A Prometheus histogram whose bucket counts are kept elsewhere (per shape, in the
 * registry) and read at scrape time: prom-client's Histogram only counts what is
 * observed through it, which would put a labelled observe() on the query path.
 */
function bucketHistogram(spec: { name: string; help: string; labelName: string; read: () => HistogramRow[] }) {
  const bounds = LATENCY_BUCKETS_MS.map((ms) => String(ms / 1000));
  return {
    name: spec.name,
    help: spec.help,
    type: 'histogram',
    aggregator: 'sum',
    reset() {},
    get() {
      const values: { metricName: string; labels: Record<string, string | number>; value: number }[] = [];
      for (const row of spec.read()) {
        let cumulative = 0;
        for (let b = 0; b < row.buckets.length; b++) {
          cumulative += row.buckets[b];
          values.push({
            metricName: `${spec.name}_bucket`,
            labels: { [spec.labelName]: row.label, le: b < bounds.length ? bounds[b] : '+Inf' },
            value: cumulative,
          });
        }
        values.push({
          metricName: `${spec.name}_sum`,
          labels: { [spec.labelName]: row.label },
          value: row.sumMs / 1000,
        });
        values.push({ metricName: `${spec.name}_count`, labels: { [spec.labelName]: row.label }, value: row.count });
      }
      return { name: spec.name, help: spec.help, type: 'histogram', aggregator: 'sum', values };
    },
  } as unknown as client.Metric;
}
