// check-migration's engine: EXPLAIN every captured shape on a staging database,
// apply the migration inside one transaction, EXPLAIN them again in that same
// transaction, and roll back, always. Nothing is executed but the migration
// (EXPLAIN without ANALYZE only plans), nothing is left behind (the ROLLBACK
// runs on success, on error, and a timeout or Ctrl-C terminates the session,
// which rolls back too), and the session carries statement_timeout and
// lock_timeout of its own so a busy staging database cannot hold it forever.
//
// No false OK: a shape's verdict rests on the plan production used when staging
// can reproduce it (generic plan, captured samples, or values from staging's
// own pg_stats), says which plan mode it used, and warns when staging cannot;
// a production plan whose index the migration drops is a regression even then.
// While the migration runs, the locks each statement takes are read from
// pg_locks (locks.ts). Captured text is planned only as --explain-role, or if
// it calls nothing outside pg_catalog (privileges.ts).

import pg from 'pg';
import { explainableStatement } from '../plans/explain.ts';
import { diffPlans, summarizePlan, type PlanDiff, type PlanSummary } from '../plans/plan.ts';
import type { Workload, WorkloadShape } from './format.ts';
import { LockObserver, lockImpact, type LockImpact, type ShapeTouch, type StatementLocks } from './locks.ts';
import type { MigrationStatement } from './migration.ts';
import { vet } from './privileges.ts';
import { statsVariants } from './representative.ts';
import { analyzeStatement, type LockMode, type StatementAnalysis } from './statement.ts';

/** Commands EXPLAIN describes; other shapes (DDL, SET...) are not checked. */
export const EXPLAINABLE_COMMANDS = new Set([
  'SELECT',
  'INSERT',
  'UPDATE',
  'DELETE',
  'WITH',
  'VALUES',
  'TABLE',
  'MERGE',
]);
/** PostgreSQL 16 added EXPLAIN (GENERIC_PLAN). */
const GENERIC_PLAN_SINCE = 16;
const SAVEPOINT = 'pgw_check';
const PREPARED = 'pgw_check_analyze';

export interface CheckOptions {
  /** postgres:// URL of the staging database. */
  readonly databaseUrl: string;
  readonly workload: Workload;
  readonly migration: readonly MigrationStatement[];
  /** A changed plan whose cost grows by at least this factor is a regression. */
  readonly costRatio: number;
  /** The whole check, connection included. */
  readonly timeoutMs: number;
  readonly lockTimeoutMs: number;
  /** EXPLAINs run as this role (SET LOCAL ROLE); null: as the check's own role, for shapes that call only pg_catalog. */
  readonly explainRole?: string | null;
  /** Plan shapes calling functions or operators outside pg_catalog as the check's own role. */
  readonly allowUserFunctions?: boolean;
  /** An ACCESS EXCLUSIVE held at least this long on a hot table is flagged. */
  readonly longLockMs?: number;
  /** Aborting it (Ctrl-C) ends the check at once; the transaction is rolled back. */
  readonly signal?: AbortSignal;
}

export type Verdict = 'regression' | 'changed' | 'unchanged' | 'not_checked';

/**
 * How a verdict's plans were made: exact (the shape has no parameters), sample
 * (captured parameter values), generic (a generic plan), stats (a custom plan
 * with values from staging's pg_stats).
 */
export type PlanMode = 'exact' | 'sample' | 'generic' | 'stats';

export interface ShapeResult {
  readonly shape: WorkloadShape;
  readonly verdict: Verdict;
  readonly before: PlanSummary | null;
  /** Null when the shape no longer plans after the migration (see error) or was not checked. */
  readonly after: PlanSummary | null;
  readonly diff: PlanDiff | null;
  /** Total cost after / before; Infinity when the cost grew from 0. */
  readonly costRatio: number | null;
  /** Why it fails to plan after the migration (a regression), why it was not checked, or why production's plan is at risk. */
  readonly error: string | null;
  /** Which of the shape's sample parameter sets the result is for (0-based); null otherwise. */
  readonly sample: number | null;
  /** How the plans of this verdict were made; null when not checked. */
  readonly mode: PlanMode | null;
  /** For stats: which statistics the values came from (never the values). */
  readonly modeDetail: string | null;
  /** Whether staging's plan before the migration is the one production used; null when the workload has no production plan. */
  readonly reproduced: boolean | null;
  /** Something the reader must know about this verdict (staging cannot reproduce production's plan...). */
  readonly warning: string | null;
  /** Typed literals (`date $2`) planned as parameters of their type. */
  readonly typedLiterals: number;
}

