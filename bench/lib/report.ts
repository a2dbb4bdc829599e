// What the overhead benchmark prints: the machine, then per mode every target's
// throughput and latency and each proxy's CPU per transaction and memory, with
// the ratios that give the verdict at a glance: against direct PostgreSQL,
// against PgBouncer, and pgwarden with statistics against pgwarden without.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { isPgwardenTarget, PGWARDEN_TARGETS, TARGETS, type BenchOptions, type Target } from './options.ts';
import { MODES, type Mode, type PgbenchResult } from './pgbench.ts';

/** What one pgbench run against one target measured. */
export interface Measurement extends PgbenchResult {
  mode: Mode;
  clients: number;
  target: Target;
  /** For the proxies: their own CPU and memory during the run. */
  proxy?: ProxyUsage;
}

export interface ProxyUsage {
  cpuUs: number;
  cpuUsPerTxn: number;
  /** Largest RSS sampled while pgbench ran, and the last sample before it ended. */
  rssPeakKib: number;
  rssEndKib: number;
}

/** A run that did not happen or did not finish; the table says 'failed' and why below. */
export interface Failure {
  mode: Mode;
  clients: number;
  target: Target;
  error: string;
}

export type Machine = Record<string, string>;

export function machineDescription(versions: Record<string, string>): Machine {
  const cpuinfo = fs.readFileSync('/proc/cpuinfo', 'utf8');
  const model = /^model name\s*:\s*(.+)$/m.exec(cpuinfo)?.[1] ?? os.cpus()[0]?.model ?? 'unknown';
  return {
    cpus: String(os.availableParallelism()),
    'cpu model': model,
    memory: `${(os.totalmem() / 2 ** 30).toFixed(1)} GiB`,
    kernel: `${os.type()} ${os.release()}`,
    ...versions,
    node: process.version,
  };
}

export function printHeader(machine: Machine, options: BenchOptions): void {
  const width = Math.max(...Object.keys(machine).map((key) => key.length));
  for (const [key, value] of Object.entries(machine)) console.log(`${key.padEnd(width)}  ${value}`);
  const pgwardens = options.targets
    .filter(isPgwardenTarget)
    .map((target) => `${target} --stats ${PGWARDEN_TARGETS[target].stats}`);
  console.log(
    `\nruns: ${options.durationS} s each, -j min(clients, 2), scale ${options.scale}, ` +
      `warm-up ${options.warmupS} s per target and warm-up mode, targets interleaved per client count` +
      (pgwardens.length > 0 ? `\npgwarden: ${pgwardens.join(', ')}` : '') +
      (pgwardens.length > 0 && options.pgwardenArgs.length > 0 ? `, args: ${options.pgwardenArgs.join(' ')}` : ''),
  );
}

/**
 * Two tables per mode, one row per client count: throughput (with the ratios
 * that answer "how much slower than direct, than PgBouncer, than stats off"),
 * then what each proxy spent per transaction. One table would be too wide to read.
 */
export function printModeTable(mode: Mode, clients: number[], measurements: Measurement[], failures: Failure[]): void {
  const find = (c: number, target: Target): Cell =>
    measurements.find((m) => m.mode === mode && m.clients === c && m.target === target) ??
    failures.find((f) => f.mode === mode && f.clients === c && f.target === target);
  const ran = (target: Target): boolean =>
    [...measurements, ...failures].some((m) => m.mode === mode && m.target === target);
  const latencyTargets = TARGETS.filter(ran);
  const rows = clients.map((c) => Object.fromEntries(TARGETS.map((target) => [target, find(c, target)])) as Row);
  console.log(`\n${mode} (pgbench ${MODES[mode].args.join(' ')})`);
  const throughputHeaders = [...THROUGHPUT_COLUMNS, `latency ms ${latencyTargets.map((t) => SHORT[t]).join('/')}`];
  console.log(
    formatTable(
      throughputHeaders,
      rows.map((row, i) => throughputRow(clients[i], row, latencyTargets)),
    ),
  );
  const cost = formatTable(
    COST_COLUMNS,
    rows.map((row, i) => costRow(clients[i], row)),
  );
  if (cost) console.log(cost);
  for (const failure of failures.filter((f) => f.mode === mode)) {
    console.log(`  ${failure.target} at ${failure.clients} clients failed: ${indent(failure.error)}`);
  }
}

/** Short names in the headers of ratios and of the cost table. */
const SHORT: Record<Target, string> = { direct: 'd', pgwarden: 'pgw', 'pgwarden-stats': 'pgws', pgbouncer: 'pgb' };

