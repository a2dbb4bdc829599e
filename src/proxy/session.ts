// One client connection and its own upstream connection. Bytes flow through two
// Framers; the session looks only at the messages that start, end or route a
// query, keeps a queue of what the server still owes (so pipelined responses are
// matched to their queries), publishes a QueryCompletion per statement and asks
// the gate before forwarding each query.
//
// Refusing a query never needs the proxy to imitate the server: the refused
// message is replaced by one the server itself fails (a syntax error), so the
// server skips to the next Sync, marks an open transaction failed and reports its
// true status in ReadyForQuery; the proxy then swaps that ErrorResponse for its own.
//
// Until the server's first ReadyForQuery (authentication and startup done) the
// session interprets nothing the client sends: bytes stream through under
// PostgreSQL's own size bound for authentication messages, so an unauthenticated
// peer can neither make pgwarden gather large messages nor reach the shape
// registry; the server judges them as it would without pgwarden.

import type net from 'node:net';
import tls from 'node:tls';
import { performance } from 'node:perf_hooks';
import type { Logger } from 'pino';
import { AuthenticationCode, Backend, Frontend, MAX_AUTH_MESSAGE_BYTES, SqlState, TransactionStatus } from '../protocol/constants.ts';
import {
  authenticationCode,
  backendKeyProcessId,
  backendKeySecret,
  commandCompleteRows,
  errorIsFatal,
  errorSqlState,
  readyForQueryStatus,
  withoutChannelBinding,
} from '../protocol/backend.ts';
import {
  decodeBindPortal,
  decodeBindStatement,
  decodeCloseTarget,
  decodeExecutePortal,
  decodeParse,
  decodeQueryText,
  ProtocolError,
} from '../protocol/frontend.ts';
import { encodeCancelRequest, encodeErrorResponse, encodeParse, encodeQuery, TERMINATE, type ErrorFields } from '../protocol/encode.ts';
import { CONTINUE, Framer, HEADER, HOLD, PASS, SKIP, WHOLE, type FrameHandler } from '../protocol/framer.ts';
import {
  FORWARD,
  type GateDecision,
  type PreparedStatement,
  type QueryCompletion,
  type QueryGate,
  type QueryObserver,
  type QueryRequest,
  RerouteInterrupted,
  type RerouteSink,
  type RerouteTarget,
  type SessionInfo,
} from './seam.ts';
import { withReadBuffer } from './readbuffer.ts';
import { startupSettings } from './settings.ts';
import { closeClient } from './closing.ts';
import type { ClientConnection } from './connections.ts';
import { connectUpstream, sendCancelRequest, type UpstreamTarget } from './upstream.ts';

export interface SessionOptions {
  readonly upstream: UpstreamTarget;
  readonly maxMessageBytes: number;
  readonly gate: QueryGate;
  readonly observers: readonly QueryObserver[];
  readonly log: Logger;
}

/** What a session starts from: the negotiated connection and its StartupMessage. */
export interface SessionOpening {
  readonly id: number;
  readonly connection: ClientConnection;
  /** The socket after negotiation (a TLSSocket when the client asked for TLS). */
  readonly socket: net.Socket;
  readonly startupPacket: Buffer;
  readonly params: Map<string, string>;
  /** Client bytes read together with the startup packet. */
  readonly leftover: Buffer | null;
}

/** What the session tells its owner; none of these run per message. */
export interface SessionEvents {
  /** The server's BackendKeyData was relayed: this session now owns a cancel key. */
  backendKeyData(session: Session): void;
  /** The upstream could not be reached. */
  upstreamUnreachable(session: Session): void;
  /** The session relays nothing more (its client socket may still be closing). */
  closed(session: Session): void;
}

// What the server still owes, per entry of the pending queue.
const SIMPLE = 0; // a Query: completions per statement, ends at ReadyForQuery
const EXECUTE = 1; // an Execute: ends at CommandComplete/EmptyQuery/PortalSuspended/Error
const SYNC = 2; // a Sync: ends at ReadyForQuery
const FUNCTION_CALL = 3; // a FunctionCall: ends at ReadyForQuery
const REFUSED_SIMPLE = 4; // a refused Query: its ErrorResponse is replaced, ends at ReadyForQuery
const REFUSED_EXTENDED = 5; // a refused Parse/Execute: its ErrorResponse is replaced
const MALFORMED_QUERY = 6; // a Query the server will reject: ends at ReadyForQuery, recorded nowhere
const MALFORMED_EXECUTE = 7; // an Execute the server will reject: ends at its ErrorResponse

/** Server-side text that fails at parse time, cheaply and without side effects. */
const REFUSAL_SQL = 'pgwarden refused this statement';
const REFUSAL_QUERY = encodeQuery(REFUSAL_SQL);
const REFUSAL_PARSE = encodeParse('pgwarden_refused', REFUSAL_SQL);

const READ_BUFFER_BYTES = 64 * 1024;

/**
 * One read buffer shared by every session for one direction. `onread` fills it
 * and the callback consumes it synchronously, so sessions can take turns with
 * it; only a write that did not complete at once still references it, and then
 * the next read goes to a fresh buffer. An idle session thus holds no buffer.
 */
class SharedReadBuffer {
  private buffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
  private inUse = false;

  take(): Buffer {
    if (this.inUse) {
      this.buffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
      this.inUse = false;
    }
    return this.buffer;
  }

  /** A pending write still references the current buffer. */
  retain(): void {
    this.inUse = true;
  }
}

const CLIENT_READS = new SharedReadBuffer();
const SERVER_READS = new SharedReadBuffer();