export interface CheckReport {
  /** host:port/database, without credentials. */
  readonly database: string;
  readonly serverVersion: string;
  readonly costRatio: number;
  readonly statements: readonly MigrationStatement[];
  /** Explainable shapes, heaviest (total_ms) first. */
  readonly results: readonly ShapeResult[];
  /** Shapes of the workload whose command EXPLAIN does not describe. */
  readonly ignored: number;
  /** Things the reader should know about the check itself. */
  readonly notes: readonly string[];
  /** Locks per migration statement, crossed with the workload, and the outage patterns found. */
  readonly locks: LockImpact;
  /** Under which privileges captured SQL was planned. */
  readonly planning: { readonly role: string | null; readonly userFunctions: boolean };
}

/** Why the check could not run to its end; `kind` says whose problem it is. */
export class CheckError extends Error {
  constructor(
    message: string,
    readonly kind: 'connection' | 'migration' | 'timeout' | 'interrupted',
  ) {
    super(message);
  }
}

type Outcome = { readonly summary: PlanSummary } | { readonly error: string; readonly code?: string };

interface Variant {
  readonly mode: PlanMode;
  /** Values for $1..$n, or null: a generic plan (or no parameters at all). */
  readonly values: (string | null)[] | null;
  /** sample: its index; stats: the statistics used. */
  readonly sample: number | null;
  readonly detail: string | null;
}

interface Planned {
  readonly shape: WorkloadShape;
  readonly analysis: StatementAnalysis | null;
  /** The statement to EXPLAIN, or why there is none. */
  readonly statement: string | { readonly error: string };
  readonly paramCount: number;
  /** Base variants first; stats variants are added in the first phase when needed. */
  variants: Variant[];
  /** Why it is not planned at all (privileges); null when it is. */
  blocked: string | null;
  /** Production's plan's indexes, from the workload file. */
  readonly productionIndexes: readonly string[];
}

