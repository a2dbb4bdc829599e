// ShapeFinder (src/shapes/fingerprint.ts) without a database: statement texts in,
// shapes out. Literal values must never survive into a shape, every text gets a
// shape (a stable fallback when libpg_query rejects it), and the caches in front of
// the parser must answer exactly what the parser would.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { fingerprintSync, normalizeSync } from 'libpg-query';
import { ShapeFinder, type StatementShape } from '../../src/shapes/fingerprint.ts';
import type { PreparedStatement } from '../../src/proxy/seam.ts';

const FALLBACK = /^u[0-9a-f]{15}$/;
const FINGERPRINT = /^[0-9a-f]{16}$/;

function newFinder(maxTextBytes = 65_536): Promise<ShapeFinder> {
  return ShapeFinder.create({ cacheEntries: 1000, maxTextBytes });
}

function only(shapes: readonly StatementShape[]): StatementShape {
  assert.equal(shapes.length, 1, `expected one shape, got ${JSON.stringify(shapes)}`);
  return shapes[0];
}

describe('ShapeFinder shapes parsable text', { timeout: 20_000 }, () => {
  let finder: ShapeFinder;
  before(async () => {
    finder = await newFinder();
  });

  test('texts that differ only in literals share a shape', () => {
    const a = only(finder.shapesOfText("select * from accounts where id = 42 and owner = 'alice'"));
    const b = only(finder.shapesOfText("select * from accounts where id = 7 and owner = 'secret-bob'"));
    assert.equal(a.fingerprint, b.fingerprint);
    assert.equal(a.fingerprint, fingerprintSync("select * from accounts where id = 42 and owner = 'alice'"));
    assert.equal(a.fallback, false);
    assert.equal(a.command, 'SELECT');
  });

  test('the normalized text has $n in place of each value', () => {
    const shape = only(
      finder.shapesOfText("update accounts set balance = balance + 12.5, note = 'refund' where id = 99"),
    );
    assert.equal(shape.query, 'update accounts set balance = balance + $1, note = $2 where id = $3');
    assert.equal(shape.command, 'UPDATE');
  });

  test('the normalized text never contains a literal value, whatever its kind', () => {
    // Each value, and the part of it that must not appear in the shape.
    const values: [string, string][] = [
      ["'secret-literal-XYZ'", 'secret-literal'],
      ["E'secret\\'escaped'", 'escaped'],
      ['$$secret-dollar$$', 'secret-dollar'],
      ['$tag$secret-tagged$tag$', 'secret-tagged'],
      ["B'0110101101'", '0110101101'],
      ["X'DEADBEEF'", 'DEADBEEF'],
      ['31415926535', '31415926535'],
      ['2.718281828', '718281828'],
      ['0x7FEEDBEEF', 'FEEDBEEF'],
      ["interval '17 secret days'", 'secret days'],
      ['\'{"card": "4111111111111111"}\'::jsonb', '4111111111111111'],
    ];
    for (const [value, secret] of values) {
      const text = `select note from events where payload = ${value} and id <> 1`;
      const shape = only(finder.shapesOfText(text));
      assert.equal(shape.fallback, false, `${text} parses`);
      assert.ok(!shape.query.includes(secret), `${JSON.stringify(shape.query)} contains ${secret}`);
    }
  });

  test('a prepared statement is shaped once: the same shape object comes back', () => {
    const statement: PreparedStatement = { name: 's1', text: 'select * from accounts where id = $1', paramTypes: [] };
    const first = finder.shapeOfStatement(statement);
    const second = finder.shapeOfStatement(statement);
    assert.equal(second, first);
    assert.equal(first.fingerprint, fingerprintSync('select * from accounts where id = 5'));
  });

  test('a parameter and an inline literal in the same place give the same shape', () => {
    const statement: PreparedStatement = {
      name: '',
      text: 'select * from accounts where owner = $1 limit $2',
      paramTypes: [],
    };
    const simple = only(finder.shapesOfText("select * from accounts where owner = 'carol' limit 10"));
    assert.equal(finder.shapeOfStatement(statement).fingerprint, simple.fingerprint);
  });

  test('the normalized text keeps quoted identifiers exactly as written', () => {
    const shape = only(finder.shapesOfText('select "unit  price", "a\tb" from "order  lines" where id = 5'));
    assert.equal(shape.query, 'select "unit  price", "a\tb" from "order  lines" where id = $1');
  });

  test("a text's normalized query does not carry a comment of another text with the same literal-free form", () => {
    only(finder.shapesOfText("select * from orders /* user='alice@example.com' */ where id = 1"));
    const shape = only(finder.shapesOfText("select * from orders /* user='bob@example.com' */ where id = 2"));
    assert.ok(!shape.query.includes('alice'), `the normalized query of bob's text is ${JSON.stringify(shape.query)}`);
  });
});

