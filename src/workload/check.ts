// check-migration's engine: EXPLAIN every captured shape on a staging database,
// apply the migration inside one transaction, EXPLAIN them again in that same
// transaction, and roll back, always. Nothing is executed but the migration
// (EXPLAIN without ANALYZE only plans), nothing is left behind (the ROLLBACK
// runs on success, on error, and a timeout or Ctrl-C terminates the session,
// which rolls back too), and the session carries statement_timeout and
// lock_timeout of its own so a busy staging database cannot hold it forever.

import pg from 'pg';
import { explainableStatement } from '../plans/explain.ts';
import { diffPlans, summarizePlan, type PlanDiff, type PlanSummary } from '../plans/plan.ts';
import type { Workload, WorkloadShape } from './format.ts';
import type { MigrationStatement } from './migration.ts';
import { parameterCount } from './values.ts';

/** Commands EXPLAIN describes; other shapes (DDL, SET...) are not checked. */
export const EXPLAINABLE_COMMANDS = new Set(['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'WITH', 'VALUES', 'TABLE', 'MERGE']);
/** PostgreSQL 16 added EXPLAIN (GENERIC_PLAN). */
const GENERIC_PLAN_SINCE = 16;
const SAVEPOINT = 'pgw_check';

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
  /** Aborting it (Ctrl-C) ends the check at once; the transaction is rolled back. */
  readonly signal?: AbortSignal;
}

export type Verdict = 'regression' | 'changed' | 'unchanged' | 'not_checked';

export interface ShapeResult {
  readonly shape: WorkloadShape;
  readonly verdict: Verdict;
  readonly before: PlanSummary | null;
  /** Null when the shape no longer plans after the migration (see error) or was not checked. */
  readonly after: PlanSummary | null;
  readonly diff: PlanDiff | null;
  /** Total cost after / before; Infinity when the cost grew from 0. */
  readonly costRatio: number | null;
  /** Why it fails to plan after the migration (a regression), or why it was not checked. */
  readonly error: string | null;
  /** Which of the shape's sample parameter sets the result is for (0-based); null: a generic plan, or no parameters. */
  readonly sample: number | null;
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

type Outcome = { readonly summary: PlanSummary } | { readonly error: string };

interface Variant {
  /** Values for $1..$n, or null: a generic plan (or no parameters at all). */
  readonly values: (string | null)[] | null;
}

interface Planned {
  readonly shape: WorkloadShape;
  /** The statement to EXPLAIN, or why there is none. */
  readonly statement: string | { readonly error: string };
  readonly paramCount: number;
  readonly variants: readonly Variant[];
}

export async function checkMigration(options: CheckOptions): Promise<CheckReport> {
  const database = describeTarget(options.databaseUrl);
  const shapes = [...options.workload.shapes].sort((a, b) => b.total_ms - a.total_ms);
  const planned = shapes.filter((s) => EXPLAINABLE_COMMANDS.has(s.command.toUpperCase())).map(plan);
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
  const guard = new Guard(client, options);
  try {
    try {
      await client.connect();
    } catch (error) {
      throw guard.reason ?? new CheckError(`cannot connect to ${database}: ${messageOf(error)}`, 'connection');
    }
    const run = async <R extends pg.QueryResultRow>(sql: string, values?: unknown[]): Promise<pg.QueryResult<R>> => {
      try {
        return await client.query<R>(sql, values);
      } catch (error) {
        throw guard.reason ?? error;
      }
    };
    const { rows } = await run<{ server_version: string; num: string }>("select current_setting('server_version') as server_version, current_setting('server_version_num') as num");
    const major = Math.floor(Number(rows[0].num) / 10_000);
    const explainer = new Explainer(run, major);

    await run('BEGIN READ ONLY');
    let before: Outcome[][];
    try {
      before = await explainer.all(planned);
    } finally {
      await rollback(run);
    }

    const notes: string[] = [];
    let after: Outcome[][];
    await run('BEGIN');
    try {
      for (const statement of options.migration) {
        if (statement.run === null) continue;
        try {
          await run(statement.run);
        } catch (error) {
          if (error instanceof CheckError) throw error;
          throw new CheckError(`the migration failed at statement ${statement.index} (line ${statement.line}): ${messageOf(error)}${hintFor(error)}; nothing was changed`, 'migration');
        }
      }
      notes.push(...(await unusableIndexes(run)));
      after = await explainer.all(planned);
    } finally {
      await rollback(run);
    }

    const results = planned.map((p, i) => judge(p, before[i], after[i], options.costRatio));
    return { database, serverVersion: rows[0].server_version, costRatio: options.costRatio, statements: options.migration, results, ignored: shapes.length - planned.length, notes };
  } catch (error) {
    if (error instanceof CheckError) throw error;
    throw guard.reason ?? new CheckError(`the check failed on ${database}: ${messageOf(error)}`, 'connection');
  } finally {
    guard.dispose();
    await client.end().catch(() => undefined);
  }
}

/** What to EXPLAIN for a shape: its statement and one variant per sample (or one generic plan). */
function plan(shape: WorkloadShape): Planned {
  let statement: Planned['statement'];
  let paramCount = 0;
  try {
    statement = explainableStatement(shape.query);
    paramCount = parameterCount(statement);
  } catch (error) {
    return { shape, statement: { error: messageOf(error) }, paramCount: 0, variants: [] };
  }
  const samples = (shape.samples ?? []).filter((s) => s.length === paramCount);
  const variants = paramCount > 0 && samples.length > 0 ? samples.map((values) => ({ values })) : [{ values: null }];
  return { shape, statement, paramCount, variants };
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

  async all(planned: readonly Planned[]): Promise<Outcome[][]> {
    // Before 16, a generic plan comes from a prepared statement under force_generic_plan.
    if (this.major < GENERIC_PLAN_SINCE) await this.run('SET LOCAL plan_cache_mode = force_generic_plan');
    await this.run(`SAVEPOINT ${SAVEPOINT}`);
    const out: Outcome[][] = [];
    for (const p of planned) {
      const outcomes: Outcome[] = [];
      if (typeof p.statement !== 'string') {
        outcomes.push({ error: p.statement.error });
      } else {
        for (const variant of p.variants) outcomes.push(await this.explain(p, p.statement, variant));
      }
      out.push(outcomes);
    }
    return out;
  }

  private async explain(p: Planned, statement: string, variant: Variant): Promise<Outcome> {
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
        result = await this.run(`EXPLAIN (FORMAT JSON) EXECUTE ${name} (${new Array(p.paramCount).fill('NULL').join(', ')})`);
      }
      const plan = result.rows[0]?.['QUERY PLAN'];
      if (plan === undefined) throw new Error('EXPLAIN returned no QUERY PLAN row');
      return { summary: summarizePlan(plan) };
    } catch (error) {
      if (error instanceof CheckError) throw error;
      // A busy database, not the shape: the check cannot vouch for anything then.
      const code = (error as { code?: unknown }).code;
      if (code === '55P03' || code === '57014') throw new CheckError(`explaining shape ${p.shape.fingerprint}: ${messageOf(error)}${hintFor(error)}`, 'timeout');
      await this.run(`ROLLBACK TO SAVEPOINT ${SAVEPOINT}`);
      return { error: messageOf(error) };
    } finally {
      if (name !== null) await this.run(`DEALLOCATE ${name}`);
    }
  }

  /** Type names for PREPARE: the declared ones, "unknown" (inferred) for the rest. */
  private async parameterTypes(declared: readonly number[], count: number): Promise<string[]> {
    const missing = [...new Set(declared.filter((oid) => oid !== 0 && !this.typeNames.has(oid)))];
    if (missing.length > 0) {
      const { rows } = await this.run<{ oid: number; name: string }>('select oid::int as oid, format_type(oid, null) as name from pg_type where oid = any($1::oid[])', [missing]);
      for (const row of rows) this.typeNames.set(row.oid, row.name);
    }
    return Array.from({ length: count }, (_, i) => this.typeNames.get(declared[i] ?? 0) ?? 'unknown');
  }
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
    (r) => `index ${r.name} is not usable by the planner inside the check's transaction (indcheckxmin: its table has HOT-updated rows); shapes that would use it may be reported worse than they will be`,
  );
}

