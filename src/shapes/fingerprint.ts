// Query shapes: libpg_query's fingerprint and normalized text for each statement
// a client runs. Parsing costs 6-300 us per text, so results are cached: DML by its
// literal-free key (see sqlscan.ts), everything else by exact text, prepared
// statements once per statement object. Text that does not parse, or is too long
// to be worth parsing, still gets a stable fallback shape.

import { createHash } from 'node:crypto';
import { fingerprintSync, loadModule, normalizeSync, parseSync } from 'libpg-query';
import { LRUCache } from 'lru-cache';
import type { PreparedStatement } from '../proxy/seam.ts';
import { displayKey, scanSql, type ScanResult } from './sqlscan.ts';

export interface StatementShape {
  /** libpg_query's fingerprint (16 hex digits), or 'u' + 15 hex digits for a fallback shape. */
  readonly fingerprint: string;
  /** Normalized text: constants replaced by $n (fallback: by ?). Never holds literal values. */
  readonly query: string;
  /** True when the text could not be parsed (or was over the size cap). */
  readonly fallback: boolean;
  /** The statement's first keyword, upper-cased (SELECT, INSERT, CREATE...). */
  readonly command: string;
  /** The parse tree's statement node (TransactionStmt, SelectStmt...); '' for a fallback shape. */
  readonly kind?: string;
  /**
   * A transaction-control or session statement (BEGIN, COMMIT, SET, FETCH...): one
   * that refusing would break the client's transaction or session rather than shed
   * load, so automatic mitigation never touches it. Absent means false.
   */
  readonly control?: boolean;
}

/**
 * Parse-tree statement kinds of transaction control and session state. Refusing
 * one fails the work around it (a refused COMMIT fails the whole transaction), so
 * they are never shed or blocked automatically, and manually only with force.
 */
export const CONTROL_KINDS: ReadonlySet<string> = new Set([
  'TransactionStmt', // BEGIN/START, COMMIT/END, ROLLBACK/ABORT, SAVEPOINT, RELEASE, PREPARE TRANSACTION, COMMIT/ROLLBACK PREPARED
  'VariableSetStmt', // SET, RESET, SET TRANSACTION
  'VariableShowStmt', // SHOW
  'DiscardStmt',
  'ListenStmt',
  'UnlistenStmt',
  'DeallocateStmt',
  'ClosePortalStmt', // CLOSE
  'FetchStmt', // FETCH, MOVE
]);

/**
 * First keywords of the same statements, for fallback shapes (no parse tree): a
 * text the parser rejects or that is too long to parse. Errs on the side of
 * calling a statement control (PREPARE may be PREPARE TRANSACTION).
 */
const CONTROL_WORDS: ReadonlySet<string> = new Set([
  'BEGIN',
  'START',
  'COMMIT',
  'END',
  'ROLLBACK',
  'ABORT',
  'SAVEPOINT',
  'RELEASE',
  'PREPARE',
  'SET',
  'RESET',
  'SHOW',
  'DISCARD',
  'LISTEN',
  'UNLISTEN',
  'DEALLOCATE',
  'CLOSE',
  'FETCH',
  'MOVE',
]);

export interface ShapeFinderOptions {
  /** Distinct texts (or literal-free keys) kept in each cache. */
  readonly cacheEntries: number;
  /**
   * Estimated bytes both caches hold at most, together (DEFAULT_CACHE_BYTES if
   * absent): an entry count alone does not bound memory when texts are long.
   */
  readonly cacheBytes?: number;
  /** Texts longer than this get a fallback shape without being parsed. */
  readonly maxTextBytes: number;
}

