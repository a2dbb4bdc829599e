// Bind parameters rendered as text for EXPLAIN: text values pass through, binary
// values are decoded by their declared type, and the decoders are checked against
// the server's own binary encoding (the *send functions) and its own text input.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import { parametersAsText } from '../../src/plans/params.ts';
import { testDatabase } from '../harness/database.ts';

const BOOL = 16;
const BYTEA = 17;
const INT8 = 20;
const INT2 = 21;
const INT4 = 23;
const TEXT = 25;
const FLOAT4 = 700;
const FLOAT8 = 701;
const DATE = 1082;
const TIMESTAMP = 1114;
const TIMESTAMPTZ = 1184;
const INTERVAL = 1186;
const NUMERIC = 1700;
const UUID = 2950;
const JSONB = 3802;

/** A Bind whose Buffer values go in binary and whose strings go in text (pg-protocol's rule). */
function bind(values: (string | Buffer | null)[]): Buffer {
  return serialize.bind({ values });
}

function int32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeInt32BE(n);
  return b;
}

function int64(n: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigInt64BE(n);
  return b;
}

/** numeric_send()'s layout, by hand. */
function numeric(ndigits: number[], weight: number, sign: number, dscale: number): Buffer {
  const b = Buffer.alloc(8 + ndigits.length * 2);
  b.writeInt16BE(ndigits.length, 0);
  b.writeInt16BE(weight, 2);
  b.writeUInt16BE(sign, 4);
  b.writeInt16BE(dscale, 6);
  ndigits.forEach((d, i) => b.writeInt16BE(d, 8 + i * 2));
  return b;
}