describe('ShapeFinder splits multi-statement text', { timeout: 20_000 }, () => {
  let finder: ShapeFinder;
  before(async () => {
    finder = await newFinder();
  });

  test('a multi-statement text gives one shape per statement', () => {
    const statements = [
      "insert into events (kind, note) values (1, 'a')",
      'update accounts set balance = 0 where id = 3',
      'select count(*) from events where kind = 1',
    ];
    const shapes = finder.shapesOfText(statements.join('; '));
    assert.deepEqual(
      shapes.map((s) => s.fingerprint),
      statements.map((s) => fingerprintSync(s)),
    );
    assert.deepEqual(
      shapes.map((s) => s.query),
      statements.map((s) => normalizeSync(s)),
    );
    assert.deepEqual(
      shapes.map((s) => s.command),
      ['INSERT', 'UPDATE', 'SELECT'],
    );
  });

  test('statements after multibyte UTF-8 characters are cut at the right place', () => {
    const text =
      "select 'Grüße, 日本語 🎉' as greeting; update accounts set note = 'ñandú' where id = 1; select 2 as after";
    const shapes = finder.shapesOfText(text);
    assert.deepEqual(
      shapes.map((s) => s.query),
      ['select $1 as greeting', 'update accounts set note = $1 where id = $2', 'select $1 as after'],
    );
    assert.equal(shapes[1].fingerprint, fingerprintSync("update accounts set note = 'x' where id = 2"));
  });

  test('a trailing semicolon and comment do not make a second shape', () => {
    const shapes = finder.shapesOfText('select 1 as one; -- done');
    assert.equal(shapes.length, 1);
    assert.equal(shapes[0].fingerprint, fingerprintSync('select 1 as one'));
  });

  test('a later statement whose constants are part of its fingerprint gets its own shape, not a cached one', () => {
    // A text starting with DML is cached by its literal-free form, but the statements
    // after it need not be DML: a reloption value is part of its fingerprint.
    finder.shapesOfText('select 1; alter table accounts set (fillfactor = 70)');
    const shapes = finder.shapesOfText('select 1; alter table accounts set (fillfactor = 90)');
    assert.equal(shapes[1].fingerprint, fingerprintSync('alter table accounts set (fillfactor = 90)'));
  });
});