export async function checkMigration(options: CheckOptions): Promise<CheckReport> {
  const database = describeTarget(options.databaseUrl);
  const shapes = [...options.workload.shapes].sort((a, b) => b.total_ms - a.total_ms);
  const planned = shapes.filter((s) => EXPLAINABLE_COMMANDS.has(s.command.toUpperCase())).map(plan);
  const role = options.explainRole ?? null;
  const trusted = role !== null || options.allowUserFunctions === true;
  const client = new pg.Client({
    connectionString: options.databaseUrl,
    application_name: 'pgwarden-check-migration',
    statement_timeout: options.timeoutMs,
    lock_timeout: options.lockTimeoutMs,
    // If this process dies mid-check, the server ends the transaction by itself.
    idle_in_transaction_session_timeout: options.timeoutMs,
    connectionTimeoutMillis: Math.min(options.timeoutMs, 10_000),
  });
  client.on('error', () => undefined); // reported by the query that was running
  let notices: string[] | null = null;
  client.on('notice', (n) => {
    if (notices !== null && typeof n.message === 'string' && n.message.startsWith('rewritten parse tree'))
      notices.push(n.detail ?? '');
  });
  const guard = new Guard(client, options);
  try {
    try {
      await client.connect();
    } catch (error) {
      throw guard.reason ?? new CheckError(`cannot connect to ${database}: ${messageOf(error)}`, 'connection');
    }
    const run: Run = async <R extends pg.QueryResultRow>(
      sql: string,
      values?: unknown[],
    ): Promise<pg.QueryResult<R>> => {
      try {
        return await client.query<R>(sql, values);
      } catch (error) {
        throw guard.reason ?? error;
      }
    };
    const { rows } = await run<{ server_version: string; num: string }>(
      "select current_setting('server_version') as server_version, current_setting('server_version_num') as num",
    );
    const major = Math.floor(Number(rows[0].num) / 10_000);
    const explainer = new Explainer(run, major);
    const setRole = async () => {
      if (role === null) return;
      try {
        await run(`SET LOCAL ROLE ${quoteIdent(role)}`);
      } catch (error) {
        if (error instanceof CheckError) throw error;
        throw new CheckError(
          `cannot plan as --explain-role ${role}: ${messageOf(error)} (the check's role must be a member of it)`,
          'connection',
        );
      }
    };

    // Phase 1, read-only: analyze each shape, vet what it calls, plan it as it is today.
    const before: Outcome[][] = [];
    const indexesBefore = new Set<string>();
    await run('BEGIN READ ONLY');
    try {
      await setRole();
      await explainer.begin();
      for (const p of planned) {
        before.push(
          await firstPhase(p, {
            run,
            client,
            explainer,
            trusted,
            collect: async (fn) => {
              notices = [];
              try {
                await fn();
                return notices;
              } finally {
                notices = null;
              }
            },
          }),
        );
      }
      for (const name of await existingIndexes(run, planned)) indexesBefore.add(name);
    } finally {
      await rollback(run);
    }

    // Phase 2: the migration, its locks observed statement by statement, then the same plans again.
    const notes: string[] = [];
    const after: Outcome[][] = [];
    const observed: StatementLocks[] = [];
    let indexesAfter: Set<string>;
    await run('BEGIN');
    try {
      const observer = new LockObserver(run);
      await observer.start();
      for (const statement of options.migration) {
        observed.push(
          await observer.observe(statement, async () => {
            try {
              await run(statement.run!);
            } catch (error) {
              if (error instanceof CheckError) throw error;
              throw new CheckError(
                `the migration failed at statement ${statement.index} (line ${statement.line}): ${messageOf(error)}${hintFor(error)}; nothing was changed`,
                'migration',
              );
            }
          }),
        );
      }
      notes.push(...(await unusableIndexes(run)));
      indexesAfter = new Set(await existingIndexes(run, planned));
      await setRole();
      await explainer.begin();
      for (const p of planned) {
        const outcomes: Outcome[] = [];
        if (p.blocked === null && typeof p.statement === 'string') {
          for (const variant of p.variants) outcomes.push(await explainer.explain(p, p.statement, variant));
        }
        after.push(outcomes);
      }
    } finally {
      await rollback(run);
    }

    const dropped = new Set([...indexesBefore].filter((name) => !indexesAfter.has(name)));
    const results = planned.map((p, i) => judge(p, before[i], after[i], options.costRatio, dropped));
    const locks = lockImpact(observed, planned.map(touchOf), options.longLockMs ?? 1000);
    if (!trusted && results.some((r) => r.verdict === 'not_checked' && r.error?.startsWith(NOT_PLANNED))) {
      notes.push(
        "shapes that call functions or operators outside pg_catalog were not planned: planning can run them, and they would run as the check's role (give --explain-role ROLE to plan them as that role)",
      );
    }
    return {
      database,
      serverVersion: rows[0].server_version,
      costRatio: options.costRatio,
      statements: options.migration,
      results,
      ignored: shapes.length - planned.length,
      notes,
      locks,
      planning: { role, userFunctions: trusted },
    };
  } catch (error) {
    if (error instanceof CheckError) throw error;
    throw guard.reason ?? new CheckError(`the check failed on ${database}: ${messageOf(error)}`, 'connection');
  } finally {
    guard.dispose();
    await client.end().catch(() => undefined);
  }
}

const NOT_PLANNED = 'not planned';

/** What to EXPLAIN for a shape: its statement and its base variants (samples, or one generic plan). */
function plan(shape: WorkloadShape): Planned {
  const productionIndexes = indexesOf(shape.plan ?? []);
  let analysis: StatementAnalysis;
  try {
    analysis = analyzeStatement(explainableStatement(shape.query));
  } catch (error) {
    return {
      shape,
      analysis: null,
      statement: { error: messageOf(error) },
      paramCount: 0,
      variants: [],
      blocked: null,
      productionIndexes,
    };
  }
  const paramCount = analysis.paramCount;
  const samples = (shape.samples ?? []).filter((s) => s.length === paramCount);
  let variants: Variant[];
  if (paramCount === 0) variants = [{ mode: 'exact', values: null, sample: null, detail: null }];
  else if (samples.length > 0)
    variants = samples.map((values, i) => ({ mode: 'sample' as const, values, sample: i, detail: null }));
  else variants = [{ mode: 'generic', values: null, sample: null, detail: null }];
  return { shape, analysis, statement: analysis.text, paramCount, variants, blocked: null, productionIndexes };
}