describe('parametersAsText', () => {
  test('text-format values come back as UTF-8 strings and NULL as null', () => {
    assert.deepEqual(parametersAsText(bind(['42', null, 'héllo ☃', '']), [0, 0, 0, 0]), ['42', null, 'héllo ☃', '']);
  });

  test('text-format values need no declared types', () => {
    assert.deepEqual(parametersAsText(bind(['1', '2']), []), ['1', '2']);
  });

  test('a Bind without parameters gives an empty list', () => {
    assert.deepEqual(parametersAsText(bind([]), []), []);
  });

  test('binary integers are decoded by their declared type', () => {
    const int2 = Buffer.alloc(2);
    int2.writeInt16BE(-32768);
    assert.deepEqual(
      parametersAsText(bind([int2, int32(-7), int64(9223372036854775807n), Buffer.from([1]), Buffer.from([0])]), [
        INT2,
        INT4,
        INT8,
        BOOL,
        BOOL,
      ]),
      ['-32768', '-7', '9223372036854775807', 'true', 'false'],
    );
  });

  test('a mix of text and binary values in one Bind is decoded value by value', () => {
    assert.deepEqual(parametersAsText(bind(['abc', int32(5), null]), [TEXT, INT4, INT4]), ['abc', '5', null]);
  });

  test('one format code for all parameters applies to each of them', () => {
    // pg-protocol always writes one code per value; drivers like JDBC may send a single code.
    const body = Buffer.concat([
      Buffer.from([0, 0]), // portal '', statement ''
      Buffer.from([0, 1, 0, 1]), // one format code: binary
      Buffer.from([0, 2]), // two values
      int32(4),
      int32(10),
      int32(-1),
      Buffer.from([0, 0]), // no result format codes
    ]);
    const header = Buffer.alloc(5);
    header[0] = 0x42; // 'B'
    header.writeInt32BE(4 + body.length, 1);
    assert.deepEqual(parametersAsText(Buffer.concat([header, body]), [INT4, INT4]), ['10', null]);
  });

  test('bytea is rendered in hex input syntax', () => {
    assert.deepEqual(parametersAsText(bind([Buffer.from([0xde, 0xad, 0x00])]), [BYTEA]), ['\\xdead00']);
  });

  test('float4 is rendered as the shortest decimal that reads back as the same float4', () => {
    const b = Buffer.alloc(4);
    b.writeFloatBE(0.1);
    assert.deepEqual(parametersAsText(bind([b]), [FLOAT4]), ['0.1']);
  });

  test('date, timestamp and timestamptz count from 2000-01-01', () => {
    assert.deepEqual(
      parametersAsText(bind([int32(-1), int64(86_400_000_000n + 1_500_000n), int64(-1n)]), [
        DATE,
        TIMESTAMP,
        TIMESTAMPTZ,
      ]),
      ['1999-12-31', '2000-01-02T00:00:01.5', '1999-12-31T23:59:59.999999Z'],
    );
  });

  test('numeric digits are base 10000 and weighted from the decimal point', () => {
    const cases: [Buffer, string][] = [
      [numeric([1234, 5678], 0, 0x4000, 4), '-1234.5678'],
      [numeric([], 0, 0, 0), '0'],
      [numeric([], 0, 0, 2), '0.00'],
      [numeric([1], -1, 0, 4), '0.0001'],
      [numeric([1], -2, 0, 8), '0.00000001'],
      [numeric([100], 1, 0, 0), '1000000'],
      [numeric([1000], -1, 0, 2), '0.10'],
      [numeric([], 0, 0xc000, 0), 'NaN'],
      [numeric([], 0, 0xd000, 0), 'Infinity'],
      [numeric([], 0, 0xf000, 0), '-Infinity'],
    ];
    for (const [value, expected] of cases) assert.deepEqual(parametersAsText(bind([value]), [NUMERIC]), [expected]);
  });

  test('uuid and jsonb are rendered as their text forms', () => {
    const uuid = Buffer.from('a0eebc999c0b4ef8bb6d6bb9bd380a11', 'hex');
    const jsonb = Buffer.concat([Buffer.from([1]), Buffer.from('{"a": 1}')]);
    assert.deepEqual(parametersAsText(bind([uuid, jsonb]), [UUID, JSONB]), [
      'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
      '{"a": 1}',
    ]);
  });

  test('a binary value of undeclared type makes the whole list unusable', () => {
    assert.equal(parametersAsText(bind(['1', int32(1)]), [INT4, 0]), null);
    assert.equal(parametersAsText(bind(['1', int32(1)]), [INT4]), null);
  });

  test('a binary value of an unsupported type makes the whole list unusable', () => {
    assert.equal(parametersAsText(bind([Buffer.alloc(16)]), [INTERVAL]), null);
  });

  test('a binary value of the wrong size for its type is not rendered', () => {
    assert.equal(parametersAsText(bind([Buffer.alloc(3)]), [INT4]), null);
    assert.equal(parametersAsText(bind([numeric([1, 2], 0, 0, 0).subarray(0, 10)]), [NUMERIC]), null);
  });

  test('a jsonb value of an unknown format version is not rendered', () => {
    assert.equal(parametersAsText(bind([Buffer.from([2, 0x7b, 0x7d])]), [JSONB]), null);
  });

  test('a truncated Bind message is a protocol error', () => {
    const b = bind(['12345']);
    assert.throws(() => parametersAsText(b.subarray(0, b.length - 6), [INT4]), /truncated/);
  });
});

