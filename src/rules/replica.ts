// A reroute rule's destination: a small pool of connections to a replica, with the
// credentials configured for that replica rather than the client's (docs/api.md, Rules).
//
// node-postgres only logs in (trust, md5, SCRAM, TLS are its business); then we take
// the socket over and speak raw protocol, because the session relays the replica's
// answer to its client byte for byte: RowDescription, DataRow, CommandComplete,
// ErrorResponse and the rest exactly as the replica sent them, never re-encoded.
// ParameterStatus is kept back (the replica's settings are not the client's session),
// and the final ReadyForQuery too (the session writes the primary's own status).

import type { Duplex } from 'node:stream';
import pg from 'pg';
import type { Logger } from 'pino';
import { errorField } from '../protocol/backend.ts';
import { Backend, ErrorField, Frontend, TransactionStatus } from '../protocol/constants.ts';
import { TERMINATE } from '../protocol/encode.ts';
import type { RerouteTarget } from '../proxy/seam.ts';

export interface ReplicaPoolOptions {
  /** The replica's configured name; rules reroute to it by this name. */
  name: string;
  /** postgres:// URL of the replica with the role's credentials; its database is the default. */
  url: string;
  /** Connections per database; default 4. */
  size?: number;
  /** For each new connection, login included; default 5000. */
  connectTimeoutMs?: number;
  log: Logger;
}

const DEFAULT_SIZE = 4;
const DEFAULT_CONNECT_TIMEOUT_MS = 5_000;
const TERMINATE_GRACE_MS = 1_000;
const HEADER_BYTES = 5;
const READY_FOR_QUERY_LENGTH = 5;

/** Answer to a CopyInResponse: a rerouted statement has no client data to send. */
const COPY_FAIL = (() => {
  const reason = Buffer.from('pgwarden: COPY FROM STDIN cannot run on a replica\0');
  const out = Buffer.allocUnsafe(HEADER_BYTES + reason.length);
  out[0] = Frontend.CopyFail;
  out.writeInt32BE(4 + reason.length, 1);
  reason.copy(out, HEADER_BYTES);
  return out;
})();

export class ReplicaPool implements RerouteTarget {
  readonly name: string;
  private readonly url: URL;
  private readonly defaultDatabase: string;
  private readonly size: number;
  private readonly connectTimeoutMs: number;
  private readonly log: Logger;
  private readonly pools = new Map<string, DatabasePool>();
  private closed = false;

  constructor(options: ReplicaPoolOptions) {
    this.name = options.name;
    try {
      this.url = new URL(options.url);
    } catch (error) {
      throw new Error(`replica ${options.name}: invalid URL`, { cause: error });
    }
    const user = decodeURIComponent(this.url.username);
    this.defaultDatabase = decodeURIComponent(this.url.pathname.slice(1)) || user;
    this.size = options.size ?? DEFAULT_SIZE;
    if (!Number.isInteger(this.size) || this.size < 1) throw new Error(`replica ${options.name}: size must be a positive integer`);
    this.connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    // The caller may already have bound the name (src/cli/app.ts does); pino would repeat the key.
    this.log = 'replica' in options.log.bindings() ? options.log : options.log.child({ replica: options.name });
  }

  /**
   * Runs a simple Query, or an extended-protocol group ending with Sync, on the
   * replica (in `database`, default the URL's) and returns the backend messages
   * up to but excluding the final ReadyForQuery. Rejects when no working
   * connection can be had, so the caller can run the statement on the primary.
   */
  async run(messages: Buffer, database: string = this.defaultDatabase): Promise<Buffer> {
    if (this.closed) throw new Error(`replica ${this.name}: the pool is closed`);
    const readyCount = this.expectedReadyForQuery(messages);
    let pool = this.pools.get(database);
    if (pool === undefined) {
      pool = new DatabasePool(this.name, this.urlFor(database), database, this.size, this.connectTimeoutMs, this.log);
      this.pools.set(database, pool);
    }
    return pool.run(messages, readyCount);
  }

  /** Sends Terminate on every connection; waiting and later runs are rejected. */
  async close(): Promise<void> {
    this.closed = true;
    await Promise.all([...this.pools.values()].map((pool) => pool.close()));
  }