interface PhaseContext {
  readonly run: Run;
  readonly client: pg.Client;
  readonly explainer: Explainer;
  readonly trusted: boolean;
  /** Runs fn and returns the rewritten query trees the server printed meanwhile. */
  readonly collect: (fn: () => Promise<void>) => Promise<string[]>;
}

/**
 * The first phase for one shape: PREPARE it (which analyzes and rewrites, and
 * plans nothing) to learn its parameter types and what it calls; unless
 * trusted, leave it unplanned if it calls anything outside pg_catalog; EXPLAIN
 * its base variants; and when they do not show production's plan (or there is
 * none to compare with and no sample), add custom plans with values from
 * pg_stats.
 */
async function firstPhase(p: Planned, ctx: PhaseContext): Promise<Outcome[]> {
  if (typeof p.statement !== 'string') return [{ error: p.statement.error }];
  const statement = p.statement;
  let types: string[] = [];
  let trees: string[] = [];
  try {
    const declared = await ctx.explainer.parameterTypes(p.shape.param_types ?? [], p.paramCount);
    const prepare = `PREPARE ${PREPARED}${p.paramCount > 0 ? ` (${declared.join(', ')})` : ''} AS ${statement}`;
    trees = await ctx.collect(async () => {
      await ctx.run(
        ctx.trusted
          ? prepare
          : `SET LOCAL debug_print_rewritten = on; SET LOCAL debug_pretty_print = off; SET LOCAL client_min_messages = log; ${prepare}; SET LOCAL debug_print_rewritten = off; SET LOCAL client_min_messages TO DEFAULT`,
      );
    });
    const { rows } = await ctx.run<{ types: string[] }>(
      'select parameter_types::text[] as types from pg_prepared_statements where name = $1',
      [PREPARED],
    );
    types = rows[0]?.types ?? [];
    await ctx.run(`DEALLOCATE ${PREPARED}`);
  } catch (error) {
    if (error instanceof CheckError) throw error;
    await ctx.explainer.recover();
    // Prepared statements outlive a rollback to the savepoint.
    await ctx.run('DEALLOCATE ALL');
    return p.variants.map(() => ({ error: messageOf(error) }));
  }
  if (!ctx.trusted) {
    const vetting = await vet(ctx.client, trees);
    if (!vetting.verified) {
      p.blocked = `${NOT_PLANNED}: this PostgreSQL does not show what the shape calls (15+ does), and planning could run a user function as the check's role; give --explain-role ROLE or --allow-user-functions`;
    } else if (vetting.outside.length > 0) {
      p.blocked = `${NOT_PLANNED}: it calls ${vetting.outside.slice(0, 3).join(', ')}${vetting.outside.length > 3 ? ` and ${vetting.outside.length - 3} more` : ''}, implemented outside pg_catalog, which planning could run as the check's role; give --explain-role ROLE (or --allow-user-functions)`;
    }
    if (p.blocked !== null) return [];
  }
  const outcomes: Outcome[] = [];
  for (const variant of p.variants) outcomes.push(await ctx.explainer.explain(p, statement, variant));
  const production = p.shape.plan_fingerprint;
  const matches = outcomes.some((o) => 'summary' in o && o.summary.fingerprint === production);
  const sampled = p.variants.some((v) => v.mode === 'sample');
  // Without samples, a generic plan can look like production's and still hide
  // the custom plans a skewed column gets (its estimates are an average): the
  // values from pg_stats are always tried then, and whenever staging's plans
  // are not production's.
  const wanted = p.paramCount > 0 && p.analysis !== null && (!sampled || (production !== null && !matches));
  if (wanted) {
    const variants = await statsVariants(ctx.client, p.analysis!, types).catch(async (error: unknown) => {
      if (error instanceof CheckError) throw error;
      await ctx.explainer.recover();
      return [];
    });
    for (const v of variants) {
      const variant: Variant = { mode: 'stats', values: v.values, sample: null, detail: v.label };
      p.variants.push(variant);
      outcomes.push(await ctx.explainer.explain(p, statement, variant));
    }
  }
  return outcomes;
}

