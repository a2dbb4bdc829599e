// A reroute rule's destination: a small pool of connections to a replica, with the
// credentials configured for that replica rather than the client's (docs/api.md, Rules).
//
// node-postgres only logs in (trust, md5, SCRAM, TLS are its business); then we take
// the socket over and speak raw protocol, because the session relays the replica's
// answer to its client byte for byte: RowDescription, DataRow, CommandComplete,
// ErrorResponse and the rest exactly as the replica sent them, never re-encoded.
// The answer streams through the project's Framer straight to the session's sink,
// with its backpressure (the replica socket pauses while the client is behind), so
// a result of any size costs a read buffer or two, never the whole result.
// ParameterStatus is kept back (the replica's settings are not the client's session),
// a FATAL ErrorResponse too (it ends the replica connection, not the client's
// session), and the final ReadyForQuery (the session writes the primary's status).

import type { Duplex } from 'node:stream';
import pg from 'pg';
import type { Logger } from 'pino';
import {
  commandCompleteRows,
  errorField,
  errorIsFatal,
  errorSqlState,
  readyForQueryStatus,
} from '../protocol/backend.ts';
import { Backend, ErrorField, Frontend, type TransactionStatus } from '../protocol/constants.ts';
import { encodeCopyFail, TERMINATE } from '../protocol/encode.ts';
import { CONTINUE, Framer, kindTable, PASS, SKIP, WHOLE, type FrameHandler, type Outcome } from '../protocol/framer.ts';
import { MessageCursor } from '../protocol/messages.ts';
import { ProtocolError } from '../protocol/frontend.ts';
import { RerouteInterrupted, type RerouteOutcome, type RerouteSink, type RerouteTarget } from '../proxy/seam.ts';

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
/** No message limit of our own on the replica's side: the client reads what the server sends. */
const MAX_BACKEND_MESSAGE = 0x7fffffff;

/** Answer to a CopyInResponse: a rerouted statement has no client data to send. */
const COPY_FAIL = encodeCopyFail('pgwarden: COPY FROM STDIN cannot run on a replica');

/** Backend messages the replica connection reads; everything else streams through. */
const REPLICA_KINDS = kindTable(PASS, [
  [
    Backend.ReadyForQuery,
    Backend.ErrorResponse,
    Backend.CommandComplete,
    Backend.ParameterStatus,
    Backend.CopyInResponse,
    Backend.CopyBothResponse,
  ],
  WHOLE,
]);

