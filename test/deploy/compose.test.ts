import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, test } from 'node:test';
import { loadConfig, parseHostPort } from '../../src/config.ts';
import { exists, findPromtool, knownEnvNames, PROMTOOL_MISSING, read, readYaml, root } from './support.ts';

const COMPOSE = 'deploy/compose.yaml';
const BASE = path.posix.dirname(COMPOSE);

interface Service {
  image?: string;
  build?: { context: string; dockerfile?: string } | string;
  environment?: Record<string, string> | string[];
  volumes?: (string | { type: string; source: string; target: string })[];
  ports?: string[];
  profiles?: string[];
}

const compose = () => readYaml<{ services: Record<string, Service>; volumes?: Record<string, unknown> }>(COMPOSE);

function env(service: Service): Record<string, string> {
  if (!service.environment) return {};
  if (!Array.isArray(service.environment))
    return Object.fromEntries(Object.entries(service.environment).map(([k, v]) => [k, String(v)]));
  return Object.fromEntries(service.environment.map((e) => [e.slice(0, e.indexOf('=')), e.slice(e.indexOf('=') + 1)]));
}

/** Bind mounts of a service: host path (relative to the repository root) -> container path. */
function binds(service: Service): { host: string; container: string }[] {
  return (service.volumes ?? []).flatMap((v) => {
    const [source, target] = typeof v === 'string' ? v.split(':') : [v.source, v.target];
    if (!source.startsWith('.') && !source.startsWith('/')) return []; // a named volume
    return [{ host: path.posix.normalize(path.posix.join(BASE, source)), container: target }];
  });
}

const mountOf = (service: string, containerPath: string): string => {
  const bind = binds(compose().services[service]).find((b) => b.container === containerPath);
  assert.ok(bind, `${service} mounts ${containerPath}`);
  return bind.host;
};

