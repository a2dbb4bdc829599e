// A migration file as check-migration runs it: split into statements by the
// parser (not by semicolons: bodies of functions, strings and comments hold
// those too), each turned into a form that can run inside the one transaction
// the check rolls back. CONCURRENTLY variants run in their plain form (same
// resulting schema, stronger locks, which a staging database can afford);
// VACUUM becomes the ANALYZE it implies, if any; transaction control is
// skipped, since a COMMIT in the migration would make its changes permanent.

import { parseSync, scanSync, type ScanToken } from 'libpg-query';

export interface MigrationStatement {
  /** 1-based position in the file. */
  readonly index: number;
  /** 1-based line where the statement starts. */
  readonly line: number;
  /** The statement as written. */
  readonly text: string;
  /** What runs in the check's transaction; null when it is skipped. */
  readonly run: string | null;
  /** Why it runs differently or not at all; null when it runs as written. */
  readonly note: string | null;
  /** The parse node's type (IndexStmt, AlterTableStmt, VariableSetStmt...). */
  readonly type: string;
  /** A CONCURRENTLY form, which runs in its plain form here: its locks are the documented ones, not observed. */
  readonly concurrently: boolean;
  /** ALTER TABLE subcommands (AT_AddColumn, AT_AlterColumnType...), for the safer form of a long lock. */
  readonly alterations: readonly string[];
  /** Sets lock_timeout to a non-zero value (SET or SET LOCAL). */
  readonly setsLockTimeout: boolean;
}

/** A migration that does not parse; `line` is where the parser stopped. */
export class MigrationSyntaxError extends Error {
  constructor(
    message: string,
    readonly line: number | null,
  ) {
    super(message);
  }
}

type Node = Record<string, unknown>;

/** Parses a migration into statements with their transactional forms. Needs loadParser() first. */
export function parseMigration(sql: string): MigrationStatement[] {
  const bytes = Buffer.from(sql);
  let stmts: { stmt?: Node; stmt_location?: number; stmt_len?: number }[];
  try {
    stmts = parseSync(sql).stmts ?? [];
  } catch (error) {
    const position = (error as { sqlDetails?: { cursorPosition?: number } }).sqlDetails?.cursorPosition;
    const line = typeof position === 'number' && position >= 0 ? lineAt(bytes, Math.min(position, bytes.length)) : null;
    throw new MigrationSyntaxError((error as Error).message, line);
  }
  return stmts.map((s, i) => {
    const start = s.stmt_location ?? 0;
    const end = s.stmt_len ? start + s.stmt_len : bytes.length;
    const raw = bytes.toString('utf8', start, end);
    const lead = raw.length - raw.trimStart().length;
    const text = raw.trim();
    const textStart = start + Buffer.byteLength(raw.slice(0, lead));
    const [type, node] = Object.entries(s.stmt ?? {})[0] ?? ['', {}];
    const { run, note } = transactional(type, node as Node, text, textStart);
    const line = lineAt(bytes, textStart);
    const n = node as Node;
    const concurrently =
      n.concurrent === true ||
      (type === 'ReindexStmt' &&
        ((n.params as { DefElem?: Node }[] | undefined) ?? []).some((p) => p.DefElem?.defname === 'concurrently'));
    const alterations =
      type === 'AlterTableStmt'
        ? ((n.cmds as { AlterTableCmd?: Node }[] | undefined) ?? []).map((c) => String(c.AlterTableCmd?.subtype ?? ''))
        : [];
    return {
      index: i + 1,
      line,
      text,
      run,
      note,
      type,
      concurrently,
      alterations,
      setsLockTimeout: setsLockTimeout(type, n),
    };
  });
}

function setsLockTimeout(type: string, node: Node): boolean {
  if (type !== 'VariableSetStmt' || node.name !== 'lock_timeout' || node.kind !== 'VAR_SET_VALUE') return false;
  const value = defElemValue({ arg: (node.args as Node[] | undefined)?.[0] } as Node);
  return !/^0+(ms|s|min)?$/i.test(value.trim());
}