// Each value: its type, then an SQL expression of that type. The server encodes
// it with the type's send function; we decode that and ask the server whether
// our text reads back as the same value.
const SERVER_VALUES: [string, number, string][] = [
  ['bool', BOOL, 'true'],
  ['bool', BOOL, 'false'],
  ['bytea', BYTEA, `'\\xdeadbeef00'::bytea`],
  ['bytea', BYTEA, `''::bytea`],
  ['name', 19, `'pg_class'::name`],
  ['int8', INT8, '123::int8'],
  ['int8', INT8, '(-9223372036854775807 - 1)::int8'],
  ['int2', INT2, '(-32768)::int2'],
  ['int4', INT4, '2147483647::int4'],
  ['text', TEXT, `'héllo ☃ ''quoted'''::text`],
  ['oid', 26, '4294967295::oid'],
  ['json', 114, `'{"a": [1, 2],  "b": null}'::json`],
  ['float4', FLOAT4, '0.1::float4'],
  ['float4', FLOAT4, '3.4028235e38::float4'],
  ['float4', FLOAT4, '1e-45::float4'],
  ['float4', FLOAT4, `'-0'::float4`],
  ['float4', FLOAT4, `'NaN'::float4`],
  ['float4', FLOAT4, `'-Infinity'::float4`],
  ['float8', FLOAT8, '0.1::float8'],
  ['float8', FLOAT8, '1e300::float8'],
  ['float8', FLOAT8, '5e-324::float8'],
  ['float8', FLOAT8, `'Infinity'::float8`],
  ['bpchar', 1042, `'ab'::char(4)`],
  ['varchar', 1043, `'x y'::varchar(10)`],
  ['date', DATE, `'2000-01-01'::date`],
  ['date', DATE, `'2024-02-29'::date`],
  ['date', DATE, `'1999-12-31'::date`],
  ['date', DATE, `'1582-10-04'::date`],
  ['date', DATE, `'0044-03-15 BC'::date`],
  ['date', DATE, `'4713-01-01 BC'::date`],
  ['date', DATE, `'5874897-12-31'::date`],
  ['date', DATE, `'infinity'::date`],
  ['date', DATE, `'-infinity'::date`],
  ['timestamp', TIMESTAMP, `'2024-02-29 13:14:15.123456'::timestamp`],
  ['timestamp', TIMESTAMP, `'1970-01-01 00:00:00'::timestamp`],
  ['timestamp', TIMESTAMP, `'1999-12-31 23:59:59.999999'::timestamp`],
  ['timestamp', TIMESTAMP, `'0044-03-15 12:30:00 BC'::timestamp`],
  ['timestamp', TIMESTAMP, `'294276-12-31 23:59:59.999999'::timestamp`],
  ['timestamp', TIMESTAMP, `'infinity'::timestamp`],
  ['timestamptz', TIMESTAMPTZ, `'2024-02-29 13:14:15.5+02'::timestamptz`],
  ['timestamptz', TIMESTAMPTZ, `'1900-01-01 00:00:00+00'::timestamptz`],
  ['timestamptz', TIMESTAMPTZ, `'-infinity'::timestamptz`],
  ['uuid', UUID, `'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid`],
  ['jsonb', JSONB, `'{"b": 1, "a": [true, null, "x"]}'::jsonb`],
  ['numeric', NUMERIC, '(-1234.5678)::numeric'],
  ['numeric', NUMERIC, '0::numeric'],
  ['numeric', NUMERIC, '0.000::numeric'],
  ['numeric', NUMERIC, '0.0001::numeric'],
  ['numeric', NUMERIC, '0.00000001::numeric'],
  ['numeric', NUMERIC, '1e-20::numeric'],
  ['numeric', NUMERIC, '1000000::numeric'],
  ['numeric', NUMERIC, '100.000::numeric'],
  ['numeric', NUMERIC, '(-0.5)::numeric'],
  ['numeric', NUMERIC, '12345678901234567890.000000000001::numeric'],
  ['numeric', NUMERIC, `'NaN'::numeric`],
  ['numeric', NUMERIC, `'Infinity'::numeric`],
];

describe('parametersAsText against the server', () => {
  let client: pg.Client;

  before(async () => {
    client = new pg.Client({ connectionString: testDatabase().url });
    await client.connect();
    // A zone other than UTC, so a timestamptz rendered without its offset would not compare equal.
    await client.query(`set timezone = 'America/New_York'`);
  });

  after(async () => {
    await client.end();
  });

  for (const [type, oid, expression] of SERVER_VALUES) {
    test(`binary ${type} ${expression} reads back as the same value`, async () => {
      const sendFunction = (
        await client.query<{ f: string }>('select typsend::text as f from pg_type where oid = $1', [oid])
      ).rows[0].f;
      const { rows } = await client.query<{ bin: Buffer; text: string }>(
        `select ${sendFunction}(${expression}) as bin, (${expression})::text as text`,
      );
      const [rendered] = parametersAsText(bind([rows[0].bin]), [oid]) ?? assert.fail(`${type} was not rendered`);
      assert.equal(typeof rendered, 'string');
      // Compare as the server's text output of the re-read value: byte-exact for
      // every type here (float output is shortest-exact since PostgreSQL 12).
      const reread = await client.query<{ text: string }>(
        `select ($1::${type === 'bpchar' ? 'char(4)' : type})::text as text`,
        [rendered],
      );
      assert.equal(reread.rows[0].text, rows[0].text, `${type}: rendered ${JSON.stringify(rendered)}`);
    });
  }

  test('every type the decoders know is checked against the server here', () => {
    const known = [16, 17, 19, 20, 21, 23, 25, 26, 114, 700, 701, 1042, 1043, 1082, 1114, 1184, 1700, 2950, 3802];
    assert.deepEqual(
      [...new Set(SERVER_VALUES.map(([, oid]) => oid))].sort((a, b) => a - b),
      known,
    );
  });
});
