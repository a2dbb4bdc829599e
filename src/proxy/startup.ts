// The part of a connection before the session exists: SSLRequest (TLS toward the
// client when a certificate is configured), GSSENCRequest, CancelRequest and the
// StartupMessage. Reads exactly one packet at a time, as PostgreSQL does, and
// rejects what PostgreSQL would reject before anything reaches the upstream, the
// way PostgreSQL does: a FATAL for a packet it can read but not accept, silence
// for bytes that are not a startup packet at all.

import type net from 'node:net';
import tls from 'node:tls';
import {
  CANCEL_REQUEST_CODE,
  GSSENC_REQUEST_CODE,
  MAX_STARTUP_PACKET_BYTES,
  SqlState,
  SSL_REQUEST_CODE,
} from '../protocol/constants.ts';
import { encodeErrorResponse, SSL_ACCEPTED, SSL_REFUSED } from '../protocol/encode.ts';
import {
  decodeStartupParameters,
  ProtocolError,
  startupPacketLength,
  startupRequestCode,
} from '../protocol/frontend.ts';
import { closeClient } from './closing.ts';

export type StartupOutcome =
  | { kind: 'startup'; socket: net.Socket; packet: Buffer; params: Map<string, string>; leftover: Buffer | null }
  | { kind: 'cancel'; packet: Buffer }
  | { kind: 'rejected'; reason: string; closedByPeer: boolean };

export interface StartupOptions {
  /** Present when TLS toward clients is configured. */
  readonly secureContext: tls.SecureContext | null;
}

/**
 * Reads packets from a new connection until it asks for a session or a cancel.
 * Whatever it rejects is closed here (see closeClient); the caller bounds the time.
 */
export async function negotiateStartup(socket: net.Socket, options: StartupOptions): Promise<StartupOutcome> {
  let current = socket;
  let tlsDone = false;
  let gssDone = false;
  try {
    for (;;) {
      const { packet, leftover } = await readPacket(current);
      const code = startupRequestCode(packet);
      if (code === SSL_REQUEST_CODE && packet.length === 8) {
        if (leftover !== null || tlsDone) return reject(current, 'unexpected data after SSLRequest');
        tlsDone = true;
        if (options.secureContext === null) {
          current.write(SSL_REFUSED);
          continue;
        }
        current.write(SSL_ACCEPTED);
        current = await acceptTls(current, options.secureContext);
        continue;
      }
      if (code === GSSENC_REQUEST_CODE && packet.length === 8) {
        if (leftover !== null || gssDone) return reject(current, 'unexpected data after GSSENCRequest');
        gssDone = true;
        current.write(SSL_REFUSED);
        continue;
      }
      if (code === CANCEL_REQUEST_CODE && packet.length >= 16) {
        closeClient(current);
        return { kind: 'cancel', packet };
      }
      if (code >>> 16 !== 3) return reject(current, `unsupported frontend protocol ${code >>> 16}.${code & 0xffff}`);
      const params = decodeStartupParameters(packet);
      return { kind: 'startup', socket: current, packet, params, leftover };
    }
  } catch (err) {
    const reason = (err as Error).message;
    if (err instanceof ProtocolError) return reject(current, reason);
    // A bad length (garbage, an HTTP request, a Terminate before any startup
    // packet) or a peer gone mid-packet: PostgreSQL closes without a word, and so
    // does pgwarden.
    const closedByPeer = err instanceof PeerClosed;
    closeClient(current);
    return { kind: 'rejected', reason, closedByPeer };
  }
}

function reject(socket: net.Socket, reason: string): StartupOutcome {
  closeClient(
    socket,
    encodeErrorResponse({
      severity: 'FATAL',
      code: SqlState.ProtocolViolation,
      message: `invalid startup packet: ${reason}`,
    }),
  );
  return { kind: 'rejected', reason, closedByPeer: false };
}

/** The connection ended (or failed) before a whole packet arrived. */
class PeerClosed extends Error {}

/** A packet length PostgreSQL would not accept (it closes the connection silently). */
class InvalidLength extends Error {}

/** Reads one length-prefixed startup-phase packet; extra bytes come back as leftover. */
function readPacket(socket: net.Socket): Promise<{ packet: Buffer; leftover: Buffer | null }> {
  return new Promise((resolve, reject) => {
    let buffered: Buffer | null = null;
    const onData = (data: Buffer) => {
      buffered = buffered === null ? data : Buffer.concat([buffered, data]);
      if (buffered.length < 4) return;
      const length = startupPacketLength(buffered);
      if (length < 8 || length - 4 > MAX_STARTUP_PACKET_BYTES) {
        cleanup();
        return reject(new InvalidLength(`invalid length of startup packet: ${length}`));
      }
      if (buffered.length < length) return;
      cleanup();
      resolve({
        packet: buffered.subarray(0, length),
        leftover: buffered.length > length ? buffered.subarray(length) : null,
      });
    };
    const onEnd = () => {
      cleanup();
      reject(new PeerClosed('connection closed during startup'));
    };
    const onError = (err: Error) => {
      cleanup();
      reject(new PeerClosed(err.message));
    };
    const cleanup = () => {
      socket.removeListener('data', onData);
      socket.removeListener('close', onEnd);
      socket.removeListener('error', onError);
      socket.pause();
    };
    socket.on('data', onData);
    socket.on('close', onEnd);
    socket.on('error', onError);
    socket.resume();
  });
}

function acceptTls(socket: net.Socket, secureContext: tls.SecureContext): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const secure = new tls.TLSSocket(socket, { isServer: true, secureContext });
    secure.once('secure', () => {
      secure.removeListener('error', reject);
      resolve(secure);
    });
    secure.once('error', (err) => {
      secure.destroy();
      reject(err);
    });
  });
}
