// Detection time with pgwarden's DEFAULT detector settings: from an out-of-band
// `DROP INDEX` behind a hot lookup to an attributed incident, measured on an
// embedded PostgreSQL, for a pgwarden started 20 s before the drop ("cold": no
// minute of history yet) and one started 80 s before it ("warm": baselines from a
// minute of 10 s buckets), each optionally beside a CPU hog spinning every core.
//
//   node --import tsx bench/detection.ts [--runs N] [--hog] [--cold-only|--warm-only]
//
// Each run starts a fresh pgwarden (in this process, as `pgwarden start` wires
// it, with a fresh state file: nothing restored), the replay workload (three
// clients on the hot lookup, a point lookup, inserts; parallel workers allowed),
// drops the index at the chosen second, polls GET /api/incidents every 100 ms, and
// re-creates the index afterwards.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import pg from 'pg';
import pino from 'pino';
import { startApp } from '../src/cli/app.ts';
import { loadConfig } from '../src/config.ts';
import { startPostgres } from '../src/embedded/postgres.ts';
import type { Incident } from '../src/detect/record.ts';
import { startCpuHog, type CpuHog } from '../test/harness/hog.ts';
import { startWorkload } from '../test/harness/workload.ts';

const ROWS = 300_000;
const { values } = parseArgs({
  options: {
    runs: { type: 'string' },
    hog: { type: 'boolean' },
    'cold-only': { type: 'boolean' },
    'warm-only': { type: 'boolean' },
  },
});
const runs = Number(values.runs ?? 3);

const db = await startPostgres();
const sql = async (text: string) => {
  const c = new pg.Client({ connectionString: db.url() });
  await c.connect();
  try {
    await c.query(text);
  } finally {
    await c.end();
  }
};
await sql(`create table users (id bigserial primary key, email text not null, name text not null, bio text not null);
  insert into users (email, name, bio) select 'user' || g || '@example.com', 'name ' || (g % 1000), repeat('x', 200) from generate_series(1, ${ROWS}) g;
  create unique index users_email_idx on users (email);
  create table events (id bigserial primary key, user_id bigint, at timestamptz default now());
  analyze users;`);

async function once(
  dropAfterS: number,
): Promise<{ detected: number; attributed: number; incidents: number; victims: number } | null> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-detect-bench-'));
  const config = {
    ...loadConfig(),
    listen: '127.0.0.1:0',
    admin: '127.0.0.1:0',
    upstream: `127.0.0.1:${db.port}`,
    monitor_url: db.url(),
    admin_token: 'bench-admin-token-0123456789',
    state_file: path.join(dir, 'state.json'),
    slow_query_ms: 60_000,
  };
  const app = await startApp(config, pino({ level: 'silent' }));
  const started = Date.now();
  const url = `postgres://postgres@127.0.0.1:${app.proxyPort}/postgres`;
  let n = 0;
  const hot = {
    next: () => ({
      text: 'select id, name from users where email = $1',
      values: [`user${1 + ((n++ * 7919) % ROWS)}@example.com`],
    }),
  };
  const workload = await startWorkload(url, [
    hot,
    hot,
    hot,
    { next: (i: number) => ({ text: 'select email from users where id = $1', values: [1 + (i % ROWS)] }), pauseMs: 2 },
    { next: (i: number) => ({ text: 'insert into events (user_id) values ($1)', values: [i] }), pauseMs: 5 },
  ]);
  const get = async (route: string) =>
    (
      await fetch(`http://127.0.0.1:${app.adminPort}${route}`, {
        headers: { Authorization: `Bearer ${config.admin_token}` },
      })
    ).json();
  /** The hot shape's calls and detector view (baseline, recent window). */
  const hotView = async () => {
    const hotShape = (
      (await get('/api/shapes?sort=calls&limit=5')) as { fingerprint: string; query: string; calls: number }[]
    ).find((x) => x.query.includes('where email'));
    return hotShape
      ? {
          calls: hotShape.calls,
          ...((await get(`/api/shapes/${hotShape.fingerprint}`)) as {
            detector: unknown;
            plans: { changes: unknown[] } | null;
          }),
        }
      : null;
  };
  const api = async () =>
    (await (
      await fetch(`http://127.0.0.1:${app.adminPort}/api/incidents`, {
        headers: { Authorization: `Bearer ${config.admin_token}` },
      })
    ).json()) as Incident[];
  try {
    while (Date.now() < started + dropAfterS * 1000) await new Promise((r) => setTimeout(r, 100));
    const early = await api();
    if (early.length > 0)
      console.log(`  before the drop: ${early.map((i) => `${i.kind} ${i.status}: ${i.summary}`).join(' | ')}`);
    if (early.some((i) => i.kind === 'shape')) throw new Error('a per-shape incident before the drop');
    const hotAtDrop = await hotView();
    const dropped = Date.now();
    await sql('drop index users_email_idx');
    let detected = 0;
    for (;;) {
      const list = await api();
      const root = list.find((i) => i.root !== null && Date.parse(i.detected_at) >= dropped);
      if (root && detected === 0) detected = (Date.parse(root.detected_at) - dropped) / 1000;
      if (root?.attributed) {
        const attributed = (Date.now() - dropped) / 1000;
        await new Promise((r) => setTimeout(r, 3000)); // victims join
        const after = await api();
        return { detected, attributed, incidents: after.length, victims: after[0]?.victims.length ?? 0 };
      }
      if (Date.now() - dropped > 90_000) {
        const hotNow = await hotView();
        console.log(`  not attributed: incidents ${JSON.stringify(list.map((i) => i.summary))}`);
        console.log(
          `  hot shape at the drop: ${hotAtDrop?.calls} calls, detector ${JSON.stringify(hotAtDrop?.detector)}`,
        );
        console.log(
          `  hot shape now: detector ${JSON.stringify(hotNow?.detector)}; plan changes ${JSON.stringify(hotNow?.plans?.changes)}`,
        );
        return null;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
  } finally {
    await workload.stop();
    await app.stop(1000);
    await sql('create unique index if not exists users_email_idx on users (email)');
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

let hog: CpuHog | null = null;
try {
  if (values.hog) hog = startCpuHog(os.availableParallelism(), 1800);
  const cases = [
    ...(values['warm-only'] ? [] : [['cold (drop 20 s after start)', 20] as const]),
    ...(values['cold-only'] ? [] : [['warm (drop 80 s after start)', 80] as const]),
  ];
  for (const [name, dropAfterS] of cases) {
    const results: string[] = [];
    for (let i = 0; i < runs; i++) {
      const r = await once(dropAfterS);
      results.push(
        r
          ? `attributed ${r.attributed.toFixed(1)} s (detected ${r.detected.toFixed(1)} s; ${r.incidents} incident, ${r.victims} victims)`
          : 'not attributed within 90 s',
      );
      console.log(`${name}${values.hog ? ', CPU hog' : ''}, run ${i + 1}: ${results[results.length - 1]}`);
    }
  }
} finally {
  await hog?.stop();
  await db.stop();
}