const THROUGHPUT_COLUMNS = [
  'clients',
  'direct tps',
  'pgwarden tps',
  'pgwarden-stats tps',
  'stats cost',
  'pgbouncer tps',
  'pgw/pgb tps',
  'pgws/pgb tps',
];

const COST_COLUMNS = [
  'clients',
  'pgw us/txn',
  'pgws us/txn',
  'pgb us/txn',
  'pgw/pgb cpu',
  'pgws/pgb cpu',
  'pgw RSS MiB',
  'pgws RSS MiB',
];

type Cell = Measurement | Failure | undefined;
type Row = Record<Target, Cell>;

function throughputRow(clients: number, row: Row, latencyTargets: Target[]): string[] {
  const d = measured(row.direct);
  const w = measured(row.pgwarden);
  const s = measured(row['pgwarden-stats']);
  const b = measured(row.pgbouncer);
  return [
    String(clients),
    d ? d.tps.toFixed(0) : absent(row.direct),
    w ? withRatio(w.tps, d?.tps) : absent(row.pgwarden),
    s ? withRatio(s.tps, d?.tps) : absent(row['pgwarden-stats']),
    s && w ? ratio(s.tps, w.tps) : '-',
    b ? withRatio(b.tps, d?.tps) : absent(row.pgbouncer),
    w && b ? ratio(w.tps, b.tps) : '-',
    s && b ? ratio(s.tps, b.tps) : '-',
    latencyTargets.map((target) => measured(row[target])?.latencyAvgMs.toFixed(3) ?? '-').join('/'),
  ];
}

function costRow(clients: number, row: Row): string[] {
  const w = measured(row.pgwarden)?.proxy;
  const s = measured(row['pgwarden-stats'])?.proxy;
  const b = measured(row.pgbouncer)?.proxy;
  return [
    String(clients),
    w ? w.cpuUsPerTxn.toFixed(1) : '-',
    s ? s.cpuUsPerTxn.toFixed(1) : '-',
    b ? b.cpuUsPerTxn.toFixed(1) : '-',
    w && b ? ratio(w.cpuUsPerTxn, b.cpuUsPerTxn) : '-',
    s && b ? ratio(s.cpuUsPerTxn, b.cpuUsPerTxn) : '-',
    w ? (w.rssPeakKib / 1024).toFixed(0) : '-',
    s ? (s.rssPeakKib / 1024).toFixed(0) : '-',
  ];
}

function measured(cell: Cell): Measurement | undefined {
  return cell && 'tps' in cell ? cell : undefined;
}

function absent(cell: Cell): string {
  return cell ? 'failed' : '-';
}

function withRatio(value: number, base: number | undefined): string {
  return base ? `${value.toFixed(0)} (${ratio(value, base)})` : value.toFixed(0);
}

function ratio(value: number, base: number): string {
  return base > 0 ? `${(value / base).toFixed(2)}x` : '-';
}

/**
 * Right-aligned columns; columns with no value in any row are left out, and
 * a table left with only its first column (clients) is not printed at all ('').
 */
function formatTable(headers: string[], rows: string[][]): string {
  const empty = (cell: string): boolean => /^-(\/-)*$/.test(cell);
  const kept = headers.map((_, i) => i).filter((i) => i === 0 || rows.some((row) => !empty(row[i])));
  if (kept.length === 1) return '';
  const widths = kept.map((i) => Math.max(headers[i].length, ...rows.map((row) => row[i].length)));
  const line = (cells: string[]): string => kept.map((i, k) => cells[i].padStart(widths[k])).join('  ');
  return [line(headers), ...rows.map(line)].join('\n');
}

function indent(text: string): string {
  return text.replaceAll('\n', '\n    ');
}

export function writeJson(
  file: string,
  report: {
    machine: Machine;
    options: BenchOptions;
    measurements: Measurement[];
    failures: Failure[];
    skipped: Record<string, string>;
  },
): void {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  const { databaseUrl, ...options } = report.options; // may hold a password
  // What tells the pgwarden targets apart, so the file explains itself.
  const pgwardenTargets = Object.fromEntries(
    options.targets.filter(isPgwardenTarget).map((target) => [target, PGWARDEN_TARGETS[target]]),
  );
  const body = {
    date: new Date().toISOString(),
    ...report,
    options: { ...options, externalDatabase: databaseUrl !== undefined },
    pgwardenTargets,
  };
  fs.writeFileSync(file, `${JSON.stringify(body, null, 2)}\n`);
}
