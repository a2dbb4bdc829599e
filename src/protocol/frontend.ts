// Decoders for the few frontend messages the proxy must read (Query, Parse, Bind,
// Execute, Close) and for the startup packet. Offsets are absolute positions in the
// buffer the session received; `start` is the message's type byte. Nothing here
// copies message bytes except to produce the strings a caller asked for.

import { MAX_STARTUP_PACKET_BYTES } from './constants.ts';

/** Index of the NUL that ends the C string at `offset`, or -1 if it is not before `end`. */
export function cstringEnd(buf: Buffer, offset: number, end: number): number {
  const i = buf.indexOf(0, offset);
  return i === -1 || i >= end ? -1 : i;
}

/** Reads the C string at `offset`; a missing terminator is a protocol violation. */
export function readCString(buf: Buffer, offset: number, end: number): string {
  const nul = cstringEnd(buf, offset, end);
  if (nul === -1) throw new ProtocolError('unterminated string in message');
  return nul === offset ? '' : buf.toString('utf8', offset, nul);
}

/** A frontend message that cannot be what it claims to be. */
export class ProtocolError extends Error {}

/** Query: the SQL text (possibly several statements). */
export function decodeQueryText(buf: Buffer, start: number, end: number): string {
  return readCString(buf, start + 5, end);
}

export interface ParseMessage {
  statement: string;
  text: string;
  /** Parameter type OIDs as sent by the client (0 = unspecified). */
  paramTypes: number[];
}

/** Parse: statement name, SQL text and the declared parameter types. */
export function decodeParse(buf: Buffer, start: number, end: number): ParseMessage {
  const nameEnd = cstringEnd(buf, start + 5, end);
  if (nameEnd === -1) throw new ProtocolError('unterminated statement name in Parse');
  const statement = nameEnd === start + 5 ? '' : buf.toString('utf8', start + 5, nameEnd);
  const textEnd = cstringEnd(buf, nameEnd + 1, end);
  if (textEnd === -1) throw new ProtocolError('unterminated query in Parse');
  const text = buf.toString('utf8', nameEnd + 1, textEnd);
  let p = textEnd + 1;
  if (p + 2 > end) throw new ProtocolError('truncated Parse message');
  const count = buf.readUInt16BE(p);
  p += 2;
  if (p + count * 4 > end) throw new ProtocolError('truncated parameter types in Parse');
  const paramTypes = new Array<number>(count);
  for (let i = 0; i < count; i++, p += 4) paramTypes[i] = buf.readUInt32BE(p);
  return { statement, text, paramTypes };
}

/** Bind's first field: the destination portal name ('' for the unnamed portal). */
export function decodeBindPortal(buf: Buffer, start: number, end: number): string {
  if (end - start < 7) throw new ProtocolError('truncated Bind message');
  // Unnamed portal and unnamed statement are the common case: no string work at all.
  return buf[start + 5] === 0 ? '' : readCString(buf, start + 5, end);
}

/** Bind's second field: the source prepared statement name. */
export function decodeBindStatement(buf: Buffer, start: number, end: number): string {
  const portalEnd = buf[start + 5] === 0 ? start + 5 : cstringEnd(buf, start + 5, end);
  if (portalEnd === -1 || portalEnd + 1 >= end) throw new ProtocolError('unterminated portal name in Bind');
  return buf[portalEnd + 1] === 0 ? '' : readCString(buf, portalEnd + 1, end);
}

export interface BindParameters {
  /** Per-parameter format code: 0 text, 1 binary. */
  formats: number[];
  /** Raw parameter values (subarrays of the Bind message); null is SQL NULL. */
  values: (Buffer | null)[];
}

/**
 * Decodes the parameter values of a whole Bind message (type byte first). Only the
 * consumers that need values (EXPLAIN sampling) call this, off the hot path.
 */
export function decodeBindParameters(bind: Buffer): BindParameters {
  const end = bind.length;
  let p = cstringEnd(bind, 5, end);
  if (p === -1) throw new ProtocolError('unterminated portal name in Bind');
  p = cstringEnd(bind, p + 1, end);
  if (p === -1) throw new ProtocolError('unterminated statement name in Bind');
  p += 1;
  const formatCount = bind.readUInt16BE(p);
  p += 2;
  const declared: number[] = [];
  for (let i = 0; i < formatCount; i++, p += 2) declared.push(bind.readUInt16BE(p));
  const count = bind.readUInt16BE(p);
  p += 2;
  const formats = new Array<number>(count);
  const values = new Array<Buffer | null>(count);
  for (let i = 0; i < count; i++) {
    // Zero format codes: all text; one: applies to all; otherwise one per parameter.
    formats[i] = formatCount === 0 ? 0 : formatCount === 1 ? declared[0] : declared[i];
    const len = bind.readInt32BE(p);
    p += 4;
    if (len === -1) {
      values[i] = null;
    } else {
      if (len < 0 || p + len > end) throw new ProtocolError('truncated parameter value in Bind');
      values[i] = bind.subarray(p, p + len);
      p += len;
    }
  }
  return { formats, values };
}

/** Execute's portal name ('' for the unnamed portal). */
export function decodeExecutePortal(buf: Buffer, start: number, end: number): string {
  if (end - start < 10) throw new ProtocolError('truncated Execute message');
  return buf[start + 5] === 0 ? '' : readCString(buf, start + 5, end);
}

/** Close: 'S' for a prepared statement or 'P' for a portal, and its name. */
export function decodeCloseTarget(buf: Buffer, start: number, end: number): { kind: number; name: string } {
  if (end - start < 7) throw new ProtocolError('truncated Close message');
  return { kind: buf[start + 5], name: readCString(buf, start + 6, end) };
}

/**
 * The length of a startup-phase packet (StartupMessage, SSLRequest, CancelRequest...:
 * no type byte, an int32 length that counts itself), from its first 4 bytes.
 */
export function startupPacketLength(buf: Buffer): number {
  return buf.readInt32BE(0);
}

/** A startup-phase packet's request code (a protocol version, or SSLRequest's, CancelRequest's...). */
export function startupRequestCode(packet: Buffer): number {
  return packet.readInt32BE(4);
}

/** The parameters of a StartupMessage (user, database, options, GUCs...). */
export function decodeStartupParameters(packet: Buffer): Map<string, string> {
  if (packet.length - 4 > MAX_STARTUP_PACKET_BYTES) throw new ProtocolError('startup packet too long');
  const params = new Map<string, string>();
  const end = packet.length;
  let p = 8;
  while (p < end && packet[p] !== 0) {
    const keyEnd = cstringEnd(packet, p, end);
    if (keyEnd === -1) throw new ProtocolError('unterminated parameter name in startup packet');
    const valueEnd = cstringEnd(packet, keyEnd + 1, end);
    if (valueEnd === -1) throw new ProtocolError('unterminated parameter value in startup packet');
    params.set(packet.toString('utf8', p, keyEnd), packet.toString('utf8', keyEnd + 1, valueEnd));
    p = valueEnd + 1;
  }
  return params;
}

/** A CancelRequest packet (length, code, process id, secret key). */
export function decodeCancelRequest(packet: Buffer): { processId: number; secretKey: Buffer } {
  if (packet.length < 16) throw new ProtocolError('truncated CancelRequest');
  return { processId: packet.readInt32BE(8), secretKey: packet.subarray(12) };
}