/** Indexes named in a plan's node descriptions ("Index Scan using x on t", "Bitmap Index Scan on x"). */
function indexesOf(plan: readonly string[]): string[] {
  const out = new Set<string>();
  for (const line of plan) {
    const m = / using ("(?:[^"]|"")+"|\S+) on /.exec(line) ?? /^Bitmap Index Scan on ("(?:[^"]|"")+"|\S+)$/.exec(line);
    if (m !== null) out.add(m[1].startsWith('"') ? m[1].slice(1, -1).replaceAll('""', '"') : m[1]);
  }
  return [...out];
}

/** Of the indexes production's plans use, those that exist now. */
async function existingIndexes(run: Run, planned: readonly Planned[]): Promise<string[]> {
  const names = [...new Set(planned.flatMap((p) => p.productionIndexes))];
  if (names.length === 0) return [];
  const { rows } = await run<{ name: string }>(
    "select n as name from unnest($1::text[]) n where exists (select 1 from pg_class c where c.relname = n and c.relkind in ('i', 'I'))",
    [names],
  );
  return rows.map((r) => r.name);
}

/** A shape as the lock analysis sees it: the relations it touches and the lock it takes on each. */
function touchOf(p: Planned): ShapeTouch {
  const relations = new Map<string, LockMode>();
  for (const r of p.analysis?.relations ?? []) relations.set(r.name, r.lock);
  for (const name of p.shape.relations ?? []) if (!relations.has(name)) relations.set(name, 'AccessShareLock');
  return {
    fingerprint: p.shape.fingerprint,
    query: p.shape.query,
    callsPerS: p.shape.calls_per_s,
    calls: p.shape.calls,
    relations,
  };
}

type Run = <R extends pg.QueryResultRow>(sql: string, values?: unknown[]) => Promise<pg.QueryResult<R>>;

/**
 * Runs the EXPLAINs of one phase inside the open transaction. Each may fail
 * (after the migration, a dropped column makes a shape fail to plan), so they
 * run under a savepoint the transaction returns to after a failure.
 */
class Explainer {
  private prepared = 0;
  private readonly typeNames = new Map<number, string>();

  constructor(
    private readonly run: Run,
    private readonly major: number,
  ) {}

  async begin(): Promise<void> {
    // Before 16, a generic plan comes from a prepared statement under force_generic_plan.
    if (this.major < GENERIC_PLAN_SINCE) await this.run('SET LOCAL plan_cache_mode = force_generic_plan');
    await this.run(`SAVEPOINT ${SAVEPOINT}`);
  }

  /** Back to the savepoint after a failed statement. */
  async recover(): Promise<void> {
    await this.run(`ROLLBACK TO SAVEPOINT ${SAVEPOINT}`);
  }

  async explain(p: Planned, statement: string, variant: Variant): Promise<Outcome> {
    let name: string | null = null;
    try {
      let result: pg.QueryResult<{ 'QUERY PLAN': unknown }>;
      if (variant.values !== null) {
        result = await this.run(`EXPLAIN (FORMAT JSON) ${statement}`, variant.values);
      } else if (p.paramCount === 0) {
        result = await this.run(`EXPLAIN (FORMAT JSON) ${statement}`);
      } else if (this.major >= GENERIC_PLAN_SINCE) {
        result = await this.run(`EXPLAIN (FORMAT JSON, GENERIC_PLAN) ${statement}`);
      } else {
        // The generic plan does not depend on the values: NULLs will do.
        const types = await this.parameterTypes(p.shape.param_types ?? [], p.paramCount);
        const candidate = `pgw_check_${++this.prepared}`;
        await this.run(`PREPARE ${candidate} (${types.join(', ')}) AS ${statement}`);
        name = candidate;
        result = await this.run(
          `EXPLAIN (FORMAT JSON) EXECUTE ${name} (${new Array(p.paramCount).fill('NULL').join(', ')})`,
        );
      }
      const plan = result.rows[0]?.['QUERY PLAN'];
      if (plan === undefined) throw new Error('EXPLAIN returned no QUERY PLAN row');
      return { summary: summarizePlan(plan) };
    } catch (error) {
      if (error instanceof CheckError) throw error;
      // A busy database, not the shape: the check cannot vouch for anything then.
      const code = (error as { code?: unknown }).code;
      if (code === '55P03' || code === '57014')
        throw new CheckError(
          `explaining shape ${p.shape.fingerprint}: ${messageOf(error)}${hintFor(error)}`,
          'timeout',
        );
      await this.recover();
      return { error: messageOf(error), ...(typeof code === 'string' ? { code } : {}) };
    } finally {
      if (name !== null) await this.run(`DEALLOCATE ${name}`);
    }
  }

