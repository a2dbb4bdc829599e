import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { ConfigError, loadConfig, parseHostPort, type Config } from '../../src/config.ts';
import {
  isServedPath,
  knownEnvNames,
  readYaml,
  readYamlDocuments,
  root,
  runNodeScript,
  startAdminServer,
} from './support.ts';

const DIR = 'deploy/kubernetes';

/** A manifest, checked field by field. */
type Manifest = {
  apiVersion: string;
  kind: string;
  metadata: { name: string; namespace?: string; labels?: Record<string, string> };
  [key: string]: any;
};

const manifestFiles = () =>
  fs
    .readdirSync(path.join(root, DIR))
    .filter((f) => /\.ya?ml$/.test(f) && f !== 'kustomization.yaml')
    .sort();

function manifests(): Manifest[] {
  return manifestFiles().flatMap((f) => readYamlDocuments(`${DIR}/${f}`) as Manifest[]);
}

function only(kind: string): Manifest {
  const found = manifests().filter((m) => m.kind === kind);
  assert.equal(found.length, 1, `exactly one ${kind}`);
  return found[0];
}

const deployment = () => only('Deployment');
const container = () => deployment().spec.template.spec.containers[0];
const secret = () => only('Secret');
const configMap = () => only('ConfigMap');

/** The token the Secret would hold once its placeholder is replaced. */
const TOKEN = 'a-real-token-of-at-least-16-characters';

/** The configuration each pod runs with: the ConfigMap's file plus the environment the Deployment sets. */
function podConfig(overrides: Record<string, string> = {}): Config {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-k8s-'));
  try {
    const file = path.join(dir, 'pgwarden.yaml');
    fs.writeFileSync(file, configMap().data['pgwarden.yaml']);
    const env: Record<string, string> = {};
    for (const e of container().env) {
      const ref = e.valueFrom?.secretKeyRef;
      if (ref) env[e.name] = secret().stringData[ref.key];
      else if (e.valueFrom?.fieldRef) env[e.name] = 'pgwarden-7d9f8-abcde';
      else env[e.name] = e.value;
    }
    return loadConfig({ file, env: { ...env, PGWARDEN_ADMIN_TOKEN: TOKEN, ...overrides } });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

const containerPort = (name: string): number => {
  const port = container().ports.find((p: { name: string }) => p.name === name);
  assert.ok(port, `the container has a port named ${name}`);
  return port.containerPort;
};

/** The exec readiness probe's script and the URL it fetches. */
function readinessScript(): { script: string; url: URL } {
  const command: string[] = container().readinessProbe.exec.command;
  assert.deepEqual(command.slice(0, 2), ['node', '-e']);
  const match = /'(http:\/\/[^']+)'/.exec(command[2]);
  assert.ok(match, 'the readiness script fetches a literal URL');
  return { script: command[2], url: new URL(match[1]) };
}

