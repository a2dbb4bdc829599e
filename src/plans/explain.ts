// Runs EXPLAIN for one sampled execution on the monitoring connection. EXPLAIN
// without ANALYZE plans and never executes, and we keep it that way three times
// over: only plain DML/query statements are accepted (one of them, no trailing
// second statement), ANALYZE is never asked for, and the EXPLAIN runs in a READ
// ONLY transaction that is always rolled back, so even a planner-time surprise
// (a mislabelled IMMUTABLE function that writes) cannot leave anything behind.
//
// Planning runs code (folded functions), so the statement is planned with the
// client's privileges, not the monitor's: inside that transaction the monitor
// becomes the session's role (SET LOCAL ROLE; it must be granted membership),
// and guard.ts refuses statements that could reach untrusted code. Becoming the
// role also makes the plan the application's: its per-role and per-database
// settings (pg_db_role_setting, which SET ROLE does not apply) and the session's
// own search_path and plan_cache_mode are applied with SET LOCAL semantics.
//
// Prepared statements: the server plans an execution of a prepared statement
// with its values (a custom plan) or once for any values (the generic plan).
// With plan_cache_mode = auto, the first five executions get custom plans; from
// the sixth, the generic plan is used when its cost is not above the average cost
// of the custom plans so far plus their planning (PostgreSQL's plancache.c). So
// the sixth execution of a statement may run a plan no plain EXPLAIN shows: for
// it, the sample is replayed on the monitor inside the same read-only
// transaction: PREPARE (with the parameter types declared in Parse), EXPLAIN
// EXECUTE with the values of the statement's first five executions (EXPLAIN
// EXECUTE goes through the plan cache, building custom plans and counting them,
// without executing), then EXPLAIN EXECUTE with the sampled values, whose plan
// is the one the server picks; pg_prepared_statements (14+) tells which kind it
// was. Approximations, said in the result's `reason`: the average custom cost
// is recomputed with today's statistics; custom plans the server built after the
// fifth are not replayed; when the first executions' values were not seen (a
// statement prepared before pgwarden, a worker's sample), the sampled values
// stand in for them. A prepared statement outlives ROLLBACK: it is deallocated
// afterwards, and a connection where that fails is not returned to the pool.

import type pg from 'pg';
import { assertPlanTimeCodeTrusted, planTimeReferences } from './guard.ts';
import type { MonitorPool } from './monitor.ts';

export { NotSampled } from './guard.ts';

export interface ExplainSample {
  readonly database: string;
  /** The session's role: the statement is planned as it (or under the stricter rule if the monitor cannot become it). */
  readonly user: string;
  /** Session-level settings to plan with (search_path, plan_cache_mode...), applied in order after the role's own. */
  readonly settings?: readonly (readonly [string, string])[];
  /** The statement text, with $n placeholders for extended-protocol statements. */
  readonly text: string;
  /** That execution's parameters as text; null when they could not be rendered. */
  readonly params: (string | null)[] | null;
  readonly paramCount: number;
  /** Which Bind of its prepared statement the execution was (1-based; 0 or absent: unknown or a simple Query). */
  readonly execution?: number;
  /** Parameter type OIDs declared in Parse (0: inferred). */
  readonly paramTypes?: readonly number[];
  /** The values of the statement's first executions (up to five), when seen: what the server based its choice on. */
  readonly firstValues?: readonly (readonly (string | null)[])[] | null;
}

/** Which plan a prepared statement's execution gets: planned for its values, or once for all. */
export type PlanKind = 'custom' | 'generic';

export interface Explained {
  /** EXPLAIN (FORMAT JSON, VERBOSE)'s QUERY PLAN column. */
  readonly plan: unknown;
  /** null: not a statement with parameters (a simple Query, none bound), or not known. */
  readonly kind: PlanKind | null;
  /** Why this kind, in one line ("execution 12: the server's choice, replayed..."). */
  readonly reason: string | null;
  /** plan_cache_mode as the session has it. */
  readonly planCacheMode: string;
}