  /** Type names for PREPARE: the declared ones, "unknown" (inferred) for the rest. */
  async parameterTypes(declared: readonly number[], count: number): Promise<string[]> {
    const missing = [...new Set(declared.filter((oid) => oid !== 0 && !this.typeNames.has(oid)))];
    if (missing.length > 0) {
      const { rows } = await this.run<{ oid: number; name: string }>(
        'select oid::int as oid, format_type(oid, null) as name from pg_type where oid = any($1::oid[])',
        [missing],
      );
      for (const row of rows) this.typeNames.set(row.oid, row.name);
    }
    return Array.from({ length: count }, (_, i) => this.typeNames.get(declared[i] ?? 0) ?? 'unknown');
  }
}

function judge(
  p: Planned,
  before: Outcome[],
  after: Outcome[],
  threshold: number,
  dropped: ReadonlySet<string>,
): ShapeResult {
  const typedLiterals = p.analysis?.typedLiterals ?? 0;
  const base = {
    shape: p.shape,
    before: null,
    after: null,
    diff: null,
    costRatio: null,
    error: null,
    sample: null,
    mode: null,
    modeDetail: null,
    reproduced: null,
    warning: null,
    typedLiterals,
  };
  if (p.blocked !== null) return { ...base, verdict: 'not_checked', error: p.blocked };
  const production = p.shape.plan_fingerprint;
  const planned = before
    .map((b, i) => ({ b, i }))
    .filter((x): x is { b: { summary: PlanSummary }; i: number } => 'summary' in x.b);
  if (planned.length === 0) {
    const first = before.find((o) => 'error' in o) as { error: string } | undefined;
    return {
      ...base,
      verdict: 'not_checked',
      error: `does not plan before the migration: ${first?.error ?? 'nothing to explain'}`,
    };
  }
  const reproducing = production === null ? [] : planned.filter((x) => x.b.summary.fingerprint === production);
  const reproduced = production === null ? null : reproducing.length > 0;
  // Production's plan speaks when staging reproduces it; otherwise every plan staging made does.
  const considered = reproducing.length > 0 ? reproducing : planned;
  const candidates: ShapeResult[] = [];
  for (const { b, i } of considered) {
    const variant = p.variants[i];
    const common = {
      ...base,
      before: b.summary,
      sample: variant.sample,
      mode: variant.mode,
      modeDetail: variant.detail,
      reproduced,
    };
    const a = after[i];
    if (a === undefined) continue;
    if (!('summary' in a)) {
      if (a.code === '42501') {
        candidates.push({
          ...common,
          verdict: 'not_checked',
          error: `cannot be planned after the migration as the explain role: ${a.error}`,
        });
        continue;
      }
      candidates.push({ ...common, verdict: 'regression', error: a.error });
      continue;
    }
    const ratio = costRatio(b.summary.totalCost, a.summary.totalCost);
    const changed = b.summary.fingerprint !== a.summary.fingerprint;
    const verdict: Verdict = changed && ratio >= threshold ? 'regression' : changed ? 'changed' : 'unchanged';
    candidates.push({
      ...common,
      verdict,
      after: a.summary,
      diff: changed ? diffPlans(b.summary, a.summary) : null,
      costRatio: ratio,
    });
  }
  if (candidates.length === 0) return { ...base, verdict: 'not_checked', error: 'no plan after the migration' };
  // The worst variant speaks for the shape: failing to plan, then the largest cost growth.
  const rank = (r: ShapeResult) =>
    r.verdict === 'regression' ? 3 : r.verdict === 'changed' ? 2 : r.verdict === 'unchanged' ? 1 : 0;
  let worst = candidates.reduce((w, r) => {
    if (rank(r) !== rank(w)) return rank(r) > rank(w) ? r : w;
    if (w.after === null) return w;
    if (r.after === null) return r;
    return (r.costRatio ?? 0) > (w.costRatio ?? 0) ? r : w;
  });
  if (reproduced === false) {
    const productionPlan = (p.shape.plan ?? []).join(' / ');
    const lost = p.productionIndexes.filter((name) => dropped.has(name));
    const warning = `staging cannot reproduce production's plan (${productionPlan || p.shape.plan_fingerprint}) with any plan mode; the verdict rests on staging's own plans`;
    if (lost.length > 0 && worst.verdict !== 'regression') {
      worst = {
        ...worst,
        verdict: 'regression',
        error: `production's plan uses ${lost.join(', ')}, which the migration drops; staging cannot reproduce that plan, so the cost of losing it is not measured`,
      };
    }
    worst = { ...worst, warning };
  }
  return worst;
}

