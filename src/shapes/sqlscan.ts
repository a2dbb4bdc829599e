// A cheap lexical pass over SQL text that blanks out literal values (numbers,
// strings, dollar-quoted bodies) and drops comments. Two DML texts with the same
// result differ only in constants, which libpg_query's fingerprint and normalize
// both ignore, so the result is a sound cache key for them: the workload whose
// literals change on every query (pgbench's simple protocol, ORMs that inline
// values) costs one scan and one cache hit instead of a parse per query.

const QUOTE = 0x27; // '
const DQUOTE = 0x22; // "
const DOLLAR = 0x24; // $
const DASH = 0x2d; // -
const SLASH = 0x2f; // /
const STAR = 0x2a; // *
const BACKSLASH = 0x5c;
const DOT = 0x2e;
const NEWLINE = 0x0a;
const SEMICOLON = 0x3b;

/** Stands for one literal in a key; never appears in SQL text a client sends. */
export const LITERAL_MARK = '\u0001';

export interface ScanResult {
  /** The text with literals replaced by LITERAL_MARK and comments by a space. */
  readonly key: string;
  /** Whether more than one statement follows a top-level semicolon. */
  readonly multiStatement: boolean;
  /** The first keyword, upper-cased ('' when none). */
  readonly firstWord: string;
  /**
   * Whether a literal's content can decide if the text parses at all (E'' and U&''
   * escape strings, whose escapes may be invalid): such texts are not cached by key.
   */
  readonly literalsMatter: boolean;
  /**
   * A plain '...' string ends with a backslash before its closing quote: under
   * standard_conforming_strings=off that quote is escaped and the string goes on,
   * so what looks like code after it may be the inside of a literal.
   */
  readonly backslashQuote: boolean;
}

/**
 * Types whose modifiers are constants the parser checks (float(54) is an error,
 * float(53) is not): numbers in their parentheses stay in the key.
 */
/** A well-formed numeric literal (PostgreSQL 16+ forms included). */
const NUMBER =
  /^(?:0[xX][0-9a-fA-F]+(?:_[0-9a-fA-F]+)*|0[oO][0-7]+(?:_[0-7]+)*|0[bB][01]+(?:_[01]+)*|(?:\d+(?:_\d+)*)?(?:\.\d*)?(?:[eE][+-]?\d+)?)$/;

/** Keywords that end an ORDER BY / GROUP BY list, whose numbers are column positions. */
const END_OF_BY_LIST = new Set([
  'LIMIT',
  'OFFSET',
  'FETCH',
  'FOR',
  'HAVING',
  'WINDOW',
  'UNION',
  'INTERSECT',
  'EXCEPT',
  'RETURNING',
  'ON',
  'ROWS',
  'RANGE',
  'GROUPS',
]);

const TYPES_WITH_MODIFIERS = new Set([
  'FLOAT',
  'NUMERIC',
  'DECIMAL',
  'VARCHAR',
  'CHAR',
  'CHARACTER',
  'BIT',
  'VARBIT',
  'VARYING',
  'TIME',
  'TIMESTAMP',
  'TIMETZ',
  'TIMESTAMPTZ',
  'INTERVAL',
  'PRECISION',
]);

/** By lower-cased first letter: 1 where a word may be one of TYPES_WITH_MODIFIERS. */
const MAY_BE_TYPE = new Uint8Array(128);
for (const type of TYPES_WITH_MODIFIERS) MAY_BE_TYPE[type.toLowerCase().charCodeAt(0)] = 1;

function allDigits(text: string, start: number, end: number): boolean {
  for (let i = start; i < end; i++) if (!isDigit(text.charCodeAt(i))) return false;
  return true;
}

function isIdentChar(c: number): boolean {
  return (
    (c >= 0x61 && c <= 0x7a) ||
    (c >= 0x41 && c <= 0x5a) ||
    (c >= 0x30 && c <= 0x39) ||
    c === 0x5f ||
    c === DOLLAR ||
    c >= 0x80
  );
}

function isDigit(c: number): boolean {
  return c >= 0x30 && c <= 0x39;
}

function isSpace(c: number): boolean {
  return c === 0x20 || c === 0x09 || c === NEWLINE || c === 0x0d || c === 0x0c;
}

/**
 * Scans `text`; returns null when it cannot be sure where a literal ends (an
 * unterminated quote or comment), leaving the decision to the real parser.
 */