const FINGERPRINT = /^[0-9a-f]{16}$/;
/** Statements whose string and number literals are all plain constants (A_Const). */
const DML = new Set(['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'WITH', 'VALUES', 'TABLE', 'MERGE']);
/** Longest normalized text kept per shape. */
const MAX_QUERY_CHARS = 16 * 1024;

/** ShapeFinderOptions.cacheBytes when not given (the shape_cache_mb default). */
const DEFAULT_CACHE_BYTES = 16 * 1024 * 1024;
/** Estimated bytes of a shape object and of a cache entry around its key, besides the strings. */
const SHAPE_OVERHEAD_BYTES = 160;
const ENTRY_OVERHEAD_BYTES = 120;

/**
 * What a cache entry holds, estimated from its strings at two bytes a character
 * (V8 keeps ASCII in one, so this errs high): the key (the text itself, or its
 * literal-free key) and each shape's normalized text. Statements of one text share
 * nothing with another's, so the sum is what evicting the entry frees.
 */
function entryBytes(shapes: readonly StatementShape[], key: string): number {
  let bytes = ENTRY_OVERHEAD_BYTES + key.length * 2;
  for (const shape of shapes)
    bytes += SHAPE_OVERHEAD_BYTES + (shape.query.length + shape.fingerprint.length + shape.command.length) * 2;
  return bytes;
}

let loaded: Promise<void> | null = null;

/** Loads the libpg_query WebAssembly module once per process. */
export function loadParser(): Promise<void> {
  loaded ??= loadModule();
  return loaded;
}

export class ShapeFinder {
  private readonly byText: LRUCache<string, readonly StatementShape[]>;
  private readonly byKey: LRUCache<string, readonly StatementShape[]>;
  private readonly byStatement = new WeakMap<PreparedStatement, StatementShape>();
  private lastKey: string | null = null;
  private lastKeyShapes: readonly StatementShape[] = [];
  private lastText: string | null = null;
  private lastShapes: readonly StatementShape[] = [];

  private constructor(private readonly options: ShapeFinderOptions) {
    const maxSize = Math.max(1, Math.floor((options.cacheBytes ?? DEFAULT_CACHE_BYTES) / 2));
    this.byText = new LRUCache({ max: options.cacheEntries, maxSize, sizeCalculation: entryBytes });
    this.byKey = new LRUCache({ max: options.cacheEntries, maxSize, sizeCalculation: entryBytes });
  }

  static async create(options: ShapeFinderOptions): Promise<ShapeFinder> {
    await loadParser();
    return new ShapeFinder(options);
  }

  /** The shape of a prepared statement, computed once per Parse. */
  shapeOfStatement(statement: PreparedStatement): StatementShape {
    let shape = this.byStatement.get(statement);
    if (shape === undefined) {
      shape = this.shapesOfText(statement.text)[0];
      this.byStatement.set(statement, shape);
    }
    return shape;
  }

  /** One shape per statement of a (possibly multi-statement) text. */
  shapesOfText(text: string): readonly StatementShape[] {
    // The gate, the in-flight tracker and the collector each ask for the shapes of
    // the same statement in turn: the last answer spares them a scan each.
    if (text === this.lastText) return this.lastShapes;
    const shapes = this.find(text);
    if (text.length <= this.options.maxTextBytes) {
      // (A text over the cap is not kept alive for this.)
      this.lastText = text;
      this.lastShapes = shapes;
    }
    return shapes;
  }

  private find(text: string): readonly StatementShape[] {
    // UTF-8 takes at most 3 bytes per UTF-16 unit: short texts skip the count.
    if (text.length * 3 > this.options.maxTextBytes && Buffer.byteLength(text) > this.options.maxTextBytes) {
      return [fallbackShape(text.length > 65536 ? null : scanSql(text), text)];
    }
    const scan = scanSql(text);
    // Only single DML statements share shapes by key: their constants are plain
    // values that neither the fingerprint nor the normalized text depends on.
    const byKey = scan !== null && DML.has(scan.firstWord) && !scan.multiStatement && !scan.literalsMatter;
    if (byKey) {
      // Consecutive statements of one shape (pgbench's, an application's hot query)
      // compare their key with the last one's instead of a cache lookup.
      if (scan.key === this.lastKey) return this.lastKeyShapes;
      const cached = this.byKey.get(scan.key);
      if (cached !== undefined) {
        this.lastKey = scan.key;
        this.lastKeyShapes = cached;
        return cached;
      }
    }
    const exact = this.byText.get(text);
    if (exact !== undefined) return exact;
    const shapes = computeShapes(text, scan);
    // A text the parser rejects is cached only as itself: another text with the
    // same key may well parse.
    if (byKey && !shapes[0].fallback) this.byKey.set(scan.key, shapes);
    else this.byText.set(text, shapes);
    return shapes;
  }
}

function computeShapes(text: string, scan: ScanResult | null): readonly StatementShape[] {
  if (scan?.multiStatement) {
    const statements = splitStatements(text);
    if (statements !== null && statements.length > 1) return statements.map((s) => shapeOfSingle(s, scanSql(s)));
  }
  return [shapeOfSingle(text, scan)];
}

function shapeOfSingle(text: string, scan: ScanResult | null): StatementShape {
  let fingerprint: string;
  let query: string;
  try {
    // For some bad inputs libpg_query returns its error text instead of throwing.
    fingerprint = fingerprintSync(text);
    if (!FINGERPRINT.test(fingerprint)) return fallbackShape(scan, text);
    query = normalizeSync(text);
  } catch {
    return fallbackShape(scan, text);
  }
  // Parsed as if standard_conforming_strings were on; if it may be off, part of
  // what the parser took for code may be inside a string: show nothing of it.
  if (scan?.backslashQuote) query = withheld(text, scan);
  const kind = statementKind(text, scan);
  return {
    fingerprint,
    query: truncate(withoutComments(query)),
    fallback: false,
    command: scan?.firstWord ?? firstWordOf(query),
    kind,
    control: CONTROL_KINDS.has(kind),
  };
}

/** Parse-tree kinds of the DML first words (WITH is parsed: its statement comes later). */
const DML_KINDS: Readonly<Record<string, string>> = {
  SELECT: 'SelectStmt',
  VALUES: 'SelectStmt',
  TABLE: 'SelectStmt',
  INSERT: 'InsertStmt',
  UPDATE: 'UpdateStmt',
  DELETE: 'DeleteStmt',
  MERGE: 'MergeStmt',
};

/**
 * The statement node's type from the parse tree ('' if it cannot be had); runs once
 * per cached shape. A statement the scanner saw start with a DML keyword cannot be
 * transaction or session control, so its kind is named without a second parse
 * (which would add ~100 us to each new DML text, a 65% longer cache miss).
 */
function statementKind(text: string, scan: ScanResult | null): string {
  const dml = scan !== null && !scan.multiStatement ? DML_KINDS[scan.firstWord] : undefined;
  if (dml !== undefined) return dml;
  try {
    const stmt = (parseSync(text).stmts?.[0]?.stmt ?? {}) as Record<string, unknown>;
    return Object.keys(stmt)[0] ?? '';
  } catch {
    return '';
  }
}

/**
 * Splits a multi-statement text with the parser's statement locations, which are
 * UTF-8 byte offsets. Returns null when it does not parse (the whole text then
 * gets one fallback shape, as the server will reject it as a whole).
 */
function splitStatements(text: string): string[] | null {
  let stmts: { stmt_location?: number; stmt_len?: number }[];
  try {
    stmts = parseSync(text).stmts ?? [];
  } catch {
    return null;
  }
  const bytes = Buffer.from(text);
  return stmts.map((s) => {
    const start = s.stmt_location ?? 0;
    const end = s.stmt_len ? start + s.stmt_len : bytes.length;
    return bytes.toString('utf8', start, end).trim();
  });
}

/** A stable shape for text the parser rejects: keyed by its literal-free form. */
function fallbackShape(scan: ScanResult | null, text: string): StatementShape {
  const basis = scan?.key ?? text;
  const digest = createHash('sha256').update(basis).digest('hex');
  const shown = scan === null ? null : displayKey(scan);
  const query =
    shown !== null
      ? truncate(shown)
      : `${firstWordOf(text)} ... (unparsable statement of ${Buffer.byteLength(text)} bytes)`;
  const command = scan?.firstWord ?? firstWordOf(text);
  return {
    fingerprint: `u${digest.slice(0, 15)}`,
    query,
    fallback: true,
    command,
    kind: '',
    control: CONTROL_WORDS.has(command),
  };
}

/**
 * The normalized text without comments (libpg_query keeps them, and they may hold
 * values) and with any constant normalization missed blanked out.
 */
function withoutComments(normalized: string): string {
  const scan = scanSql(normalized);
  if (scan === null) return normalized.trim();
  // Whitespace stays as written: quoted identifiers may hold meaningful spaces.
  return displayKey(scan, false) ?? withheldText(normalized);
}

/** What is shown for a statement whose text cannot be shown without risking a value. */
function withheld(text: string, scan: ScanResult | null): string {
  return `${scan?.firstWord || firstWordOf(text)} ... (text withheld: a backslash before a closing quote makes its literals ambiguous)`;
}

function withheldText(text: string): string {
  return withheld(text, null);
}

function firstWordOf(text: string): string {
  return /^\s*([A-Za-z_]+)/.exec(text)?.[1].toUpperCase() ?? '';
}

function truncate(query: string): string {
  return query.length > MAX_QUERY_CHARS ? `${query.slice(0, MAX_QUERY_CHARS)} ...` : query;
}