/** PostgreSQL 14 added generic_plans and custom_plans to pg_prepared_statements. */
const PLAN_COUNTS_SINCE = 14;
/** Executions that get custom plans before the server considers the generic one (plancache.c). */
export const CUSTOM_PLANS_FIRST = 5;
/** Distinct statement names for the replays: one counter per process is enough. */
let replays = 0;

/** First keywords of statements EXPLAIN accepts and we are willing to explain. */
const EXPLAINABLE = new Set(['select', 'insert', 'update', 'delete', 'with', 'values', 'table', 'merge']);

/** PostgreSQL 16 added EXPLAIN (GENERIC_PLAN): a plan for $n placeholders without values. */
const GENERIC_PLAN_SINCE = 16;

/**
 * `EXPLAIN (FORMAT JSON, VERBOSE)` of the sample, as node-postgres returns the
 * QUERY PLAN column (an array holding one object with "Plan"). See explainExecution.
 */
export async function explainSample(
  monitor: MonitorPool,
  sample: ExplainSample,
  serverMajorVersion: number,
): Promise<unknown> {
  return (await explainExecution(monitor, sample, serverMajorVersion)).plan;
}

/**
 * The plan of the sampled execution and which kind it is. Parameters are sent as
 * text and typed by the server's inference from the statement (or the types
 * declared in Parse, for a replayed prepared statement).
 */
export async function explainExecution(
  monitor: MonitorPool,
  sample: ExplainSample,
  serverMajorVersion: number,
): Promise<Explained> {
  const statement = explainableStatement(sample.text);
  let sql: string;
  let values: (string | null)[] = [];
  if (sample.params !== null) {
    sql = `EXPLAIN (FORMAT JSON, VERBOSE) ${statement}`;
    values = sample.params;
  } else if (sample.paramCount === 0) {
    sql = `EXPLAIN (FORMAT JSON, VERBOSE) ${statement}`;
  } else if (serverMajorVersion >= GENERIC_PLAN_SINCE) {
    sql = `EXPLAIN (FORMAT JSON, VERBOSE, GENERIC_PLAN) ${statement}`;
  } else {
    throw new Error(
      `cannot EXPLAIN this sample: its ${sample.paramCount} parameter(s) could not be rendered as text ` +
        `and PostgreSQL ${serverMajorVersion} has no GENERIC_PLAN (16+)`,
    );
  }

  const refs = await planTimeReferences(statement);
  const client = await monitor.connect(sample.database);
  let broken: Error | undefined;
  let prepared: string | null = null;
  try {
    await client.query('BEGIN READ ONLY');
    try {
      const asSessionRole = await becomeSessionRole(client, sample.user);
      // Before anything is planned, the replay included: it plans the same statement.
      await assertPlanTimeCodeTrusted(client, refs, asSessionRole);
      await applySessionSettings(client, sample.user, sample.settings ?? []);
      const planCacheMode = await currentPlanCacheMode(client);
      const choice = planChoice(sample, values, planCacheMode);
      if (choice.replay === null) {
        const result = await client.query<{ 'QUERY PLAN': unknown }>(sql, values);
        const plan = result.rows[0]?.['QUERY PLAN'];
        if (plan === undefined) throw new Error('EXPLAIN returned no QUERY PLAN row');
        return { plan, kind: choice.kind, reason: choice.reason, planCacheMode };
      }
      prepared = `pgwarden_replay_${process.pid}_${++replays}`;
      const name = prepared;
      await client.query(`PREPARE ${name}${await declaredTypes(client, sample.paramTypes ?? [])} AS ${statement}`);
      const execute = (params: readonly (string | null)[]) =>
        `EXPLAIN (FORMAT JSON, VERBOSE) EXECUTE ${name}(${params.map(literal).join(', ')})`;
      for (const params of choice.replay) await client.query(execute(params));
      const counts = serverMajorVersion >= PLAN_COUNTS_SINCE;
      const before = counts ? await planCounts(client, name) : null;
      const result = await client.query<{ 'QUERY PLAN': unknown }>(execute(values));
      const plan = result.rows[0]?.['QUERY PLAN'];
      if (plan === undefined) throw new Error('EXPLAIN EXECUTE returned no QUERY PLAN row');
      if (before === null) {
        const kind = planCacheMode === 'force_generic_plan' ? 'generic' : null;
        return {
          plan,
          kind,
          reason: `${choice.reason}; PostgreSQL ${serverMajorVersion} does not say which plan EXECUTE used (14+)`,
          planCacheMode,
        };
      }
      const after = await planCounts(client, name);
      const kind = after.generic > before.generic ? 'generic' : 'custom';
      return { plan, kind, reason: choice.reason, planCacheMode };
    } finally {
      await client.query('ROLLBACK').catch((error: Error) => {
        // A client whose ROLLBACK failed may still hold the transaction: it must
        // not go back to the pool.
        broken = error;
      });
    }
  } catch (error) {
    broken ??= isConnectionError(error) ? (error as Error) : undefined;
    throw error;
  } finally {
    if (prepared !== null && broken === undefined) {
      // PREPARE is not undone by ROLLBACK: a pooled connection must not keep it.
      await client.query(`DEALLOCATE ${prepared}`).catch((error: Error) => {
        broken = error;
      });
    }
    client.release(broken ?? false);
  }
}

