// check-migration's report: a summary line a reviewer reads first, then one
// block per shape whose plan changed (or that stopped planning), heaviest
// shapes first, each saying which plan mode its verdict used; then the locks
// each migration statement took, crossed with the workload, and the outage
// patterns found; and the same as JSON for CI. What fails the build is chosen
// with --fail-on (regression, lock, not-checked).

import { describePlan, type PlanSummary } from '../plans/plan.ts';
import type { CheckReport, PlanMode, ShapeResult } from './check.ts';
import { formatRate, lockName, seconds } from './locks.ts';

export const CHECK_FORMAT = 'pgwarden-check-migration/1';
/** Shapes listed by name among those that could not be checked; the rest are counted. */
const MAX_NOT_CHECKED_LINES = 10;
/** Warnings about shapes whose production plan staging cannot reproduce, listed by name. */
const MAX_WARNING_LINES = 10;

export const FAIL_ON = ['regression', 'lock', 'not-checked'] as const;
export type FailOn = (typeof FAIL_ON)[number];

export function regressions(report: CheckReport): ShapeResult[] {
  return report.results.filter((r) => r.verdict === 'regression');
}

/** What fails the check under `failOn`, counted per kind. */
export function failures(
  report: CheckReport,
  failOn: readonly FailOn[],
): { regression: number; lock: number; not_checked: number; failed: boolean } {
  const regression = regressions(report).length;
  const lock = report.locks.findings.length;
  const notChecked = report.results.filter((r) => r.verdict === 'not_checked').length;
  const failed =
    (failOn.includes('regression') && regression > 0) ||
    (failOn.includes('lock') && lock > 0) ||
    (failOn.includes('not-checked') && notChecked > 0);
  return { regression, lock, not_checked: notChecked, failed };
}

const MODE_TEXT: Record<PlanMode, string> = {
  exact: 'no parameters',
  sample: 'captured sample parameters',
  generic: 'generic plan',
  stats: "custom plan with values from staging's pg_stats",
};

function modeOf(r: ShapeResult): string {
  if (r.mode === null) return '';
  let text =
    r.mode === 'sample' && r.sample !== null ? `captured sample parameters #${r.sample + 1}` : MODE_TEXT[r.mode];
  if (r.mode === 'stats' && r.modeDetail) text += ` (${r.modeDetail})`;
  if (r.reproduced === true) text += ", reproduces production's plan";
  if (r.reproduced === false) text += ", does NOT reproduce production's plan";
  return text;
}

