import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import client from 'prom-client';
import YAML from 'yaml';
import { createMetrics } from '../../src/admin/metrics.ts';
import { loadConfig } from '../../src/config.ts';
import { RULES_USAGE } from '../../src/cli/rules.ts';
import {
  adminPaths,
  exists,
  isPgwardenSeries,
  metricCatalog,
  pgwardenNamesInText,
  read,
  readYaml,
  root,
} from './support.ts';

/** The metrics createMetrics registers when every source is there (stubs: nothing is read before a scrape). */
function registeredMetrics(): Map<string, string> {
  const registry = createMetrics(
    { stats: {} } as never,
    { collector: {}, incidents: {}, sampler: {}, rules: {} } as never,
    { topShapes: 5 },
  );
  const kinds = new Map<string, string>();
  for (const metric of registry.getMetricsAsArray()) {
    const name = (metric as unknown as { name: string }).name;
    // prom-client's default process and runtime metrics are documented as a group.
    if (!name.startsWith('pgwarden_')) continue;
    // A histogram read from counts kept elsewhere (bucketHistogram) says so in its type.
    const kind =
      metric instanceof client.Histogram || (metric as unknown as { type?: string }).type === 'histogram'
        ? 'histogram'
        : metric instanceof client.Counter
          ? 'counter'
          : metric instanceof client.Gauge
            ? 'gauge'
            : 'summary';
    kinds.set(name, kind);
  }
  return kinds;
}

/** The fields of an exported interface, from its source text. */
function interfaceFields(file: string, name: string): string[] {
  const source = read(file);
  const start = source.search(new RegExp(`^(export )?interface ${name}( extends [^{]+)? \\{`, 'm'));
  assert.ok(start >= 0, `${file} declares interface ${name}`);
  const body = source.slice(start, source.indexOf('\n}', start));
  return [...body.matchAll(/^\s+(?:readonly\s+)?(\w+)\??:/gm)].map((m) => m[1]);
}

