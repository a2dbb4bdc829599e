// The literal-free cache key (src/shapes/sqlscan.ts), without a database: which
// tokens are blanked, kept or dropped, how statements are counted, and the one
// property the key exists for: texts with the same key are the same shape to
// libpg_query, so caching a shape by key never changes what the parser would say.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { fingerprintSync, loadModule, normalizeSync } from 'libpg-query';
import { LITERAL_MARK, scanSql, type ScanResult } from '../../src/shapes/sqlscan.ts';

/** The key with each literal shown as `?`, so expectations read like SQL. */
function keyOf(text: string): string {
  const scan = scanSql(text);
  assert.ok(scan !== null, `expected ${JSON.stringify(text)} to scan`);
  return scan.key.split(LITERAL_MARK).join('?');
}

function scan(text: string): ScanResult {
  const result = scanSql(text);
  assert.ok(result !== null, `expected ${JSON.stringify(text)} to scan`);
  return result;
}

/** What libpg_query says about a text: its fingerprint and normalized form, or its error. */
function parserView(text: string): { fingerprint: string; normalized: string } {
  const attempt = (f: (t: string) => string) => {
    try {
      return f(text);
    } catch (err) {
      return `error: ${(err as Error).message}`;
    }
  };
  return { fingerprint: attempt(fingerprintSync), normalized: attempt(normalizeSync) };
}

/** Whether libpg_query accepts the text (for some errors it returns the message instead of throwing). */
function parses(text: string): boolean {
  try {
    return /^[0-9a-f]{16}$/.test(fingerprintSync(text));
  } catch {
    return false;
  }
}

describe('scanSql blanks literal values', { timeout: 10_000 }, () => {
  test('integers, decimals, exponents, hexadecimal and underscored numbers each become one literal', () => {
    assert.equal(keyOf('select 1, 1.5, .5, 1e-3, 2E+10, 0x1F, 1_000 from t'), 'select ?, ?, ?, ?, ?, ?, ? from t');
  });

  test('a string with doubled quotes inside is one literal', () => {
    assert.equal(keyOf("select 'it''s', '''' from t where a = 'x'"), 'select ?, ? from t where a = ?');
  });

  test("an E'' string with a backslash-escaped quote is one literal and keeps its prefix", () => {
    assert.equal(keyOf("select E'it\\'s', e'\\\\' from t"), 'select E?, e? from t');
  });

  test('a plain string ending in a backslash ends at its quote (standard_conforming_strings)', () => {
    assert.equal(keyOf("select 'C:\\' as path, 2"), 'select ? as path, ?');
  });

  test('dollar-quoted bodies, with or without a tag, are one literal whatever they contain', () => {
    assert.equal(keyOf("select $$it's -- not a comment; $$, $fn$ body $$ 'x' $fn$ from t"), 'select ?, ? from t');
  });

  test('a bit string keeps its B prefix and loses its digits', () => {
    assert.equal(keyOf("select B'0101', X'1F' from t"), 'select B?, X? from t');
  });
});

describe('scanSql keeps what is not a literal', { timeout: 10_000 }, () => {
  test('positional parameters are kept as they are', () => {
    assert.equal(keyOf('select * from t where a = $1 and b = $12'), 'select * from t where a = $1 and b = $12');
  });

  test('quoted identifiers, doubled quotes and digits inside included, are kept', () => {
    assert.equal(keyOf('select "col""1", "t 2".x from "t 2"'), 'select "col""1", "t 2".x from "t 2"');
  });

  test('identifiers containing digits are kept', () => {
    assert.equal(
      keyOf('select t1.col_2, x3y from t1 join t22 using (col_2)'),
      'select t1.col_2, x3y from t1 join t22 using (col_2)',
    );
  });

  test('identifiers containing a dollar sign are kept', () => {
    assert.equal(keyOf('select a$b, c$1 from t'), 'select a$b, c$1 from t');
  });
});

