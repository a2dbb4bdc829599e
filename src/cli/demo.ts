// `pgwarden demo`: the incident pgwarden was built for, replayed on an embedded
// PostgreSQL. A shop's users table gets a hot lookup by email and other traffic
// through a real pgwarden process; after a baseline, a migration replaces the
// email index with one that does not match the query, and the terminal narrates
// what pgwarden saw: detection, the plan change, the DDL, what was ruled out, the
// automatic shed under policy enforce, then the revert and the recovery, with the
// measured seconds. `--once` exits after the story: 0 if the incident was detected
// and attributed, 1 otherwise.

import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import pg from 'pg';
import type { Incident as FullIncident } from '../detect/record.ts';
import { freePort, startPostgres, type PostgresServer } from '../embedded/postgres.ts';

const USERS = 300_000;
const HOT = 'select id, name from users where email = $1';
const STEP_DEADLINE_MS = 60_000;

type Incident = Pick<
  FullIncident,
  | 'id'
  | 'fingerprint'
  | 'root'
  | 'status'
  | 'onset'
  | 'detected_at'
  | 'attributed'
  | 'summary'
  | 'baseline'
  | 'current'
  | 'peak'
  | 'causes'
  | 'ruled_out'
  | 'mitigation'
  | 'victims'
  | 'resolution'
>;

export const DEMO_USAGE = `usage: pgwarden demo [--once] [--keep-running-s S]

Replays the index-change incident on an embedded PostgreSQL with pgwarden in front
of it, and narrates detection, attribution, mitigation and recovery.
  --once   exit after the story: 0 if the incident was detected and attributed, 1 if not
`;

export async function runDemo(args: string[]): Promise<number> {
  let once = false;
  try {
    const { values } = parseArgs({
      args,
      options: { once: { type: 'boolean' }, help: { type: 'boolean' } },
      strict: true,
    });
    if (values.help) {
      process.stdout.write(DEMO_USAGE);
      return 0;
    }
    once = values.once ?? false;
  } catch (err) {
    process.stderr.write(`pgwarden demo: ${(err as Error).message}\n${DEMO_USAGE}`);
    return 2;
  }
  const demo = new Demo();
  const stop = () => void demo.cleanup().then(() => process.exit(130));
  process.once('SIGINT', stop);
  process.once('SIGTERM', stop);
  try {
    const ok = await demo.tell();
    if (once || !ok) {
      await demo.cleanup();
      return ok ? 0 : 1;
    }
    demo.say(`pgwarden keeps running with the workload. Dashboard: ${demo.dashboardUrl}`);
    demo.say('Press Ctrl-C to stop.');
    return -1;
  } catch (err) {
    demo.say(`the demo failed: ${(err as Error).message}`);
    await demo.cleanup();
    return 1;
  }
}

class Demo {
  private readonly started = Date.now();
  private readonly dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgwarden-demo-'));
  private readonly token = randomBytes(18).toString('base64url');
  private database: PostgresServer | null = null;
  private pgwarden: ChildProcess | null = null;
  /** How pgwarden ended, if it ended while the demo still needed it. */
  private pgwardenExit: string | null = null;
  private proxyPort = 0;
  private adminPort = 0;
  private readonly clients: pg.Client[] = [];
  private running = true;
  private readonly loops: Promise<void>[] = [];
  /** Per stream: durations (ms) with their end time, and refusals. */
  private readonly samples: { at: number; ms: number }[][] = [];
  private readonly refused: number[] = [];

  get dashboardUrl(): string {
    return `http://127.0.0.1:${this.adminPort}/#token=${this.token}`;
  }

  say(line: string): void {
    const t = ((Date.now() - this.started) / 1000).toFixed(1).padStart(6);
    process.stdout.write(`[${t}s] ${line}\n`);
  }