export function scanSql(text: string): ScanResult | null {
  const n = text.length;
  let out = '';
  let copyFrom = 0; // text[copyFrom, i) is still to be copied verbatim
  let i = 0;
  let sawSemicolon = false;
  let multiStatement = false;
  let firstWord = '';
  let literalsMatter = false;
  let backslashQuote = false;
  // Inside ORDER BY / GROUP BY a bare number is a column position, not a value.
  let inByList = false;

  const replace = (start: number, end: number, by: string) => {
    out += text.slice(copyFrom, start) + by;
    copyFrom = end;
  };

  while (i < n) {
    const c = text.charCodeAt(i);
    if (isSpace(c)) {
      i++;
      continue;
    }
    if (
      sawSemicolon &&
      c !== SEMICOLON &&
      !(c === DASH && text.charCodeAt(i + 1) === DASH) &&
      !(c === SLASH && text.charCodeAt(i + 1) === STAR)
    ) {
      multiStatement = true;
    }
    if (c === SEMICOLON || c === 0x29 /* ) */) inByList = false;
    if (c === SEMICOLON) {
      sawSemicolon = true;
      i++;
      continue;
    }
    if (c === DASH && text.charCodeAt(i + 1) === DASH) {
      let end = text.indexOf('\n', i + 2);
      if (end === -1) end = n;
      replace(i, end, ' ');
      i = end;
      continue;
    }
    if (c === SLASH && text.charCodeAt(i + 1) === STAR) {
      const end = skipBlockComment(text, i);
      if (end < 0) return null;
      replace(i, end, ' ');
      i = end;
      continue;
    }
    if (c === QUOTE) {
      const end = skipQuoted(text, i, false);
      if (end < 0) return null;
      if (text.charCodeAt(end - 2) === BACKSLASH) backslashQuote = true;
      replace(i, end, LITERAL_MARK);
      i = end;
      continue;
    }
    if (c === DQUOTE) {
      const end = skipQuotedIdentifier(text, i);
      if (end < 0) return null;
      i = end; // identifiers stay
      continue;
    }
    if (c === DOLLAR) {
      if (isDigit(text.charCodeAt(i + 1))) {
        // $n parameter reference: kept as it is.
        i++;
        while (i < n && isDigit(text.charCodeAt(i))) i++;
        continue;
      }
      const end = skipDollarQuoted(text, i);
      if (end === -2) return null;
      if (end > 0) {
        replace(i, end, LITERAL_MARK);
        i = end;
        continue;
      }
      i++;
      continue;
    }
    if (isDigit(c) || (c === DOT && isDigit(text.charCodeAt(i + 1)))) {
      const end = skipNumber(text, i);
      // A malformed number (0xZZ, 1__0, 1_) does not parse while a well-formed one
      // does: it stays in the key as written, like a column position in ORDER BY.
      // Plain digits (most numbers) are well-formed without the regular expression.
      const malformed =
        (end < n && isIdentChar(text.charCodeAt(end))) ||
        (!allDigits(text, i, end) && !NUMBER.test(text.slice(i, end)));
      if (!inByList && !malformed) replace(i, end, LITERAL_MARK);
      i = end;
      continue;
    }
    if (isIdentChar(c)) {
      const start = i;
      while (i < n && isIdentChar(text.charCodeAt(i))) i++;
      // Upper-cased only when it may be a keyword that matters here: most words are
      // names, and a string per name was most of the scan's garbage.
      const len = i - start;
      const word =
        len <= 11 && (firstWord === '' || len === 2 || inByList || MAY_BE_TYPE[c | 0x20] === 1)
          ? text.slice(start, i).toUpperCase()
          : '';
      if (firstWord === '' && !sawSemicolon) firstWord = word || text.slice(start, i).toUpperCase();
      if (word === 'BY') inByList = true;
      else if (END_OF_BY_LIST.has(word)) inByList = false;
      // E'...' takes backslash escapes; B'..', X'..', N'..' are plain: the prefix stays.
      if (i - start === 1 && text.charCodeAt(i) === QUOTE) {
        const escapes = c === 0x45 || c === 0x65;
        if (escapes) literalsMatter = true;
        const end = skipQuoted(text, i, escapes);
        if (end < 0) return null;
        if (!escapes && text.charCodeAt(end - 2) === BACKSLASH) backslashQuote = true;
        replace(i, end, LITERAL_MARK);
        i = end;
      } else if (TYPES_WITH_MODIFIERS.has(word)) {
        // Keep a type modifier such as (10,2) verbatim: it is checked by the parser.
        let j = i;
        while (j < n && isSpace(text.charCodeAt(j))) j++;
        if (text.charCodeAt(j) === 0x28) {
          const close = text.indexOf(')', j);
          if (close > 0 && /^\(\s*[0-9]+\s*(,\s*[0-9]+\s*)?\)$/.test(text.slice(j, close + 1))) i = close + 1;
        }
      }
      continue;
    }
    if (c === 0x26 /* & */ && text.charCodeAt(i + 1) === QUOTE) literalsMatter = true; // U&'...'
    i++; // operators and punctuation
  }
  out += text.slice(copyFrom);
  return { key: out, multiStatement, firstWord, literalsMatter, backslashQuote };
}