describe('compose stack', () => {
  test('parses, and runs postgres:16, pgwarden built from the Dockerfile, Prometheus and Grafana', () => {
    const { services } = compose();
    assert.equal(services.postgres.image, 'postgres:16');
    const build = services.pgwarden.build;
    assert.ok(build && typeof build === 'object', 'pgwarden is built');
    const context = path.posix.normalize(path.posix.join(BASE, build.context));
    assert.ok(exists(path.posix.join(context, build.dockerfile ?? 'Dockerfile')), 'its Dockerfile exists');
    assert.equal(context, '.', 'from the repository root');
    assert.ok(services.prometheus.image?.startsWith('prom/prometheus:'));
    assert.ok(services.grafana.image?.startsWith('grafana/grafana:'));
  });

  test('every file it mounts exists in the repository', () => {
    for (const [name, service] of Object.entries(compose().services)) {
      for (const { host } of binds(service)) assert.ok(exists(host), `${name} mounts ${host}, which does not exist`);
    }
  });

  test('every named volume is declared', () => {
    const declared = Object.keys(compose().volumes ?? {});
    for (const [name, service] of Object.entries(compose().services)) {
      for (const v of service.volumes ?? []) {
        const source = typeof v === 'string' ? v.split(':')[0] : v.source;
        if (!source.startsWith('.') && !source.startsWith('/'))
          assert.ok(declared.includes(source), `${name}: volume ${source} is not declared`);
      }
    }
  });

  test('every published port is bound to 127.0.0.1', () => {
    for (const [name, service] of Object.entries(compose().services)) {
      for (const port of service.ports ?? []) assert.match(port, /^127\.0\.0\.1:\d+:\d+$/, `${name}: ${port}`);
    }
  });

  test('its PGWARDEN_* variables exist in src/config.ts, and with its config file they make a valid configuration', () => {
    const known = knownEnvNames();
    const pgwardenEnv = env(compose().services.pgwarden);
    for (const [name, service] of Object.entries(compose().services)) {
      for (const key of Object.keys(env(service)))
        if (key.startsWith('PGWARDEN_')) assert.ok(known.has(key), `${name}: ${key} is not read by pgwarden`);
    }
    const file = mountOf('pgwarden', '/etc/pgwarden/pgwarden.yaml');
    const config = loadConfig({ file: path.join(root, file), env: pgwardenEnv });
    assert.equal(config.upstream, 'postgres:5432');
    assert.equal(parseHostPort(config.listen).port, 6464);
    assert.equal(parseHostPort(config.admin).host, '0.0.0.0', 'the admin server is reachable from Prometheus');
    assert.ok(config.state_file.startsWith('/var/lib/pgwarden/'), 'the state file is on the pgwarden-state volume');
    assert.ok(
      (compose().services.pgwarden.volumes ?? []).some(
        (v) => typeof v === 'string' && v.startsWith('pgwarden-state:/var/lib/pgwarden'),
      ),
    );
  });

  test("pgwarden's monitoring role is the one the init script creates, with the roles EXPLAIN and the catalog checks need", () => {
    const url = new URL(env(compose().services.pgwarden).PGWARDEN_MONITOR_URL);
    const sql = read(mountOf('postgres', '/docker-entrypoint-initdb.d/10-pgwarden-monitor.sql'));
    assert.match(sql, new RegExp(`CREATE ROLE ${url.username} LOGIN PASSWORD '${url.password}'`, 'i'));
    for (const role of ['pg_monitor', 'pg_read_all_stats'])
      assert.match(sql, new RegExp(`GRANT ${role} TO ${url.username}`, 'i'));
  });

  test('Prometheus scrapes pgwarden with its admin token and loads the alert rules', () => {
    const prometheusYml = mountOf('prometheus', '/etc/prometheus/prometheus.yml');
    const prom = readYaml<{
      rule_files: string[];
      scrape_configs: {
        job_name: string;
        metrics_path?: string;
        authorization?: { type?: string; credentials?: string };
        static_configs: { targets: string[] }[];
      }[];
    }>(prometheusYml);
    const job = prom.scrape_configs.find((j) => j.job_name === 'pgwarden');
    assert.ok(job, 'a scrape job named pgwarden (the alert PgwardenDown selects job="pgwarden")');
    assert.equal(job.metrics_path ?? '/metrics', '/metrics');
    assert.equal(
      job.authorization?.credentials,
      env(compose().services.pgwarden).PGWARDEN_ADMIN_TOKEN,
      'the scrape token is the admin token',
    );
    const config = loadConfig({
      file: path.join(root, mountOf('pgwarden', '/etc/pgwarden/pgwarden.yaml')),
      env: env(compose().services.pgwarden),
    });
    assert.deepEqual(job.static_configs[0].targets, [`pgwarden:${parseHostPort(config.admin).port}`]);
    const rulesTarget = binds(compose().services.prometheus).find(
      (b) => b.host === 'deploy/prometheus/pgwarden-rules.yaml',
    )?.container;
    assert.ok(rulesTarget, 'the alert rules are mounted');
    const globs = prom.rule_files.map(
      (g) => new RegExp(`^${g.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '[^/]*')}$`),
    );
    assert.ok(
      globs.some((g) => g.test(rulesTarget)),
      `rule_files ${prom.rule_files.join(', ')} match ${rulesTarget}`,
    );
  });

  test('Grafana is provisioned with the Prometheus data source and the dashboard', () => {
    const datasources = readYaml<{ datasources: { type: string; url: string }[] }>(
      mountOf('grafana', '/etc/grafana/provisioning/datasources/pgwarden.yaml'),
    );
    assert.ok(datasources.datasources.some((d) => d.type === 'prometheus' && d.url === 'http://prometheus:9090'));
    const providers = readYaml<{ providers: { options: { path: string } }[] }>(
      mountOf('grafana', '/etc/grafana/provisioning/dashboards/pgwarden.yaml'),
    );
    const dashboardsDir = mountOf('grafana', providers.providers[0].options.path);
    assert.ok(
      exists(path.posix.join(dashboardsDir, 'pgwarden-dashboard.json')),
      `${dashboardsDir} holds the dashboard`,
    );
    const home = env(compose().services.grafana).GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH;
    assert.equal(path.posix.dirname(home), providers.providers[0].options.path);
    assert.ok(exists(path.posix.join(dashboardsDir, path.posix.basename(home))));
  });

  const promtool = findPromtool();
  test("promtool accepts Prometheus' configuration", { skip: promtool ? false : PROMTOOL_MISSING }, () => {
    // The rule files are checked where the container sees them: copy both into that layout.
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-compose-'));
    try {
      const rulesDir = path.join(dir, 'rules');
      fs.mkdirSync(rulesDir);
      fs.copyFileSync(
        path.join(root, 'deploy/prometheus/pgwarden-rules.yaml'),
        path.join(rulesDir, 'pgwarden-rules.yaml'),
      );
      const config = read(mountOf('prometheus', '/etc/prometheus/prometheus.yml')).replaceAll(
        '/etc/prometheus/rules/',
        `${rulesDir}/`,
      );
      fs.writeFileSync(path.join(dir, 'prometheus.yml'), config);
      const result = spawnSync(promtool!, ['check', 'config', path.join(dir, 'prometheus.yml')], { encoding: 'utf8' });
      assert.equal(result.status, 0, `${result.stdout}${result.stderr}`);
      assert.match(result.stdout, /SUCCESS: \d+ rules found/);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