class Pending {
  kind = SIMPLE;
  text = '';
  statement: PreparedStatement | null = null;
  bind: Buffer | null = null;
  /** performance.now() when the message arrived; advanced per statement of a multi-statement Query. */
  mark = 0;
  statementIndex = 0;
  refusal: Buffer | null = null;
  refusalCode: string | null = null;
  done: (() => void) | null = null;
  upstream = 'primary';
}

/** A FIFO of Pending entries that recycles them, so steady traffic allocates none. */
class PendingQueue {
  private items: (Pending | undefined)[] = [];
  private head = 0;
  private readonly spare: Pending[] = [];

  get length(): number {
    return this.items.length - this.head;
  }

  push(kind: number, mark: number): Pending {
    const entry = this.spare.pop() ?? new Pending();
    entry.kind = kind;
    entry.mark = mark;
    this.items.push(entry);
    return entry;
  }

  peek(): Pending | undefined {
    return this.items[this.head];
  }

  shift(): void {
    const entry = this.items[this.head]!;
    this.items[this.head++] = undefined;
    if (this.head === this.items.length) {
      this.items.length = 0;
      this.head = 0;
    } else if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items.splice(0, this.head);
      this.head = 0;
    }
    entry.text = '';
    entry.statement = null;
    entry.bind = null;
    entry.statementIndex = 0;
    entry.refusal = null;
    entry.refusalCode = null;
    entry.done = null;
    entry.upstream = 'primary';
    this.spare.push(entry);
  }
}

class MutableSessionInfo implements SessionInfo {
  applicationName: string;
  readonly settings: Map<string, string>;
  constructor(
    readonly id: number,
    readonly user: string,
    readonly database: string,
    applicationName: string,
    readonly clientAddress: string,
    readonly replication: boolean,
    settings: Map<string, string>,
  ) {
    this.applicationName = applicationName;
    this.settings = settings;
  }
}

class MutableCompletion implements QueryCompletion {
  text = '';
  statement: PreparedStatement | null = null;
  statementIndex = 0;
  bind: Buffer | null = null;
  startedAt = 0;
  durationMs = 0;
  rows = 0;
  sqlstate: string | null = null;
  upstream = 'primary';
  refused = false;
  constructor(readonly session: SessionInfo) {}
}

class MutableRequest implements QueryRequest {
  phase: 'query' | 'parse' | 'execute' = 'query';
  text = '';
  statement: PreparedStatement | null = null;
  transactionStatus: 'I' | 'T' | 'E' = 'I';
  pipelineBusy = false;
  constructor(readonly session: SessionInfo) {}
}

/** Before authentication completes the session reads no client message but Terminate. */
const PRE_AUTH_FRONTEND_KINDS = new Uint8Array(256).fill(PASS);
PRE_AUTH_FRONTEND_KINDS[Frontend.Terminate] = HEADER;

/** Which frontend messages the session reads. */
const FRONTEND_KINDS = new Uint8Array(256).fill(PASS);
for (const t of [Frontend.Query, Frontend.Parse, Frontend.Bind, Frontend.Execute, Frontend.Close, Frontend.Sync]) FRONTEND_KINDS[t] = WHOLE;
for (const t of [Frontend.FunctionCall, Frontend.Terminate]) FRONTEND_KINDS[t] = HEADER;

/** While an extended-protocol group is captured for reroute, every message is seen whole. */
const CAPTURE_KINDS = new Uint8Array(256).fill(WHOLE);

/** Which backend messages the session reads; DataRow only to count it. */
const BACKEND_KINDS = new Uint8Array(256).fill(PASS);
for (const t of [
  Backend.CommandComplete,
  Backend.ErrorResponse,
  Backend.ReadyForQuery,
  Backend.BackendKeyData,
  Backend.ParameterStatus,
  Backend.EmptyQueryResponse,
  Backend.PortalSuspended,
]) BACKEND_KINDS[t] = WHOLE;
BACKEND_KINDS[Backend.DataRow] = HEADER;

/** Before the first ReadyForQuery the authentication requests are read too (see onAuthentication). */
const PRE_AUTH_BACKEND_KINDS = Uint8Array.from(BACKEND_KINDS);
PRE_AUTH_BACKEND_KINDS[Backend.Authentication] = WHOLE;

const APPLICATION_NAME = Buffer.from('application_name\0');
const SEARCH_PATH = Buffer.from('search_path\0');

interface Portal {
  statement: PreparedStatement | null;
  bind: Buffer | null;
}

export type SessionState = 'connecting' | 'open' | 'closed';

/** What GET /api/sessions shows of a session (see snapshot()); built on request, never on the relay path. */
export interface SessionSnapshot {
  readonly id: number;
  readonly info: SessionInfo;
  /** Epoch ms the session was created. */
  readonly connectedAt: number;
  /** From the last ReadyForQuery and what is in flight. */
  readonly state: 'connecting' | 'idle' | 'active' | 'idle in transaction' | 'idle in transaction (aborted)' | 'closed';
  /** The statement running now (the oldest one in flight), or the last one that finished. */
  readonly statement: { readonly text: string; readonly statementIndex: number; readonly startedAt: number; readonly durationMs: number; readonly running: boolean } | null;
  readonly bytesFromClient: number;
  readonly bytesFromServer: number;
}

export class Session {
  readonly info: MutableSessionInfo;
  state: SessionState = 'connecting';
  /** Bytes relayed each way, for the proxy-level metrics. */
  bytesFromClient = 0;
  bytesFromServer = 0;
  /** Milliseconds the upstream connection took, or -1 if it failed. */
  upstreamConnectMs = 0;
  /** The upstream went away while the client still used it. */
  upstreamLost = false;
  /** Server process id from BackendKeyData (0 until received). */
  backendPid = 0;
  backendKey: Buffer | null = null;
  /** Epoch ms the session was created. */
  readonly connectedAt = Date.now();
  // The last finished statement, for snapshot(): plain field writes once per statement.
  private lastText = '';
  private lastStatementIndex = 0;
  private lastMark = 0;
  private lastDurationMs = 0;
  /** The server's first ReadyForQuery has passed: authentication and startup are done. */
  authenticated = false;

