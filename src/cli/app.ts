// Wires the parts of a running pgwarden together: the proxy, the shape collector
// and the admin server. The only module that knows them all (with the commands);
// tests and the demo start pgwarden through it too.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import type { Logger } from 'pino';
import { shapeRoutes } from '../admin/api.ts';
import { createMetrics } from '../admin/metrics.ts';
import { AdminServer, upstreamProbe } from '../admin/server.ts';
import { systemClock, type Clock } from '../clock.ts';
import { parseHostPort, type Config } from '../config.ts';
import { ProxyServer } from '../proxy/server.ts';
import { ShapeCollector } from '../shapes/collector.ts';
import { ShapeFinder } from '../shapes/fingerprint.ts';
import { ShapeRegistry } from '../shapes/registry.ts';

export interface App {
  readonly proxy: ProxyServer;
  readonly collector: ShapeCollector | null;
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
}

export async function startApp(config: Config, log: Logger, options: AppOptions = {}): Promise<App> {
  const clock = options.clock ?? systemClock;
  const upstream = parseHostPort(config.upstream);
  const proxy = buildProxy(config, log);

  let collector: ShapeCollector | null = null;
  if (config.stats) {
    const finder = await ShapeFinder.create({ cacheEntries: config.shape_cache_entries, maxTextBytes: config.max_shape_text_bytes });
    const registry = new ShapeRegistry({
      maxShapes: config.max_shapes,
      clock,
      series: { bucketMs: config.series_bucket_s * 1000, buckets: config.series_buckets, sketchBuckets: 6 },
    });
    collector = new ShapeCollector(finder, registry, {
      slowQueryMs: config.slow_query_ms,
      logQueryValues: config.log_query_values,
      log: log.child({ component: 'shapes' }),
    });
    proxy.onQueryComplete(collector.observe);
  }

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
      metrics: createMetrics(proxy, collector, { topShapes: config.metrics_top_shapes }),
      routes: collector ? shapeRoutes(collector.registry, clock) : [],
      upstreamReady: upstreamProbe(upstream.host, upstream.port),
      log: log.child({ component: 'admin' }),
    });
    adminPort = (await admin.listen()).port;
  }

  return {
    proxy,
    collector,
    admin,
    adminToken,
    proxyPort: proxyAddress.port,
    adminPort,
    async stop(drainMs: number) {
      await proxy.drain(drainMs);
      await admin?.close();
    },
  };
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