  /** The whole story; true if the incident was detected and attributed. */
  async tell(): Promise<boolean> {
    this.say('pgwarden demo: a migration replaces the index behind a hot query. In the original incident');
    this.say('60% of users waited up to 10 s and responders spent 105 minutes on the wrong paths.');
    this.say('Starting an embedded PostgreSQL...');
    this.database = await startPostgres();
    this.say(
      `PostgreSQL ${this.database.version} on 127.0.0.1:${this.database.port}. Creating the shop: ${USERS.toLocaleString('en')} users...`,
    );
    await this.seed();
    await this.startPgwarden();
    this.say(`pgwarden is in front of it on 127.0.0.1:${this.proxyPort} (policy: enforce).`);
    this.say(`Dashboard: ${this.dashboardUrl}`);
    await this.startWorkload();

    const hot = await this.waitFor('a baseline for the hot lookup by email', async (progress) => {
      const shapes = await this.api<{ fingerprint: string; query: string; calls: number; p95_ms: number }[]>(
        '/api/shapes?sort=calls&limit=20',
      );
      const shape = shapes.find((s) => s.query.startsWith('select id, name from users where email'));
      if (!shape) return undefined;
      const detail = await this.api<{
        plans?: { current: { nodes: string[] } | null };
        detector?: { baseline: { p95_ms: number } | null; baseline_from: string | null } | null;
      }>(`/api/shapes/${shape.fingerprint}`);
      progress(
        `baseline: hot lookup ${shape.calls.toLocaleString('en')} calls, p95 ${shape.p95_ms} ms, plan ${detail.plans?.current?.nodes.join(' / ') ?? '(sampling)'}`,
      );
      const baseline = detail.detector?.baseline;
      if (!detail.plans?.current || !baseline) return undefined;
      this.say(
        `baseline: hot lookup p95 ${baseline.p95_ms} ms from ${shape.calls.toLocaleString('en')} calls (${(detail.detector!.baseline_from ?? '').replace('_', ' ')}), plan ${detail.plans.current.nodes.join(' / ')}`,
      );
      return shape;
    });

    this.say('Running the migration out of band (directly on the database, as a deploy job would):');
    this.say('  DROP INDEX users_email_idx;  CREATE INDEX users_name_idx ON users (name);');
    const migratedAt = Date.now();
    const pointLookupBefore = this.recentP95(3);
    await this.direct('drop index users_email_idx; create index users_name_idx on users (name)');

    let detectedS = 0;
    const incident = await this.waitFor('pgwarden to detect and attribute the regression', async (progress) => {
      const list = await this.api<Incident[]>('/api/incidents?status=active');
      const found = list.find((i) => i.root === hot.fingerprint);
      if (found && detectedS === 0) {
        detectedS = (Date.parse(found.detected_at) - migratedAt) / 1000;
        this.say(
          `DETECTED ${detectedS.toFixed(1)} s after the migration: p95 ${found.baseline.p95_ms} ms -> ${found.current.p95_ms} ms`,
        );
      }
      if (!found) progress(`watching: hot lookup p95 now ${this.recentP95(0).toFixed(1)} ms`);
      return found?.attributed ? found : undefined;
    });
    const attributedS = (Date.now() - migratedAt) / 1000;
    this.say(`ATTRIBUTED ${attributedS.toFixed(1)} s after the migration:`);
    this.say(`  ${incident.summary}`);
    for (const cause of incident.causes.slice(0, 3))
      this.say(`  cause: ${cause.type.replace('_', ' ')}: ${cause.kind === 'ddl' ? cause.statement : cause.summary}`);
    for (const ruled of incident.ruled_out) this.say(`  ruled out: ${ruled.summary}`);
    for (const victim of incident.victims)
      this.say(`  victim (slowed by it, no plan change of its own): ${victim.query.slice(0, 60)}`);
    const others = (await this.api<Incident[]>('/api/incidents?status=active')).length - 1;
    this.say(`  one incident for one cause${others > 0 ? ` (and ${others} other)` : ''}: the hot lookup is its root.`);

    const rule = await this.waitFor('the mitigation policy to shed the shape', async () => {
      const rules =
        await this.api<{ id: string; fingerprint: string; created_by: string; max_concurrent: number }[]>('/api/rules');
      return rules.find((r) => r.fingerprint === hot.fingerprint && r.created_by === 'policy');
    });
    const mitigatedS = (Date.now() - migratedAt) / 1000;
    this.say(
      `MITIGATED ${mitigatedS.toFixed(1)} s after the migration: rule ${rule.id} sheds the shape to ${rule.max_concurrent} concurrent execution(s).`,
    );
    this.say(`  (by hand it would be one command: pgwarden rules shed ${hot.fingerprint} --max-concurrent 1)`);
    await this.pause(6000, () =>
      this.say(
        `while shed: hot lookups refused so far ${this.refused.slice(0, 3).reduce((a, b) => a + b, 0)}; ` +
          `point lookup p95 ${this.recentP95(3).toFixed(2)} ms (before the migration: ${pointLookupBefore.toFixed(2)} ms)`,
      ),
    );

    this.say(
      'Reverting the migration: CREATE UNIQUE INDEX users_email_idx ON users (email); DROP INDEX users_name_idx;',
    );
    const revertedAt = Date.now();
    await this.direct('create unique index users_email_idx on users (email); drop index users_name_idx');
    await this.waitFor('the shape to recover and the rule to be lifted', async (progress) => {
      const current = await this.api<Incident>(`/api/incidents/${incident.id}`);
      const rules = await this.api<{ id: string }[]>('/api/rules');
      progress(`recovering: incident ${current.status}, hot lookup p95 ${this.recentP95(0).toFixed(1)} ms`);
      return current.status === 'resolved' && !rules.some((r) => r.id === rule.id) ? true : undefined;
    });
    const recoveredS = (Date.now() - revertedAt) / 1000;
    this.say(`RECOVERED ${recoveredS.toFixed(1)} s after the revert: incident resolved, rule ${rule.id} lifted.`);
    const resolved = await this.api<Incident>(`/api/incidents/${incident.id}`);
    this.say(
      `  the record keeps the worst: p95 ${resolved.baseline.p95_ms} ms at baseline, ${resolved.peak.p95_ms} ms at its peak`,
    );
    if (resolved.resolution) this.say(`  resolution: ${resolved.resolution.summary}`);
    this.say(
      `  postmortem: pgwarden incidents postmortem ${incident.id} (or GET /api/incidents/${incident.id}/postmortem)`,
    );
    this.say('Summary:');
    this.say(`  migration -> detected:   ${detectedS.toFixed(1)} s`);
    this.say(`  migration -> attributed: ${attributedS.toFixed(1)} s`);
    this.say(`  migration -> mitigated:  ${mitigatedS.toFixed(1)} s`);
    this.say(`  revert -> recovered:     ${recoveredS.toFixed(1)} s`);
    return detectedS > 0 && incident.attributed;
  }