function lineAt(bytes: Buffer, offset: number): number {
  let line = 1;
  for (let i = 0; i < offset; i++) if (bytes[i] === 0x0a) line++;
  return line;
}

const TRANSACTION_CONTROL = new Set([
  'TRANS_STMT_BEGIN',
  'TRANS_STMT_START',
  'TRANS_STMT_COMMIT',
  'TRANS_STMT_ROLLBACK',
  'TRANS_STMT_PREPARE',
  'TRANS_STMT_COMMIT_PREPARED',
  'TRANS_STMT_ROLLBACK_PREPARED',
]);

/** Statements PostgreSQL refuses inside a transaction block whatever their options. */
const NEVER_IN_TRANSACTION: Record<string, string> = {
  CreatedbStmt: 'CREATE DATABASE',
  DropdbStmt: 'DROP DATABASE',
  AlterSystemStmt: 'ALTER SYSTEM',
  CreateTableSpaceStmt: 'CREATE TABLESPACE',
  DropTableSpaceStmt: 'DROP TABLESPACE',
  CreateSubscriptionStmt: 'CREATE SUBSCRIPTION',
  DropSubscriptionStmt: 'DROP SUBSCRIPTION',
};

/** `textStart`: the statement's byte offset in the file, which parse tree locations count from. */
function transactional(
  type: string,
  node: Node,
  text: string,
  textStart: number,
): { run: string | null; note: string | null } {
  switch (type) {
    case 'TransactionStmt':
      if (TRANSACTION_CONTROL.has(String(node.kind))) {
        return {
          run: null,
          note: `skipped ${firstWords(text)}: the check runs the whole migration in one transaction of its own and rolls it back`,
        };
      }
      break;
    case 'IndexStmt':
      if (node.concurrent === true)
        return {
          run: withoutConcurrently(text),
          note: "CREATE INDEX CONCURRENTLY runs as CREATE INDEX inside the check's transaction",
        };
      break;
    case 'DropStmt':
      if (node.concurrent === true)
        return {
          run: withoutConcurrently(text),
          note: "DROP INDEX CONCURRENTLY runs as DROP INDEX inside the check's transaction",
        };
      break;
    case 'ReindexStmt': {
      const kind = String(node.kind);
      if (kind === 'REINDEX_OBJECT_SCHEMA' || kind === 'REINDEX_OBJECT_SYSTEM' || kind === 'REINDEX_OBJECT_DATABASE') {
        return {
          run: null,
          note: `skipped ${firstWords(text)}: it cannot run inside a transaction block (and rebuilding indexes does not change plans)`,
        };
      }
      const params = (node.params as { DefElem?: Node }[] | undefined) ?? [];
      if (params.some((p) => p.DefElem?.defname === 'concurrently')) {
        return {
          run: reindexWithoutConcurrently(text),
          note: "REINDEX ... CONCURRENTLY runs as REINDEX inside the check's transaction",
        };
      }
      break;
    }
    case 'VacuumStmt':
      return vacuum(node, text, textStart);
    case 'ClusterStmt':
      if (node.relation === undefined)
        return { run: null, note: 'skipped CLUSTER without a table: it cannot run inside a transaction block' };
      break;
    default:
      if (type in NEVER_IN_TRANSACTION)
        return { run: null, note: `skipped ${NEVER_IN_TRANSACTION[type]}: it cannot run inside a transaction block` };
  }
  return { run: text, note: null };
}

/**
 * VACUUM cannot run in a transaction block; the part that matters to plans, the
 * statistics of VACUUM ANALYZE, can: it runs as ANALYZE of the same tables.
 * ANALYZE itself runs as written.
 */