export function renderText(
  report: CheckReport,
  migrationName: string,
  failOn: readonly FailOn[] = ['regression'],
): string {
  const count = (verdict: ShapeResult['verdict']) => report.results.filter((r) => r.verdict === verdict).length;
  const regressed = count('regression');
  const checked = report.results.length - count('not_checked');
  const ran = report.statements.filter((s) => s.run !== null).length;
  const lines: string[] = [];
  const verdict =
    regressed > 0
      ? `REGRESSION: ${regressed} of ${checked} shapes regressed`
      : `OK: no regression in ${checked} shapes`;
  lines.push(
    `${verdict} (${plural(count('changed'), 'plan change')} under the ${report.costRatio}x cost threshold, ${count('unchanged')} unchanged, ${count('not_checked')} not checked) ` +
      `after ${migrationName} (${ran < report.statements.length ? `${ran} of ${report.statements.length} statements run` : plural(ran, 'statement')}), rolled back`,
  );
  const findings = report.locks.findings.length;
  const fail = failures(report, failOn);
  lines.push(
    `${findings > 0 ? 'LOCKS' : 'locks'}: ${findings === 0 ? 'no outage pattern found' : `${plural(findings, 'outage pattern')} found`}; result: ${fail.failed ? 'FAIL' : 'pass'} (--fail-on ${failOn.join(',')})`,
  );
  lines.push(
    `  on ${report.database}, PostgreSQL ${report.serverVersion}; regression: a changed plan at least ${report.costRatio}x the cost, or a shape that no longer plans`,
  );
  lines.push(
    `  planned ${report.planning.role !== null ? `as role ${report.planning.role}` : report.planning.userFunctions ? "as the check's role, user functions allowed" : "as the check's role, only shapes that call nothing outside pg_catalog"}`,
  );

  for (const r of report.results) {
    if (r.verdict !== 'regression' && r.verdict !== 'changed') continue;
    lines.push('');
    lines.push(
      `${r.verdict === 'regression' ? 'REGRESSION' : 'changed   '}  ${r.shape.fingerprint}  ${oneLine(r.shape.query)}`,
    );
    lines.push(
      `  calls ${r.shape.calls}${r.shape.calls_per_s === null ? '' : ` (${formatRate(r.shape.calls_per_s)}/s)`}, p95 ${ms(r.shape.p95_ms)}, total ${ms(r.shape.total_ms)}`,
    );
    lines.push(`  plan mode: ${modeOf(r)}`);
    if (r.after === null) {
      lines.push(`  ${describePlan(r.before!)} -> does not plan any more: ${r.error}`);
      continue;
    }
    lines.push(`  ${r.diff?.headline || `${describePlan(r.before!)} -> ${describePlan(r.after)}`}`);
    lines.push(`  cost ${cost(r.before!)} -> ${cost(r.after)} (${ratio(r.costRatio)})`);
    if (r.error !== null) lines.push(`  ${r.error}`);
  }

  const locked = report.locks.statements.filter((s) => s.source !== 'skipped' && s.locks.length > 0);
  if (locked.length > 0) {
    lines.push('');
    for (const s of locked) {
      const tables = s.locks.filter((l) => l.kind === 'table');
      const strongest = tables.length > 0 ? tables : s.locks;
      const what = strongest.map((l) => `${lockName(l.mode)} on ${l.relation}`).join(', ');
      const ran = s.durationMs === null ? '' : `${seconds(s.durationMs)} on staging`;
      const how =
        s.source === 'documented'
          ? ` (documented for CONCURRENTLY, which cannot run in a transaction: checked statically; the plain form ran in ${ran})`
          : ` (in ${ran})`;
      lines.push(`lock  statement ${s.statement.index} (line ${s.statement.line}) ${oneLine(s.statement.text, 70)}`);
      lines.push(`  takes ${what}${how}${s.rewrote.length > 0 ? `; rewrote ${s.rewrote.join(', ')}` : ''}`);
      for (const b of s.blocked) {
        if (b.shapes.length === 0) continue;
        lines.push(
          `  ${plural(b.shapes.length, 'shape')} ${b.shapes.length === 1 ? 'touches' : 'touch'} ${b.table}${b.callsPerS === null ? '' : ` at ${formatRate(b.callsPerS)} calls/s`} in production and would queue behind it`,
        );
      }
    }
  }
  for (const f of report.locks.findings) {
    lines.push('');
    lines.push(`LOCK  statement ${f.statement} (line ${f.line}): ${f.message}`);
    lines.push(`  safer: ${f.safer}`);
  }

  const notChecked = report.results.filter((r) => r.verdict === 'not_checked');
  const warned = report.results.filter((r) => r.warning !== null && r.verdict !== 'not_checked');
  const typed = report.results.filter((r) => r.typedLiterals > 0 && r.verdict !== 'not_checked').length;
  const notes = [
    ...report.statements.filter((s) => s.note !== null).map((s) => `statement ${s.index} (line ${s.line}): ${s.note}`),
    ...report.notes,
    ...warned
      .slice(0, MAX_WARNING_LINES)
      .map((r) => `warning: ${r.shape.fingerprint} ${oneLine(r.shape.query, 60)}: ${r.warning}`),
    ...(warned.length > MAX_WARNING_LINES
      ? [
          `warning: ${warned.length - MAX_WARNING_LINES} more shapes whose production plan staging cannot reproduce (see --format json)`,
        ]
      : []),
    ...(typed > 0
      ? [
          `${plural(typed, 'shape')} with typed literals (date $n, interval $n...) planned with parameters of those types`,
        ]
      : []),
    ...notChecked
      .slice(0, MAX_NOT_CHECKED_LINES)
      .map((r) => `not checked: ${r.shape.fingerprint} ${oneLine(r.shape.query, 60)}: ${r.error}`),
    ...(notChecked.length > MAX_NOT_CHECKED_LINES
      ? [`not checked: ${notChecked.length - MAX_NOT_CHECKED_LINES} more shapes (see --format json)`]
      : []),
    ...(report.ignored > 0
      ? [
          `${plural(report.ignored, 'shape')} of the workload ${report.ignored === 1 ? 'is' : 'are'} not explainable (DDL, SET...) and ${report.ignored === 1 ? 'was' : 'were'} not checked`,
        ]
      : []),
  ];
  if (notes.length > 0) {
    lines.push('');
    for (const note of notes) lines.push(note.startsWith('warning: ') ? note : `note: ${note}`);
  }
  return `${lines.join('\n')}\n`;
}

