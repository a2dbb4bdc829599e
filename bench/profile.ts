// Profiles pgwarden's CPU under pgbench and prints where the time goes.
//
// Starts a throwaway PostgreSQL, pgwarden (the built dist/, as bench/overhead.ts
// runs it) under `node --cpu-prof`, drives it with one pgbench mode, stops it
// (SIGTERM: pgwarden drains and exits, and Node writes the profile on exit) and
// summarizes the profile: self time per function, and the time spent inside the
// statistics path (everything under the collector's observe) as a share of all
// samples that were not idle.
//
//   node --import tsx bench/profile.ts [--mode select-simple] [--clients 32] [--duration 10] [--stats true|false]
//   node --import tsx bench/profile.ts --summarize file.cpuprofile

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { startPostgres } from '../test/harness/postgres.ts';
import { initPgbench, runPgbench, type Mode, MODE_NAMES } from './lib/pgbench.ts';
import { buildPgwarden, startPgwarden, statsFlag } from './lib/pgwarden.ts';

const ROOT = path.resolve(import.meta.dirname, '..');

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}
interface Profile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples: number[];
}

/** Frames whose subtree is "the statistics path". */
const STATS_ROOTS = [/shapes\/collector\.js$/, /shapes\/summary\.js$/];

export function summarize(file: string, top = 20): string {
  const profile = JSON.parse(fs.readFileSync(file, 'utf8')) as Profile;
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const parent = new Map<number, number>();
  for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n.id);
  const total = profile.samples.length;
  const usPerSample = (profile.endTime - profile.startTime) / Math.max(total, 1);
  const self = new Map<string, number>();
  let idle = 0;
  let stats = 0;
  const label = (n: ProfileNode) => {
    const url = n.callFrame.url.replace(/^file:\/\//, '').replace(`${ROOT}/`, '');
    return `${n.callFrame.functionName || '(anonymous)'} ${url ? `${url.replace(/^.*node_modules\//, '')}:${n.callFrame.lineNumber + 1}` : ''}`.trim();
  };
  for (const id of profile.samples) {
    const node = byId.get(id)!;
    if (node.callFrame.functionName === '(idle)') {
      idle++;
      continue;
    }
    const key = label(node);
    self.set(key, (self.get(key) ?? 0) + 1);
    for (let at: number | undefined = id; at !== undefined; at = parent.get(at)) {
      const frame = byId.get(at)!.callFrame;
      if (STATS_ROOTS.some((re) => re.test(frame.url))) {
        stats++;
        break;
      }
    }
  }
  const busy = total - idle;
  const lines = [
    `${file}: ${total} samples of ${usPerSample.toFixed(0)} us, ${busy} busy (${((busy / total) * 100).toFixed(1)}%)`,
    `statistics path (under shapes/collector or shapes/summary): ${((stats / Math.max(busy, 1)) * 100).toFixed(1)}% of busy samples`,
    'self time, top frames (% of busy samples):',
  ];
  for (const [key, n] of [...self].sort((a, b) => b[1] - a[1]).slice(0, top))
    lines.push(`  ${((n / busy) * 100).toFixed(1).padStart(5)}%  ${key}`);
  return lines.join('\n');
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      mode: { type: 'string', default: 'select-simple' },
      clients: { type: 'string', default: '32' },
      duration: { type: 'string', default: '10' },
      stats: { type: 'string', default: 'true' },
      summarize: { type: 'string' },
      'no-build': { type: 'boolean', default: false },
    },
  });
  if (values.summarize) {
    console.log(summarize(values.summarize));
    return;
  }
  const mode = values.mode as Mode;
  if (!MODE_NAMES.includes(mode)) throw new Error(`--mode must be one of ${MODE_NAMES.join(', ')}`);
  if (!values['no-build']) await buildPgwarden();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgwarden-profile-'));
  const server = await startPostgres();
  const abort = new AbortController();
  try {
    const database = { host: server.host, port: server.port, user: server.superuser, database: 'postgres' };
    await initPgbench(database, 1, abort.signal);
    const { daemon, port } = await startPgwarden(`${server.host}:${server.port}`, {
      name: 'pgwarden',
      stats: statsFlag(values.stats!),
      extraArgs: [],
      tempDir: dir,
      nodeArgs: ['--cpu-prof', '--cpu-prof-dir', dir],
    });
    try {
      const endpoint = { ...database, host: '127.0.0.1', port };
      const result = await runPgbench(
        endpoint,
        { mode, clients: Number(values.clients), durationS: Number(values.duration) },
        abort.signal,
      );
      console.log(`${mode} -c ${values.clients}: ${result.tps.toFixed(0)} tps, ${result.transactions} transactions`);
    } finally {
      await daemon.stop();
    }
    const file = fs.readdirSync(dir).find((f) => f.endsWith('.cpuprofile'));
    if (!file) throw new Error(`no profile written; see ${path.join(dir, 'pgwarden.log')}`);
    const kept = path.join(
      os.tmpdir(),
      `pgwarden-${mode}-${values.clients}-stats-${values.stats}-${Date.now()}.cpuprofile`,
    );
    fs.copyFileSync(path.join(dir, file), kept);
    console.log(summarize(kept));
  } finally {
    await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

if (process.argv[1] === import.meta.filename) {
  main().catch((error: unknown) => {
    console.error(error instanceof Error ? error.message : error);
    process.exitCode = 1;
  });
}
