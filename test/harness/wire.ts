// A raw protocol client for tests that must control exactly which messages are
// sent together (pipelines, malformed bytes) or see messages drivers hide (like
// BackendKeyData): pg-protocol serializes and parses, node:net carries the bytes,
// and every backend message is recorded.

import net from 'node:net';
import { once } from 'node:events';
import { parse, serialize } from 'pg-protocol';
import type { BackendMessage } from 'pg-protocol/dist/messages.js';

export { serialize };

/** A socket whose backend messages are parsed and queued as they arrive. */
export class RawConnection {
  private readonly queue: BackendMessage[] = [];
  private wake: (() => void) | null = null;
  closed = false;
  readonly closedAt: Promise<number>;

  private constructor(readonly socket: net.Socket) {
    this.closedAt = new Promise((resolve) =>
      socket.once('close', () => {
        this.closed = true;
        this.wake?.();
        resolve(Date.now());
      }),
    );
    socket.on('error', () => undefined); // a reset shows up as 'close'
    void parse(socket, (message) => {
      this.queue.push(message);
      this.wake?.();
    });
    socket.resume(); // a socket someone paused (see wrap) does not flow again by itself
  }

  static async open(port: number, host = '127.0.0.1'): Promise<RawConnection> {
    const socket = net.connect({ host, port });
    await once(socket, 'connect');
    return new RawConnection(socket);
  }

  /** Opens a connection and logs in as a trust-authenticated user; resolves at the first ReadyForQuery. */
  static async login(port: number, params: Record<string, string>): Promise<RawConnection> {
    const connection = await RawConnection.open(port);
    connection.write(serialize.startup(params));
    const messages = await connection.untilReady();
    const error = messages.find((m) => m.name === 'error');
    if (error) throw new Error(`login failed: ${(error as unknown as { message: string }).message}`);
    return connection;
  }

  /**
   * Wraps an already-connected socket whose earlier bytes were read by someone
   * else (e.g. the one-byte answer to SSLRequest).
   */
  static wrap(socket: net.Socket): RawConnection {
    return new RawConnection(socket);
  }

  write(...buffers: Buffer[]): void {
    this.socket.write(Buffer.concat(buffers));
  }

  /** The next message, or null once the connection is closed and nothing is left. */
  async next(timeoutMs = 10_000): Promise<BackendMessage | null> {
    const deadline = Date.now() + timeoutMs;
    while (this.queue.length === 0) {
      if (this.closed) return null;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out after ${timeoutMs} ms waiting for a backend message`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = null;
    }
    return this.queue.shift()!;
  }

  /** Messages up to and including the next ReadyForQuery; throws if the connection closes first. */
  async untilReady(timeoutMs = 10_000): Promise<BackendMessage[]> {
    const out: BackendMessage[] = [];
    for (;;) {
      const message = await this.next(timeoutMs);
      if (message === null) throw new Error(`connection closed after [${out.map((m) => m.name).join(', ')}]`);
      out.push(message);
      if (message.name === 'readyForQuery') return out;
    }
  }

  /** Every message until the connection closes (bounded by timeoutMs). */
  async untilClosed(timeoutMs = 10_000): Promise<BackendMessage[]> {
    const out: BackendMessage[] = [];
    for (;;) {
      const message = await this.next(timeoutMs);
      if (message === null) return out;
      out.push(message);
    }
  }

  /** Says goodbye (Terminate) and ends the connection. */
  close(): void {
    if (!this.closed) this.socket.end(serialize.end());
  }

  destroy(): void {
    this.socket.destroy();
  }
}

/** A compact description of a response sequence: names, with SQLSTATE for errors and status for ReadyForQuery. */
export function describeMessages(messages: BackendMessage[]): string[] {
  return messages.map((m) => {
    if (m.name === 'error') return `error:${(m as unknown as { code: string }).code}`;
    if (m.name === 'readyForQuery') return `readyForQuery:${(m as unknown as { status: string }).status}`;
    return m.name;
  });
}

/** The SQLSTATE of an ErrorResponse as parsed by pg-protocol. */
export function sqlstate(message: BackendMessage | null | undefined): string | undefined {
  return message?.name === 'error' ? (message as unknown as { code?: string }).code : undefined;
}