describe('scanSql drops comments', { timeout: 10_000 }, () => {
  test('a line comment is dropped up to the end of its line', () => {
    assert.equal(keyOf("select 1 -- the answer is 'forty-two'\nfrom t"), 'select ?  \nfrom t');
  });

  test('nested block comments are dropped as a whole', () => {
    assert.equal(keyOf("select /* outer /* inner 'x' */ still outer 42 */ a from t"), 'select   a from t');
  });

  test('a comment marker inside a string is part of the string', () => {
    assert.equal(keyOf("select '-- x', '/* y */' from t"), 'select ?, ? from t');
  });
});

describe('scanSql finds multi-statement texts', { timeout: 10_000 }, () => {
  test('two statements separated by a semicolon are multi-statement', () => {
    assert.equal(scan('select 1; select 2').multiStatement, true);
  });

  test('a trailing semicolon alone is not multi-statement', () => {
    assert.equal(scan('select 1;').multiStatement, false);
    assert.equal(scan('select 1 ;;  \n').multiStatement, false);
  });

  test('a comment after the final semicolon is not multi-statement', () => {
    assert.equal(scan('select 1; -- done').multiStatement, false);
    assert.equal(scan('select 1; /* done */\n').multiStatement, false);
  });

  test('a semicolon inside a string, dollar quote, quoted identifier or comment does not split', () => {
    assert.equal(scan(`select 'a;b', $$c;d$$, "e;f" /* g; h */ from t -- i; j`).multiStatement, false);
  });

  test('a statement after a comment that follows a semicolon is multi-statement', () => {
    assert.equal(scan('select 1; /* next */ select 2').multiStatement, true);
  });
});

describe('scanSql finds the first word', { timeout: 10_000 }, () => {
  test('the first keyword is upper-cased', () => {
    assert.equal(scan('with x as (select 1) select * from x').firstWord, 'WITH');
    assert.equal(scan('Insert into t values (1)').firstWord, 'INSERT');
  });

  test('leading whitespace, comments and parentheses are skipped', () => {
    assert.equal(scan('  -- why\n /* what */ (select 1) union (select 2)').firstWord, 'SELECT');
  });

  test('a text without a word has an empty first word', () => {
    assert.equal(scan('').firstWord, '');
    assert.equal(scan(' ; -- nothing').firstWord, '');
  });
});

describe('scanSql gives up when it cannot tell where a literal ends', { timeout: 10_000 }, () => {
  test('an unterminated string gives null', () => {
    assert.equal(scanSql("select 'abc"), null);
    assert.equal(scanSql("select E'abc\\'"), null);
  });

  test('an unterminated quoted identifier gives null', () => {
    assert.equal(scanSql('select "abc from t'), null);
  });

  test('an unterminated block comment gives null, nested ones included', () => {
    assert.equal(scanSql('select 1 /* abc'), null);
    assert.equal(scanSql('select 1 /* a /* b */ c'), null);
  });

  test('an unterminated dollar quote gives null', () => {
    assert.equal(scanSql('select $$abc'), null);
    assert.equal(scanSql('select $tag$abc$$ $ta$'), null);
  });
});

/**
 * Realistic DML, each template with literal values of different kinds and lengths.
 * Texts of one template differ only in literals; different templates differ in
 * structure (names, operators, clauses).
 */
type Values = readonly [number: string, other: string, text: string, escaped: string, bits: string];