  private upstream: net.Socket | null = null;
  private readonly clientFramer: Framer;
  private readonly serverFramer: Framer;
  private readonly pending = new PendingQueue();
  private readonly statements = new Map<string, PreparedStatement>();
  private readonly portals = new Map<string, Portal>();
  private unnamedPortal: Portal | null = null;
  private transactionStatus: number = TransactionStatus.Idle;
  private dataRows = 0;
  private readonly completion: MutableCompletion;
  private readonly request: MutableRequest;
  /**
   * Client bytes read before the upstream connection was ready: those read with
   * the startup packet and those the re-created socket hands over (the client is
   * not read while connecting, so this is bounded by a read or two).
   */
  private early: Buffer[] | null = [];
  /** Sent to the server once connected, then dropped. */
  private startupPacket: Buffer | null;
  private readonly connection: ClientConnection;
  /** The client leg is TLS: it can bind SCRAM to a channel of its own (see onAuthentication). */
  private readonly clientTls: boolean;

  // Read-side flow control: the client is read only when the upstream accepts
  // writes and no gate decision is outstanding.
  private clientBlockedByBackpressure = false;
  private upstreamBlockedByBackpressure = false;
  private gateHolding = false;

  /** An extended-protocol group being collected, up to its Sync, to run on a reroute target. */
  private capture: { target: RerouteTarget; messages: Buffer[]; mark: number; statement: PreparedStatement; executes: number } | null = null;
  /** Replaying captured messages to the primary: the gate has already decided. */
  private bypassGate = false;

  private clientTerminated = false;
  private fatalRelayed = false;
  private draining = false;
  private closeTimer: NodeJS.Timeout | null = null;

  private readonly client: net.Socket;

  constructor(
    opening: SessionOpening,
    private readonly options: SessionOptions,
    private readonly events: SessionEvents,
  ) {
    const { id, socket, params } = opening;
    this.connection = opening.connection;
    this.startupPacket = opening.startupPacket;
    this.clientTls = socket instanceof tls.TLSSocket;
    if (opening.leftover !== null && opening.leftover.length > 0) this.early!.push(opening.leftover);
    const replication = params.get('replication');
    this.info = new MutableSessionInfo(
      id,
      params.get('user') ?? '',
      params.get('database') ?? params.get('user') ?? '',
      params.get('application_name') ?? '',
      `${socket.remoteAddress ?? 'unknown'}:${socket.remotePort ?? 0}`,
      replication !== undefined && replication !== 'false' && replication !== 'off' && replication !== '0',
      startupSettings(params),
    );
    this.completion = new MutableCompletion(this.info);
    this.request = new MutableRequest(this.info);
    this.clientFramer = new Framer(PRE_AUTH_FRONTEND_KINDS, MAX_AUTH_MESSAGE_BYTES, this.clientHandler);
    this.serverFramer = new Framer(PRE_AUTH_BACKEND_KINDS, 0x7fffffff, this.serverHandler);
    const adopted = withReadBuffer(socket, {
      buffer: () => CLIENT_READS.take(),
      callback: (n, buf) => {
        this.onClientData((buf as Buffer).subarray(0, n));
        return true;
      },
    });
    const client = adopted?.socket ?? socket;
    if (adopted === null) client.on('data', (data: Buffer) => this.onClientData(data));
    else {
      if (adopted.pending) this.early!.push(adopted.pending);
      this.connection.adopt(client);
    }
    this.client = client;
    client.on('drain', () => this.onClientDrain());
    client.on('error', (err) => this.options.log.debug({ err, session: id }, 'client socket error'));
    client.on('close', () => this.onClientClose());
  }

  /** Connects upstream and starts relaying; the client is read only from then on. */
  async start(): Promise<void> {
    let connection;
    const connectStarted = performance.now();
    try {
      connection = await connectUpstream(this.options.upstream, {
        buffer: () => SERVER_READS.take(),
        callback: (n, buf) => this.onUpstreamRead(n, buf as Buffer),
      });
    } catch (err) {
      this.upstreamConnectMs = -1;
      this.options.log.warn({ err, session: this.info.id, upstream: this.options.upstream.name }, 'upstream unreachable');
      this.events.upstreamUnreachable(this);
      this.failClient(SqlState.ConnectionFailure, (err as Error).message);
      return;
    }
    this.upstreamConnectMs = performance.now() - connectStarted;
    const socket = connection.socket;
    if (this.state === 'closed') {
      socket.destroy();
      return;
    }
    this.upstream = socket;
    this.state = 'open';
    if (!connection.usesReadBuffer) {
      socket.on('data', (data: Buffer) => this.serverFramer.push(data));
      socket.resume(); // paused after the SSLRequest answer was read
    }
    socket.on('drain', () => this.onUpstreamDrain());
    socket.on('error', (err) => this.options.log.debug({ err, session: this.info.id }, 'upstream socket error'));
    socket.on('close', () => this.onUpstreamClose());
    socket.write(this.startupPacket!);
    this.startupPacket = null;
    const early = this.early!;
    this.early = null;
    for (const chunk of early) this.clientFramer.push(chunk);
    this.resumeClientInput();
  }

  /** True when no query is in flight and no transaction is open. */
  get idle(): boolean {
    return this.pending.length === 0 && this.transactionStatus === TransactionStatus.Idle && !this.clientFramer.holding;
  }

