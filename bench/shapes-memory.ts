// How much memory do 100,000 distinct statement shapes cost pgwarden?
//
// Starts a throwaway PostgreSQL and pgwarden as it ships (the built dist/ via
// bin/pgwarden.js, statistics on, like bench/overhead.ts's pgwarden-stats), warms
// it up with a few thousand statements of a handful of shapes, reads its RSS
// ("before"), then sends --shapes distinct statement structures through it (a
// different column list each: `SELECT c3, c7, c12 FROM wide WHERE c0 = 42`, every
// subset of 20 columns is its own parse tree, so its own fingerprint) and reads the
// RSS again ("after"), once the flood is over and again after a pause. The delta is
// what the shape caches, the shape registry and the parser's WebAssembly heap grew
// by; by design it is bounded whatever the number of shapes (see bench/README.md).
//
//   node --import tsx bench/shapes-memory.ts [--shapes 100000] [--clients 8] [--stats true] [--pgwarden-args '...']

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import pg from 'pg';
import { startPostgres } from '../test/harness/postgres.ts';
import { ADMIN_TOKEN, buildPgwarden, startPgwarden, statsFlag } from './lib/pgwarden.ts';
import { treeRssKib } from './lib/procfs.ts';

const COLUMNS = 20;

/** The i-th distinct statement (i >= 1): the columns of i's bits, a literal that changes too. */
export function distinctStatement(i: number): string {
  const columns: string[] = [];
  for (let b = 0; b < COLUMNS; b++) if (i & (1 << b)) columns.push(`c${b}`);
  return `SELECT ${columns.join(', ')} FROM wide WHERE c0 = ${i % 997}`;
}

const mib = (kib: number) => kib / 1024;
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      shapes: { type: 'string', default: '100000' },
      clients: { type: 'string', default: '8' },
      stats: { type: 'string', default: 'true' },
      'pgwarden-args': { type: 'string', default: '' },
      'no-build': { type: 'boolean', default: false },
    },
  });
  const shapes = Number(values.shapes);
  const clients = Number(values.clients);
  if (!Number.isInteger(shapes) || shapes < 1 || shapes >= 2 ** COLUMNS)
    throw new Error(`--shapes must be 1..${2 ** COLUMNS - 1}`);
  if (!values['no-build']) await buildPgwarden();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgwarden-shapes-memory-'));
  const server = await startPostgres();
  try {
    const database = { host: server.host, port: server.port, user: server.superuser, database: 'postgres' };
    const setup = new pg.Client(database);
    await setup.connect();
    await setup.query(
      `DROP TABLE IF EXISTS wide; CREATE TABLE wide (${Array.from({ length: COLUMNS }, (_, b) => `c${b} int`).join(', ')})`,
    );
    await setup.end();

    const { daemon, port, adminPort } = await startPgwarden(`${server.host}:${server.port}`, {
      name: 'pgwarden',
      stats: statsFlag(values.stats!),
      extraArgs: values['pgwarden-args']!.split(' ').filter(Boolean),
      tempDir: dir,
    });
    try {
      const pool = await Promise.all(
        Array.from({ length: clients }, async () => {
          const client = new pg.Client({ ...database, host: '127.0.0.1', port });
          client.on('error', () => {});
          await client.connect();
          return client;
        }),
      );
      const run = async (count: number, text: (i: number) => string) => {
        let next = 1;
        await Promise.all(
          pool.map(async (client) => {
            for (let i = next++; i <= count; i = next++) await client.query(text(i));
          }),
        );
      };
      const metrics = async () =>
        fetch(`http://127.0.0.1:${adminPort}/metrics`, { headers: { authorization: `Bearer ${ADMIN_TOKEN}` } })
          .then((r) => (r.ok ? r.text() : ''))
          .catch(() => '');
      const metric = (text: string, name: string) => Number(new RegExp(`^${name} (\\S+)`, 'm').exec(text)?.[1] ?? NaN);
      // What the RSS is made of: the JS heap, and memory outside it (the parser's WebAssembly heap is in external).
      const heap = async () => {
        const text = await metrics();
        const m = (name: string) => (metric(text, name) / 1048576).toFixed(1);
        return `heap total ${m('nodejs_heap_size_total_bytes')} used ${m('nodejs_heap_size_used_bytes')}, external ${m('nodejs_external_memory_bytes')} MiB`;
      };
      const idle = treeRssKib(daemon.pid);
      const idleHeap = await heap();
      // Warm-up: the same few shapes (and the code paths that find a new one) until the heap settles.
      await run(5000, (i) => distinctStatement((i % 5) + 1 + 2 ** 19));
      await sleep(2000);
      const before = treeRssKib(daemon.pid);
      const beforeHeap = await heap();
      const started = Date.now();
      let peak = before;
      const sampler = setInterval(() => (peak = Math.max(peak, treeRssKib(daemon.pid))), 250);
      await run(shapes, distinctStatement);
      clearInterval(sampler);
      const seconds = (Date.now() - started) / 1000;
      const after = treeRssKib(daemon.pid);
      peak = Math.max(peak, after);
      const afterHeap = await heap();
      await sleep(5000);
      const settled = treeRssKib(daemon.pid);
      await Promise.all(pool.map((c) => c.end()));
      const text = await metrics();
      console.log(`pgwarden --stats ${values.stats} ${values['pgwarden-args']}`.trim());
      console.log(
        `${shapes} distinct shapes through ${clients} connections in ${seconds.toFixed(1)} s (${(shapes / seconds).toFixed(0)}/s)`,
      );
      console.log(
        `shapes folded into the overflow shape by the shape cap: ${metric(text, 'pgwarden_shapes_evicted_total')}`,
      );
      console.log(`idle:   ${idleHeap}\nbefore: ${beforeHeap}\nafter:  ${afterHeap}`);
      console.log(
        `RSS MiB: idle ${mib(idle).toFixed(1)}, before ${mib(before).toFixed(1)}, after ${mib(after).toFixed(1)} (peak ${mib(peak).toFixed(1)}), 5 s later ${mib(settled).toFixed(1)}`,
      );
      console.log(
        `delta (after - before): ${mib(after - before).toFixed(1)} MiB; peak - before: ${mib(peak - before).toFixed(1)} MiB`,
      );
    } finally {
      await daemon.stop();
    }
  } finally {
    await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] === import.meta.filename)
  main().catch((error: unknown) => {
    console.error(error instanceof Error ? error.message : error);
    process.exitCode = 1;
  });