  /**
   * One ReadyForQuery comes back per Query, Sync or FunctionCall; the group must
   * end with one of them, or the replica would never say it is done.
   */
  private expectedReadyForQuery(messages: Buffer): number {
    let p = 0;
    let count = 0;
    let last = -1;
    while (p < messages.length) {
      if (messages.length - p < HEADER_BYTES) throw new Error(`replica ${this.name}: truncated frontend message`);
      const type = messages[p];
      const length = messages.readInt32BE(p + 1);
      if (length < 4 || p + 1 + length > messages.length) throw new Error(`replica ${this.name}: malformed frontend message`);
      if (type === Frontend.Terminate) throw new Error(`replica ${this.name}: Terminate cannot be rerouted`);
      if (type === Frontend.Query || type === Frontend.Sync || type === Frontend.FunctionCall) count++;
      last = type;
      p += 1 + length;
    }
    if (last !== Frontend.Query && last !== Frontend.Sync && last !== Frontend.FunctionCall) {
      throw new Error(`replica ${this.name}: messages to reroute must end with Query or Sync`);
    }
    return count;
  }

  private urlFor(database: string): string {
    if (database === this.defaultDatabase) return this.url.href;
    // node-postgres reads the database with decodeURI, which cannot restore '?' or '#'.
    if (/[?#]/.test(database)) throw new Error(`replica ${this.name}: cannot connect to database "${database}" by URL`);
    const url = new URL(this.url.href);
    url.pathname = `/${encodeURI(database)}`;
    return url.href;
  }
}

/** The connections to one database; at most `size`, callers beyond that wait in order. */
class DatabasePool {
  private readonly idle: ReplicaConnection[] = [];
  private readonly waiters: { resolve(connection: ReplicaConnection): void; reject(error: Error): void }[] = [];
  private readonly live = new Set<ReplicaConnection>();
  /** Connections counted against size: live ones plus those still logging in. */
  private slots = 0;
  private closed = false;

  constructor(
    private readonly name: string,
    private readonly url: string,
    private readonly database: string,
    private readonly size: number,
    private readonly connectTimeoutMs: number,
    private readonly log: Logger,
  ) {}

  async run(messages: Buffer, readyCount: number): Promise<Buffer> {
    for (;;) {
      const connection = await this.acquire();
      try {
        return await connection.run(messages, readyCount);
      } catch (error) {
        // A pooled connection can die while idle (replica restarted, backend
        // terminated) and we only learn it now. If it died before answering, the
        // statement did not run: try again, on a fresh connection once the idle
        // ones are used up. A fresh connection failing is the replica's answer.
        if (!(error instanceof ConnectionLost && error.beforeResponse && connection.reused)) throw error;
        this.log.info({ database: this.database, err: error }, 'replica connection was found dead; retrying on another');
      } finally {
        this.release(connection);
      }
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    const error = new Error(`replica ${this.name}: the pool is closed`);
    for (const waiter of this.waiters.splice(0)) waiter.reject(error);
    this.idle.length = 0;
    await Promise.all([...this.live].map((connection) => connection.terminate()));
  }

  private acquire(): Promise<ReplicaConnection> {
    if (this.closed) return Promise.reject(new Error(`replica ${this.name}: the pool is closed`));
    const connection = this.idle.pop();
    if (connection !== undefined) return Promise.resolve(connection);
    if (this.slots < this.size) {
      this.slots++;
      return this.open();
    }
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  private release(connection: ReplicaConnection): void {
    if (connection.dead !== null) {
      this.forget(connection);
      return;
    }
    if (this.closed) {
      void connection.terminate();
      return;
    }
    const waiter = this.waiters.shift();
    if (waiter) waiter.resolve(connection);
    else this.idle.push(connection);
  }

  /** Opens a connection for a slot already counted; on failure the slot goes to the next waiter. */
  private async open(): Promise<ReplicaConnection> {
    try {
      const connection = await ReplicaConnection.open({
        name: this.name,
        url: this.url,
        database: this.database,
        connectTimeoutMs: this.connectTimeoutMs,
        log: this.log,
        onDead: (dead) => this.onIdleDeath(dead),
      });
      if (this.closed) {
        void connection.terminate();
        throw new Error(`replica ${this.name}: the pool is closed`);
      }
      this.live.add(connection);
      return connection;
    } catch (error) {
      this.slots--;
      this.handOverSlot();
      throw error;
    }
  }

  private onIdleDeath(connection: ReplicaConnection): void {
    const index = this.idle.indexOf(connection);
    if (index === -1) return; // busy: its run's release() forgets it
    this.idle.splice(index, 1);
    this.forget(connection);
  }

  private forget(connection: ReplicaConnection): void {
    if (!this.live.delete(connection)) return;
    this.slots--;
    this.handOverSlot();
  }

  /** A freed slot goes to the longest waiter, as a new connection. */
  private handOverSlot(): void {
    if (this.closed || this.slots >= this.size) return;
    const waiter = this.waiters.shift();
    if (!waiter) return;
    this.slots++;
    this.open().then(waiter.resolve, waiter.reject);
  }
}

/** The connection died during a run; `beforeResponse`: nothing but errors or notices had come back. */
class ConnectionLost extends Error {
  constructor(
    message: string,
    readonly beforeResponse: boolean,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = 'ConnectionLost';
  }
}

interface PendingRun {
  resolve(responses: Buffer): void;
  reject(error: Error): void;
  /** ReadyForQuery messages still to come; the last one ends the run. */
  readyLeft: number;
  /** Something other than ErrorResponse or NoticeResponse came back. */
  responded: boolean;
}

interface OpenOptions {
  name: string;
  url: string;
  database: string;
  connectTimeoutMs: number;
  log: Logger;
  onDead(connection: ReplicaConnection): void;
}

/** One logged-in connection, framing backend messages by their 5-byte headers. */
class ReplicaConnection {
  /** Why the connection is unusable, or null while it works. */
  dead: Error | null = null;
  /** Has completed a run: it sat in the pool and may have died there unnoticed. */
  reused = false;

  private pending: PendingRun | null = null;
  /** Kept messages so far: finished chunks, plus one run of a chunk still growing. */
  private out: Buffer[] = [];
  private runChunk: Buffer | null = null;
  private runStart = 0;
  private runEnd = 0;
  /** A header split across reads. */
  private readonly header = Buffer.allocUnsafe(HEADER_BYTES);
  private headerFill = 0;
  /** The message being read: its type, body bytes still to come, whether it is relayed. */
  private type = 0;
  private remaining = 0;
  private keep = false;
  private status = 0;
  private terminating = false;
  private readonly closedPromise: Promise<void>;

  private constructor(
    private readonly socket: Duplex,
    private readonly options: OpenOptions,
  ) {
    this.closedPromise = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('error', (err: Error) => this.fail(`socket error: ${err.message}`, err));
    socket.on('close', () => this.fail('the replica closed the connection'));
  }

  static async open(options: OpenOptions): Promise<ReplicaConnection> {
    const client = new pg.Client({
      connectionString: options.url,
      connectionTimeoutMillis: options.connectTimeoutMs,
      keepAlive: true,
      application_name: 'pgwarden',
    });
    // pg reports the socket's later end and errors on the client; they are ours to handle now.
    client.on('error', () => {});
    try {
      await client.connect();
    } catch (error) {
      throw new Error(`replica ${options.name}: cannot connect to database "${options.database}": ${(error as Error).message}`, {
        cause: error,
      });
    }
    // From here on the bytes are ours: pg's parser listens to 'data' only.
    const socket = client.connection.stream;
    socket.removeAllListeners('data');
    options.log.debug({ database: options.database }, 'replica connection opened');
    return new ReplicaConnection(socket, options);
  }

  run(messages: Buffer, readyCount: number): Promise<Buffer> {
    if (this.dead !== null) return Promise.reject(this.dead);
    return new Promise((resolve, reject) => {
      this.pending = { resolve, reject, readyLeft: readyCount, responded: false };
      this.socket.write(messages);
    });
  }

  /**
   * Terminate, then close; resolves once the socket is closed. A statement in
   * flight still gets its answer: the replica reads Terminate only after it.
   */
  terminate(): Promise<void> {
    if (this.dead === null && !this.terminating) {
      this.terminating = true;
      this.socket.end(TERMINATE);
      // A replica that does not close its end in time is closed for it.
      const timer = setTimeout(() => this.socket.destroy(), TERMINATE_GRACE_MS);
      void this.closedPromise.then(() => clearTimeout(timer));
    }
    return this.closedPromise;
  }

  private onData(chunk: Buffer): void {
    const n = chunk.length;
    let p = 0;
    while (p < n && this.dead === null) {
      if (this.remaining > 0) {
        const take = Math.min(this.remaining, n - p);
        if (this.keep) this.include(chunk, p, p + take);
        this.remaining -= take;
        p += take;
        if (this.remaining === 0) this.endMessage(chunk[p - 1]);
        continue;
      }
      let headerStart: number;
      let headerBuf: Buffer;
      if (this.headerFill === 0 && n - p >= HEADER_BYTES) {
        headerBuf = chunk;
        headerStart = p;
        p += HEADER_BYTES;
      } else {
        const take = Math.min(HEADER_BYTES - this.headerFill, n - p);
        chunk.copy(this.header, this.headerFill, p, p + take);
        this.headerFill += take;
        p += take;
        if (this.headerFill < HEADER_BYTES) return;
        this.headerFill = 0;
        headerBuf = this.header;
        headerStart = 0;
      }
      if (!this.beginMessage(headerBuf[headerStart], headerBuf.readInt32BE(headerStart + 1))) return;
      if (this.keep) {
        if (headerBuf === chunk) this.include(chunk, headerStart, headerStart + HEADER_BYTES);
        else this.includeCopy(this.header);
      }
      if (this.remaining === 0) this.endMessage(-1);
    }
  }

  /** Decides what happens to a message from its header; false if the connection is now dead. */
  private beginMessage(type: number, length: number): boolean {
    if (length < 4 || (type === Backend.ReadyForQuery && length !== READY_FOR_QUERY_LENGTH)) {
      this.fail(`malformed backend message (type ${type}, length ${length})`);
      this.socket.destroy();
      return false;
    }
    this.type = type;
    this.remaining = length - 4;
    const run = this.pending;
    if (run === null) {
      // Between runs only asynchronous messages arrive (ParameterStatus, NoticeResponse,
      // a FATAL ErrorResponse before the close): nobody to relay them to.
      this.keep = false;
      return true;
    }
    switch (type) {
      case Backend.ParameterStatus:
        this.keep = false;
        return true;
      case Backend.ReadyForQuery:
        run.readyLeft--;
        this.keep = run.readyLeft > 0;
        return true;
      case Backend.CopyInResponse:
        // The client is not in COPY mode; the replica's ErrorResponse tells it why.
        this.keep = false;
        this.socket.write(COPY_FAIL);
        break;
      case Backend.CopyBothResponse:
        this.fail('a rerouted statement started a CopyBoth (replication) stream');
        this.socket.destroy();
        return false;
      default:
        this.keep = true;
    }
    if (type !== Backend.ErrorResponse && type !== Backend.NoticeResponse) run.responded = true;
    return true;
  }

  /** A message is complete; `lastByte` is its final body byte (-1 when it has no body). */
  private endMessage(lastByte: number): void {
    if (this.type !== Backend.ReadyForQuery) return;
    this.status = lastByte;
    const run = this.pending;
    if (run === null || run.readyLeft > 0) return;
    this.pending = null;
    const responses = this.takeOutput();
    this.reused = true;
    if (this.status !== TransactionStatus.Idle) {
      // A rerouted statement must not leave a transaction open; whatever it began
      // ends with this connection instead of leaking into the next statement.
      const status = String.fromCharCode(this.status);
      this.options.log.warn({ database: this.options.database, status }, 'rerouted statement left a transaction open; closing the connection');
      this.dead = new Error(`replica ${this.options.name}: connection closed after a statement left transaction status ${status}`);
      this.socket.destroy();
    }
    run.resolve(responses);
  }

  /** Keeps chunk[start, end), extending the current run when contiguous (no copy). */
  private include(chunk: Buffer, start: number, end: number): void {
    if (this.runChunk === chunk && this.runEnd === start) {
      this.runEnd = end;
      return;
    }
    this.flushRun();
    this.runChunk = chunk;
    this.runStart = start;
    this.runEnd = end;
  }

  private includeCopy(bytes: Buffer): void {
    this.flushRun();
    this.out.push(Buffer.from(bytes));
  }

  private flushRun(): void {
    if (this.runChunk === null) return;
    this.out.push(this.runChunk.subarray(this.runStart, this.runEnd));
    this.runChunk = null;
  }

  private takeOutput(): Buffer {
    this.flushRun();
    const out = this.out;
    this.out = [];
    return out.length === 1 ? out[0] : Buffer.concat(out);
  }

  private fail(reason: string, cause?: Error): void {
    if (this.dead !== null) {
      // Already unusable (e.g. closed after an open transaction); the close is expected.
      this.options.onDead(this);
      return;
    }
    const run = this.pending;
    if (run === null && this.terminating) {
      this.dead = new Error(`replica ${this.options.name}: connection terminated`);
      this.options.onDead(this);
      return;
    }
    this.pending = null;
    const output = this.takeOutput();
    const fatal = run ? fatalMessage(output) : null;
    const detail = fatal ? `${reason} (${fatal})` : reason;
    const message = `replica ${this.options.name}: connection to database "${this.options.database}" lost: ${detail}`;
    this.dead = new ConnectionLost(message, run !== null && !run.responded, cause ? { cause } : undefined);
    this.socket.destroy();
    if (run) {
      this.options.log.warn({ database: this.options.database, reason: detail }, 'replica connection lost during a statement');
      run.reject(this.dead);
    } else {
      this.options.log.info({ database: this.options.database, reason }, 'idle replica connection lost');
    }
    this.options.onDead(this);
  }
}

/** The message of the last ErrorResponse in relayed output, for the error that explains a lost connection. */
function fatalMessage(output: Buffer): string | null {
  let found: string | null = null;
  let p = 0;
  while (p + HEADER_BYTES <= output.length) {
    const end = p + 1 + output.readInt32BE(p + 1);
    if (end > output.length) break;
    if (output[p] === Backend.ErrorResponse) found = errorField(output, p, end, ErrorField.Message);
    p = end;
  }
  return found;
}