function vacuum(node: Node, text: string, textStart: number): { run: string | null; note: string | null } {
  if (node.is_vacuumcmd !== true) return { run: text, note: null };
  const options = ((node.options as { DefElem?: Node }[] | undefined) ?? [])
    .map((o) => o.DefElem)
    .filter((d): d is Node => d !== undefined);
  const analyze = options.find((d) => d.defname === 'analyze');
  const off = analyze !== undefined && /^(false|off|0|no)$/i.test(defElemValue(analyze));
  if (analyze === undefined || off) {
    return {
      run: null,
      note: 'skipped VACUUM: it cannot run inside a transaction block; its effect on the visibility map and page counts is not simulated',
    };
  }
  const rels = (node.rels as { VacuumRelation?: { relation?: { location?: number } } }[] | undefined) ?? [];
  const first = rels[0]?.VacuumRelation?.relation?.location;
  // The relation list is the statement's tail: "users (email), orders".
  const tables =
    first === undefined
      ? ''
      : ` ${Buffer.from(text)
          .toString('utf8', first - textStart)
          .trim()}`;
  return {
    run: `ANALYZE${tables}`,
    note: `VACUUM ANALYZE runs as ANALYZE${tables} inside the check's transaction (VACUUM cannot)`,
  };
}

function defElemValue(d: Node): string {
  const arg = d.arg as Record<string, Record<string, unknown>> | undefined;
  if (arg === undefined) return 'true';
  const constant = arg.A_Const ?? arg;
  for (const key of ['boolval', 'sval', 'ival']) {
    if (key in constant)
      return String(
        (constant[key] as Record<string, unknown>)?.[key] ?? (key === 'ival' ? 0 : key === 'boolval' ? false : ''),
      );
  }
  if ('String' in arg) return String(arg.String.sval ?? '');
  return 'true';
}

/** The statement without its CONCURRENTLY keyword (CREATE INDEX, DROP INDEX, REINDEX INDEX x). */
function withoutConcurrently(text: string): string {
  const bytes = Buffer.from(text);
  const token = scanSync(text).tokens.find((t) => isConcurrently(t));
  if (token === undefined) return text;
  return `${bytes.toString('utf8', 0, token.start).trimEnd()} ${bytes.toString('utf8', token.end).trimStart()}`;
}

/** REINDEX with CONCURRENTLY either as a keyword or in its (option, ...) list. */
function reindexWithoutConcurrently(text: string): string {
  const tokens = scanSync(text).tokens;
  const at = tokens.findIndex((t) => isConcurrently(t));
  if (at === -1) return text;
  if (tokens[1]?.text !== '(' || at > closingParen(tokens, 1)) return withoutConcurrently(text);
  // Rebuild the option list without the CONCURRENTLY option (and its value).
  const bytes = Buffer.from(text);
  const close = closingParen(tokens, 1);
  const options: string[] = [];
  let start = 2;
  for (let i = 2; i <= close; i++) {
    if (tokens[i].text === ',' || i === close) {
      if (i > start && !isConcurrently(tokens[start]))
        options.push(bytes.toString('utf8', tokens[start].start, tokens[i - 1].end));
      start = i + 1;
    }
  }
  const head = bytes.toString('utf8', 0, tokens[0].end);
  const tail = bytes.toString('utf8', tokens[close].end).trimStart();
  return options.length === 0 ? `${head} ${tail}` : `${head} (${options.join(', ')}) ${tail}`;
}

function closingParen(tokens: ScanToken[], open: number): number {
  let depth = 0;
  for (let i = open; i < tokens.length; i++) {
    if (tokens[i].text === '(') depth++;
    else if (tokens[i].text === ')' && --depth === 0) return i;
  }
  return tokens.length - 1;
}

function isConcurrently(t: ScanToken): boolean {
  return t.keywordName !== 'NO_KEYWORD' && t.text.toUpperCase() === 'CONCURRENTLY';
}

function firstWords(text: string): string {
  return text.split(/\s+/).slice(0, 2).join(' ').replace(/;$/, '').toUpperCase();
}
