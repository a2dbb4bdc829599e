import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { describe, test } from 'node:test';
import {
  findPromtool,
  isPgwardenSeries,
  metricCatalog,
  pgwardenNamesIn,
  pgwardenNamesInText,
  PROMTOOL_MISSING,
  readYaml,
  root,
} from './support.ts';

const RULES = 'deploy/prometheus/pgwarden-rules.yaml';
const RULE_TESTS = 'deploy/prometheus/pgwarden-rules.test.yaml';

interface Rule {
  alert?: string;
  record?: string;
  expr: string;
  for?: string;
  labels?: Record<string, string>;
  annotations?: Record<string, string>;
}

const rules = (): Rule[] =>
  readYaml<{ groups: { name: string; rules: Rule[] }[] }>(RULES).groups.flatMap((g) => g.rules);

describe('Prometheus alerting rules', () => {
  test('every alert the runbook names is defined, with a severity, a summary and a description', () => {
    const byName = new Map(rules().map((r) => [r.alert, r]));
    for (const name of [
      'PgwardenIncidentActive',
      'PgwardenShapeRegressed',
      'PgwardenShedding',
      'PgwardenUpstreamErrors',
      'PgwardenDown',
    ]) {
      const rule = byName.get(name);
      assert.ok(rule, `${RULES} has no alert ${name}`);
      assert.match(rule.labels?.severity ?? '', /^(critical|warning|info)$/, `${name}: severity label`);
      assert.ok(rule.annotations?.summary, `${name}: summary`);
      assert.ok(
        (rule.annotations?.description ?? '').length > 80,
        `${name}: a description that tells the responder what to look at`,
      );
    }
  });

  test('every metric an expression or annotation query uses exists in src/admin/metrics.ts', () => {
    const catalog = metricCatalog();
    assert.ok(catalog.families.size > 10, 'the metric names were found in src/admin/metrics.ts');
    for (const rule of rules()) {
      // Annotation templates run queries of their own ({{ query "..." }}): their names count too.
      const names = [
        ...pgwardenNamesIn(rule.expr),
        ...Object.values(rule.annotations ?? {}).flatMap((t) => pgwardenNamesInText(t)),
      ];
      for (const name of names)
        assert.ok(isPgwardenSeries(name, catalog), `${rule.alert}: ${name} is not a metric of src/admin/metrics.ts`);
    }
  });

  test('every alert has a promtool unit test', () => {
    const tests = readYaml<{ tests: { alert_rule_test?: { alertname: string; exp_alerts: unknown[] }[] }[] }>(
      RULE_TESTS,
    ).tests;
    const tested = new Set(
      tests.flatMap((t) => (t.alert_rule_test ?? []).filter((a) => a.exp_alerts.length > 0).map((a) => a.alertname)),
    );
    for (const rule of rules())
      if (rule.alert) assert.ok(tested.has(rule.alert), `${RULE_TESTS} never expects ${rule.alert} to fire`);
  });

  const promtool = findPromtool();
  test('promtool check rules accepts the rules', { skip: promtool ? false : PROMTOOL_MISSING }, () => {
    const result = spawnSync(promtool!, ['check', 'rules', RULES], { cwd: root, encoding: 'utf8' });
    assert.equal(result.status, 0, `${result.stdout}${result.stderr}`);
  });

  test('promtool test rules passes the unit tests of every alert', {
    skip: promtool ? false : PROMTOOL_MISSING,
  }, () => {
    const result = spawnSync(promtool!, ['test', 'rules', path.basename(RULE_TESTS)], {
      cwd: path.join(root, path.dirname(RULE_TESTS)),
      encoding: 'utf8',
    });
    assert.equal(result.status, 0, `${result.stdout}${result.stderr}`);
  });
});