interface PlanChoice {
  /** Values to EXPLAIN EXECUTE before the sample's own (the executions the server counted); null: plain EXPLAIN. */
  readonly replay: readonly (readonly (string | null)[])[] | null;
  /** The kind when plain EXPLAIN decides it (custom, or none without parameters). */
  readonly kind: PlanKind | null;
  readonly reason: string | null;
}

/**
 * How the server would choose this execution's plan, from plan_cache_mode and the
 * execution's number (choose_custom_plan() in plancache.c): a plain EXPLAIN with
 * the values when the plan is certainly custom, a replay otherwise.
 */
export function planChoice(
  sample: ExplainSample,
  values: readonly (string | null)[],
  planCacheMode: string,
): PlanChoice {
  const n = sample.execution ?? 0;
  // No values bound (a simple Query, no parameters, or values that could not be rendered).
  if (values.length === 0 || sample.paramCount === 0) return { replay: null, kind: null, reason: null };
  if (planCacheMode === 'force_custom_plan')
    return { replay: null, kind: 'custom', reason: 'plan_cache_mode = force_custom_plan' };
  if (planCacheMode === 'force_generic_plan')
    return { replay: [], kind: 'generic', reason: 'plan_cache_mode = force_generic_plan' };
  if (n <= CUSTOM_PLANS_FIRST) {
    const which = n === 0 ? 'an execution of unknown number' : `execution ${n}`;
    return {
      replay: null,
      kind: 'custom',
      reason: `${which}: the first ${CUSTOM_PLANS_FIRST} executions of a prepared statement get custom plans`,
    };
  }
  const seen = (sample.firstValues ?? []).slice(0, CUSTOM_PLANS_FIRST);
  const replay = [...seen];
  while (replay.length < CUSTOM_PLANS_FIRST) replay.push(values);
  const from =
    seen.length === CUSTOM_PLANS_FIRST
      ? `with the values of its first ${CUSTOM_PLANS_FIRST} executions`
      : seen.length === 0
        ? `with this execution's values standing in for its first ${CUSTOM_PLANS_FIRST} (not seen)`
        : `with the values of its first ${seen.length} executions and this one's for the rest (not seen)`;
  return {
    replay,
    kind: null,
    reason: `execution ${n}: the server's choice between its custom and generic plan, replayed ${from}`,
  };
}

/** plan_cache_mode as now applied (the role's, the database's, the session's). */
async function currentPlanCacheMode(client: pg.ClientBase): Promise<string> {
  const { rows } = await client.query<{ mode: string }>("select current_setting('plan_cache_mode') as mode");
  return rows[0]?.mode ?? 'auto';
}

/** "(integer, unknown)" for the OIDs Parse declared (0: inferred); "" when none was. */
async function declaredTypes(client: pg.ClientBase, oids: readonly number[]): Promise<string> {
  if (!oids.some((oid) => oid !== 0)) return '';
  const { rows } = await client.query<{ name: string }>(
    "select case when t = 0 then 'unknown' else format_type(t, null) end as name from unnest($1::oid[]) with ordinality u(t, o) order by o",
    [oids],
  );
  return `(${rows.map((r) => r.name).join(', ')})`;
}