describe('ShapeFinder gives unparsable text a fallback shape', { timeout: 20_000 }, () => {
  let finder: ShapeFinder;
  before(async () => {
    finder = await newFinder();
  });

  const unparsable: [string, string][] = [
    ['a misspelled keyword', 'selec 1'],
    ['an unterminated string', "select 'unterminated"],
    ['the empty string', ''],
    ['5000 unclosed parentheses', `select ${'('.repeat(5000)}1`],
    ['nesting deeper than the parser allows', `select ${'('.repeat(20_000)}1${')'.repeat(20_000)}`],
  ];

  for (const [what, text] of unparsable) {
    test(`${what} gets a fallback shape starting with u`, () => {
      const shape = only(finder.shapesOfText(text));
      assert.equal(shape.fallback, true);
      assert.match(shape.fingerprint, FALLBACK);
    });
  }

  test('the fallback shape is the same for the same text in another finder', async () => {
    const other = await newFinder();
    for (const [, text] of unparsable) {
      assert.equal(only(other.shapesOfText(text)).fingerprint, only(finder.shapesOfText(text)).fingerprint);
    }
  });

  test('unparsable texts that differ only in literals share a fallback shape', () => {
    const a = only(finder.shapesOfText("selec * from t where a = 1 and b = 'x'"));
    const b = only(finder.shapesOfText("selec * from t where a = 2 and b = 'y'"));
    assert.equal(a.fingerprint, b.fingerprint);
    assert.notEqual(a.fingerprint, only(finder.shapesOfText("selec * from u where a = 1 and b = 'x'")).fingerprint);
  });

  test('the fallback query contains no literal value', () => {
    const texts = [
      "selec 'secret-literal-XYZ', 31415926535 from t",
      "select 'unterminated secret-literal-XYZ",
      'selec $$secret-literal-XYZ$$ /* secret-literal-XYZ */',
    ];
    for (const text of texts) {
      const shape = only(finder.shapesOfText(text));
      assert.equal(shape.fallback, true);
      assert.ok(
        !shape.query.includes('secret-literal-XYZ') && !shape.query.includes('31415926535'),
        `fallback query ${JSON.stringify(shape.query)}`,
      );
    }
  });

  test('the fallback query contains no binary or octal literal digits', () => {
    const shape = only(finder.shapesOfText('selec 0b1011001110, 0o7654321'));
    assert.equal(shape.fallback, true);
    assert.ok(
      !shape.query.includes('1011001110') && !shape.query.includes('7654321'),
      `fallback query ${JSON.stringify(shape.query)}`,
    );
  });

  test('a text the parser rejects does not take the shape of a valid text with the same literal-free form', () => {
    const valid = only(finder.shapesOfText('select amount::float(53) from events'));
    assert.equal(valid.fallback, false);
    const invalid = only(finder.shapesOfText('select amount::float(54) from events')); // precision must be < 54
    assert.equal(invalid.fallback, true, `got ${JSON.stringify(invalid)}`);
  });

  test('a valid text does not take the fallback shape of a rejected text with the same literal-free form', () => {
    const invalid = only(finder.shapesOfText("select note from events where note = E'\\u12'")); // bad Unicode escape
    assert.equal(invalid.fallback, true);
    const valid = only(finder.shapesOfText("select note from events where note = E'\\u00e9'"));
    assert.equal(valid.fallback, false, `got ${JSON.stringify(valid)}`);
    assert.equal(valid.fingerprint, fingerprintSync("select note from events where note = 'x'"));
  });
});

describe('ShapeFinder caps the text it parses', { timeout: 20_000 }, () => {
  test('text over maxTextBytes gets a fallback shape without being parsed', async () => {
    const finder = await newFinder(200);
    const text = `select ${Array.from({ length: 60 }, (_, i) => `c${i}`).join(', ')} from t where id = 1`;
    assert.ok(Buffer.byteLength(text) > 200, 'the text is over the cap');
    assert.match(fingerprintSync(text), FINGERPRINT, 'the text itself is valid SQL');
    const shape = only(finder.shapesOfText(text));
    assert.equal(shape.fallback, true);
    assert.match(shape.fingerprint, FALLBACK);
  });

  test('the cap counts UTF-8 bytes, not characters', async () => {
    const finder = await newFinder(200);
    const text = `select '${'é'.repeat(100)}' as x`; // 114 characters, 214 bytes
    assert.ok(text.length < 200 && Buffer.byteLength(text) > 200, 'fewer characters than the cap, more bytes');
    assert.equal(only(finder.shapesOfText(text)).fallback, true);
  });

  test('oversized texts that differ only in literals share a fallback shape with no literal in its query', async () => {
    const finder = await newFinder(200);
    const text = (v: string) =>
      `select ${Array.from({ length: 60 }, (_, i) => `c${i}`).join(', ')} from t where note = '${v}'`;
    const a = only(finder.shapesOfText(text('secret-literal-AAA')));
    const b = only(finder.shapesOfText(text('secret-literal-BBB')));
    assert.equal(a.fingerprint, b.fingerprint);
    assert.ok(!a.query.includes('secret-literal'), a.query);
  });
});

