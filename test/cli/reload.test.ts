// `pgwarden start` and its signals as an operator meets them: the ready line (with
// the dashboard URL, the token only on request), --version, and SIGHUP reloading the
// config file under load without dropping anything; a bad file refused in one line.

import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import pg from 'pg';
import YAML from 'yaml';
import { testDatabase, waitFor } from '../harness/database.ts';

const TOKEN = 'reload-test-token-0123456789';
const root = new URL('../..', import.meta.url);

interface Running {
  child: ChildProcess;
  port: number;
  lines(): Record<string, any>[];
  output(): string;
  exit: Promise<number | null>;
}

const dirs: string[] = [];
after(() => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));

function writeConfig(file: string, values: Record<string, unknown>): void {
  const db = testDatabase();
  const config = {
    listen: '127.0.0.1:0',
    admin: '127.0.0.1:0',
    upstream: `${db.host}:${db.port}`,
    admin_token: TOKEN,
    state_file: path.join(path.dirname(file), 'state.json'),
    ...values,
  };
  // Written whole then renamed, as config management tools do.
  fs.writeFileSync(`${file}.tmp`, typeof values.__raw === 'string' ? values.__raw : YAML.stringify(config));
  fs.renameSync(`${file}.tmp`, file);
}

async function start(values: Record<string, unknown>, extra: string[] = []): Promise<Running & { file: string }> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-reload-'));
  dirs.push(dir);
  const file = path.join(dir, 'pgwarden.yaml');
  writeConfig(file, values);
  const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'start', '--config', file, ...extra], {
    cwd: root,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const exit = once(child, 'exit').then(([code]) => code as number | null);
  let output = '';
  child.stdout!.on('data', (d: Buffer) => (output += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (output += d.toString()));
  const lines = () =>
    output
      .split('\n')
      .filter((l) => l.startsWith('{'))
      .map((l) => JSON.parse(l) as Record<string, any>);
  // The ready line with the dashboard: the proxy's, or with --workers the primary's.
  // A start that never gets ready must not leave its process behind (it would hold the test run open).
  const ready = await waitFor(
    () =>
      lines().find(
        (l) => /^pgwarden (proxy listening|supervising proxy workers)/.test(String(l.msg)) && l.dashboard !== undefined,
      ),
    {
      timeoutMs: 30_000,
      what: `the ready line (output so far: ${output})`,
    },
  ).catch((err: Error) => {
    child.kill('SIGTERM');
    throw err;
  });
  return { child, file, port: Number(String(ready.listen).split(':').at(-1)), lines, output: () => output, exit };
}

async function stop(r: Running): Promise<void> {
  r.child.kill('SIGTERM');
  assert.equal(await r.exit, 0);
}

const client = (port: number) => {
  const db = testDatabase();
  return new pg.Client({ host: '127.0.0.1', port, user: db.user, database: db.database });
};

describe('pgwarden start: day one', () => {
  test('--version prints the version and exits 0', () => {
    const result = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', '--version'], {
      cwd: root,
      encoding: 'utf8',
    });
    assert.equal(result.status, 0, result.stderr);
    const pkg = JSON.parse(fs.readFileSync(new URL('package.json', root), 'utf8'));
    assert.equal(result.stdout, `pgwarden ${pkg.version}\n`);
  });

  test('the ready line names the listen address and the dashboard URL, without the token by default', {
    timeout: 60_000,
  }, async () => {
    const r = await start({});
    try {
      const ready = r.lines().find((l) => l.dashboard !== undefined)!;
      assert.match(
        ready.msg,
        new RegExp(`listening on 127\\.0\\.0\\.1:${r.port}; dashboard at http://127\\.0\\.0\\.1:\\d+/$`),
      );
      assert.match(ready.dashboard, /^http:\/\/127\.0\.0\.1:\d+\/$/);
      assert.ok(!r.output().includes(TOKEN), 'the admin token is never printed by default');
      const response = await fetch(ready.dashboard);
      assert.equal(response.status, 200, 'the dashboard URL serves the dashboard');
    } finally {
      await stop(r);
    }
  });

  test('with print_dashboard_token the URL carries #token= for a one-click login', { timeout: 60_000 }, async () => {
    const r = await start({ print_dashboard_token: true });
    try {
      assert.match(r.lines().find((l) => l.dashboard !== undefined)!.dashboard, new RegExp(`/#token=${TOKEN}$`));
    } finally {
      await stop(r);
    }
  });
});