  /**
   * Graceful shutdown: an idle session is closed now, a busy one as soon as it
   * becomes idle (see onReadyForQuery).
   */
  drain(): void {
    this.draining = true;
    if (this.state !== 'open' || this.idle) this.shutdown();
  }

  /** Ends the session now, telling the client why, as PostgreSQL does on shutdown. */
  shutdown(): void {
    if (this.state === 'closed') return;
    this.failClient(SqlState.AdminShutdown, 'terminating connection because pgwarden is shutting down');
  }

  /** Ends the session at an operator's request, telling the client why (57P01, as pg_terminate_backend does). */
  terminate(): void {
    if (this.state === 'closed') return;
    this.failClient(SqlState.AdminShutdown, 'terminating connection due to administrator command (pgwarden)');
  }

  /** Who is connected, in which state, running what: for the live sessions view. */
  snapshot(): SessionSnapshot {
    const now = performance.now();
    let state: SessionSnapshot['state'];
    if (this.state !== 'open') state = this.state;
    else if (this.pending.length > 0) state = 'active';
    else if (this.transactionStatus === TransactionStatus.InTransaction) state = 'idle in transaction';
    else if (this.transactionStatus === TransactionStatus.Failed) state = 'idle in transaction (aborted)';
    else state = 'idle';
    const head = this.pending.peek();
    let statement: SessionSnapshot['statement'] = null;
    if (head !== undefined && head.text !== '') {
      statement = { text: head.text, statementIndex: head.statementIndex, startedAt: performance.timeOrigin + head.mark, durationMs: now - head.mark, running: true };
    } else if (this.lastText !== '') {
      statement = { text: this.lastText, statementIndex: this.lastStatementIndex, startedAt: performance.timeOrigin + this.lastMark, durationMs: this.lastDurationMs, running: false };
    }
    return { id: this.info.id, info: this.info, connectedAt: this.connectedAt, state, statement, bytesFromClient: this.bytesFromClient, bytesFromServer: this.bytesFromServer };
  }

  /** Authentication did not finish in time: ends the session as PostgreSQL's authentication_timeout does. */
  authenticationTimeout(): void {
    if (this.state === 'closed') return;
    this.failClient(SqlState.QueryCanceled, 'canceling authentication due to timeout');
  }

  /** Cancels the query in flight on the upstream (used for a forwarded CancelRequest). */
  cancel(): Promise<void> {
    if (this.backendKey === null) return Promise.resolve();
    return sendCancelRequest(this.options.upstream, encodeCancelRequest(this.backendPid, this.backendKey));
  }

  // ---- client to server -------------------------------------------------------

  private onClientData(data: Buffer): void {
    if (this.early !== null) {
      this.early.push(Buffer.from(data)); // the read buffer is reused
      return;
    }
    this.clientFramer.push(data);
  }

  private readonly clientHandler: FrameHandler = {
    onMessage: (type, buf, start, end) => this.onClientMessage(type, buf, start, end),
    onForward: (bytes) => this.writeUpstream(bytes),
    onViolation: (reason) => this.onClientViolation(reason),
  };

  private onClientMessage(type: number, buf: Buffer, start: number, end: number): number {
    try {
      if (this.capture !== null) return this.onCaptured(type, buf, start, end);
      switch (type) {
        case Frontend.Query:
          return this.onQuery(buf, start, end);
        case Frontend.Parse:
          return this.onParse(buf, start, end);
        case Frontend.Bind:
          this.onBind(buf, start, end);
          return CONTINUE;
        case Frontend.Execute:
          return this.onExecute(buf, start, end);
        case Frontend.Sync:
          this.pending.push(SYNC, 0);
          return CONTINUE;
        case Frontend.Close:
          this.onClose(buf, start, end);
          return CONTINUE;
        case Frontend.FunctionCall:
          this.pending.push(FUNCTION_CALL, performance.now());
          return CONTINUE;
        case Frontend.Terminate:
          this.clientTerminated = true;
          return CONTINUE;
      }
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      return this.onMalformed(type);
    }
    return CONTINUE;
  }

  /**
   * A well-framed message whose insides are wrong. PostgreSQL answers it with an
   * ERROR and keeps the connection, so it goes to the server as it is; only what the
   * server owes for it is noted, so later responses still match their queries.
   */
  private onMalformed(type: number): number {
    if (this.capture !== null) return this.abandonCapture(); // the primary answers the group, this message included
    if (type === Frontend.Query) this.pending.push(MALFORMED_QUERY, 0);
    else if (type === Frontend.Execute) this.pending.push(MALFORMED_EXECUTE, 0);
    return CONTINUE;
  }

  private onQuery(buf: Buffer, start: number, end: number): number {
    const mark = performance.now();
    const text = decodeQueryText(buf, start, end);
    const decision = this.ask('query', text, null);
    if (decision === FORWARD) {
      this.pending.push(SIMPLE, mark).text = text;
      return CONTINUE;
    }
    return this.decided(decision, SIMPLE, mark, text, null, null, buf, start, end);
  }

  private onParse(buf: Buffer, start: number, end: number): number {
    const parse = decodeParse(buf, start, end);
    const statement: PreparedStatement = { name: parse.statement, text: parse.text, paramTypes: parse.paramTypes };
    this.statements.set(parse.statement, statement);
    const decision = this.ask('parse', parse.text, statement);
    if (decision === FORWARD) return CONTINUE;
    return this.decided(decision, -1, performance.now(), parse.text, statement, null, buf, start, end);
  }