/** A value as an escape-string literal: read the same whatever standard_conforming_strings says. */
function literal(value: string | null): string {
  if (value === null) return 'NULL';
  return `E'${value.replace(/\\/g, '\\\\').replace(/'/g, "\\'")}'`;
}

async function planCounts(client: pg.ClientBase, name: string): Promise<{ generic: number; custom: number }> {
  const { rows } = await client.query<{ generic: string; custom: string }>(
    'select generic_plans as generic, custom_plans as custom from pg_prepared_statements where name = $1',
    [name],
  );
  if (rows.length === 0) throw new Error(`prepared statement ${name} vanished during its replay`);
  return { generic: Number(rows[0].generic), custom: Number(rows[0].custom) };
}

/**
 * SET LOCAL ROLE to the session's role, inside the open transaction; false when
 * the monitoring role may not (not a member), leaving the transaction usable.
 */
async function becomeSessionRole(client: pg.ClientBase, user: string): Promise<boolean> {
  await client.query('SAVEPOINT pgwarden_role');
  try {
    // set_config('role') is SET ROLE with the name as a parameter: no quoting to get wrong.
    await client.query("select set_config('role', $1, true)", [user]);
    return true;
  } catch (error) {
    if (isConnectionError(error)) throw error;
    await client.query('ROLLBACK TO SAVEPOINT pgwarden_role');
    return false;
  }
}

/**
 * Settings a session of `user` runs with, in the order PostgreSQL applies them
 * (later wins): ALTER ROLE ALL, ALTER DATABASE, ALTER ROLE, ALTER ROLE IN DATABASE,
 * then the session's own ($2, $3). Only settings a user may set are kept, so a
 * superuser-only one (log_statement) stays as it is instead of failing the sample,
 * and the monitor's own timeouts and read-only transaction are never overridden.
 */
const SESSION_SETTINGS_SQL = `
select s.name, s.value from (
  select lower(split_part(u.cfg, '=', 1)) as name, substr(u.cfg, strpos(u.cfg, '=') + 1) as value,
         (d.setdatabase <> 0)::int + 2 * (d.setrole <> 0)::int as rank, u.ord
  from pg_db_role_setting d cross join lateral unnest(d.setconfig) with ordinality u(cfg, ord)
  where d.setdatabase in (0, (select oid from pg_database where datname = current_database()))
    and d.setrole in (0, (select oid from pg_roles where rolname = $1))
  union all
  select lower(x.name), x.value, 4, x.ord from unnest($2::text[], $3::text[]) with ordinality x(name, value, ord)
) s join pg_settings p on p.name = s.name and p.context = 'user'
where s.name not in ('statement_timeout', 'lock_timeout', 'idle_in_transaction_session_timeout', 'transaction_timeout',
                     'default_transaction_read_only', 'transaction_read_only', 'role', 'session_authorization')
order by s.rank, s.ord`;

/** Applies, for this transaction only, the settings the session's plans are made with. */
async function applySessionSettings(
  client: pg.ClientBase,
  user: string,
  session: readonly (readonly [string, string])[],
): Promise<void> {
  const { rows } = await client.query<{ name: string; value: string }>({
    name: 'pgwarden_session_settings',
    text: SESSION_SETTINGS_SQL,
    values: [user, session.map(([name]) => name), session.map(([, value]) => value)],
  });
  if (rows.length === 0) return;
  await client.query(
    'select set_config(s.name, s.value, true) from unnest($1::text[], $2::text[]) with ordinality s(name, value, ord)',
    [rows.map((r) => r.name), rows.map((r) => r.value)],
  );
}

/**
 * The statement without a trailing semicolon, or an Error saying why it is not
 * something to EXPLAIN: not a SELECT/INSERT/UPDATE/DELETE/WITH/VALUES/TABLE/MERGE,
 * or more than one statement.
 */