describe('SIGHUP', () => {
  test('reloads the config under load without dropping a query or a session, and applies a changed threshold', {
    timeout: 90_000,
  }, async () => {
    const r = await start({ slow_query_ms: 100_000 });
    const clients = await Promise.all(
      Array.from({ length: 4 }, async () => {
        const c = client(r.port);
        await c.connect();
        return c;
      }),
    );
    const errors: Error[] = [];
    for (const c of clients) c.on('error', (err) => errors.push(err));
    let running = true;
    let completed = 0;
    const loops = clients.slice(1).map(async (c, i) => {
      while (running) {
        try {
          await c.query('select pg_sleep(0.002), $1::int as n', [i]);
          completed++;
        } catch (err) {
          errors.push(err as Error);
          return;
        }
      }
    });
    try {
      // A statement in flight across every reload.
      const long = clients[0].query('select pg_sleep(2) as slept, 7 as answer');
      await waitFor(() => completed > 50, { what: 'load to run' });
      const slowLines = () => r.lines().filter((l) => l.msg === 'slow query').length;
      assert.equal(slowLines(), 0);

      writeConfig(r.file, { slow_query_ms: 0, log_level: 'info' });
      r.child.kill('SIGHUP');
      await waitFor(() => r.lines().some((l) => String(l.msg).startsWith('configuration reloaded')), {
        what: 'the reload',
      });
      const reloaded = r.lines().find((l) => String(l.msg).startsWith('configuration reloaded'))!;
      assert.deepEqual(reloaded.applied, ['slow_query_ms']);
      await waitFor(() => slowLines() > 10, { what: 'the new slow-query threshold to apply' });

      // A bad file: refused in one line, the running configuration stays.
      writeConfig(r.file, { slow_query_ms: 'soon' });
      r.child.kill('SIGHUP');
      await waitFor(() => r.lines().some((l) => String(l.msg).startsWith('configuration reload refused')), {
        what: 'the refusal',
      });
      const refusals = r.lines().filter((l) => l.level >= 50);
      assert.equal(refusals.length, 1, `one error line: ${JSON.stringify(refusals)}`);
      assert.match(refusals[0].msg, /slow_query_ms .*: .*number/);
      const before = slowLines();
      await waitFor(() => slowLines() > before + 10, { what: 'the old (reloaded) threshold to stay in force' });

      // A key only a restart applies is named as such.
      writeConfig(r.file, { slow_query_ms: 0, max_shapes: 10 });
      r.child.kill('SIGHUP');
      await waitFor(
        () => r.lines().some((l) => String(l.msg).startsWith('changed but only applied by a restart: max_shapes')),
        { what: 'the restart-only warning' },
      );

      const { rows } = await long;
      assert.equal(rows[0].answer, 7, 'the statement in flight across the reloads completed');
      assert.equal(r.lines().filter((l) => l.signal === 'SIGHUP').length, 3, 'every SIGHUP is logged');
      running = false;
      await Promise.all(loops);
      assert.deepEqual(errors, [], 'no query failed and no session was dropped');
      for (const c of clients) assert.equal((await c.query('select 1 as one')).rows[0].one, 1);
    } finally {
      running = false;
      await Promise.all(loops);
      await Promise.all(clients.map((c) => c.end().catch(() => undefined)));
      await stop(r);
    }
  });

  test('with several workers the primary forwards the reload to each of them', { timeout: 60_000 }, async () => {
    const r = await start({ workers: 2, slow_query_ms: 100_000 });
    try {
      await waitFor(() => r.lines().filter((l) => String(l.msg).startsWith('pgwarden proxy listening')).length === 2, {
        timeoutMs: 30_000,
        what: 'both workers',
      });
      writeConfig(r.file, { workers: 2, slow_query_ms: 0 });
      r.child.kill('SIGHUP');
      // The primary (detection, policy, rules) and both workers (relay, TLS, log level).
      await waitFor(
        () =>
          new Set(
            r
              .lines()
              .filter((l) => String(l.msg).startsWith('configuration reloaded'))
              .map((l) => l.pid),
          ).size === 3,
        {
          timeoutMs: 20_000,
          what: 'the primary and both workers to reload',
        },
      );
      assert.ok(r.lines().some((l) => l.msg === 'forwarding the reload to the workers'));
    } finally {
      await stop(r);
    }
  });
});

describe('a reload and TLS toward clients', {
  skip: spawnSync('openssl', ['version']).status !== 0 ? 'the openssl CLI is not installed' : false,
}, () => {
  test('a renewed certificate at the same path serves new connections; established sessions keep theirs; a bad one is refused', {
    timeout: 60_000,
  }, async () => {
    const { startTestApp } = await import('../harness/app.ts');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-reload-tls-'));
    dirs.push(dir);
    const makeCert = (cn: string) => {
      const made = spawnSync(
        'openssl',
        [
          'req',
          '-x509',
          '-newkey',
          'ec',
          '-pkeyopt',
          'ec_paramgen_curve:prime256v1',
          '-nodes',
          '-keyout',
          'key.pem',
          '-out',
          'cert.pem',
          '-days',
          '1',
          '-subj',
          `/CN=${cn}`,
        ],
        { cwd: dir, encoding: 'utf8', timeout: 30_000 },
      );
      assert.equal(made.status, 0, made.stderr);
    };
    makeCert('first');
    const pgw = await startTestApp({ tls_cert: path.join(dir, 'cert.pem'), tls_key: path.join(dir, 'key.pem') });
    const peerCn = (c: pg.Client) =>
      (
        c as unknown as { connection: { stream: { getPeerCertificate(): { subject: { CN: string } } } } }
      ).connection.stream.getPeerCertificate().subject.CN;
    const tlsClient = async () => {
      const c = new pg.Client({ connectionString: pgw.url(), ssl: { rejectUnauthorized: false } });
      await c.connect();
      return c;
    };
    const first = await tlsClient();
    try {
      assert.equal(peerCn(first), 'first');
      makeCert('second');
      await pgw.app.reload(pgw.config);
      const second = await tlsClient();
      assert.equal(peerCn(second), 'second');
      assert.equal((await first.query('select 1 as one')).rows[0].one, 1, 'the established session carries on');
      await second.end();

      fs.writeFileSync(path.join(dir, 'cert.pem'), 'not a certificate');
      await assert.rejects(pgw.app.reload(pgw.config));
      const third = await tlsClient();
      assert.equal(peerCn(third), 'second', 'a bad certificate leaves the previous one in use');
      await third.end();
    } finally {
      await first.end();
      await pgw.stop();
    }
  });
});