export class ReplicaPool implements RerouteTarget {
  readonly name: string;
  private readonly url: URL;
  /** The database named in the URL. */
  readonly defaultDatabase: string;
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
    if (!Number.isInteger(this.size) || this.size < 1)
      throw new Error(`replica ${options.name}: size must be a positive integer`);
    this.connectTimeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
    // The caller may already have bound the name (src/cli/app.ts does); pino would repeat the key.
    this.log = 'replica' in options.log.bindings() ? options.log : options.log.child({ replica: options.name });
  }

  /**
   * Runs a simple Query, or an extended-protocol group ending with Sync, on the
   * replica (in `database`, default the URL's) and streams the backend messages to
   * `sink`, up to but excluding the final ReadyForQuery. Rejects with a plain Error
   * when nothing was relayed (no working connection: the caller may run the
   * statement on the primary), with RerouteInterrupted when the replica failed
   * after part of the answer was relayed.
   */
  async run(messages: Buffer, database: string, sink: RerouteSink): Promise<RerouteOutcome> {
    if (this.closed) throw new Error(`replica ${this.name}: the pool is closed`);
    const readyCount = this.expectedReadyForQuery(messages);
    let pool = this.pools.get(database);
    if (pool === undefined) {
      pool = new DatabasePool(this.name, this.urlFor(database), database, this.size, this.connectTimeoutMs, this.log);
      this.pools.set(database, pool);
    }
    return pool.run(messages, readyCount, sink);
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
    let count = 0;
    let last = -1;
    const cursor = new MessageCursor(messages);
    try {
      while (cursor.next()) {
        const type = cursor.type;
        if (type === Frontend.Terminate) throw new Error(`replica ${this.name}: Terminate cannot be rerouted`);
        if (type === Frontend.Query || type === Frontend.Sync || type === Frontend.FunctionCall) count++;
        last = type;
      }
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      throw new Error(`replica ${this.name}: malformed frontend message: ${err.message}`);
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

  async run(messages: Buffer, readyCount: number, sink: RerouteSink): Promise<RerouteOutcome> {
    for (;;) {
      const connection = await this.acquire();
      try {
        return await connection.run(messages, readyCount, sink);
      } catch (error) {
        // A pooled connection can die while idle (replica restarted, backend
        // terminated) and we only learn it now. If it died before relaying
        // anything, try again, on a fresh connection once the idle ones are used
        // up. A fresh connection failing is the replica's answer.
        if (!(error instanceof ConnectionLost && connection.reused)) throw error;
        this.log.info(
          { database: this.database, err: error },
          'replica connection was found dead; retrying on another',
        );
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

/** The connection died during a run before anything was relayed. */
class ConnectionLost extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'ConnectionLost';
  }
}

interface PendingRun {
  resolve(outcome: RerouteOutcome): void;
  reject(error: Error): void;
  readonly sink: RerouteSink;
  /** ReadyForQuery messages still to come; the last one ends the run. */
  readyLeft: number;
  /** Bytes handed to the sink so far. */
  relayed: number;
  rows: number;
  sqlstate: string | null;
  /** The message of a FATAL ErrorResponse kept back, to explain the close that follows. */
  fatal: string | null;
}

interface OpenOptions {
  name: string;
  url: string;
  database: string;
  connectTimeoutMs: number;
  log: Logger;
  onDead(connection: ReplicaConnection): void;
}

/** One logged-in connection whose backend messages stream to the current run's sink. */
class ReplicaConnection {
  /** Why the connection is unusable, or null while it works. */
  dead: Error | null = null;
  /** Has completed a run: it sat in the pool and may have died there unnoticed. */
  reused = false;

  private pending: PendingRun | null = null;
  private readonly framer: Framer;
  private paused = false;
  private terminating = false;
  private readonly closedPromise: Promise<void>;
  /** Bound once: the sink calls it when its client drains or goes away. */
  private readonly onSinkResumed = (): void => this.resumeFromSink();

  private constructor(
    private readonly socket: Duplex,
    private readonly options: OpenOptions,
  ) {
    this.framer = new Framer(REPLICA_KINDS, MAX_BACKEND_MESSAGE, this.handler);
    this.closedPromise = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', (chunk: Buffer) => this.framer.push(chunk));
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
      throw new Error(
        `replica ${options.name}: cannot connect to database "${options.database}": ${(error as Error).message}`,
        {
          cause: error,
        },
      );
    }
    // From here on the bytes are ours: pg's parser listens to 'data' only.
    const socket = client.connection.stream;
    socket.removeAllListeners('data');
    options.log.debug({ database: options.database }, 'replica connection opened');
    return new ReplicaConnection(socket, options);
  }

  run(messages: Buffer, readyCount: number, sink: RerouteSink): Promise<RerouteOutcome> {
    if (this.dead !== null) return Promise.reject(this.dead);
    return new Promise((resolve, reject) => {
      this.pending = { resolve, reject, sink, readyLeft: readyCount, relayed: 0, rows: 0, sqlstate: null, fatal: null };
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

  private readonly handler: FrameHandler = {
    onMessage: (type, buf, start, end) => this.onMessage(type, buf, start, end),
    onForward: (bytes) => this.relay(bytes),
    onViolation: (reason) => {
      this.fail(`malformed backend message: ${reason}`);
      this.socket.destroy();
    },
  };

  private onMessage(type: number, buf: Buffer, start: number, end: number): Outcome {
    const run = this.pending;
    // Between runs only asynchronous messages arrive (ParameterStatus, NoticeResponse,
    // a FATAL ErrorResponse before the close): nobody to relay them to.
    if (run === null) return SKIP;
    switch (type) {
      case Backend.CommandComplete:
        run.rows = commandCompleteRows(buf, start, end);
        return CONTINUE;
      case Backend.ErrorResponse:
        if (errorIsFatal(buf, start, end)) {
          run.fatal = errorField(buf, start, end, ErrorField.Message);
          this.framer.flushPending();
          return SKIP;
        }
        run.sqlstate = errorSqlState(buf, start, end);
        return CONTINUE;
      case Backend.ParameterStatus:
        this.framer.flushPending();
        return SKIP;
      case Backend.CopyInResponse:
        // The client is not in COPY mode; the replica's ErrorResponse tells it why.
        this.framer.flushPending();
        this.socket.write(COPY_FAIL);
        return SKIP;
      case Backend.CopyBothResponse:
        this.framer.flushPending();
        this.fail('a rerouted statement started a CopyBoth (replication) stream');
        this.socket.destroy();
        return SKIP;
      case Backend.ReadyForQuery:
        if (--run.readyLeft > 0) return CONTINUE;
        this.framer.flushPending();
        this.finish(run, readyForQueryStatus(buf, start));
        return SKIP;
    }
    return CONTINUE;
  }

  private relay(bytes: Buffer): void {
    const run = this.pending;
    if (run === null) return;
    run.relayed += bytes.length;
    if (run.sink.write(bytes)) return;
    if (run.sink.closed) {
      this.clientGone();
      return;
    }
    if (!this.paused) {
      this.paused = true;
      this.socket.pause();
      run.sink.resumed = this.onSinkResumed;
    }
  }

  private resumeFromSink(): void {
    const run = this.pending;
    if (run !== null) run.sink.resumed = null;
    if (!this.paused) return;
    this.paused = false;
    if (run?.sink.closed) this.clientGone();
    else if (this.dead === null) this.socket.resume();
  }

  /** The client left mid-answer: the rest is not wanted, and this connection is mid-statement. */
  private clientGone(): void {
    this.fail('the client went away before the answer was relayed');
    this.socket.destroy();
  }

  private finish(run: PendingRun, status: TransactionStatus): void {
    this.pending = null;
    this.reused = true;
    if (status !== 'I') {
      // A rerouted statement must not leave a transaction open; whatever it began
      // ends with this connection instead of leaking into the next statement.
      const { database, name } = this.options;
      this.options.log.warn({ database, status }, 'rerouted statement left a transaction open; closing the connection');
      this.dead = new Error(`replica ${name}: connection closed after a statement left transaction status ${status}`);
      this.socket.destroy();
    }
    run.resolve({ rows: run.rows, sqlstate: run.sqlstate });
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
    if (run !== null) run.sink.resumed = null;
    const detail = run?.fatal ? `${reason} (${run.fatal})` : reason;
    const message = `replica ${this.options.name}: connection to database "${this.options.database}" lost: ${detail}`;
    const options = cause ? { cause } : undefined;
    const error =
      run !== null && run.relayed > 0
        ? new RerouteInterrupted(message, this.framer.midMessage, options)
        : new ConnectionLost(message, options);
    this.dead = error;
    this.framer.stop();
    this.socket.destroy();
    if (run) {
      this.options.log.warn(
        { database: this.options.database, reason: detail, relayed: run.relayed },
        'replica connection lost during a statement',
      );
      run.reject(error);
    } else {
      this.options.log.info({ database: this.options.database, reason }, 'idle replica connection lost');
    }
    this.options.onDead(this);
  }
}