const TEMPLATES: ((v: Values) => string)[] = [
  ([a]) => `select ${a}`,
  ([a, b]) => `select ${a}, ${b}`,
  ([a]) => `select * from accounts where id = ${a}`,
  ([a]) => `select * from accounts where id = ${a}::bigint`,
  ([a]) => `select * from accounts where id <> ${a}`,
  ([a, b]) => `select * from accounts where id between ${a} and ${b} order by id limit 10`,
  ([, , s]) => `select name from users where email = ${s}`,
  ([, , s]) => `SELECT name FROM users WHERE email = ${s}`,
  ([a, b, s]) => `insert into events (kind, amount, note) values (${a}, ${b}, ${s})`,
  ([a, b, s]) => `insert into events (kind, amount, note) values (${a}, ${b}, ${s}) returning id`,
  ([a, , s]) =>
    `insert into events (kind, note) values (${a}, ${s}) on conflict (kind) do update set note = excluded.note`,
  ([a, b]) => `update accounts set balance = balance + ${a} where id = ${b}`,
  ([a, b]) => `update accounts set balance = balance - ${a} where id = ${b}`,
  ([a]) =>
    `delete from sessions where created_at < now() - interval ${a === '1' ? "'1 day'" : "'30 days'"} and id > ${a}`,
  ([a, b, s]) =>
    `with recent as (select * from events where amount > ${a}) select kind, count(*) from recent where note <> ${s} group by kind having count(*) > ${b}`,
  ([a, b]) => `select * from t1 join t2 on t1.id = t2.t1_id where t2.col_2 in (${a}, ${b})`,
  ([a, b]) => `select * from t1 where col_2 in (${a}, ${b}, ${a})`,
  ([a, , s]) => `select "Mixed""Case", t1.x from t1 where "Mixed""Case" = ${s} and x = ${a}`,
  ([a, b]) => `select * from accounts where id = $1 and balance > ${a} and owner = $2 offset ${b}`,
  ([, , s]) => `select ${s}::jsonb -> 'k' ->> 0`,
  ([a]) => `select coalesce(max(amount), ${a}) from events`,
  ([a, b]) => `select case when amount > ${a} then 'big' else 'small' end from events where kind = ${b}`,
  ([, , s]) => `select * from users where name like ${s} escape '!'`,
  ([a, b]) => `values (${a}, ${b}), (${b}, ${a})`,
  ([a]) => `table accounts limit ${a}`,
  ([a, b]) => `select ${a} union all select ${b}`,
  ([a]) => `select * from accounts for update skip locked limit ${a}`,
  ([a, b]) =>
    `merge into accounts a using (select ${a} as id) s on a.id = s.id when matched then update set balance = ${b} when not matched then insert (id) values (s.id)`,
  ([a, , s]) => `select date ${s === "'x'" ? "'2026-01-01'" : "'1999-12-31'"} + ${a}`,
  ([a, b]) => `select pg_sleep(${a}) where ${b} > 0`,
  ([a, , , e]) => `select note || ${e} from events where id = ${a}`,
  ([, , , e, bits]) => `select ${bits} | flags, ${e} from events`,
  ([a, , s]) => `select count(*) filter (where amount > ${a}) over (partition by kind) from events where note = ${s}`,
  ([a, , s]) => `select amount::numeric(12, 2), ${s} from events where id = ${a}`,
  ([a]) => `select kind, amount from events order by 2 desc limit ${a}`,
  ([a, , s]) => `select * from events /* app='checkout' */ where amount = ${a} and note = ${s}`,
];

/** Value sets with different kinds of literals for the same positions. */
const VALUES: readonly Values[] = [
  ['1', '2', "'x'", "E'x'", "B'0'"],
  ['1.5', '7', "'it''s'", "E'it\\'s'", "B'0101'"],
  ['0x1F', '1e-3', "'multi\nline -- not a comment'", "E'\\\\'", "B'1111111111'"],
  ['.5', '1_000', '$$dollar; $ quoted$$', "E'tab\\there'", "B''"],
  ['42', '99999999999999999999', "$q$tag'ged$q$", "E'\\u00e9'", "B'1'"],
];

/** Variants differing only in literals that libpg_query's normalize keeps (type modifiers, sort positions, comments). */
const NORMALIZE_VARIANTS: readonly (readonly [string, string])[] = [
  ['select amount::numeric(12, 2) from events where id = 1', 'select amount::numeric(10, 4) from events where id = 2'],
  [
    'select kind, amount from events order by 2 desc limit 5',
    'select kind, amount from events order by 1 desc limit 6',
  ],
  [
    "select * from events /* app='checkout' */ where amount = 1",
    "select * from events /* app='billing' */ where amount = 2",
  ],
];