  async cleanup(): Promise<void> {
    this.running = false;
    await Promise.race([Promise.all(this.loops), new Promise((r) => setTimeout(r, 3000))]);
    await Promise.all(this.clients.map((c) => c.end().catch(() => undefined)));
    if (this.pgwarden && this.pgwarden.exitCode === null) {
      this.pgwarden.kill('SIGTERM');
      await new Promise((r) => this.pgwarden!.once('exit', r));
    }
    await this.database?.stop();
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  private async seed(): Promise<void> {
    await this.direct(`
      create table users (id bigserial primary key, email text not null, name text not null, bio text not null, created_at timestamptz not null default now());
      insert into users (email, name, bio) select 'user' || g || '@example.com', 'name ' || (g % 5000), repeat('x', 200) from generate_series(1, ${USERS}) g;
      create unique index users_email_idx on users (email);
      alter table users set (parallel_workers = 0);
      create table orders (id bigserial primary key, user_id bigint not null, total numeric not null, created_at timestamptz not null default now());
      analyze users;`);
  }

  private async startPgwarden(): Promise<void> {
    this.proxyPort = await freePort();
    this.adminPort = await freePort();
    // The same code the demo runs from: the TypeScript sources (via tsx) or dist/.
    const fromSources = import.meta.url.endsWith('.ts');
    const entry = fileURLToPath(new URL(fromSources ? './main.ts' : './main.js', import.meta.url));
    const log = fs.openSync(path.join(this.dir, 'pgwarden.log'), 'a');
    const db = this.database!;
    // Default detector settings: a baseline forms from the hot lookup's calls within seconds.
    const args = [
      ...(fromSources ? ['--import', 'tsx'] : []),
      entry,
      'start',
      '--listen',
      `127.0.0.1:${this.proxyPort}`,
      '--upstream',
      `127.0.0.1:${db.port}`,
      '--admin',
      `127.0.0.1:${this.adminPort}`,
      '--monitor-url',
      db.url(),
      '--mitigation',
      'enforce',
      '--mitigation-queue-timeout-ms',
      '20',
      // The hot lookup is most of this small shop's traffic: let the policy's budget cover it.
      '--mitigation-max-traffic-share',
      '1',
      '--state-file',
      path.join(this.dir, 'state.json'),
      '--log-level',
      'warn',
    ];
    this.pgwarden = spawn(process.execPath, args, {
      stdio: ['ignore', log, log],
      env: { ...process.env, PGWARDEN_ADMIN_TOKEN: this.token },
    });
    this.pgwarden.once('exit', (code, signal) => {
      if (this.running) this.pgwardenExit = signal !== null ? `by signal ${signal}` : `with code ${code}`;
    });
    await this.waitFor(
      'pgwarden to start',
      async () =>
        (await fetch(`http://127.0.0.1:${this.adminPort}/healthz`).catch(() => null))?.ok ? true : undefined,
      20_000,
    );
  }

  private async startWorkload(): Promise<void> {
    let n = 0;
    const email = () => `user${1 + ((n++ * 7919) % USERS)}@example.com`;
    const streams: { text: () => [string, unknown[]]; pauseMs: number }[] = [
      { text: () => [HOT, [email()]], pauseMs: 0 },
      { text: () => [HOT, [email()]], pauseMs: 0 },
      { text: () => [HOT, [email()]], pauseMs: 0 },
      {
        text: () => ['select email, created_at from users where id = $1', [1 + Math.floor(Math.random() * USERS)]],
        pauseMs: 2,
      },
      {
        text: () => [
          'insert into orders (user_id, total) values ($1, $2)',
          [1 + Math.floor(Math.random() * USERS), (Math.random() * 100).toFixed(2)],
        ],
        pauseMs: 20,
      },
      {
        text: () => [
          "select date_trunc('minute', created_at) as m, count(*), sum(total) from orders group by 1 order by 1 desc limit 10",
          [],
        ],
        pauseMs: 500,
      },
    ];
    for (const [index, stream] of streams.entries()) {
      const client = new pg.Client({
        host: '127.0.0.1',
        port: this.proxyPort,
        user: 'postgres',
        database: 'postgres',
        application_name: 'shop-web',
      });
      client.on('error', () => undefined);
      await client.connect();
      this.clients.push(client);
      this.samples.push([]);
      this.refused.push(0);
      this.loops.push(
        (async () => {
          while (this.running) {
            const [text, values] = stream.text();
            const started = performance.now();
            try {
              await client.query(text, values);
              const list = this.samples[index];
              list.push({ at: Date.now(), ms: performance.now() - started });
              if (list.length > 20_000) list.splice(0, 10_000);
            } catch (err) {
              if ((err as { code?: string }).code === '53400') this.refused[index]++;
              else if (!this.running) return;
              // A connection that is gone fails every query at once: retry gently, never in a spin.
              else await new Promise((r) => setTimeout(r, 100));
            }
            if (stream.pauseMs) await new Promise((r) => setTimeout(r, stream.pauseMs));
          }
        })(),
      );
    }
  }

  /** p95 of a stream's calls over the last 3 s, as its client saw them. */
  private recentP95(stream: number): number {
    const since = Date.now() - 3000;
    const ms = this.samples[stream]
      .filter((s) => s.at >= since)
      .map((s) => s.ms)
      .sort((a, b) => a - b);
    return ms.length ? ms[Math.min(ms.length - 1, Math.ceil(ms.length * 0.95) - 1)] : NaN;
  }

  private async direct(sql: string): Promise<void> {
    const client = new pg.Client({ connectionString: this.database!.url() });
    await client.connect();
    try {
      await client.query(sql);
    } finally {
      await client.end();
    }
  }

  private async api<T>(route: string): Promise<T> {
    const response = await fetch(`http://127.0.0.1:${this.adminPort}${route}`, {
      headers: { Authorization: `Bearer ${this.token}` },
    });
    if (!response.ok) throw new Error(`${route}: HTTP ${response.status}`);
    return (await response.json()) as T;
  }

  /**
   * Polls `check` until it returns a value. Its progress lines are shown at most
   * every 3 s, so the terminal is never silent for long nor flooded.
   */
  private async waitFor<T>(
    what: string,
    check: (progress: (line: string) => void) => Promise<T | undefined>,
    deadlineMs = STEP_DEADLINE_MS,
  ): Promise<T> {
    const end = Date.now() + deadlineMs;
    let lastSaid = 0;
    const progress = (line: string) => {
      if (Date.now() - lastSaid < 3000) return;
      lastSaid = Date.now();
      this.say(line);
    };
    for (;;) {
      if (this.pgwardenExit !== null) {
        const log = fs.readFileSync(path.join(this.dir, 'pgwarden.log'), 'utf8').trimEnd().split('\n').slice(-20);
        throw new Error(
          `pgwarden exited ${this.pgwardenExit} while waiting for ${what}; its log ends:\n${log.join('\n')}`,
        );
      }
      const value = await check(progress).catch(() => undefined);
      if (value !== undefined) return value;
      if (Date.now() > end)
        throw new Error(
          `timed out after ${deadlineMs / 1000} s waiting for ${what} (pgwarden's log: ${path.join(this.dir, 'pgwarden.log')})`,
        );
      progress(`waiting for ${what}...`);
      await new Promise((r) => setTimeout(r, 250));
    }
  }

  private async pause(ms: number, every3s: () => void): Promise<void> {
    const end = Date.now() + ms;
    while (Date.now() < end) {
      await new Promise((r) => setTimeout(r, Math.min(3000, end - Date.now())));
      every3s();
    }
  }
}