describe('Kubernetes manifests', () => {
  test('every file parses as YAML into named Kubernetes objects', () => {
    const all = manifests();
    assert.ok(all.length >= 6);
    for (const m of all) {
      assert.ok(
        m.apiVersion && m.kind && m.metadata?.name,
        `${m.kind ?? '?'} ${m.metadata?.name ?? '?'}: apiVersion, kind, metadata.name`,
      );
      assert.equal(m.metadata.namespace, undefined, `${m.kind} ${m.metadata.name} is namespace-agnostic`);
    }
    const kustomization = readYaml<{ resources: string[] }>(`${DIR}/kustomization.yaml`);
    assert.deepEqual(
      [...kustomization.resources].sort(),
      manifestFiles(),
      'kustomization.yaml lists every manifest, and only those',
    );
  });

  test('the ConfigMap is a valid pgwarden configuration with the Secret and the Deployment environment', () => {
    const config = podConfig();
    assert.equal(config.listen, '0.0.0.0:6464');
    assert.equal(config.admin, '0.0.0.0:6465');
    assert.equal(config.mitigation, 'dry-run');
    assert.equal(config.workers, 1);
    assert.match(
      configMap().data['pgwarden.yaml'],
      /only be reachable inside the cluster/,
      'the admin binding carries its warning',
    );
    assert.ok(config.monitor_url?.startsWith('postgres://'), 'monitor_url from the Secret');
    assert.ok(config.control_url?.startsWith('postgres://'), 'control_url from the Secret');
    assert.equal(config.admin_token, TOKEN);
  });

  test("the Secret's placeholder token is refused, so nothing runs with it", () => {
    assert.throws(
      () => podConfig({ PGWARDEN_ADMIN_TOKEN: secret().stringData['admin-token'] }),
      (err: unknown) => {
        assert.ok(err instanceof ConfigError);
        assert.match(err.message, /admin_token .*PGWARDEN_ADMIN_TOKEN/);
        return true;
      },
    );
  });

  test('every PGWARDEN_* variable the Deployment sets is an option of src/config.ts, from a Secret key that exists', () => {
    const known = knownEnvNames();
    const names = container().env.map((e: { name: string }) => e.name);
    for (const name of names.filter((n: string) => n.startsWith('PGWARDEN_')))
      assert.ok(known.has(name), `${name} is not read by pgwarden`);
    for (const name of ['PGWARDEN_ADMIN_TOKEN', 'PGWARDEN_MONITOR_URL', 'PGWARDEN_CONTROL_URL']) {
      const ref = container().env.find((e: { name: string }) => e.name === name)?.valueFrom?.secretKeyRef;
      assert.ok(ref, `${name} comes from a Secret`);
      assert.equal(ref.name, secret().metadata.name);
      assert.ok(ref.key in secret().stringData, `the Secret has ${ref.key}`);
    }
  });

  test('the container runs `start --config` on the mounted ConfigMap', () => {
    const args: string[] = container().args;
    assert.equal(args[0], 'start');
    const file = args[args.indexOf('--config') + 1];
    const mount = container().volumeMounts.find((m: { mountPath: string }) => file.startsWith(`${m.mountPath}/`));
    assert.ok(mount, `${file} is on a mounted volume`);
    const volume = deployment().spec.template.spec.volumes.find((v: { name: string }) => v.name === mount.name);
    assert.equal(volume.configMap?.name, configMap().metadata.name);
    assert.ok(path.basename(file) in configMap().data, `the ConfigMap has ${path.basename(file)}`);
  });

  test('ports agree: config, container, Service, ServiceMonitor and NetworkPolicy', () => {
    const config = podConfig();
    assert.equal(containerPort('proxy'), parseHostPort(config.listen).port);
    assert.equal(containerPort('admin'), parseHostPort(config.admin).port);
    const service = only('Service');
    assert.equal(service.spec.type, 'ClusterIP');
    for (const p of service.spec.ports) {
      assert.equal(p.port, containerPort(p.targetPort), `Service port ${p.name}`);
    }
    const endpoint = only('ServiceMonitor').spec.endpoints[0];
    assert.ok(
      service.spec.ports.some((p: { name: string }) => p.name === endpoint.port),
      'the ServiceMonitor scrapes a Service port',
    );
    assert.equal(service.spec.ports.find((p: { name: string }) => p.name === endpoint.port).targetPort, 'admin');
    const policy = only('NetworkPolicy');
    const rules: { from?: unknown[]; ports: { port: number }[] }[] = policy.spec.ingress;
    const adminRules = rules.filter((r) => r.ports.some((p) => p.port === containerPort('admin')));
    assert.equal(adminRules.length, 1, 'one rule admits the admin port');
    assert.deepEqual(adminRules[0].from, [
      { namespaceSelector: { matchLabels: { 'kubernetes.io/metadata.name': 'monitoring' } } },
    ]);
    assert.ok(
      rules.some((r) => r.ports.some((p) => p.port === containerPort('proxy'))),
      'the proxy port is admitted',
    );
  });

  test('labels select the pods: Deployment, Service, ServiceMonitor, NetworkPolicy', () => {
    const podLabels = deployment().spec.template.metadata.labels;
    const matches = (selector: Record<string, string>) =>
      Object.entries(selector).every(([k, v]) => podLabels[k] === v);
    assert.ok(matches(deployment().spec.selector.matchLabels));
    assert.ok(matches(only('Service').spec.selector));
    assert.ok(matches(only('NetworkPolicy').spec.podSelector.matchLabels));
    const serviceLabels = only('Service').metadata.labels ?? {};
    assert.ok(
      Object.entries(only('ServiceMonitor').spec.selector.matchLabels).every(([k, v]) => serviceLabels[k] === v),
    );
  });

  test('the ServiceMonitor scrapes /metrics with the admin token from the Secret', () => {
    const endpoint = only('ServiceMonitor').spec.endpoints[0];
    assert.equal(endpoint.path, '/metrics');
    assert.ok(isServedPath(endpoint.path));
    assert.equal(endpoint.authorization.type, 'Bearer');
    assert.equal(endpoint.authorization.credentials.name, secret().metadata.name);
    assert.ok(endpoint.authorization.credentials.key in secret().stringData);
  });

  test('probes point at paths the admin server serves, on the admin port', () => {
    for (const probe of ['livenessProbe', 'startupProbe']) {
      const get = container()[probe].httpGet;
      assert.equal(get.path, '/healthz', `${probe}: the only path served without the token`);
      assert.ok(isServedPath(get.path));
      assert.equal(
        typeof get.port === 'string' ? containerPort(get.port) : get.port,
        containerPort('admin'),
        `${probe} port`,
      );
    }
    const { script, url } = readinessScript();
    assert.equal(url.pathname, '/readyz');
    assert.ok(isServedPath(url.pathname));
    assert.equal(Number(url.port), containerPort('admin'));
    assert.equal(url.hostname, '127.0.0.1', 'the probe runs inside the pod');
    for (const m of script.matchAll(/process\.env\.(\w+)/g)) {
      assert.ok(
        container().env.some((e: { name: string }) => e.name === m[1]),
        `the probe reads ${m[1]}, which the container sets`,
      );
    }
  });

  describe('the readiness probe script against a real admin server', () => {
    const token = 'probe-token-0123456789abcdef';
    let ready = true;
    const admin = startAdminServer(token, () => ready);
    after(async () => (await admin).close());
    const script = async () => {
      const { script, url } = readinessScript();
      return script.replace(url.origin, `http://127.0.0.1:${(await admin).port}`);
    };

    test('succeeds when the upstream is reachable', async () => {
      ready = true;
      assert.equal(await runNodeScript(await script(), { PGWARDEN_ADMIN_TOKEN: token }), 0);
    });

    test('fails when /readyz answers 503', async () => {
      ready = false;
      assert.equal(await runNodeScript(await script(), { PGWARDEN_ADMIN_TOKEN: token }), 1);
      ready = true;
    });

    test('fails with the wrong token instead of passing on a 401', async () => {
      assert.equal(await runNodeScript(await script(), { PGWARDEN_ADMIN_TOKEN: 'not-the-token-0123456789' }), 1);
    });
  });

  test('shuts down gracefully: the grace period covers preStop and the drain timeout', () => {
    const spec = deployment().spec.template.spec;
    const preStop: string[] = container().lifecycle?.preStop?.exec?.command ?? [];
    const pause = preStop[0] === 'sleep' ? Number(preStop[1]) : 0;
    const drainS = podConfig().drain_timeout_ms / 1000;
    assert.ok(
      spec.terminationGracePeriodSeconds > pause + drainS,
      `terminationGracePeriodSeconds ${spec.terminationGracePeriodSeconds} > ${pause} + ${drainS}`,
    );
  });

  test('runs as non-root on a read-only root filesystem, with the state file on a writable volume', () => {
    const spec = deployment().spec.template.spec;
    assert.equal(spec.securityContext.runAsNonRoot, true);
    assert.notEqual(spec.securityContext.runAsUser, 0);
    const sc = container().securityContext;
    assert.equal(sc.readOnlyRootFilesystem, true);
    assert.equal(sc.allowPrivilegeEscalation, false);
    assert.deepEqual(sc.capabilities.drop, ['ALL']);
    const stateDir = path.posix.dirname(podConfig().state_file);
    const mount = container().volumeMounts.find((m: { mountPath: string }) => m.mountPath === stateDir);
    assert.ok(mount && !mount.readOnly, `${stateDir} is a writable mount`);
    const volume = spec.volumes.find((v: { name: string }) => v.name === mount.name);
    assert.ok(volume.emptyDir, 'an emptyDir');
    assert.ok(
      container().resources?.requests?.memory && container().resources?.limits?.memory,
      'memory request and limit',
    );
  });
});
