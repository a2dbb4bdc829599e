// Encoders for the messages pgwarden itself writes: its own ErrorResponses, the
// substitute messages that make the server fail a refused statement, ReadyForQuery
// after a rerouted statement, Terminate and CancelRequest (BackendKeyData for tests). None of these run per forwarded message.

import {
  CANCEL_REQUEST_CODE,
  ErrorField,
  Frontend,
  Backend,
  SSL_REQUEST_CODE,
  type TransactionStatus,
} from './constants.ts';

export interface ErrorFields {
  severity: 'ERROR' | 'FATAL';
  code: string;
  message: string;
  detail?: string;
  hint?: string;
}

/** One ErrorResponse; the message is prefixed with "pgwarden: " if it is not already. */
export function encodeErrorResponse(fields: ErrorFields): Buffer {
  const message = fields.message.startsWith('pgwarden:') ? fields.message : `pgwarden: ${fields.message}`;
  const parts: [number, string][] = [
    [ErrorField.Severity, fields.severity],
    [ErrorField.SeverityNonLocalized, fields.severity],
    [ErrorField.Code, fields.code],
    [ErrorField.Message, message],
  ];
  if (fields.detail) parts.push([ErrorField.Detail, fields.detail]);
  if (fields.hint) parts.push([ErrorField.Hint, fields.hint]);
  let length = 4 + 1;
  for (const [, value] of parts) length += 1 + Buffer.byteLength(value) + 1;
  const out = Buffer.allocUnsafe(1 + length);
  out[0] = Backend.ErrorResponse;
  out.writeInt32BE(length, 1);
  let p = 5;
  for (const [type, value] of parts) {
    out[p++] = type;
    p += out.write(value, p);
    out[p++] = 0;
  }
  out[p] = 0;
  return out;
}

function encodeWithCStrings(type: number, strings: string[], trailer?: Buffer): Buffer {
  let length = 4 + (trailer?.length ?? 0);
  for (const s of strings) length += Buffer.byteLength(s) + 1;
  const out = Buffer.allocUnsafe(1 + length);
  out[0] = type;
  out.writeInt32BE(length, 1);
  let p = 5;
  for (const s of strings) {
    p += out.write(s, p);
    out[p++] = 0;
  }
  if (trailer) trailer.copy(out, p);
  return out;
}

/** A simple-protocol Query message. */
export function encodeQuery(text: string): Buffer {
  return encodeWithCStrings(Frontend.Query, [text]);
}

/** A Parse message with no declared parameter types. */
export function encodeParse(statement: string, text: string): Buffer {
  return encodeWithCStrings(Frontend.Parse, [statement, text], Buffer.from([0, 0]));
}

/** A CopyFail message: the frontend aborts a COPY FROM STDIN with `reason`. */
export function encodeCopyFail(reason: string): Buffer {
  return encodeWithCStrings(Frontend.CopyFail, [reason]);
}

/** ReadyForQuery with a transaction status. */
export function encodeReadyForQuery(status: TransactionStatus): Buffer {
  return Buffer.from([Backend.ReadyForQuery, 0, 0, 0, 5, status.charCodeAt(0)]);
}

/** BackendKeyData: the server process id and its secret key (4 bytes before protocol 3.2, up to 256 after). */
export function encodeBackendKeyData(processId: number, secretKey: Buffer): Buffer {
  const out = Buffer.allocUnsafe(9 + secretKey.length);
  out[0] = Backend.BackendKeyData;
  out.writeInt32BE(8 + secretKey.length, 1);
  out.writeInt32BE(processId, 5);
  secretKey.copy(out, 9);
  return out;
}

export const TERMINATE = Buffer.from([Frontend.Terminate, 0, 0, 0, 4]);
export const SSL_REQUEST = (() => {
  const b = Buffer.alloc(8);
  b.writeInt32BE(8, 0);
  b.writeInt32BE(SSL_REQUEST_CODE, 4);
  return b;
})();
/** Single-byte answers to SSLRequest / GSSENCRequest. */
export const SSL_ACCEPTED = Buffer.from('S');
export const SSL_REFUSED = Buffer.from('N');

/** A CancelRequest for a backend, from the process id and secret key of its BackendKeyData. */
export function encodeCancelRequest(processId: number, secretKey: Buffer): Buffer {
  const out = Buffer.allocUnsafe(12 + secretKey.length);
  out.writeInt32BE(out.length, 0);
  out.writeInt32BE(CANCEL_REQUEST_CODE, 4);
  out.writeInt32BE(processId, 8);
  secretKey.copy(out, 12);
  return out;
}