export function explainableStatement(text: string): string {
  const first = skipInsignificant(text, 0, true);
  const word = /^[A-Za-z_][\w$]*/.exec(text.slice(first, first + 64))?.[0].toLowerCase();
  if (first >= text.length) throw new Error('refusing to EXPLAIN an empty statement');
  if (word === undefined || !EXPLAINABLE.has(word)) {
    const what = word === undefined ? JSON.stringify(text.slice(first, first + 20)) : word.toUpperCase();
    throw new Error(
      `refusing to EXPLAIN ${what}: only a single SELECT, INSERT, UPDATE, DELETE, WITH, VALUES, TABLE or MERGE statement is explained`,
    );
  }
  const end = statementEnd(text, first);
  if (end === text.length) return text;
  // Past the semicolon only whitespace, comments and more semicolons may follow.
  for (let i = end; ; i++) {
    i = skipInsignificant(text, i, false);
    if (i >= text.length) return text.slice(0, end);
    if (text[i] !== ';') throw new Error('refusing to EXPLAIN more than one statement');
  }
}

/** Index of the first character at or after i that is not whitespace or a comment (nor "(" if asked). */
function skipInsignificant(text: string, i: number, parentheses: boolean): number {
  while (i < text.length) {
    const c = text[i];
    if (c === '-' && text[i + 1] === '-') {
      const eol = text.indexOf('\n', i);
      i = eol === -1 ? text.length : eol + 1;
    } else if (c === '/' && text[i + 1] === '*') {
      i = skipBlockComment(text, i);
    } else if (/\s/.test(c) || (parentheses && c === '(')) {
      i++;
    } else {
      return i;
    }
  }
  return i;
}

/**
 * Index of the first top-level semicolon from i (text.length if none): a small
 * lexer, just enough to tell a semicolon that ends a statement from one inside
 * a string, quoted identifier, dollar quote or comment.
 */
function statementEnd(text: string, i: number): number {
  const n = text.length;
  while (i < n) {
    const c = text[i];
    if (c === ';') return i;
    if ((c === '-' && text[i + 1] === '-') || (c === '/' && text[i + 1] === '*')) {
      i = skipInsignificant(text, i, false);
    } else if (c === "'") {
      // E'...' strings honour backslash escapes; plain ones only '' (standard_conforming_strings).
      const escapes = i > 0 && /[eE]/.test(text[i - 1]) && (i < 2 || !/[\w$]/.test(text[i - 2]));
      i = skipQuoted(text, i, "'", escapes);
    } else if (c === '"') {
      i = skipQuoted(text, i, '"', false);
    } else if (c === '$' && (i === 0 || !/[\w$]/.test(text[i - 1]))) {
      // $$...$$ or $tag$...$tag$; a bare $1 is a parameter.
      const tag = /^\$(?:[A-Za-z_\u0080-\uffff][\w\u0080-\uffff]*)?\$/.exec(text.slice(i, i + 256));
      if (tag === null) {
        i++;
      } else {
        const close = text.indexOf(tag[0], i + tag[0].length);
        i = close === -1 ? n : close + tag[0].length;
      }
    } else {
      i++;
    }
  }
  return n;
}

function skipBlockComment(text: string, start: number): number {
  // Block comments nest in PostgreSQL.
  let depth = 0;
  let i = start;
  while (i < text.length) {
    if (text[i] === '/' && text[i + 1] === '*') {
      depth++;
      i += 2;
    } else if (text[i] === '*' && text[i + 1] === '/') {
      depth--;
      i += 2;
      if (depth === 0) return i;
    } else {
      i++;
    }
  }
  return text.length;
}

function skipQuoted(text: string, start: number, quote: string, backslashEscapes: boolean): number {
  let i = start + 1;
  while (i < text.length) {
    const c = text[i];
    if (backslashEscapes && c === '\\') {
      i += 2;
    } else if (c === quote) {
      if (text[i + 1] === quote) i += 2;
      else return i + 1;
    } else {
      i++;
    }
  }
  return text.length;
}

function isConnectionError(error: unknown): boolean {
  // Server errors carry a SQLSTATE; anything else (ECONNRESET, "Connection
  // terminated") means the session itself is gone.
  const code = (error as { code?: unknown } | null)?.code;
  return !(typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code));
}