  private onBind(buf: Buffer, start: number, end: number): void {
    const portalName = decodeBindPortal(buf, start, end);
    const statement = this.statements.get(decodeBindStatement(buf, start, end)) ?? null;
    // Kept until the execution completes, beyond this read: a copy, as the read
    // buffer is reused; only subscribers of the completion event read it.
    const bind = this.options.observers.length > 0 ? Buffer.from(buf.subarray(start, end)) : null;
    if (portalName === '') {
      if (this.unnamedPortal === null) this.unnamedPortal = { statement, bind };
      else {
        this.unnamedPortal.statement = statement;
        this.unnamedPortal.bind = bind;
      }
    } else {
      this.portals.set(portalName, { statement, bind });
    }
  }

  private onExecute(buf: Buffer, start: number, end: number): number {
    const mark = performance.now();
    const portalName = decodeExecutePortal(buf, start, end);
    const portal = portalName === '' ? this.unnamedPortal : (this.portals.get(portalName) ?? null);
    const statement = portal?.statement ?? null;
    const text = statement?.text ?? '';
    const decision = this.ask('execute', text, statement);
    if (decision === FORWARD) {
      const entry = this.pending.push(EXECUTE, mark);
      entry.text = text;
      entry.statement = statement;
      entry.bind = portal?.bind ?? null;
      return CONTINUE;
    }
    return this.decided(decision, EXECUTE, mark, text, statement, portal?.bind ?? null, buf, start, end);
  }

  private onClose(buf: Buffer, start: number, end: number): void {
    const target = decodeCloseTarget(buf, start, end);
    if (target.kind === 0x53 /* 'S' */) this.statements.delete(target.name);
    else if (target.name === '') this.unnamedPortal = null;
    else this.portals.delete(target.name);
  }

  private ask(phase: QueryRequest['phase'], text: string, statement: PreparedStatement | null): GateDecision | Promise<GateDecision> {
    if (this.bypassGate) return FORWARD;
    const request = this.request;
    request.phase = phase;
    request.text = text;
    request.statement = statement;
    request.transactionStatus = this.transactionStatus === TransactionStatus.Idle ? 'I' : this.transactionStatus === TransactionStatus.InTransaction ? 'T' : 'E';
    request.pipelineBusy = this.pending.length > 0;
    return this.options.gate.decide(request);
  }

  /**
   * Applies a decision other than the plain forward. `kind` is the pending entry a
   * forwarded message creates (-1 for Parse, which creates none).
   */
  private decided(
    decision: GateDecision | Promise<GateDecision>,
    kind: number,
    mark: number,
    text: string,
    statement: PreparedStatement | null,
    bind: Buffer | null,
    buf: Buffer,
    start: number,
    end: number,
  ): number {
    if (decision instanceof Promise) {
      // Hold this session's input (only this session's) until the gate answers.
      const message = Buffer.from(buf.subarray(start, end));
      this.gateHolding = true;
      this.client.pause();
      decision.then(
        (settled) => this.resumeAfterGate(settled, kind, mark, text, statement, bind, message),
        (err: Error) => {
          this.options.log.error({ err, session: this.info.id }, 'query gate failed; forwarding the query');
          this.resumeAfterGate(FORWARD, kind, mark, text, statement, bind, message);
        },
      );
      return HOLD;
    }
    switch (decision.action) {
      case 'forward':
        this.forwardAs(kind, mark, text, statement, bind, decision.done ?? null);
        return CONTINUE;
      case 'refuse':
        this.clientFramer.flushPending();
        this.refuse(decision.error, kind === SIMPLE, mark, text, statement);
        return SKIP;
      case 'reroute': {
        // Reroute is only honoured where the result cannot differ from the
        // primary's: outside a transaction, with nothing in flight, for a simple
        // Query or an extended-protocol group on the unnamed statement.
        const idle = this.transactionStatus === TransactionStatus.Idle && this.pending.length === 0;
        if (idle && kind === SIMPLE) {
          this.reroute(decision.target, mark, text, buf.subarray(start, end));
          return HOLD;
        }
        if (idle && kind < 0 && statement !== null && statement.name === '') {
          this.clientFramer.flushPending();
          this.capture = { target: decision.target, messages: [Buffer.from(buf.subarray(start, end))], mark, statement, executes: 0 };
          this.clientFramer.setKinds(CAPTURE_KINDS);
          return SKIP;
        }
        this.forwardAs(kind, mark, text, statement, bind, null);
        return CONTINUE;
      }
    }
  }

  /** Records what a forwarded message is owed; Parse (kind -1) is owed nothing of its own. */
  private forwardAs(kind: number, mark: number, text: string, statement: PreparedStatement | null, bind: Buffer | null, done: (() => void) | null): void {
    if (kind < 0) {
      done?.();
      return;
    }
    const entry = this.pending.push(kind, mark);
    entry.text = text;
    entry.statement = statement;
    entry.bind = bind;
    entry.done = done;
  }

  private resumeAfterGate(
    decision: GateDecision,
    kind: number,
    mark: number,
    text: string,
    statement: PreparedStatement | null,
    bind: Buffer | null,
    message: Buffer,
  ): void {
    this.gateHolding = false;
    if (this.state === 'closed') {
      if (decision.action === 'forward') decision.done?.();
      return;
    }
    const outcome = this.decided(decision, kind, mark, text, statement, bind, message, 0, message.length);
    if (outcome === HOLD) return; // rerouted: resumes when the other upstream answers
    if (outcome === CONTINUE) this.writeUpstream(message);
    this.resumeClientInput();
    this.clientFramer.resume();
  }

