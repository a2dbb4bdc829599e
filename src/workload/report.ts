// check-migration's report: a summary line a reviewer reads first, then one
// block per shape whose plan changed (or that stopped planning), heaviest
// shapes first; and the same as JSON for CI.

import { describePlan, type PlanSummary } from '../plans/plan.ts';
import type { CheckReport, ShapeResult } from './check.ts';

export const CHECK_FORMAT = 'pgwarden-check-migration/1';
/** Shapes listed by name among those that could not be checked; the rest are counted. */
const MAX_NOT_CHECKED_LINES = 10;

export function regressions(report: CheckReport): ShapeResult[] {
  return report.results.filter((r) => r.verdict === 'regression');
}

export function renderText(report: CheckReport, migrationName: string): string {
  const count = (verdict: ShapeResult['verdict']) => report.results.filter((r) => r.verdict === verdict).length;
  const regressed = count('regression');
  const checked = report.results.length - count('not_checked');
  const ran = report.statements.filter((s) => s.run !== null).length;
  const lines: string[] = [];
  const verdict = regressed > 0 ? `REGRESSION: ${regressed} of ${checked} shapes regressed` : `OK: no regression in ${checked} shapes`;
  lines.push(
    `${verdict} (${plural(count('changed'), 'plan change')} under the ${report.costRatio}x cost threshold, ${count('unchanged')} unchanged, ${count('not_checked')} not checked) ` +
      `after ${migrationName} (${ran < report.statements.length ? `${ran} of ${report.statements.length} statements run` : plural(ran, 'statement')}), rolled back`,
  );
  lines.push(`  on ${report.database}, PostgreSQL ${report.serverVersion}; regression: a changed plan at least ${report.costRatio}x the cost, or a shape that no longer plans`);

  for (const r of report.results) {
    if (r.verdict !== 'regression' && r.verdict !== 'changed') continue;
    lines.push('');
    lines.push(`${r.verdict === 'regression' ? 'REGRESSION' : 'changed   '}  ${r.shape.fingerprint}  ${oneLine(r.shape.query)}`);
    lines.push(`  calls ${r.shape.calls}, p95 ${ms(r.shape.p95_ms)}, total ${ms(r.shape.total_ms)}${r.sample === null ? '' : `; with sample parameters #${r.sample + 1}`}`);
    if (r.after === null) {
      lines.push(`  ${describePlan(r.before!)} -> does not plan any more: ${r.error}`);
      continue;
    }
    lines.push(`  ${r.diff?.headline || `${describePlan(r.before!)} -> ${describePlan(r.after)}`}`);
    lines.push(`  cost ${cost(r.before!)} -> ${cost(r.after)} (${ratio(r.costRatio)})`);
  }

  const notChecked = report.results.filter((r) => r.verdict === 'not_checked');
  const notes = [
    ...report.statements.filter((s) => s.note !== null).map((s) => `statement ${s.index} (line ${s.line}): ${s.note}`),
    ...report.notes,
    ...notChecked.slice(0, MAX_NOT_CHECKED_LINES).map((r) => `not checked: ${r.shape.fingerprint} ${oneLine(r.shape.query, 60)}: ${r.error}`),
    ...(notChecked.length > MAX_NOT_CHECKED_LINES ? [`not checked: ${notChecked.length - MAX_NOT_CHECKED_LINES} more shapes (see --format json)`] : []),
    ...(report.ignored > 0 ? [`${plural(report.ignored, 'shape')} of the workload ${report.ignored === 1 ? 'is' : 'are'} not explainable (DDL, SET...) and ${report.ignored === 1 ? 'was' : 'were'} not checked`] : []),
  ];
  if (notes.length > 0) {
    lines.push('');
    for (const note of notes) lines.push(`note: ${note}`);
  }
  return `${lines.join('\n')}\n`;
}

export function reportJson(report: CheckReport, migrationName: string) {
  const count = (verdict: ShapeResult['verdict']) => report.results.filter((r) => r.verdict === verdict).length;
  const planJson = (p: PlanSummary | null) => (p === null ? null : { fingerprint: p.fingerprint, plan: p.nodes.map((n) => n.description), total_cost: p.totalCost });
  return {
    format: CHECK_FORMAT,
    result: count('regression') > 0 ? 'regression' : 'clean',
    database: report.database,
    server_version: report.serverVersion,
    cost_ratio_threshold: report.costRatio,
    migration: {
      file: migrationName,
      statements: report.statements.map((s) => ({ index: s.index, line: s.line, ran: s.run !== null, rewritten: s.run !== null && s.run !== s.text, note: s.note })),
    },
    summary: {
      shapes: report.results.length,
      regressions: count('regression'),
      changed: count('changed'),
      unchanged: count('unchanged'),
      not_checked: count('not_checked'),
      not_explainable: report.ignored,
    },
    notes: report.notes,
    shapes: report.results.map((r) => ({
      fingerprint: r.shape.fingerprint,
      query: r.shape.query,
      command: r.shape.command,
      calls: r.shape.calls,
      total_ms: r.shape.total_ms,
      p95_ms: r.shape.p95_ms,
      verdict: r.verdict,
      headline: r.diff?.headline ?? null,
      removed: r.diff?.removed ?? [],
      added: r.diff?.added ?? [],
      before: planJson(r.before),
      after: planJson(r.after),
      cost_ratio: r.costRatio === null || !Number.isFinite(r.costRatio) ? null : round(r.costRatio),
      error: r.error,
      sample: r.sample,
    })),
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
