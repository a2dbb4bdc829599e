// What the deploy/ assets are checked against, read from the code itself: metric
// names from src/admin/metrics.ts, admin paths from src/admin/*.ts, environment
// variable names from the configuration schema. The deploy tests use these so
// alerts, dashboards, manifests and docs cannot drift from what pgwarden serves.

import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import YAML from 'yaml';
import { envName, optionKeys } from '../../src/config.ts';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

export const read = (relative: string): string => fs.readFileSync(path.join(root, relative), 'utf8');
export const exists = (relative: string): boolean => fs.existsSync(path.join(root, relative));

/** Every YAML document of a file (manifests may hold several). */
export function readYamlDocuments(relative: string): unknown[] {
  const docs = YAML.parseAllDocuments(read(relative));
  for (const doc of docs) {
    if (doc.errors.length > 0) throw new Error(`${relative}: ${doc.errors.map((e) => e.message).join('; ')}`);
  }
  return docs.map((d) => d.toJS()).filter((d) => d !== null && d !== undefined);
}

export function readYaml<T = Record<string, unknown>>(relative: string): T {
  const docs = readYamlDocuments(relative);
  if (docs.length !== 1) throw new Error(`${relative}: expected one YAML document, found ${docs.length}`);
  return docs[0] as T;
}

export interface MetricCatalog {
  /** Metric family names as registered (pgwarden_connections_total, pgwarden_upstream_connect_seconds...). */
  readonly families: ReadonlySet<string>;
  /** Families that are histograms (their series carry _bucket, _sum and _count). */
  readonly histograms: ReadonlySet<string>;
}

/**
 * The metrics src/admin/metrics.ts registers, from its source text: every string
 * literal that is a pgwarden_ name (whether passed as `name: '...'` or to a helper
 * like counter('...', ...)), and which of them are histograms.
 */
export function metricCatalog(): MetricCatalog {
  const source = read('src/admin/metrics.ts');
  const families = new Set<string>();
  for (const m of source.matchAll(/(['"`])(pgwarden_[a-z0-9_]+)\1/g)) families.add(m[2]);
  const histograms = new Set<string>();
  for (const m of source.matchAll(
    /(?:new\s+client\.Histogram|bucketHistogram)\(\s*\{\s*name:\s*(['"`])(pgwarden_[a-z0-9_]+)\1/g,
  ))
    histograms.add(m[2]);
  return { families, histograms };
}

/** Whether `series` is a name Prometheus would store for one of pgwarden's metrics. */
export function isPgwardenSeries(series: string, catalog: MetricCatalog): boolean {
  if (catalog.families.has(series)) return true;
  for (const suffix of ['_bucket', '_sum', '_count']) {
    if (series.endsWith(suffix) && catalog.histograms.has(series.slice(0, -suffix.length))) return true;
  }
  return false;
}

/** The pgwarden_ metric names a PromQL expression selects (string literals such as label values ignored). */
export function pgwardenNamesIn(expr: string): string[] {
  return pgwardenNamesInText(expr.replace(/"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`/g, '""'));
}

/** Every pgwarden_ name in a text (an alert template's embedded query, a document). */
export function pgwardenNamesInText(text: string): string[] {
  return [...new Set(text.match(/\bpgwarden_[a-zA-Z0-9_:]+/g) ?? [])];
}

/** Paths the admin server answers: the fixed ones in server.ts and every route in src/admin/*.ts. */
export function adminPaths(): { fixed: string[]; routes: string[] } {
  const fixed = [...read('src/admin/server.ts').matchAll(/pathname\s*===\s*'(\/[^']*)'/g)].map((m) => m[1]);
  const routes: string[] = [];
  for (const file of fs
    .readdirSync(path.join(root, 'src/admin'))
    .filter((f) => f.endsWith('.ts'))
    .sort()) {
    for (const m of read(`src/admin/${file}`).matchAll(/path:\s*'(\/[^']*)'/g)) routes.push(m[1]);
  }
  return { fixed: [...new Set(fixed)], routes: [...new Set(routes)] };
}

/** Whether a concrete request path (/api/shapes/abc) is served, matching `:param` segments. */
export function isServedPath(requestPath: string): boolean {
  const { fixed, routes } = adminPaths();
  if (fixed.includes(requestPath)) return true;
  const segments = requestPath.split('/').filter(Boolean);
  return routes.some((route) => {
    const pattern = route.split('/').filter(Boolean);
    return pattern.length === segments.length && pattern.every((p, i) => p.startsWith(':') || p === segments[i]);
  });
}

/**
 * The PGWARDEN_* environment variables pgwarden reads: one per option of the
 * schema (PGWARDEN_ + upper-case key), plus PGWARDEN_CONFIG (the config file, read
 * by the CLI).
 */
export function knownEnvNames(): Set<string> {
  const names = new Set(optionKeys.map((key) => envName(key)));
  if (read('src/cli/main.ts').includes('process.env.PGWARDEN_CONFIG')) names.add('PGWARDEN_CONFIG');
  return names;
}

/** The promtool binary if it is on PATH, else null. */
export function findPromtool(): string | null {
  const result = spawnSync('promtool', ['--version'], { encoding: 'utf8' });
  return result.status === 0 ? 'promtool' : null;
}

export const PROMTOOL_MISSING =
  'promtool is not on PATH: the Prometheus checks were skipped (Debian: apt-get install -y prometheus; .ci/run installs it)';

/**
 * A real admin server (src/admin/server.ts) on an ephemeral loopback port, to run
 * the health checks and probes of the image and manifests against. Its readiness
 * answer is whatever `ready` says.
 */
export async function startAdminServer(
  token: string,
  ready: () => boolean,
): Promise<{ port: number; close(): Promise<void> }> {
  const { AdminServer } = await import('../../src/admin/server.ts');
  const { createLogger } = await import('../../src/log.ts');
  const client = (await import('prom-client')).default;
  const server = new AdminServer({
    host: '127.0.0.1',
    port: 0,
    token,
    metrics: new client.Registry(),
    routes: [],
    upstreamReady: async () => ready(),
    log: createLogger('silent'),
  });
  const { port } = await server.listen();
  return { port, close: () => server.close() };
}

/** Runs `node -e SCRIPT` with extra environment; resolves with its exit code. */
export function runNodeScript(script: string, env: Record<string, string>, timeoutMs = 10_000): Promise<number> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ['-e', script], { env: { ...process.env, ...env }, stdio: 'ignore' });
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', reject);
    child.once('exit', (code, signal) => {
      clearTimeout(timer);
      resolve(code ?? (signal ? 128 : 1));
    });
  });
}