  /** Sends the server a message it will fail, and remembers to answer with `error` instead. */
  private refuse(error: ErrorFields, simple: boolean, mark: number, text: string, statement: PreparedStatement | null): void {
    const entry = this.pending.push(simple ? REFUSED_SIMPLE : REFUSED_EXTENDED, mark);
    entry.text = text;
    entry.statement = statement;
    entry.refusal = encodeErrorResponse(error);
    entry.refusalCode = error.code;
    this.writeUpstream(simple ? REFUSAL_QUERY : REFUSAL_PARSE);
  }

  /** Runs a simple Query on a reroute target; the client's input waits meanwhile. */
  private reroute(target: RerouteTarget, mark: number, text: string, message: Buffer): void {
    this.gateHolding = true;
    this.client.pause();
    const copy = Buffer.from(message); // the client's read buffer is not ours to keep across awaits
    this.runElsewhere(target, copy, mark, text, null, null, () => {
      this.pending.push(SIMPLE, mark).text = text;
      this.writeUpstream(copy);
    });
  }

  /**
   * A message of the extended-protocol group being captured. Only the plain
   * single-statement shape (Parse, Bind, Describe, Execute on unnamed objects, then
   * Sync) is rerouted; anything else sends the whole group to the primary.
   */
  private onCaptured(type: number, buf: Buffer, start: number, end: number): number {
    const capture = this.capture!;
    capture.messages.push(Buffer.from(buf.subarray(start, end)));
    switch (type) {
      case Frontend.Bind:
        if (decodeBindPortal(buf, start, end) !== '' || decodeBindStatement(buf, start, end) !== '') return this.abandonCapture();
        return SKIP;
      case Frontend.Execute:
        if (decodeExecutePortal(buf, start, end) !== '' || ++capture.executes > 1) return this.abandonCapture();
        return SKIP;
      case Frontend.Describe:
      case Frontend.Flush:
        return SKIP;
      case Frontend.Sync: {
        this.capture = null;
        this.clientFramer.setKinds(FRONTEND_KINDS);
        this.gateHolding = true;
        this.client.pause();
        const bindMessage = capture.messages.find((m) => m[0] === Frontend.Bind) ?? null;
        const group = Buffer.concat(capture.messages);
        this.runElsewhere(capture.target, group, capture.mark, capture.statement.text, capture.statement, bindMessage, () =>
          this.replayToPrimary(capture.messages),
        );
        return HOLD;
      }
      default:
        return this.abandonCapture();
    }
  }

  /** The captured group cannot be rerouted: it goes to the primary, in order, as it came. */
  private abandonCapture(): number {
    const messages = this.capture!.messages;
    this.capture = null;
    this.clientFramer.setKinds(FRONTEND_KINDS);
    this.replayToPrimary(messages);
    return SKIP;
  }

  private replayToPrimary(messages: Buffer[]): void {
    this.bypassGate = true;
    try {
      for (const m of messages) if (this.onClientMessage(m[0], m, 0, m.length) === CONTINUE) this.writeUpstream(m);
    } finally {
      this.bypassGate = false;
    }
  }

  /**
   * Runs frontend messages on a reroute target, streaming its answer to the client
   * (the target pauses while the client is behind), then ReadyForQuery with the
   * primary's (idle) status. If the target fails before relaying anything,
   * `fallback` sends the messages to the primary instead. If it fails mid-answer,
   * the statement ends with an 08006 ErrorResponse and ReadyForQuery, and the
   * session goes on; if a message was half-relayed the client's stream cannot be
   * continued, and the session is closed. Client input resumes otherwise.
   */
  private runElsewhere(
    target: RerouteTarget,
    messages: Buffer,
    mark: number,
    text: string,
    statement: PreparedStatement | null,
    bind: Buffer | null,
    fallback: () => void,
  ): void {
    const client = this.client;
    const sink: RerouteSink = {
      resumed: null,
      get closed() {
        return client.destroyed || client.writableEnded;
      },
      write: (bytes) => {
        if (client.destroyed) return false;
        this.bytesFromServer += bytes.length;
        if (client.write(bytes)) return true;
        client.once('drain', wake);
        return false;
      },
    };
    // The target waits for this after a false write: on drain, or at once if the client goes.
    const wake = (): void => {
      client.off('drain', wake);
      sink.resumed?.();
    };
    client.once('close', wake);
    const resume = () => {
      client.off('close', wake);
      this.gateHolding = false;
      this.resumeClientInput();
      this.clientFramer.resume();
    };
    target.run(messages, this.info.database, sink).then(
      (outcome) => {
        if (this.state === 'closed') return;
        this.writeClient(READY_FOR_QUERY_IDLE);
        this.emit(text, statement, 0, bind, mark, performance.now(), outcome.rows, outcome.sqlstate, target.name);
        resume();
      },
      (err: Error) => {
        if (this.state === 'closed') return;
        if (!(err instanceof RerouteInterrupted)) {
          this.options.log.warn({ err, session: this.info.id, target: target.name }, 'reroute failed; running on the primary');
          fallback();
          resume();
          return;
        }
        this.options.log.warn({ err, session: this.info.id, target: target.name }, 'reroute target failed mid-answer');
        this.emit(text, statement, 0, bind, mark, performance.now(), 0, SqlState.ConnectionFailure, target.name);
        if (err.midMessage) {
          // Part of a message is out: nothing more can be framed by the client. Close.
          client.off('close', wake);
          this.clientFramer.stop();
          client.end();
          return;
        }
        this.writeClient(
          encodeErrorResponse({
            severity: 'ERROR',
            code: SqlState.ConnectionFailure,
            message: `reroute target ${target.name} failed during the statement; the rest of its answer is lost`,
            detail: err.message,
            hint: 'The statement did not complete. It is safe to retry it; the session is still usable.',
          }),
        );
        this.writeClient(READY_FOR_QUERY_IDLE);
        resume();
      },
    );
  }

