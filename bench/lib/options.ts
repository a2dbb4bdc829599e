// Command-line flags of the overhead benchmark, validated into one typed value.

import { parseArgs } from 'node:util';
import { MODE_NAMES, type Mode } from './pgbench.ts';

/** In the order of the interleaved runs: direct first, the baseline every ratio is taken against. */
export const TARGETS = ['direct', 'pgwarden', 'pgwarden-stats', 'pgbouncer'] as const;
export type Target = (typeof TARGETS)[number];

/** The two pgwarden targets, one process each: a plain proxy, and fingerprints + statistics (the default config). */
export const PGWARDEN_TARGETS = {
  pgwarden: { stats: false },
  'pgwarden-stats': { stats: true },
} as const satisfies Partial<Record<Target, { stats: boolean }>>;
export type PgwardenTarget = keyof typeof PGWARDEN_TARGETS;

export function isPgwardenTarget(target: Target): target is PgwardenTarget {
  return target in PGWARDEN_TARGETS;
}

export interface BenchOptions {
  durationS: number;
  warmupS: number;
  clients: number[];
  modes: Mode[];
  scale: number;
  targets: Target[];
  pgwardenArgs: string[];
  jsonFile: string | undefined;
  databaseUrl: string | undefined;
}

export const USAGE = `usage: node --import tsx bench/overhead.ts [options]

  --duration S          seconds per pgbench run (default 10)
  --warmup S            seconds of unrecorded select-prepared, then select-simple load per
                        target before measuring (default 3 each, 0 = none)
  --clients LIST        client counts, comma-separated (default 1,8,32)
  --modes LIST          ${MODE_NAMES.join(',')} (default all)
  --scale N             pgbench scale factor for pgbench -i (default 10)
  --targets LIST        ${TARGETS.join(',')} (default all)
  --pgwarden-args ARGS  extra flags for 'pgwarden start' of both pgwarden targets, split on
                        spaces (not --stats: pgwarden runs with --stats false, pgwarden-stats
                        with --stats true)
  --json FILE           also write every result as JSON (bench/results/ is git-ignored)
  --help

environment:
  PGWARDEN_BENCH_DATABASE_URL  benchmark this server instead of a throwaway one
                               (its pgbench_* tables are recreated)
  PGWARDEN_TEST_PG_BIN         PostgreSQL bin directory for the throwaway server
`;

/** Thrown for bad flags; the message is meant for the user, followed by USAGE. */
export class UsageError extends Error {}

const FLAGS = {
  duration: { type: 'string' },
  warmup: { type: 'string' },
  clients: { type: 'string' },
  modes: { type: 'string' },
  scale: { type: 'string' },
  targets: { type: 'string' },
  'pgwarden-args': { type: 'string' },
  json: { type: 'string' },
  help: { type: 'boolean' },
} as const;

/** Returns undefined when --help was asked for. */
export function parseOptions(argv: string[], env: NodeJS.ProcessEnv): BenchOptions | undefined {
  const values = parseFlags(argv);
  if (values.help) return undefined;
  return {
    durationS: positiveInteger('--duration', values.duration ?? '10'),
    warmupS: nonNegativeInteger('--warmup', values.warmup ?? '3'),
    clients: list(values.clients ?? '1,8,32').map((value) => positiveInteger('--clients', value)),
    modes: oneOf('--modes', values.modes, MODE_NAMES),
    scale: positiveInteger('--scale', values.scale ?? '10'),
    targets: oneOf('--targets', values.targets, TARGETS),
    pgwardenArgs: pgwardenArgs(values['pgwarden-args'] ?? ''),
    jsonFile: values.json,
    databaseUrl: env.PGWARDEN_BENCH_DATABASE_URL || undefined,
  };
}

function parseFlags(argv: string[]) {
  try {
    return parseArgs({ args: attachValues(argv), options: FLAGS, strict: true, allowPositionals: false }).values;
  } catch (error) {
    throw new UsageError((error as Error).message);
  }
}

/**
 * `--pgwarden-args '--workers 2'` has a value that starts with a dash, which
 * parseArgs rejects as ambiguous; joining it into `--flag=value` is unambiguous.
 */
function attachValues(argv: string[]): string[] {
  const result: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const name = argv[i].startsWith('--') ? argv[i].slice(2) : undefined;
    const takesValue = name !== undefined && name in FLAGS && FLAGS[name as keyof typeof FLAGS].type === 'string';
    if (takesValue && i + 1 < argv.length) {
      result.push(`${argv[i]}=${argv[i + 1]}`);
      i++;
    } else {
      result.push(argv[i]);
    }
  }
  return result;
}

/** --stats is what tells the two pgwarden targets apart, so it cannot be passed to both. */
function pgwardenArgs(value: string): string[] {
  const args = value.split(/\s+/).filter(Boolean);
  if (args.some((arg) => arg === '--stats' || arg.startsWith('--stats='))) {
    throw new UsageError(
      '--pgwarden-args: --stats is set per target (pgwarden: --stats false, pgwarden-stats: --stats true); use --targets to choose',
    );
  }
  return args;
}

function list(value: string): string[] {
  return value
    .split(',')
    .map((item) => item.trim())
    .filter(Boolean);
}

function oneOf<T extends string>(flag: string, value: string | undefined, allowed: readonly T[]): T[] {
  if (value === undefined) return [...allowed];
  const chosen = list(value);
  const unknown = chosen.filter((item) => !(allowed as readonly string[]).includes(item));
  if (unknown.length > 0)
    throw new UsageError(`${flag}: unknown ${unknown.join(', ')} (expected ${allowed.join(', ')})`);
  if (chosen.length === 0) throw new UsageError(`${flag}: empty list`);
  // The order of `allowed` (direct first) is the order of the interleaved runs.
  return allowed.filter((item) => chosen.includes(item));
}

function positiveInteger(flag: string, value: string): number {
  const number = nonNegativeInteger(flag, value);
  if (number === 0) throw new UsageError(`${flag}: expected a positive integer, got '${value}'`);
  return number;
}

function nonNegativeInteger(flag: string, value: string): number {
  if (!/^\d+$/.test(value)) throw new UsageError(`${flag}: expected an integer, got '${value}'`);
  return Number(value);
}