export function reportJson(report: CheckReport, migrationName: string, failOn: readonly FailOn[] = ['regression']) {
  const count = (verdict: ShapeResult['verdict']) => report.results.filter((r) => r.verdict === verdict).length;
  const planJson = (p: PlanSummary | null) =>
    p === null
      ? null
      : { fingerprint: p.fingerprint, plan: p.nodes.map((n) => n.description), total_cost: p.totalCost };
  const fail = failures(report, failOn);
  return {
    format: CHECK_FORMAT,
    result: count('regression') > 0 ? 'regression' : 'clean',
    failed: fail.failed,
    fail_on: failOn,
    failures: { regression: fail.regression, lock: fail.lock, not_checked: fail.not_checked },
    database: report.database,
    server_version: report.serverVersion,
    cost_ratio_threshold: report.costRatio,
    planning: { explain_role: report.planning.role, user_functions: report.planning.userFunctions },
    migration: {
      file: migrationName,
      statements: report.statements.map((s) => ({
        index: s.index,
        line: s.line,
        ran: s.run !== null,
        rewritten: s.run !== null && s.run !== s.text,
        note: s.note,
      })),
    },
    summary: {
      shapes: report.results.length,
      regressions: count('regression'),
      changed: count('changed'),
      unchanged: count('unchanged'),
      not_checked: count('not_checked'),
      not_explainable: report.ignored,
      lock_findings: report.locks.findings.length,
    },
    notes: report.notes,
    shapes: report.results.map((r) => ({
      fingerprint: r.shape.fingerprint,
      query: r.shape.query,
      command: r.shape.command,
      calls: r.shape.calls,
      calls_per_s: r.shape.calls_per_s,
      total_ms: r.shape.total_ms,
      p95_ms: r.shape.p95_ms,
      verdict: r.verdict,
      plan_mode: r.mode,
      plan_mode_detail: r.modeDetail,
      reproduces_production: r.reproduced,
      production:
        r.shape.plan_fingerprint === null
          ? null
          : { fingerprint: r.shape.plan_fingerprint, plan: r.shape.plan, total_cost: r.shape.plan_cost },
      headline: r.diff?.headline ?? null,
      removed: r.diff?.removed ?? [],
      added: r.diff?.added ?? [],
      before: planJson(r.before),
      after: planJson(r.after),
      cost_ratio: r.costRatio === null || !Number.isFinite(r.costRatio) ? null : round(r.costRatio),
      error: r.error,
      warning: r.warning,
      typed_literals: r.typedLiterals,
      sample: r.sample,
    })),
    locks: {
      statements: report.locks.statements.map((s) => ({
        index: s.statement.index,
        line: s.statement.line,
        text: s.statement.text,
        source: s.source,
        duration_ms: s.durationMs === null ? null : round(s.durationMs),
        locks: s.locks.map((l) => ({ relation: l.relation, kind: l.kind, mode: l.mode, lock: lockName(l.mode) })),
        rewrote: s.rewrote,
        blocked: s.blocked.map((b) => ({
          table: b.table,
          mode: b.mode,
          shapes: b.shapes.map((x) => x.fingerprint),
          calls_per_s: b.callsPerS === null ? null : round(b.callsPerS),
          touching: b.touching,
        })),
      })),
      findings: report.locks.findings,
    },
  };
}

function oneLine(query: string, max = 160): string {
  const text = query.replace(/\s+/g, ' ').trim();
  return text.length > max ? `${text.slice(0, max - 3)}...` : text;
}

function ms(value: number): string {
  return `${value < 10 ? value.toFixed(2) : value.toFixed(0)} ms`;
}

function cost(p: PlanSummary): string {
  return p.totalCost.toFixed(2);
}

function ratio(value: number | null): string {
  if (value === null) return '?';
  if (!Number.isFinite(value)) return 'from 0';
  return `${value >= 10 ? value.toFixed(0) : value.toFixed(2)}x`;
}

function round(value: number): number {
  return Math.round(value * 100) / 100;
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}
