// A raw protocol client for tests that must control exactly which messages are
// sent together (pipelines, malformed bytes): pg-protocol serializes and parses,
// node:net carries the bytes.

import net from 'node:net';
import { once } from 'node:events';
import { parse, serialize } from 'pg-protocol';
import type { BackendMessage } from 'pg-protocol/dist/messages.js';

export { serialize };

export class WireClient {
  private readonly queue: BackendMessage[] = [];
  private waiter: (() => void) | null = null;
  closed = false;

  private constructor(readonly socket: net.Socket) {
    void parse(socket, (message) => {
      this.queue.push(message);
      this.waiter?.();
    });
    socket.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
    socket.on('error', () => undefined);
  }

  /** Connects and logs in as a trust-authenticated user; resolves at the first ReadyForQuery. */
  static async connect(port: number, params: Record<string, string>): Promise<WireClient> {
    const socket = net.connect({ host: '127.0.0.1', port });
    await once(socket, 'connect');
    const client = new WireClient(socket);
    socket.write(serialize.startup(params));
    const messages = await client.readUntilReady();
    const error = messages.find((m) => m.name === 'error');
    if (error) throw new Error(`login failed: ${(error as unknown as { message: string }).message}`);
    return client;
  }

  send(...buffers: Buffer[]): void {
    this.socket.write(Buffer.concat(buffers));
  }

  /** The next message, or null once the connection is closed and nothing is left. */
  async next(timeoutMs = 10_000): Promise<BackendMessage | null> {
    const deadline = Date.now() + timeoutMs;
    while (this.queue.length === 0) {
      if (this.closed) return null;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('timed out waiting for a backend message');
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.waiter = null;
    }
    return this.queue.shift()!;
  }

  /** Messages up to and including the next ReadyForQuery. */
  async readUntilReady(timeoutMs = 10_000): Promise<BackendMessage[]> {
    const out: BackendMessage[] = [];
    for (;;) {
      const message = await this.next(timeoutMs);
      if (message === null) throw new Error(`connection closed after ${out.map((m) => m.name).join(',')}`);
      out.push(message);
      if (message.name === 'readyForQuery') return out;
    }
  }

  close(): void {
    if (!this.closed) this.socket.end(serialize.end());
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
