// Decoders for the few backend messages the proxy must read: CommandComplete (row
// counts), ErrorResponse (SQLSTATE), ReadyForQuery (transaction status),
// ParameterStatus, BackendKeyData and the authentication requests. Like the frontend decoders they read in place; the row count
// parser allocates nothing because it runs once per query.

import { ErrorField, SCRAM_SHA_256_PLUS, type TransactionStatus } from './constants.ts';

const DIGIT_0 = 0x30;
const DIGIT_9 = 0x39;

/**
 * The row count at the end of a CommandComplete tag ("SELECT 5", "INSERT 0 5",
 * "UPDATE 3"); 0 for tags without one ("CREATE TABLE").
 */
export function commandCompleteRows(buf: Buffer, start: number, end: number): number {
  // The tag ends with a NUL at end - 1; digits run back from there.
  let i = end - 2;
  const tagStart = start + 5;
  let rows = 0;
  let scale = 1;
  while (i >= tagStart && buf[i] >= DIGIT_0 && buf[i] <= DIGIT_9) {
    rows += (buf[i] - DIGIT_0) * scale;
    scale *= 10;
    i--;
  }
  return i >= tagStart && buf[i] === 0x20 ? rows : 0;
}

/** The value of one field of an ErrorResponse or NoticeResponse, or null. */
export function errorField(buf: Buffer, start: number, end: number, field: number): string | null {
  let p = start + 5;
  while (p < end && buf[p] !== 0) {
    const type = buf[p];
    const valueEnd = buf.indexOf(0, p + 1);
    if (valueEnd === -1 || valueEnd >= end) return null;
    if (type === field) return buf.toString('utf8', p + 1, valueEnd);
    p = valueEnd + 1;
  }
  return null;
}

/** The SQLSTATE of an ErrorResponse. */
export function errorSqlState(buf: Buffer, start: number, end: number): string | null {
  return errorField(buf, start, end, ErrorField.Code);
}

/** Whether an ErrorResponse is FATAL or PANIC (the server closes the connection). */
export function errorIsFatal(buf: Buffer, start: number, end: number): boolean {
  const severity =
    errorField(buf, start, end, ErrorField.SeverityNonLocalized) ?? errorField(buf, start, end, ErrorField.Severity);
  return severity === 'FATAL' || severity === 'PANIC';
}

/** The request code of an Authentication ('R') message (0 = AuthenticationOk, 10 = SASL...). */
export function authenticationCode(buf: Buffer, start: number, end: number): number {
  return end - start >= 9 ? buf.readInt32BE(start + 5) : -1;
}

const STATUS_IN_TRANSACTION = 0x54; // 'T'
const STATUS_IDLE = 0x49; // 'I'

/**
 * ReadyForQuery's transaction status. A byte other than 'I', 'T' or 'E' (no server
 * sends one) reads as 'E': nothing is assumed to be idle that did not say so.
 */
export function readyForQueryStatus(buf: Buffer, start: number): TransactionStatus {
  const status = buf[start + 5];
  return status === STATUS_IDLE ? 'I' : status === STATUS_IN_TRANSACTION ? 'T' : 'E';
}

/**
 * A ParameterStatus's value when its parameter is `name` (given NUL-terminated, as
 * on the wire, e.g. Buffer.from('search_path\0')), else null. Compares in place.
 */
export function parameterStatusValue(buf: Buffer, start: number, end: number, name: Buffer): string | null {
  const nameStart = start + 5;
  const valueStart = nameStart + name.length;
  if (valueStart >= end || buf.compare(name, 0, name.length, nameStart, valueStart) !== 0) return null;
  return buf.toString('utf8', valueStart, end - 1);
}

/** BackendKeyData's process id. */
export function backendKeyProcessId(buf: Buffer, start: number): number {
  return buf.readInt32BE(start + 5);
}

/** BackendKeyData's secret key (4 bytes before protocol 3.2, up to 256 after), copied. */
export function backendKeySecret(buf: Buffer, start: number, end: number): Buffer {
  return Buffer.from(buf.subarray(start + 9, end));
}

/**
 * An AuthenticationSASL message without SCRAM-SHA-256-PLUS, or null when it does
 * not offer it. A client without TLS toward pgwarden cannot bind to the server's
 * TLS channel, so the offer would only make it refuse to log in.
 */
export function withoutChannelBinding(buf: Buffer, start: number, end: number): Buffer | null {
  const mechanisms: string[] = [];
  let p = start + 9;
  while (p < end && buf[p] !== 0) {
    const nul = buf.indexOf(0, p);
    if (nul === -1 || nul >= end) return null; // malformed: relayed as it is, the client judges
    mechanisms.push(buf.toString('utf8', p, nul));
    p = nul + 1;
  }
  if (!mechanisms.includes(SCRAM_SHA_256_PLUS)) return null;
  const kept = mechanisms.filter((m) => m !== SCRAM_SHA_256_PLUS);
  let length = 4 + 4 + 1;
  for (const m of kept) length += Buffer.byteLength(m) + 1;
  const out = Buffer.alloc(1 + length);
  buf.copy(out, 0, start, start + 1);
  out.writeInt32BE(length, 1);
  buf.copy(out, 5, start + 5, start + 9);
  let q = 9;
  for (const m of kept) {
    q += out.write(m, q);
    out[q++] = 0;
  }
  return out;
}

/** The server's one-byte answer to SSLRequest: 'S' to go on with TLS, 'N' to go on without. */
export function sslAccepted(answer: Buffer): boolean {
  return answer[0] === 0x53; // 'S'
}
