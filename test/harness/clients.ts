// Clients the proxy tests drive besides node-postgres and postgres.js: libpq's
// psql as a child process, and a raw socket that records every backend message
// (for bytes no driver would send, or messages drivers hide, like BackendKeyData).

import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { parse } from 'pg-protocol';
import type { BackendMessage } from 'pg-protocol/dist/messages.js';

export const PSQL = '/usr/bin/psql';
export const PGBENCH = '/usr/bin/pgbench';

export interface ProcessResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

export interface RunningProcess {
  child: ChildProcess;
  /** Settles when the process has exited; it is killed at timeoutMs. */
  done: Promise<ProcessResult>;
}

/**
 * The environment for libpq tools: nothing inherited that starts with PG (no
 * stray PGHOST, PGSSLMODE or service file), no password file, and the password
 * only when given.
 */
export function libpqEnv(password?: string): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) if (!key.startsWith('PG')) env[key] = value;
  env.PGPASSFILE = path.join(os.tmpdir(), 'pgwarden-test-no-such-pgpass');
  env.PGCONNECT_TIMEOUT = '10';
  if (password !== undefined) env.PGPASSWORD = password;
  return env;
}

/** Starts a program and collects its output; a program still running at timeoutMs is killed. */
export function startProcess(file: string, args: string[], env: NodeJS.ProcessEnv, timeoutMs = 30_000): RunningProcess {
  const child = spawn(file, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout!.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const done = new Promise<ProcessResult>((resolve, reject) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.once('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.once('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
  return { child, done };
}

/** A libpq key=value connection string (values quoted, so any role or database name works). */
export function conninfo(params: Record<string, string | number>): string {
  return Object.entries(params)
    .map(([key, value]) => `${key}='${String(value).replaceAll('\\', '\\\\').replaceAll("'", "\\'")}'`)
    .join(' ');
}

/** Runs `psql -X -A -t` with the given connection string and commands (`-c` each). */
export function psql(connection: string, commands: string[], options: { password?: string; timeoutMs?: number } = {}): RunningProcess {
  const args = ['-X', '-A', '-t', '-d', connection];
  for (const command of commands) args.push('-c', command);
  return startProcess(PSQL, args, libpqEnv(options.password), options.timeoutMs);
}

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

  destroy(): void {
    this.socket.destroy();
  }
}

/** The SQLSTATE of an ErrorResponse as parsed by pg-protocol. */
export function sqlstate(message: BackendMessage | null | undefined): string | undefined {
  return message?.name === 'error' ? (message as unknown as { code?: string }).code : undefined;
}
