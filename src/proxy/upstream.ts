// Opening connections to the upstream server: plain TCP with the proxy's reusable
// read buffer, or TLS negotiated with an SSLRequest first, as libpq would. Also
// the one-shot connections that carry a CancelRequest.

import net from 'node:net';
import tls from 'node:tls';
import { sslAccepted } from '../protocol/backend.ts';
import { SSL_REQUEST } from '../protocol/encode.ts';

export type UpstreamTlsMode = 'disable' | 'prefer' | 'require' | 'verify-full';

export interface UpstreamTarget {
  readonly name: string;
  readonly host: string;
  readonly port: number;
  readonly tls: UpstreamTlsMode;
  /** PEM CA bundle for verify-full. */
  readonly ca?: string | Buffer;
  readonly connectTimeoutMs: number;
}

/** How the session wants to receive upstream bytes on a plain TCP connection. */
export interface ReadBufferOptions {
  buffer: () => Uint8Array;
  callback: (bytesRead: number, buffer: Uint8Array) => boolean;
}

export interface UpstreamConnection {
  readonly socket: net.Socket;
  /** False when TLS is in use: reads then arrive as 'data' events. */
  readonly usesReadBuffer: boolean;
}

/** The upstream could not be reached; `cause` says how. */
export class UpstreamUnreachable extends Error {
  constructor(
    readonly target: UpstreamTarget,
    override readonly cause: Error,
  ) {
    super(`upstream ${target.name} (${target.host}:${target.port}) unreachable: ${cause.message}`);
  }
}

/** Opens the upstream connection; `connectTimeoutMs` bounds all of it, TLS negotiation included. */
export async function connectUpstream(target: UpstreamTarget, onread: ReadBufferOptions): Promise<UpstreamConnection> {
  const started = Date.now();
  try {
    if (target.tls === 'disable') {
      const socket = await openTcp(target, onread);
      return { socket, usesReadBuffer: true };
    }
    const socket = await openTcp(target, null);
    // A server that accepts but never answers must not hold the client forever.
    const timer = setTimeout(
      () => socket.destroy(new Error(`TLS negotiation timed out after ${target.connectTimeoutMs} ms`)),
      Math.max(1, target.connectTimeoutMs - (Date.now() - started)),
    );
    try {
      const accepted = await requestTls(socket);
      if (!accepted) {
        if (target.tls === 'prefer') return { socket, usesReadBuffer: false };
        socket.destroy();
        throw new Error('server does not support TLS');
      }
      return { socket: await startTls(socket, target), usesReadBuffer: false };
    } catch (err) {
      socket.destroy();
      throw err;
    } finally {
      clearTimeout(timer);
    }
  } catch (err) {
    throw err instanceof UpstreamUnreachable ? err : new UpstreamUnreachable(target, err as Error);
  }
}

function openTcp(target: UpstreamTarget, onread: ReadBufferOptions | null): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const options: net.NetConnectOpts = { host: target.host, port: target.port, noDelay: true };
    if (onread) (options as net.TcpNetConnectOpts).onread = onread;
    const socket = net.connect(options);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`connect timed out after ${target.connectTimeoutMs} ms`));
    }, target.connectTimeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeListener('error', reject);
      resolve(socket);
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
  });
}

/** Sends SSLRequest and reads the server's one-byte answer. */
function requestTls(socket: net.Socket): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const onData = (data: Buffer) => {
      cleanup();
      // Any byte beyond the answer would be unencrypted data injected before the handshake.
      if (data.length !== 1) return reject(new Error('unexpected data in answer to SSLRequest'));
      resolve(sslAccepted(data));
    };
    const onError = (err: Error) => {
      cleanup();
      reject(err);
    };
    const onClose = () => {
      cleanup();
      reject(new Error('connection closed during SSLRequest'));
    };
    if (socket.destroyed) return reject(new Error('connection closed during SSLRequest'));
    const cleanup = () => {
      socket.removeListener('data', onData);
      socket.removeListener('error', onError);
      socket.removeListener('close', onClose);
      socket.pause();
    };
    socket.on('data', onData);
    socket.on('error', onError);
    socket.on('close', onClose);
    socket.write(SSL_REQUEST);
  });
}

function startTls(socket: net.Socket, target: UpstreamTarget): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    const verify = target.tls === 'verify-full';
    const secure = tls.connect({
      socket,
      servername: net.isIP(target.host) ? undefined : target.host,
      ca: target.ca,
      rejectUnauthorized: verify,
      checkServerIdentity: verify ? tls.checkServerIdentity : () => undefined,
    });
    const onClose = () => reject(new Error('connection closed during the TLS handshake'));
    secure.once('secureConnect', () => {
      secure.removeListener('error', reject);
      secure.removeListener('close', onClose);
      secure.setNoDelay(true);
      resolve(secure);
    });
    secure.once('error', reject);
    secure.once('close', onClose);
  });
}

/**
 * Delivers a CancelRequest on a connection of its own, as PostgreSQL requires.
 * Resolves when the server has closed that connection (it answers nothing).
 */
export function sendCancelRequest(target: UpstreamTarget, packet: Buffer): Promise<void> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: target.host, port: target.port });
    const timer = setTimeout(() => socket.destroy(), target.connectTimeoutMs);
    socket.once('connect', () => socket.end(packet));
    socket.on('error', () => undefined); // best effort: the query may have finished already
    socket.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
    socket.resume();
  });
}
