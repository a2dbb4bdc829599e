import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import YAML from 'yaml';
import { findPromtool, isPgwardenSeries, metricCatalog, pgwardenNamesIn, PROMTOOL_MISSING, read } from './support.ts';

const DASHBOARD = 'deploy/grafana/pgwarden-dashboard.json';

interface Target {
  refId: string;
  expr?: string;
  datasource?: { type: string; uid: string };
}
interface Panel {
  id: number;
  type: string;
  title: string;
  gridPos: { h: number; w: number; x: number; y: number };
  datasource?: { type: string; uid: string };
  targets?: Target[];
  panels?: Panel[];
}
interface Dashboard {
  uid: string;
  schemaVersion: number;
  panels: Panel[];
  templating: { list: { name: string; type: string; query: string | { query: string } }[] };
  annotations: { list: { name: string; expr?: string }[] };
}

const dashboard = (): Dashboard => JSON.parse(read(DASHBOARD)) as Dashboard;

function allPanels(panels: Panel[]): Panel[] {
  return panels.flatMap((p) => [p, ...allPanels(p.panels ?? [])]);
}

/** Every PromQL expression of the dashboard: panel targets, annotations, variable queries. */
function expressions(d: Dashboard): { where: string; expr: string }[] {
  const found: { where: string; expr: string }[] = [];
  for (const panel of allPanels(d.panels)) {
    for (const t of panel.targets ?? [])
      if (t.expr) found.push({ where: `panel "${panel.title}" ${t.refId}`, expr: t.expr });
  }
  for (const a of d.annotations.list) if (a.expr) found.push({ where: `annotation "${a.name}"`, expr: a.expr });
  for (const v of d.templating.list) {
    if (v.type !== 'query') continue;
    const query = typeof v.query === 'string' ? v.query : v.query.query;
    // label_values(SELECTOR, label): the selector is PromQL.
    const selector = /^label_values\((.*),\s*\w+\)$/.exec(query)?.[1] ?? query;
    found.push({ where: `variable $${v.name}`, expr: selector });
  }
  return found;
}

/** Grafana's variables replaced by values Prometheus accepts, to check the syntax. */
const asPromQL = (expr: string) =>
  expr.replace(/\$__rate_interval|\$__interval|\$__range/g, '5m').replace(/\$\{?(job|instance)\}?/g, '.*');

describe('Grafana dashboard', () => {
  test('parses as JSON with a Prometheus data source variable every panel uses', () => {
    const d = dashboard();
    assert.equal(d.uid, 'pgwarden', 'the alerts link to /d/pgwarden');
    assert.ok(d.schemaVersion >= 36, `schemaVersion ${d.schemaVersion}`);
    const ds = d.templating.list.find((v) => v.type === 'datasource');
    assert.ok(ds, 'a datasource variable');
    assert.equal(ds.query, 'prometheus');
    for (const panel of allPanels(d.panels)) {
      if (panel.type === 'row') continue;
      assert.deepEqual(panel.datasource, { type: 'prometheus', uid: `\${${ds.name}}` }, `panel "${panel.title}"`);
      assert.ok((panel.targets ?? []).length > 0, `panel "${panel.title}" has queries`);
    }
  });

  test('panel ids are unique and panels fit the 24-column grid without overlapping', () => {
    const panels = allPanels(dashboard().panels);
    const ids = panels.map((p) => p.id);
    assert.equal(new Set(ids).size, ids.length, 'unique panel ids');
    const taken = new Set<string>();
    for (const p of panels) {
      assert.ok(p.gridPos.x >= 0 && p.gridPos.x + p.gridPos.w <= 24, `panel "${p.title}" within 24 columns`);
      for (let x = p.gridPos.x; x < p.gridPos.x + p.gridPos.w; x++) {
        for (let y = p.gridPos.y; y < p.gridPos.y + p.gridPos.h; y++) {
          assert.ok(!taken.has(`${x},${y}`), `panel "${p.title}" overlaps another at ${x},${y}`);
          taken.add(`${x},${y}`);
        }
      }
    }
  });

  test('covers what an operator looks at first', () => {
    const exprs = expressions(dashboard())
      .map((e) => e.expr)
      .join('\n');
    for (const metric of [
      'pgwarden_queries_total',
      'pgwarden_query_errors_total',
      'pgwarden_incidents_active',
      'pgwarden_shape_time_seconds_total',
      'pgwarden_shape_info',
      'pgwarden_shape_latency_seconds',
      'pgwarden_shape_regression_ratio',
      'pgwarden_connections_active',
      'pgwarden_bytes_total',
      'pgwarden_upstream_connect_seconds_bucket',
      'pgwarden_shape_latency_seconds_bucket',
      'pgwarden_build_info',
      'process_cpu_seconds_total',
      'process_resident_memory_bytes',
      'process_open_fds',
      'nodejs_eventloop_lag_p99_seconds',
    ]) {
      assert.ok(exprs.includes(metric), `no panel uses ${metric}`);
    }
  });

  test('every expression uses only metric names that exist in src/admin/metrics.ts', () => {
    const catalog = metricCatalog();
    for (const { where, expr } of expressions(dashboard())) {
      for (const name of pgwardenNamesIn(expr))
        assert.ok(isPgwardenSeries(name, catalog), `${where}: ${name} is not a metric of src/admin/metrics.ts`);
    }
  });

  const promtool = findPromtool();
  test('every expression is valid PromQL (promtool check rules)', { skip: promtool ? false : PROMTOOL_MISSING }, () => {
    const rules = expressions(dashboard()).map((e, i) => ({
      record: `pgwarden_dashboard:expr_${i}`,
      expr: asPromQL(e.expr),
    }));
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-grafana-'));
    try {
      const file = path.join(dir, 'dashboard-exprs.yaml');
      fs.writeFileSync(file, YAML.stringify({ groups: [{ name: 'dashboard', rules }] }));
      const result = spawnSync(promtool!, ['check', 'rules', file], { encoding: 'utf8' });
      assert.equal(result.status, 0, `${result.stdout}${result.stderr}`);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