  private writeUpstream(bytes: Buffer): void {
    const upstream = this.upstream;
    if (upstream === null || upstream.writableEnded) return;
    this.bytesFromClient += bytes.length;
    const flushed = upstream.write(bytes);
    if (upstream.writableLength > 0) CLIENT_READS.retain();
    if (!flushed && !this.clientBlockedByBackpressure) {
      this.clientBlockedByBackpressure = true;
      this.client.pause();
    }
  }

  private onUpstreamDrain(): void {
    if (!this.clientBlockedByBackpressure) return;
    this.clientBlockedByBackpressure = false;
    this.resumeClientInput();
  }

  private resumeClientInput(): void {
    if (!this.clientBlockedByBackpressure && !this.gateHolding && this.state === 'open') this.client.resume();
  }

  private onClientViolation(reason: string): void {
    this.options.log.warn({ session: this.info.id, client: this.info.clientAddress, reason }, 'malformed client message');
    this.failClient(SqlState.ProtocolViolation, `invalid client message: ${reason}`);
  }

  // ---- server to client -------------------------------------------------------

  private onUpstreamRead(bytesRead: number, buffer: Buffer): boolean {
    this.serverFramer.push(buffer.subarray(0, bytesRead));
    return !this.upstreamBlockedByBackpressure;
  }

  private readonly serverHandler: FrameHandler = {
    onMessage: (type, buf, start, end) => this.onServerMessage(type, buf, start, end),
    onForward: (bytes) => this.writeClient(bytes),
    onViolation: (reason) => {
      this.options.log.error({ session: this.info.id, reason }, 'invalid data from upstream');
      this.failClient(SqlState.ConnectionFailure, `invalid data from upstream: ${reason}`);
    },
  };

  private onServerMessage(type: number, buf: Buffer, start: number, end: number): number {
    switch (type) {
      case Backend.DataRow:
        this.dataRows++;
        return CONTINUE;
      case Backend.CommandComplete:
        this.onStatementComplete(commandCompleteRows(buf, start, end));
        return CONTINUE;
      case Backend.EmptyQueryResponse:
        this.onStatementComplete(0);
        return CONTINUE;
      case Backend.PortalSuspended:
        this.onStatementComplete(this.dataRows);
        return CONTINUE;
      case Backend.ErrorResponse:
        return this.onErrorResponse(buf, start, end);
      case Backend.ReadyForQuery:
        this.onReadyForQuery(readyForQueryStatus(buf, start));
        return CONTINUE;
      case Backend.BackendKeyData:
        this.backendPid = backendKeyProcessId(buf, start);
        this.backendKey = backendKeySecret(buf, start, end);
        this.events.backendKeyData(this);
        return CONTINUE;
      case Backend.Authentication:
        return this.onAuthentication(buf, start, end);
      case Backend.ParameterStatus:
        if (buf.indexOf(APPLICATION_NAME, start + 5) === start + 5) {
          const valueStart = start + 5 + APPLICATION_NAME.length;
          this.info.applicationName = buf.toString('utf8', valueStart, end - 1);
        } else if (end - start > 5 + SEARCH_PATH.length && buf.compare(SEARCH_PATH, 0, SEARCH_PATH.length, start + 5, start + 5 + SEARCH_PATH.length) === 0) {
          this.info.settings.set('search_path', buf.toString('utf8', start + 5 + SEARCH_PATH.length, end - 1));
        }
        return CONTINUE;
    }
    return CONTINUE;
  }

  /**
   * Without TLS toward pgwarden a client cannot bind SCRAM to the server's TLS
   * channel, and libpq or node-postgres refuse a server that offers
   * SCRAM-SHA-256-PLUS over a connection without TLS; so the offer is withdrawn.
   * (The client then says it does not support binding, which the server accepts.
   * A TLS client would say it could bind, which the server rightly refuses as a
   * downgrade: see docs/operations.md.)
   */
  private onAuthentication(buf: Buffer, start: number, end: number): number {
    if (this.clientTls || authenticationCode(buf, start, end) !== AuthenticationCode.SASL) return CONTINUE;
    const replacement = withoutChannelBinding(buf, start, end);
    if (replacement === null) return CONTINUE;
    this.serverFramer.flushPending();
    this.writeClient(replacement);
    return SKIP;
  }

  /** The first ReadyForQuery: the client is authenticated, its queries are read from now on. */
  private onAuthenticated(): void {
    this.authenticated = true;
    this.connection.activate();
    this.clientFramer.setKinds(FRONTEND_KINDS, this.options.maxMessageBytes);
    this.serverFramer.setKinds(BACKEND_KINDS);
  }

  private onStatementComplete(rows: number): void {
    const head = this.pending.peek();
    this.dataRows = 0;
    if (head === undefined) return;
    const now = performance.now();
    if (head.kind === EXECUTE) {
      this.emit(head.text, head.statement, 0, head.bind, head.mark, now, rows, null, head.upstream);
      this.finishHead();
    } else if (head.kind === SIMPLE) {
      this.emit(head.text, null, head.statementIndex++, null, head.mark, now, rows, null, head.upstream);
      head.mark = now;
    }
  }

