// Runs EXPLAIN for one sampled execution on the monitoring connection. EXPLAIN
// without ANALYZE plans and never executes, and we keep it that way three times
// over: only plain DML/query statements are accepted (one of them, no trailing
// second statement), ANALYZE is never asked for, and the EXPLAIN runs in a READ
// ONLY transaction that is always rolled back, so even a planner-time surprise
// (a mislabelled IMMUTABLE function that writes) cannot leave anything behind.

import type { MonitorPool } from './monitor.ts';

export interface ExplainSample {
  readonly database: string;
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

  const client = await monitor.connect(sample.database);
  let broken: Error | undefined;
  try {
    await client.query('BEGIN READ ONLY');
    try {
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
