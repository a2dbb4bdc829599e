import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { serialize } from 'pg-protocol';
import { commandCompleteRows, errorField, errorIsFatal, errorSqlState } from '../../src/protocol/backend.ts';
import { ErrorField } from '../../src/protocol/constants.ts';
import { encodeErrorResponse } from '../../src/protocol/encode.ts';
import {
  decodeBindParameters,
  decodeBindPortal,
  decodeBindStatement,
  decodeExecutePortal,
  decodeParse,
  decodeQueryText,
  decodeStartupParameters,
  ProtocolError,
} from '../../src/protocol/frontend.ts';

function commandComplete(tag: string): Buffer {
  const out = Buffer.alloc(5 + tag.length + 1);
  out[0] = 0x43;
  out.writeInt32BE(4 + tag.length + 1, 1);
  out.write(tag, 5);
  return out;
}

describe('frontend decoders', () => {
  test('Query text is decoded as UTF-8', () => {
    const q = serialize.query("select 'héllo'");
    assert.equal(decodeQueryText(q, 0, q.length), "select 'héllo'");
  });

  test('Parse gives statement name, text and parameter types', () => {
    const p = serialize.parse({ name: 's1', text: 'select $1::int', types: [23] });
    assert.deepEqual(decodeParse(p, 0, p.length), { statement: 's1', text: 'select $1::int', paramTypes: [23] });
  });

  test('Bind gives portal, statement and parameter values with their formats', () => {
    const b = serialize.bind({
      portal: 'p1',
      statement: 's1',
      values: ['42', null, Buffer.from([1, 2])],
      binary: false,
    });
    assert.equal(decodeBindPortal(b, 0, b.length), 'p1');
    assert.equal(decodeBindStatement(b, 0, b.length), 's1');
    const params = decodeBindParameters(b);
    assert.deepEqual(
      params.values.map((v) => (v === null ? null : v.toString('hex'))),
      ['3432', null, '0102'],
    );
    assert.deepEqual(params.formats, [0, 0, 1]);
  });

  test('the unnamed portal and statement decode as empty names', () => {
    const b = serialize.bind({ values: [] });
    assert.equal(decodeBindPortal(b, 0, b.length), '');
    assert.equal(decodeBindStatement(b, 0, b.length), '');
    const e = serialize.execute({});
    assert.equal(decodeExecutePortal(e, 0, e.length), '');
  });

  test('decoders read in place at an offset inside a larger buffer', () => {
    const q = serialize.query('select 2');
    const buf = Buffer.concat([serialize.sync(), q, serialize.flush()]);
    assert.equal(decodeQueryText(buf, 5, 5 + q.length), 'select 2');
  });

  test('an unterminated string is a ProtocolError, not a crash', () => {
    const q = serialize.query('select 1');
    q[q.length - 1] = 0x20;
    assert.throws(() => decodeQueryText(q, 0, q.length), ProtocolError);
  });

  test('startup parameters are read in order', () => {
    const s = serialize.startup({ user: 'alice', database: 'shop', application_name: 'web' });
    assert.deepEqual(
      [...decodeStartupParameters(s)],
      [
        ['user', 'alice'],
        ['database', 'shop'],
        ['application_name', 'web'],
        ['client_encoding', 'UTF8'], // added by pg-protocol's serializer
      ],
    );
  });
});

describe('backend decoders', () => {
  test('CommandComplete row counts come from the end of the tag', () => {
    const cases: [string, number][] = [
      ['SELECT 5', 5],
      ['INSERT 0 123', 123],
      ['UPDATE 0', 0],
      ['COPY 200000', 200000],
      ['CREATE TABLE', 0],
      ['BEGIN', 0],
    ];
    for (const [tag, rows] of cases) {
      const m = commandComplete(tag);
      assert.equal(commandCompleteRows(m, 0, m.length), rows, tag);
    }
  });

  test('ErrorResponse round-trips through our encoder and decoders', () => {
    const e = encodeErrorResponse({
      severity: 'ERROR',
      code: '42501',
      message: 'blocked',
      detail: 'rule r1',
      hint: 'lift it',
    });
    assert.equal(errorSqlState(e, 0, e.length), '42501');
    assert.equal(errorField(e, 0, e.length, ErrorField.Message), 'pgwarden: blocked');
    assert.equal(errorField(e, 0, e.length, ErrorField.Detail), 'rule r1');
    assert.equal(errorField(e, 0, e.length, ErrorField.Hint), 'lift it');
    assert.equal(errorIsFatal(e, 0, e.length), false);
    const f = encodeErrorResponse({ severity: 'FATAL', code: '08006', message: 'pgwarden: gone' });
    assert.equal(errorIsFatal(f, 0, f.length), true);
    assert.equal(errorField(f, 0, f.length, ErrorField.Message), 'pgwarden: gone');
  });
});
