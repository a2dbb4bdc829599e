// What the overhead benchmark prints: the machine, then one table per mode with
// every target's throughput and latency and each proxy's CPU per transaction as
// ratios, so the verdict against direct PostgreSQL and PgBouncer reads at a glance.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { BenchOptions, Target } from './options.ts';
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
  console.log(
    `\nruns: ${options.durationS} s each, -j min(clients, 2), scale ${options.scale}, ` +
      `warm-up ${options.warmupS} s per target, targets interleaved per client count` +
      (options.pgwardenArgs.length > 0 ? `, pgwarden args: ${options.pgwardenArgs.join(' ')}` : ''),
  );
}

export function printModeTable(mode: Mode, clients: number[], measurements: Measurement[], failures: Failure[]): void {
  const find = (c: number, target: Target): Measurement | Failure | undefined =>
    measurements.find((m) => m.mode === mode && m.clients === c && m.target === target) ??
    failures.find((f) => f.mode === mode && f.clients === c && f.target === target);
  const rows = clients.map((c) => tableRow(c, find(c, 'direct'), find(c, 'pgwarden'), find(c, 'pgbouncer')));
  console.log(`\n${mode} (pgbench ${MODES[mode].args.join(' ')})`);
  console.log(formatTable(COLUMNS, rows));
  for (const failure of failures.filter((f) => f.mode === mode)) {
    console.log(`  ${failure.target} at ${failure.clients} clients failed: ${indent(failure.error)}`);
  }
}

const COLUMNS = [
  'clients',
  'direct tps',
  'pgwarden tps',
  'pgbouncer tps',
  'pgw/pgb tps',
  'latency ms d/pgw/pgb',
  'pgw us/txn',
  'pgb us/txn',
  'pgw/pgb cpu',
  'pgw RSS MiB',
];

type Cell = Measurement | Failure | undefined;

function tableRow(clients: number, direct: Cell, pgwarden: Cell, pgbouncer: Cell): string[] {
  const d = measured(direct);
  const w = measured(pgwarden);
  const b = measured(pgbouncer);
  return [
    String(clients),
    d ? d.tps.toFixed(0) : absent(direct),
    w ? withRatio(w.tps, d?.tps) : absent(pgwarden),
    b ? withRatio(b.tps, d?.tps) : absent(pgbouncer),
    w && b ? ratio(w.tps, b.tps) : '-',
    [direct, pgwarden, pgbouncer].map((cell) => measured(cell)?.latencyAvgMs.toFixed(3) ?? '-').join('/'),
    w?.proxy ? w.proxy.cpuUsPerTxn.toFixed(1) : '-',
    b?.proxy ? b.proxy.cpuUsPerTxn.toFixed(1) : '-',
    w?.proxy && b?.proxy ? ratio(w.proxy.cpuUsPerTxn, b.proxy.cpuUsPerTxn) : '-',
    w?.proxy ? (w.proxy.rssPeakKib / 1024).toFixed(0) : '-',
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

/** Right-aligned columns; columns with no value in any row are left out. */
function formatTable(headers: string[], rows: string[][]): string {
  const kept = headers.map((_, i) => i).filter((i) => i === 0 || rows.some((row) => row[i] !== '-' && row[i] !== '-/-/-'));
  const widths = kept.map((i) => Math.max(headers[i].length, ...rows.map((row) => row[i].length)));
  const line = (cells: string[]): string => kept.map((i, k) => cells[i].padStart(widths[k])).join('  ');
  return [line(headers), ...rows.map(line)].join('\n');
}

function indent(text: string): string {
  return text.replaceAll('\n', '\n    ');
}

export function writeJson(
  file: string,
  report: { machine: Machine; options: BenchOptions; measurements: Measurement[]; failures: Failure[]; skipped: Record<string, string> },
): void {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  const { databaseUrl, ...options } = report.options; // may hold a password
  const body = { date: new Date().toISOString(), ...report, options: { ...options, externalDatabase: databaseUrl !== undefined } };
  fs.writeFileSync(file, `${JSON.stringify(body, null, 2)}\n`);
}
