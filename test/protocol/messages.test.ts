// The protocol layer owns every byte offset: the message cursor over a buffer of
// whole messages, and the ReadyForQuery, BackendKeyData, ParameterStatus and
// startup-packet decoders and encoders the proxy uses instead of reading headers.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { serialize } from 'pg-protocol';
import {
  backendKeyProcessId,
  backendKeySecret,
  parameterStatusValue,
  readyForQueryStatus,
  sslAccepted,
} from '../../src/protocol/backend.ts';
import { Backend, Frontend, PROTOCOL_VERSION_3_0 } from '../../src/protocol/constants.ts';
import { encodeBackendKeyData, encodeReadyForQuery, SSL_ACCEPTED, SSL_REFUSED } from '../../src/protocol/encode.ts';
import { ProtocolError, startupPacketLength, startupRequestCode } from '../../src/protocol/frontend.ts';
import { findMessage, MessageCursor } from '../../src/protocol/messages.ts';

function walk(buf: Buffer): string[] {
  const seen: string[] = [];
  const cursor = new MessageCursor(buf);
  while (cursor.next()) seen.push(`${String.fromCharCode(cursor.type)}:${cursor.start}-${cursor.end}`);
  return seen;
}

describe('MessageCursor', () => {
  const parse = serialize.parse({ text: 'select $1' });
  const bind = serialize.bind({ values: ['1'] });
  const sync = serialize.sync();
  const group = Buffer.concat([parse, bind, sync]);

  test('walks whole messages in order, naming each type and bounds', () => {
    const p = parse.length;
    const b = p + bind.length;
    assert.deepEqual(walk(group), [`P:0-${p}`, `B:${p}-${b}`, `S:${b}-${b + sync.length}`]);
    assert.deepEqual(walk(Buffer.alloc(0)), []);
  });

  test('a truncated message or an invalid length is a ProtocolError', () => {
    assert.throws(() => walk(group.subarray(0, group.length - 1)), ProtocolError);
    assert.throws(() => walk(Buffer.concat([sync, Buffer.from([0x53, 0, 0])])), /truncated message header/);
    assert.throws(() => walk(Buffer.from([0x53, 0, 0, 0, 3])), /invalid message length 3/);
  });

  test('findMessage returns a view of the first message of a type, or null', () => {
    assert.deepEqual(findMessage(group, Frontend.Bind), bind);
    assert.equal(findMessage(group, Frontend.Execute), null);
  });
});

describe('backend message codecs', () => {
  test('ReadyForQuery round-trips each transaction status', () => {
    for (const status of ['I', 'T', 'E'] as const) {
      const message = encodeReadyForQuery(status);
      assert.deepEqual([...message], [Backend.ReadyForQuery, 0, 0, 0, 5, status.charCodeAt(0)]);
      const inside = Buffer.concat([Buffer.from('xx'), message]);
      assert.equal(readyForQueryStatus(inside, 2), status);
    }
    // No server sends another byte; if one did, nothing would take it for idle.
    assert.equal(readyForQueryStatus(Buffer.from([Backend.ReadyForQuery, 0, 0, 0, 5, 0x3f]), 0), 'E');
  });

  test('BackendKeyData round-trips a 4-byte and a longer (protocol 3.2) secret', () => {
    for (const secret of [Buffer.from([1, 2, 3, 4]), Buffer.alloc(32, 7)]) {
      const message = Buffer.concat([Buffer.from('x'), encodeBackendKeyData(4242, secret)]);
      assert.equal(message[1], Backend.BackendKeyData);
      assert.equal(message.readInt32BE(2), 8 + secret.length);
      assert.equal(backendKeyProcessId(message, 1), 4242);
      assert.deepEqual(backendKeySecret(message, 1, message.length), secret);
    }
  });

  test('ParameterStatus value is read only for the parameter asked about', () => {
    const status = (name: string, value: string): Buffer => {
      const body = Buffer.from(`${name}\0${value}\0`);
      const out = Buffer.alloc(5 + body.length);
      out[0] = Backend.ParameterStatus;
      out.writeInt32BE(4 + body.length, 1);
      body.copy(out, 5);
      return out;
    };
    const name = Buffer.from('application_name\0');
    const m = status('application_name', 'psql');
    assert.equal(parameterStatusValue(m, 0, m.length, name), 'psql');
    const other = status('application_namex', 'psql');
    assert.equal(parameterStatusValue(other, 0, other.length, name), null);
    const short = status('a', '');
    assert.equal(parameterStatusValue(short, 0, short.length, name), null);
    const empty = status('application_name', '');
    assert.equal(parameterStatusValue(empty, 0, empty.length, name), '');
  });
});

describe('startup packets', () => {
  test('length and request code come from the untyped header', () => {
    const packet = Buffer.alloc(8);
    packet.writeInt32BE(8, 0);
    packet.writeInt32BE(PROTOCOL_VERSION_3_0, 4);
    assert.equal(startupPacketLength(packet), 8);
    assert.equal(startupRequestCode(packet), PROTOCOL_VERSION_3_0);
  });

  test("the answer to SSLRequest is 'S' or 'N'", () => {
    assert.equal(sslAccepted(SSL_ACCEPTED), true);
    assert.equal(sslAccepted(SSL_REFUSED), false);
  });
});