function skipQuoted(text: string, start: number, backslashEscapes: boolean): number {
  const n = text.length;
  let i = start + 1;
  while (i < n) {
    const c = text.charCodeAt(i);
    if (backslashEscapes && c === BACKSLASH) {
      i += 2;
      continue;
    }
    if (c === QUOTE) {
      if (text.charCodeAt(i + 1) === QUOTE) {
        i += 2;
        continue;
      }
      return i + 1;
    }
    i++;
  }
  return -1;
}

function skipQuotedIdentifier(text: string, start: number): number {
  let i = start + 1;
  for (;;) {
    const end = text.indexOf('"', i);
    if (end === -1) return -1;
    if (text.charCodeAt(end + 1) === DQUOTE) {
      i = end + 2;
      continue;
    }
    return end + 1;
  }
}

function skipBlockComment(text: string, start: number): number {
  // PostgreSQL block comments nest.
  let depth = 0;
  let i = start;
  const n = text.length;
  while (i < n) {
    if (text.charCodeAt(i) === SLASH && text.charCodeAt(i + 1) === STAR) {
      depth++;
      i += 2;
    } else if (text.charCodeAt(i) === STAR && text.charCodeAt(i + 1) === SLASH) {
      depth--;
      i += 2;
      if (depth === 0) return i;
    } else i++;
  }
  return -1;
}

/** End of a $tag$...$tag$ literal; 0 if this `$` does not open one; -2 if unterminated. */
function skipDollarQuoted(text: string, start: number): number {
  let i = start + 1;
  while (i < text.length && isIdentChar(text.charCodeAt(i)) && text.charCodeAt(i) !== DOLLAR) i++;
  if (text.charCodeAt(i) !== DOLLAR) return 0;
  const tag = text.slice(start, i + 1);
  const close = text.indexOf(tag, i + 1);
  return close === -1 ? -2 : close + tag.length;
}

function skipNumber(text: string, start: number): number {
  let i = start;
  const n = text.length;
  const radix = text.charCodeAt(i + 1) | 0x20;
  if (text.charCodeAt(i) === 0x30 && (radix === 0x78 || radix === 0x6f || radix === 0x62)) {
    // 0x hexadecimal, 0o octal, 0b binary (PostgreSQL 16+)
    i += 2;
    while (i < n && isIdentChar(text.charCodeAt(i)) && text.charCodeAt(i) !== DOLLAR) i++;
    return i;
  }
  while (i < n && (isDigit(text.charCodeAt(i)) || text.charCodeAt(i) === 0x5f)) i++;
  if (text.charCodeAt(i) === DOT && text.charCodeAt(i + 1) !== DOT) {
    i++;
    while (i < n && isDigit(text.charCodeAt(i))) i++;
  }
  if ((text.charCodeAt(i) | 0x20) === 0x65) {
    let j = i + 1;
    if (text.charCodeAt(j) === 0x2b || text.charCodeAt(j) === DASH) j++;
    if (isDigit(text.charCodeAt(j))) {
      i = j;
      while (i < n && isDigit(text.charCodeAt(i))) i++;
    }
  }
  return i;
}

/**
 * The text with every literal replaced by `?` and comments dropped, for showing
 * statements (DDL on the timeline) without the values they carry; null when the
 * text cannot be scanned.
 */
export function redactLiterals(text: string): string | null {
  const scan = scanSql(text);
  return scan === null ? null : displayKey(scan);
}

/**
 * A scan's key for display: literals as `?`, and null when the key could still
 * hold a value: a string whose end depends on standard_conforming_strings, or a
 * malformed number glued to a word (`4111111111111111as`), which stays in the key
 * for caching but is a value all the same.
 */
export function displayKey(scan: ScanResult, numbers = true): string | null {
  if (scan.backslashQuote) return null;
  const shown = scan.key.split(LITERAL_MARK).join('?');
  // Text the parser normalized has no values left in numbers (ORDER BY 1, varchar(10)).
  return (numbers ? shown.replace(/(^|[^\w$])\.?\d[\w$.]*/g, '$1?') : shown).trim();
}
