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
}

/** First keywords of statements EXPLAIN accepts and we are willing to explain. */
const EXPLAINABLE = new Set(['select', 'insert', 'update', 'delete', 'with', 'values', 'table', 'merge']);

/** PostgreSQL 16 added EXPLAIN (GENERIC_PLAN): a plan for $n placeholders without values. */
const GENERIC_PLAN_SINCE = 16;

/**
 * `EXPLAIN (FORMAT JSON)` of the sample, as node-postgres returns the QUERY PLAN
 * column (an array holding one object with "Plan"). Parameters are sent as text
 * and typed by the server's inference from the statement.
 */
export async function explainSample(
  monitor: MonitorPool,
  sample: ExplainSample,
  serverMajorVersion: number,
): Promise<unknown> {
  const statement = explainableStatement(sample.text);
  let sql: string;
  let values: (string | null)[] = [];
  if (sample.params !== null) {
    sql = `EXPLAIN (FORMAT JSON) ${statement}`;
    values = sample.params;
  } else if (sample.paramCount === 0) {
    sql = `EXPLAIN (FORMAT JSON) ${statement}`;
  } else if (serverMajorVersion >= GENERIC_PLAN_SINCE) {
    sql = `EXPLAIN (FORMAT JSON, GENERIC_PLAN) ${statement}`;
  } else {
    throw new Error(
      `cannot EXPLAIN this sample: its ${sample.paramCount} parameter(s) could not be rendered as text ` +
        `and PostgreSQL ${serverMajorVersion} has no GENERIC_PLAN (16+)`,
    );
  }

  const refs = await planTimeReferences(statement);
  const client = await monitor.connect(sample.database);
  let broken: Error | undefined;
  try {
    await client.query('BEGIN READ ONLY');
    try {
      const asSessionRole = await becomeSessionRole(client, sample.user);
      await assertPlanTimeCodeTrusted(client, refs, asSessionRole);
      await applySessionSettings(client, sample.user, sample.settings ?? []);
      if (values.length > 0 && serverMajorVersion >= GENERIC_PLAN_SINCE && (await forcesGenericPlan(client))) {
        // EXPLAIN with values always plans for those values; a session (or role)
        // with plan_cache_mode = force_generic_plan runs the generic plan instead.
        sql = `EXPLAIN (FORMAT JSON, GENERIC_PLAN) ${statement}`;
        values = [];
      }
      const result = await client.query<{ 'QUERY PLAN': unknown }>(sql, values);
      const plan = result.rows[0]?.['QUERY PLAN'];
      if (plan === undefined) throw new Error('EXPLAIN returned no QUERY PLAN row');
      return plan;
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
    client.release(broken ?? false);
  }
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

/** Whether plan_cache_mode, as now applied, makes prepared statements use their generic plan. */
async function forcesGenericPlan(client: pg.ClientBase): Promise<boolean> {
  const { rows } = await client.query<{ mode: string }>("select current_setting('plan_cache_mode') as mode");
  return rows[0]?.mode === 'force_generic_plan';
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
