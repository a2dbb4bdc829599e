// Decoders for the few backend messages the proxy must read: CommandComplete (row
// counts), ErrorResponse (SQLSTATE), ReadyForQuery (transaction status) and
// BackendKeyData. Like the frontend decoders they read in place; the row count
// parser allocates nothing because it runs once per query.

import { ErrorField } from './constants.ts';

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
  const severity = errorField(buf, start, end, ErrorField.SeverityNonLocalized) ?? errorField(buf, start, end, ErrorField.Severity);
  return severity === 'FATAL' || severity === 'PANIC';
}

/** The transaction status byte of a ReadyForQuery ('I', 'T' or 'E'). */
export function readyForQueryStatus(buf: Buffer, start: number): number {
  return buf[start + 5];
}