function costRatio(before: number, after: number): number {
  if (before > 0) return after / before;
  return after > 0 ? Infinity : 1;
}

function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

/**
 * Indexes the migration built on tables with broken HOT chains are marked
 * indcheckxmin, and the planner ignores them in the transaction that built
 * them: plans that would use them look worse here than they will in production.
 */
async function unusableIndexes(run: Run): Promise<string[]> {
  const { rows } = await run<{ name: string }>(
    `select i.indexrelid::regclass::text as name from pg_index i
      where i.indcheckxmin and i.xmin::text = (txid_current() % 4294967296)::text`,
  );
  return rows.map(
    (r) =>
      `index ${r.name} is not usable by the planner inside the check's transaction (indcheckxmin: its table has HOT-updated rows); shapes that would use it may be reported worse than they will be`,
  );
}

async function rollback(run: Run): Promise<void> {
  // If the session is gone, so is its transaction: the server rolled it back.
  await run('ROLLBACK').catch(() => undefined);
}

/**
 * The whole check's deadline and Ctrl-C: either terminates the check's backend
 * (from a second connection), which aborts whatever it runs and rolls the
 * transaction back at once, then closes the connection.
 */
class Guard {
  reason: CheckError | null = null;
  private readonly timer: NodeJS.Timeout;
  private readonly onAbort = () =>
    this.stop(new CheckError('interrupted; the transaction was rolled back, nothing was changed', 'interrupted'));

  constructor(
    private readonly client: pg.Client,
    private readonly options: CheckOptions,
  ) {
    this.timer = setTimeout(
      () =>
        this.stop(
          new CheckError(
            `the check did not finish within ${options.timeoutMs / 1000} s (--timeout); it was stopped and rolled back, nothing was changed`,
            'timeout',
          ),
        ),
      options.timeoutMs,
    );
    if (options.signal?.aborted) this.onAbort();
    else options.signal?.addEventListener('abort', this.onAbort, { once: true });
  }

  dispose(): void {
    clearTimeout(this.timer);
    this.options.signal?.removeEventListener('abort', this.onAbort);
  }

  private stop(reason: CheckError): void {
    if (this.reason !== null) return;
    this.reason = reason;
    void this.terminate();
  }

  private async terminate(): Promise<void> {
    const pid = (this.client as unknown as { processID: number | null }).processID;
    if (pid !== null) {
      const killer = new pg.Client({
        connectionString: this.options.databaseUrl,
        application_name: 'pgwarden-check-migration',
        connectionTimeoutMillis: 3000,
        statement_timeout: 3000,
      });
      killer.on('error', () => undefined);
      try {
        await killer.connect();
        await killer.query('select pg_terminate_backend($1)', [pid]);
      } catch {
        // Closing the connection below still ends the session, once the server notices.
      } finally {
        await killer.end().catch(() => undefined);
      }
    }
    await this.client.end().catch(() => undefined);
  }
}

function hintFor(error: unknown): string {
  const code = (error as { code?: unknown }).code;
  if (code === '55P03') return ' (--lock-timeout: the table is locked by another session)';
  if (code === '57014') return ' (--timeout)';
  return '';
}

function messageOf(error: unknown): string {
  const e = error as { message?: unknown; code?: unknown; errors?: unknown[] };
  // Connection failures to several addresses (localhost: ::1 and 127.0.0.1) come as an AggregateError.
  if (error instanceof AggregateError && error.errors.length > 0) return messageOf(error.errors[0]);
  const text = typeof e?.message === 'string' && e.message !== '' ? e.message : String(e?.code ?? error);
  return text.split('\n')[0];
}

/** host:port/database from a postgres:// URL, without credentials. */
export function describeTarget(url: string): string {
  try {
    const u = new URL(url);
    const db = decodeURIComponent(u.pathname.replace(/^\//, '')) || decodeURIComponent(u.username) || 'postgres';
    return `${u.hostname || 'localhost'}:${u.port || 5432}/${db}`;
  } catch {
    return 'the database';
  }
}