/** The keys of the object shapeSummary() returns in src/admin/api.ts (its literal and the parts it spreads). */
function shapeSummaryFields(): string[] {
  const source = read('src/admin/api.ts');
  const fields: string[] = [];
  for (const fn of ['export function shapeSummary(', 'function figuresOf(', 'function originOf(']) {
    const start = source.indexOf(fn);
    assert.ok(start >= 0, `src/admin/api.ts has ${fn}`);
    const body = source.slice(source.indexOf('return {', start) + 'return '.length, source.indexOf('\n}', start));
    fields.push(...[...body.matchAll(/(?:^\s+|[{,]\s+)(\w+)(?=:|,)/gm)].map((m) => m[1]));
  }
  return fields;
}

/** The fields of a workload shape (src/workload/format.ts), when the workload export exists. */
function workloadShapeFields(): string[] {
  if (!exists('src/workload/format.ts')) return [];
  const source = read('src/workload/format.ts');
  const start = source.indexOf('const WorkloadShapeSchema = z.object({');
  if (start < 0) return [];
  const body = source.slice(start, source.indexOf('\n});', start));
  return [...body.matchAll(/^\s+(\w+):/gm)].map((m) => m[1]);
}

/**
 * METHOD path of everything the admin server answers: the fixed probe paths (GET),
 * the routes declared anywhere in src/ (`method: 'GET', path: '/api/...'`), and the
 * dashboard's page (src/dashboard/assets.ts).
 */
function routes(): string[] {
  const { fixed } = adminPaths();
  const declared: string[] = [];
  for (const file of sourceFiles('src')) {
    for (const m of read(file).matchAll(/method:\s*'(\w+)',\s*path:\s*'(\/[^']*)'/g)) declared.push(`${m[1]} ${m[2]}`);
  }
  const dashboard =
    exists('src/dashboard/assets.ts') && /files\.set\('\/',/.test(read('src/dashboard/assets.ts')) ? ['GET /'] : [];
  return [...new Set([...fixed.map((p) => `GET ${p}`), ...declared, ...dashboard])];
}

function sourceFiles(dir: string): string[] {
  return fs.readdirSync(path.join(root, dir), { withFileTypes: true }).flatMap((entry) => {
    const relative = `${dir}/${entry.name}`;
    if (entry.isDirectory()) return sourceFiles(relative);
    return entry.name.endsWith('.ts') ? [relative] : [];
  });
}

const headingAnchor = (heading: string) =>
  heading
    .trim()
    .toLowerCase()
    .replace(/[^a-z0-9 -]/g, '')
    .replace(/ /g, '-');

describe('docs/metrics.md', () => {
  const doc = read('docs/metrics.md');

  test('the source-text reader of src/admin/metrics.ts finds exactly what createMetrics registers', () => {
    const registered = registeredMetrics();
    const catalog = metricCatalog();
    assert.deepEqual([...catalog.families].sort(), [...registered.keys()].sort());
    assert.deepEqual(
      [...catalog.histograms].sort(),
      [...registered]
        .filter(([, kind]) => kind === 'histogram')
        .map(([name]) => name)
        .sort(),
    );
  });

  test('every metric of src/admin/metrics.ts is documented, with its type', () => {
    for (const [name, kind] of registeredMetrics()) {
      const row = doc.split('\n').find((line) => line.startsWith(`| \`${name}\` |`));
      assert.ok(row, `docs/metrics.md has no row for ${name}`);
      assert.match(row, new RegExp(`^\\| \`${name}\` \\| ${kind}\\b`), `${name} is a ${kind}`);
    }
  });

  test('the process and runtime metrics an SRE looks for first are named', () => {
    const registry = createMetrics({ stats: {} } as never, { collector: null } as never, { topShapes: 5 });
    const names = registry.getMetricsAsArray().map((m) => (m as unknown as { name: string }).name);
    for (const name of [
      'process_cpu_seconds_total',
      'process_resident_memory_bytes',
      'process_open_fds',
      'nodejs_heap_size_used_bytes',
      'nodejs_eventloop_lag_seconds',
    ]) {
      assert.ok(names.includes(name), `${name} is registered`);
      assert.ok(doc.includes(`\`${name}\``), `docs/metrics.md names ${name}`);
    }
  });

  test('every pgwarden_ name in docs/metrics.md is a metric of src/admin/metrics.ts', () => {
    const catalog = metricCatalog();
    for (const name of pgwardenNamesInText(doc))
      assert.ok(
        isPgwardenSeries(name, catalog),
        `docs/metrics.md mentions ${name}, which src/admin/metrics.ts does not register`,
      );
  });
});

describe('docs/api.md', () => {
  const doc = read('docs/api.md');
  const headings = [...doc.matchAll(/^### (GET|POST|DELETE) (\S+)$/gm)].map((m) => `${m[1]} ${m[2]}`);

  test('every route the admin server registers has a section', () => {
    const all = routes();
    assert.ok(all.length >= 10, `found the routes: ${all.join(', ')}`);
    for (const route of all) assert.ok(headings.includes(route), `docs/api.md has no "### ${route}"`);
  });

  test('every documented route is served', () => {
    const all = routes();
    for (const heading of headings)
      assert.ok(all.includes(heading), `docs/api.md documents ${heading}, which src/admin does not serve`);
  });

  test('the JSON fields of shapes, rules and incidents are documented by their names in the code', () => {
    const fields = [
      ...shapeSummaryFields(),
      ...interfaceFields('src/rules/rule.ts', 'RuleBase'),
      ...interfaceFields('src/rules/rule.ts', 'ShedRule'),
      ...interfaceFields('src/rules/rule.ts', 'RerouteRule'),
      ...interfaceFields('src/detect/record.ts', 'Incident'),
      ...interfaceFields('src/detect/record.ts', 'Victim'),
      ...interfaceFields('src/detect/record.ts', 'Impact'),
      ...interfaceFields('src/detect/record.ts', 'Resolution'),
      ...interfaceFields('src/detect/record.ts', 'CauseBase'),
      ...interfaceFields('src/events/timeline.ts', 'EventBase'),
      'type',
      'details',
      ...interfaceFields('src/shapes/series.ts', 'SeriesPoint'),
      ...workloadShapeFields(),
    ];
    assert.ok(fields.length > 40, `found the fields: ${fields.join(', ')}`);
    for (const field of new Set(fields))
      assert.ok(doc.includes(`\`${field}\``), `docs/api.md does not mention \`${field}\``);
  });
});

describe('docs/operations.md', () => {
  const doc = read('docs/operations.md');

  test('has the section each alert links to, and names every alert', () => {
    const anchors = new Set([...doc.matchAll(/^#{2,4} (.+)$/gm)].map((m) => headingAnchor(m[1])));
    const rules = readYaml<{ groups: { rules: { alert: string; annotations: Record<string, string> }[] }[] }>(
      'deploy/prometheus/pgwarden-rules.yaml',
    ).groups.flatMap((g) => g.rules);
    for (const rule of rules) {
      const anchor = /#([\w-]+)$/.exec(rule.annotations.runbook_url ?? '')?.[1];
      assert.ok(anchor, `${rule.alert} has a runbook_url with an anchor`);
      assert.ok(anchors.has(anchor), `${rule.alert} links to #${anchor}, which docs/operations.md has no heading for`);
      assert.ok(doc.includes(rule.alert), `docs/operations.md does not mention ${rule.alert}`);
    }
  });

  test('its pgwarden configuration examples are valid configurations', () => {
    const blocks = [...doc.matchAll(/```yaml\n([\s\S]*?)```/g)].map((m) => m[1]);
    const configs = blocks.filter((b) => {
      const parsed = YAML.parse(b) as Record<string, unknown> | null;
      return (
        parsed !== null &&
        typeof parsed === 'object' &&
        !('apiVersion' in parsed) &&
        !('services' in parsed) &&
        !('scrape_configs' in parsed) &&
        !('jobs' in parsed)
      );
    });
    assert.ok(configs.length >= 3, 'docs/operations.md shows pgwarden configurations');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-docs-'));
    try {
      configs.forEach((text, i) => {
        const file = path.join(dir, `example-${i}.yaml`);
        fs.writeFileSync(file, text);
        assert.doesNotThrow(
          () => loadConfig({ file, env: { PGWARDEN_ADMIN_TOKEN: 'a-token-of-at-least-16-chars' } }),
          `example ${i + 1}:\n${text}`,
        );
      });
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  test('the commands it tells responders to run exist', () => {
    for (const m of doc.matchAll(/pgwarden rules (\w+)/g))
      assert.ok(RULES_USAGE.includes(`pgwarden rules ${m[1]}`), `pgwarden rules ${m[1]} is not a command`);
    const known = new Set(
      read('src/cli/main.ts')
        .match(/case '(\w[\w-]*)'/g)
        ?.map((c) => c.slice(6, -1)),
    );
    for (const m of doc.matchAll(/(?:^|[\s`])pgwarden (start|demo|rules|incidents|workload|check-migration|help)\b/g)) {
      assert.ok(known.has(m[1]), `pgwarden ${m[1]} is not a command of src/cli/main.ts`);
    }
  });
});