function judge(p: Planned, before: Outcome[], after: Outcome[], threshold: number): ShapeResult {
  const base = { shape: p.shape, before: null, after: null, diff: null, costRatio: null, error: null, sample: null };
  const sampleOf = (i: number) => (p.variants[i]?.values === null || p.variants[i] === undefined ? null : i);
  const candidates: ShapeResult[] = [];
  for (let i = 0; i < before.length; i++) {
    const b = before[i];
    if (!('summary' in b)) continue;
    const a = after[i];
    if (!('summary' in a)) {
      candidates.push({ ...base, verdict: 'regression', before: b.summary, error: a.error, sample: sampleOf(i) });
      continue;
    }
    const ratio = costRatio(b.summary.totalCost, a.summary.totalCost);
    const changed = b.summary.fingerprint !== a.summary.fingerprint;
    const verdict: Verdict = changed && ratio >= threshold ? 'regression' : changed ? 'changed' : 'unchanged';
    candidates.push({ ...base, verdict, before: b.summary, after: a.summary, diff: changed ? diffPlans(b.summary, a.summary) : null, costRatio: ratio, sample: sampleOf(i) });
  }
  if (candidates.length === 0) {
    const first = before.find((o) => 'error' in o) as { error: string } | undefined;
    return { ...base, verdict: 'not_checked', error: `does not plan before the migration: ${first?.error ?? 'nothing to explain'}` };
  }
  // The worst variant speaks for the shape: failing to plan, then the largest cost growth.
  const rank = (r: ShapeResult) => (r.verdict === 'regression' ? 2 : r.verdict === 'changed' ? 1 : 0);
  return candidates.reduce((worst, r) => {
    if (rank(r) !== rank(worst)) return rank(r) > rank(worst) ? r : worst;
    if (worst.after === null) return worst;
    if (r.after === null) return r;
    return (r.costRatio ?? 0) > (worst.costRatio ?? 0) ? r : worst;
  });
}

function costRatio(before: number, after: number): number {
  if (before > 0) return after / before;
  return after > 0 ? Infinity : 1;
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
  private readonly onAbort = () => this.stop(new CheckError('interrupted; the transaction was rolled back, nothing was changed', 'interrupted'));

  constructor(
    private readonly client: pg.Client,
    private readonly options: CheckOptions,
  ) {
    this.timer = setTimeout(
      () => this.stop(new CheckError(`the check did not finish within ${options.timeoutMs / 1000} s (--timeout); it was stopped and rolled back, nothing was changed`, 'timeout')),
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
      const killer = new pg.Client({ connectionString: this.options.databaseUrl, application_name: 'pgwarden-check-migration', connectionTimeoutMillis: 3000, statement_timeout: 3000 });
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