describe('the scan key is a sound cache key for libpg_query', { timeout: 10_000 }, () => {
  let corpus: string[];

  before(async () => {
    await loadModule();
    corpus = TEMPLATES.flatMap((template) => VALUES.map((values) => template(values)));
  });

  test('every text of the corpus parses (the corpus is valid SQL)', () => {
    const rejected = corpus.filter((text) => !parses(text));
    assert.deepEqual(rejected, []);
  });

  test('texts that differ only in literals have the same key', () => {
    for (const template of TEMPLATES) {
      const keys = new Set(VALUES.map((values) => keyOf(template(values))));
      assert.equal(keys.size, 1, `one key expected for ${template(VALUES[0])}; got ${[...keys].join(' | ')}`);
    }
  });

  test('texts with the same key always have the same libpg_query fingerprint', () => {
    const byKey = groupByKey(corpus);
    for (const [key, texts] of byKey) {
      const fingerprints = new Set(texts.map((t) => parserView(t).fingerprint));
      assert.equal(
        fingerprints.size,
        1,
        `key ${JSON.stringify(key)} maps to fingerprints ${[...fingerprints].join(', ')} for ${texts.join(' | ')}`,
      );
    }
  });

  test('texts with the same key always have the same libpg_query normalized text, comments aside', () => {
    // libpg_query keeps comments in normalized text; pgwarden stores it without
    // them (they may hold values), so comments are not part of what must agree.
    const byKey = groupByKey([...corpus, ...NORMALIZE_VARIANTS.flat()]);
    const mismatches: string[] = [];
    const withoutComments = (sql: string) =>
      sql
        .replace(/\/\*[\s\S]*?\*\//g, ' ')
        .replace(/--[^\n]*/g, ' ')
        .replace(/\s+/g, ' ')
        .trim();
    for (const texts of byKey.values()) {
      const normalized = new Set(texts.map((t) => withoutComments(parserView(t).normalized)));
      if (normalized.size > 1) mismatches.push([...normalized].join('  <>  '));
    }
    assert.deepEqual(mismatches, [], 'texts with one key normalize differently');
  });

  test('texts that differ in structure have different keys', () => {
    const byKey = groupByKey(corpus);
    assert.equal(byKey.size, TEMPLATES.length, 'expected one key per template');
  });

  test('names, parameters, operators and keywords are part of the key', () => {
    const pairs: [string, string][] = [
      ['select a from t', 'select b from t'],
      ['select * from t1', 'select * from t2'],
      ['select * from t where a = $1', 'select * from t where a = $2'],
      ['select * from t where a < 1', 'select * from t where a > 1'],
      ['select * from "T"', 'select * from "t"'],
      ['select true', 'select false'],
      ['select 1 from t', 'select 1 from t for update'],
      ["select B'1'", "select X'1'"],
    ];
    for (const [a, b] of pairs) assert.notEqual(scan(a).key, scan(b).key, `${a} and ${b} share a key`);
  });

  test('a number the parser rejects never shares its key with one it accepts', () => {
    const pairs: [string, string][] = [
      ['select * from t where id = 0x1F', 'select * from t where id = 0xZZ'],
      ['select * from t where id = 1_000', 'select * from t where id = 1__000'],
      ['select * from t where id = 1_000', 'select * from t where id = 1000_'],
    ];
    const shared: string[] = [];
    for (const [valid, invalid] of pairs) {
      assert.ok(parses(valid), `${valid} parses`);
      assert.ok(!parses(invalid), `${invalid} does not parse`);
      if (scanSql(invalid)?.key === scan(valid).key) shared.push(`${invalid}  ~  ${valid}`);
    }
    assert.deepEqual(shared, [], 'syntax errors sharing a key with valid texts');
  });
});

function groupByKey(texts: readonly string[]): Map<string, string[]> {
  const byKey = new Map<string, string[]>();
  for (const text of texts) {
    const key = scan(text).key;
    const group = byKey.get(key);
    if (group) group.push(text);
    else byKey.set(key, [text]);
  }
  return byKey;
}