  private onErrorResponse(buf: Buffer, start: number, end: number): number {
    if (errorIsFatal(buf, start, end)) this.fatalRelayed = true;
    const head = this.pending.peek();
    this.dataRows = 0;
    if (head === undefined) return CONTINUE;
    const now = performance.now();
    switch (head.kind) {
      case REFUSED_SIMPLE:
      case REFUSED_EXTENDED:
        this.serverFramer.flushPending();
        this.writeClient(head.refusal!);
        this.emit(head.text, head.statement, 0, null, head.mark, now, 0, head.refusalCode, head.upstream, true);
        if (head.kind === REFUSED_EXTENDED) this.finishHead();
        return SKIP;
      case EXECUTE:
        this.emit(head.text, head.statement, 0, head.bind, head.mark, now, 0, errorSqlState(buf, start, end), head.upstream);
        this.finishHead();
        // The server now skips everything up to the next Sync: those owe nothing.
        while (this.pending.length > 0 && this.pending.peek()!.kind !== SYNC) this.finishHead();
        return CONTINUE;
      case SIMPLE:
        this.emit(head.text, null, head.statementIndex++, null, head.mark, now, 0, errorSqlState(buf, start, end), head.upstream);
        return CONTINUE;
      case MALFORMED_EXECUTE:
        this.finishHead();
        while (this.pending.length > 0 && this.pending.peek()!.kind !== SYNC) this.finishHead();
        return CONTINUE;
    }
    return CONTINUE;
  }

  private onReadyForQuery(status: number): void {
    if (!this.authenticated) this.onAuthenticated();
    this.transactionStatus = status;
    // ReadyForQuery answers the oldest Sync, Query or FunctionCall; Executes still
    // ahead of it were skipped by the server after an error.
    while (this.pending.length > 0) {
      const kind = this.pending.peek()!.kind;
      this.finishHead();
      if (kind !== EXECUTE && kind !== REFUSED_EXTENDED && kind !== MALFORMED_EXECUTE) break;
    }
    if (this.draining && this.idle) setImmediate(() => this.shutdown());
  }

  private finishHead(): void {
    const done = this.pending.peek()!.done;
    this.pending.shift();
    if (done !== null) done();
  }

  private emit(
    text: string,
    statement: PreparedStatement | null,
    statementIndex: number,
    bind: Buffer | null,
    mark: number,
    now: number,
    rows: number,
    sqlstate: string | null,
    upstream: string,
    refused = false,
  ): void {
    this.lastText = text;
    this.lastStatementIndex = statementIndex;
    this.lastMark = mark;
    this.lastDurationMs = now - mark;
    const observers = this.options.observers;
    if (observers.length === 0) return;
    const c = this.completion;
    c.text = text;
    c.statement = statement;
    c.statementIndex = statementIndex;
    c.bind = bind;
    c.startedAt = performance.timeOrigin + mark;
    c.durationMs = now - mark;
    c.rows = rows;
    c.sqlstate = sqlstate;
    c.upstream = upstream;
    c.refused = refused;
    for (let i = 0; i < observers.length; i++) {
      try {
        observers[i](c);
      } catch (err) {
        // A subscriber's bug must never break the query path.
        this.options.log.error({ err, session: this.info.id }, 'query observer failed');
      }
    }
  }

  private writeClient(bytes: Buffer): void {
    if (this.client.writableEnded || this.client.destroyed) return;
    this.bytesFromServer += bytes.length;
    const flushed = this.client.write(bytes);
    if (this.client.writableLength > 0) SERVER_READS.retain();
    if (!flushed && !this.upstreamBlockedByBackpressure) {
      this.upstreamBlockedByBackpressure = true;
      this.upstream?.pause();
    }
  }

  private onClientDrain(): void {
    if (!this.upstreamBlockedByBackpressure) return;
    this.upstreamBlockedByBackpressure = false;
    this.upstream?.resume();
  }

  // ---- endings ----------------------------------------------------------------

  /** Sends the client a FATAL ErrorResponse and closes both sides. */
  private failClient(code: string, message: string): void {
    this.clientFramer.stop();
    this.endClient(encodeErrorResponse({ severity: 'FATAL', code, message }));
    this.closeUpstream();
    this.markClosed();
  }

  /** Ends the client connection from pgwarden's side, destroyed in bounded time (see closeClient). */
  private endClient(lastBytes: Buffer | null): void {
    this.connection.closing();
    closeClient(this.client, lastBytes);
  }

  private onClientClose(): void {
    this.clientFramer.stop();
    this.closeUpstream();
    this.markClosed();
  }

  /** Cancels whatever the client left running, then ends the upstream connection. */
  private closeUpstream(): void {
    const upstream = this.upstream;
    if (upstream === null || upstream.destroyed) return;
    if (this.pending.length > 0 && this.backendKey !== null && !this.clientTerminated) {
      this.cancel().catch(() => undefined);
    }
    if (!upstream.writableEnded) {
      if (this.clientTerminated) upstream.end(); // the client's Terminate was forwarded already
      else upstream.end(TERMINATE);
    }
    this.closeTimer = setTimeout(() => upstream.destroy(), 5000);
    this.closeTimer.unref();
  }

  private onUpstreamClose(): void {
    if (this.closeTimer !== null) clearTimeout(this.closeTimer);
    this.serverFramer.stop();
    this.clientFramer.stop();
    if (!this.client.destroyed && !this.client.writableEnded) {
      if (this.clientTerminated || this.fatalRelayed) this.endClient(null);
      else {
        this.upstreamLost = true;
        this.options.log.warn({ session: this.info.id, upstream: this.options.upstream.name }, 'upstream connection lost');
        this.endClient(encodeErrorResponse({ severity: 'FATAL', code: SqlState.ConnectionFailure, message: 'upstream connection lost' }));
      }
    } else if (!this.client.destroyed) this.endClient(null); // bound whatever end() already started
    this.markClosed();
  }

  private markClosed(): void {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.startupPacket = null;
    this.early = null;
    while (this.pending.length > 0) this.finishHead();
    this.events.closed(this);
  }
}

const READY_FOR_QUERY_IDLE = Buffer.from([Backend.ReadyForQuery, 0, 0, 0, 5, TransactionStatus.Idle]);