describe('ShapeFinder tells transaction-control and session statements apart', { timeout: 20_000 }, () => {
  let finder: ShapeFinder;
  before(async () => {
    finder = await ShapeFinder.create({ cacheEntries: 1000, maxTextBytes: 65_536 });
  });

  test('every transaction-control and session statement is control, by its parse-tree kind', () => {
    const control: [string, string][] = [
      ['BEGIN', 'TransactionStmt'],
      ['start transaction isolation level serializable', 'TransactionStmt'],
      ['COMMIT', 'TransactionStmt'],
      ['end', 'TransactionStmt'],
      ['/* app */ ROLLBACK', 'TransactionStmt'],
      ['savepoint sp1', 'TransactionStmt'],
      ['release savepoint sp1', 'TransactionStmt'],
      ['rollback to savepoint sp1', 'TransactionStmt'],
      ["prepare transaction 'tx1'", 'TransactionStmt'],
      ["commit prepared 'tx1'", 'TransactionStmt'],
      ["rollback prepared 'tx1'", 'TransactionStmt'],
      ["set statement_timeout = '5s'", 'VariableSetStmt'],
      ['SET LOCAL lock_timeout = 100', 'VariableSetStmt'],
      ['reset all', 'VariableSetStmt'],
      ['show work_mem', 'VariableShowStmt'],
      ['discard all', 'DiscardStmt'],
      ['listen jobs', 'ListenStmt'],
      ['unlisten *', 'UnlistenStmt'],
      ['deallocate all', 'DeallocateStmt'],
      ['close c1', 'ClosePortalStmt'],
      ['fetch 100 from c1', 'FetchStmt'],
      ['move forward 10 in c1', 'FetchStmt'],
    ];
    for (const [text, kind] of control) {
      const [shape] = finder.shapesOfText(text);
      assert.equal(shape.kind, kind, text);
      assert.equal(shape.control, true, text);
    }
  });

  test('DML, DDL and the rest are not control, whatever they mention', () => {
    for (const text of [
      'select 1',
      "select set_config('x', 'y', false)",
      'with c as (select 1) insert into t select * from c',
      'update accounts set abalance = abalance + $1 where aid = $2',
      'insert into history values (1)',
      'delete from t where id = 1',
      'create index on t (a)',
      'notify jobs',
      'prepare p as select 1',
    ]) {
      assert.equal(finder.shapesOfText(text)[0].control, false, text);
    }
  });

  test('each statement of a multi-statement text is judged on its own', () => {
    assert.deepEqual(
      finder.shapesOfText('update t set a = 1; commit').map((s) => s.control),
      [false, true],
    );
  });

  test('a fallback shape (no parse tree) is control by its first keyword', () => {
    assert.equal(finder.shapesOfText('commit this is not sql').at(0)?.control, true);
    assert.equal(finder.shapesOfText('selec 1').at(0)?.control, false);
  });
});

describe('literal values that normalization used to miss', () => {
  test('digits glued to a word never reach the shape text', async () => {
    const shapes = await ShapeFinder.create({ cacheEntries: 10, maxTextBytes: 100_000 });
    for (const text of [
      'select 4111111111111111as x',
      'select 1 from t where a = 4222222222222222and b',
      'select 0x4111AB, 4111e5as y',
    ]) {
      const [shape] = shapes.shapesOfText(text);
      assert.doesNotMatch(shape.query, /4111|4222/, text);
    }
  });

  test('strings whose end depends on standard_conforming_strings never reach the shape text', async () => {
    const shapes = await ShapeFinder.create({ cacheEntries: 10, maxTextBytes: 100_000 });
    for (const text of [
      "select 'it\\'s secret' as x",
      "select 'a\\', secret_col, '\\' from t",
      "select 'a\\' secret\\'b' from t",
      "select E'it\\'s secret'",
      "select 1 where x = 'it\\'s secret' and y = 'z'",
    ]) {
      const [shape] = shapes.shapesOfText(text);
      assert.doesNotMatch(shape.query, /secret/, text);
    }
  });
});
