// One client connection and its own upstream connection. Bytes flow through two
// Framers; the session looks only at the messages that start, end or route a
// query, keeps a queue of what the server still owes (so pipelined responses are
// matched to their queries), publishes a QueryCompletion per statement and asks
// the gate before forwarding each query. After its states and the owner's
// controls it reads in the order of the protocol documentation: start-up, the
// simple query, the extended query (with the gate and reroute each query passes),
// the server's responses, termination. The in-flight query is one Pending object
// (query.ts) from the message that starts it to its completion event; running a
// statement on a reroute target is in reroute.ts.
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
//
// Two state variables say where a session is, each changed only through its own
// transition function, which refuses a transition the tables below do not list
// (PgBouncer's change_client_state() is the model): the lifecycle (connecting,
// authenticating, open, draining, closed) and the input phase (what happens to the
// client's next message: relayed, held for the gate, captured for a reroute...).

import type net from 'node:net';
import tls from 'node:tls';
import { performance } from 'node:perf_hooks';
import type { Logger } from 'pino';
import {
  AuthenticationCode,
  Backend,
  Frontend,
  MAX_AUTH_MESSAGE_BYTES,
  SqlState,
  type TransactionStatus,
} from '../protocol/constants.ts';
import {
  authenticationCode,
  backendKeyProcessId,
  backendKeySecret,
  commandCompleteRows,
  errorIsFatal,
  errorSqlState,
  parameterStatusValue,
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
import {
  encodeCancelRequest,
  encodeErrorResponse,
  encodeParse,
  encodeQuery,
  TERMINATE,
  type ErrorFields,
} from '../protocol/encode.ts';
import {
  CONTINUE,
  Framer,
  HEADER,
  HOLD,
  kindTable,
  PASS,
  SKIP,
  WHOLE,
  withKinds,
  type FrameHandler,
  type Outcome,
} from '../protocol/framer.ts';
import { findMessage, MessageCursor } from '../protocol/messages.ts';
import {
  FORWARD,
  type GateDecision,
  type PreparedStatement,
  type QueryGate,
  type QueryObserver,
  type RerouteTarget,
  type SessionInfo,
} from './seam.ts';
import { MutableCompletion, MutableRequest, Owed, type Pending, PendingQueue } from './query.ts';
import { GroupCapture, runRerouted, type RerouteHost } from './reroute.ts';
import { SharedReadBuffer, withReadBuffer } from './readbuffer.ts';
import { startupSettings } from './settings.ts';
import { closeClient } from './closing.ts';
import { WriteBatch } from './batch.ts';
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

/** What GET /api/sessions shows of a session (see snapshot()); built on request, never on the relay path. */
export interface SessionSnapshot {
  readonly id: number;
  readonly info: SessionInfo;
  /** Epoch ms the session was created. */
  readonly connectedAt: number;
  /** From the last ReadyForQuery and what is in flight. */
  readonly state: 'connecting' | 'idle' | 'active' | 'idle in transaction' | 'idle in transaction (aborted)' | 'closed';
  /** The statement running now (the oldest one in flight), or the last one that finished. */
  readonly statement: {
    readonly text: string;
    readonly statementIndex: number;
    readonly startedAt: number;
    readonly durationMs: number;
    readonly running: boolean;
  } | null;
  readonly bytesFromClient: number;
  readonly bytesFromServer: number;
}

// ---- states ---------------------------------------------------------------------

/**
 * Where the session is in its life:
 * - connecting: the upstream connection is being made; client bytes wait unread;
 * - authenticating: the client and server talk authentication and startup, which
 *   the session relays without reading the client's messages;
 * - open: after the server's first ReadyForQuery, queries are read and gated;
 * - draining: open, but ends as soon as it is idle (graceful shutdown);
 * - closed: relays nothing more (the client socket may still be closing).
 */
export type Lifecycle = 'connecting' | 'authenticating' | 'open' | 'draining' | 'closed';

const LIFECYCLE_NEXT: { readonly [From in Lifecycle]: readonly Lifecycle[] } = {
  connecting: ['authenticating', 'closed'],
  authenticating: ['open', 'closed'],
  open: ['draining', 'closed'],
  draining: ['closed'],
  closed: [],
};

/**
 * What happens to the client's next message (meaningful once open):
 * - relaying: read, gated and forwarded as it comes;
 * - gating: the gate is deciding on a message asynchronously; input waits;
 * - capturing: an extended-protocol group is collected up to its Sync, for a reroute;
 * - rerouting: a statement runs on a reroute target; input waits;
 * - replaying: a captured group goes to the primary after all, the gate having
 *   decided already (its messages are not asked about again).
 */
export type InputPhase = 'relaying' | 'gating' | 'capturing' | 'rerouting' | 'replaying';

const INPUT_NEXT: { readonly [From in InputPhase]: readonly InputPhase[] } = {
  relaying: ['gating', 'capturing', 'rerouting'],
  gating: ['relaying'],
  capturing: ['rerouting', 'replaying'],
  rerouting: ['replaying', 'relaying'],
  replaying: ['relaying', 'rerouting'],
};

// ---- what the Framers show the session --------------------------------------------

/** Before authentication completes the session reads no client message but Terminate. */
const PRE_AUTH_FRONTEND_KINDS = kindTable(PASS, [[Frontend.Terminate], HEADER]);

/** Which frontend messages the session reads. */
const FRONTEND_KINDS = kindTable(
  PASS,
  [[Frontend.Query, Frontend.Parse, Frontend.Bind, Frontend.Execute, Frontend.Close, Frontend.Sync], WHOLE],
  [[Frontend.FunctionCall, Frontend.Terminate], HEADER],
);

/** While an extended-protocol group is captured for reroute, every message is seen whole. */
const CAPTURE_KINDS = kindTable(WHOLE);

/** Which backend messages the session reads; DataRow only to count it. */
const BACKEND_KINDS = kindTable(
  PASS,
  [
    [
      Backend.CommandComplete,
      Backend.ErrorResponse,
      Backend.ReadyForQuery,
      Backend.BackendKeyData,
      Backend.ParameterStatus,
      Backend.EmptyQueryResponse,
      Backend.PortalSuspended,
    ],
    WHOLE,
  ],
  [[Backend.DataRow], HEADER],
);

/** Before the first ReadyForQuery the authentication requests are read too (see onAuthentication). */
const PRE_AUTH_BACKEND_KINDS = withKinds(BACKEND_KINDS, [[Backend.Authentication], WHOLE]);

/** Server-side text that fails at parse time, cheaply and without side effects. */
const REFUSAL_SQL = 'pgwarden refused this statement';
const REFUSAL_QUERY = encodeQuery(REFUSAL_SQL);
const REFUSAL_PARSE = encodeParse('pgwarden_refused', REFUSAL_SQL);

const APPLICATION_NAME = Buffer.from('application_name\0');
const SEARCH_PATH = Buffer.from('search_path\0');

/** A longer Parse of the unnamed statement is decoded every time rather than kept per session. */
const MAX_REMEMBERED_PARSE_BYTES = 8 * 1024;

const CLIENT_READS = new SharedReadBuffer();
const SERVER_READS = new SharedReadBuffer();

/** Who is on the other end, from the startup packet; application_name and search_path follow ParameterStatus. */
class MutableSessionInfo implements SessionInfo {
  readonly user: string;
  readonly database: string;
  applicationName: string;
  readonly clientAddress: string;
  readonly replication: boolean;
  readonly settings: Map<string, string>;

  constructor(
    readonly id: number,
    socket: net.Socket,
    params: ReadonlyMap<string, string>,
  ) {
    this.user = params.get('user') ?? '';
    this.database = params.get('database') ?? this.user;
    this.applicationName = params.get('application_name') ?? '';
    this.clientAddress = `${socket.remoteAddress ?? 'unknown'}:${socket.remotePort ?? 0}`;
    const replication = params.get('replication');
    this.replication =
      replication !== undefined && replication !== 'false' && replication !== 'off' && replication !== '0';
    this.settings = startupSettings(params);
  }
}

interface Portal {
  statement: PreparedStatement | null;
  bind: Buffer | null;
  /** Which Bind of its statement made this portal (see BoundStatement.binds). */
  execution: number;
}

/**
 * A prepared statement and how often it was bound. The server's plan cache counts
 * the same: the first five Binds of a statement get custom plans, later ones may
 * get its generic plan (see plans/explain.ts), so the sampler needs the number.
 * A plain counter on the object Parse made: nothing allocated per Bind.
 */
interface BoundStatement extends PreparedStatement {
  binds: number;
}

export class Session {
  readonly info: MutableSessionInfo;
  /** Bytes relayed each way, for the proxy-level metrics. */
  bytesFromClient = 0;
  bytesFromServer = 0;
  /** Milliseconds the upstream connection took, or -1 if it failed. */
  upstreamConnectMs = 0;
  /** The upstream went away while the client still used it (a statistic, read once the session closes). */
  upstreamLost = false;
  /** Server process id from BackendKeyData (0 until received). */
  backendPid = 0;
  backendKey: Buffer | null = null;
  /** Epoch ms the session was created. */
  readonly connectedAt = Date.now();

  private state: Lifecycle = 'connecting';
  private input: InputPhase = 'relaying';

  // Facts independent of the phases above, each set once:
  /** The client sent Terminate (it was forwarded): the upstream may close, nothing was lost. */
  private clientTerminated = false;
  /** The server sent a FATAL ErrorResponse (relayed): the client knows why the upstream closes. */
  private fatalRelayed = false;

  // Flow control, independent of the phases: each side is read only while the other accepts writes.
  private clientBlockedByBackpressure = false;
  private upstreamBlockedByBackpressure = false;
  /** Writes one read causes, sent together when the read has been handled (batch.ts). */
  private readonly toUpstream = new WriteBatch(
    () => this.upstream,
    (socket, flushed) => this.afterUpstreamWrite(socket, flushed),
  );
  private readonly toClient = new WriteBatch(
    () => this.client,
    (socket, flushed) => this.afterClientWrite(socket, flushed),
  );

  private upstream: net.Socket | null = null;
  private readonly client: net.Socket;
  private readonly clientFramer: Framer;
  private readonly serverFramer: Framer;
  private readonly connection: ClientConnection;
  /** The client leg is TLS: it can bind SCRAM to a channel of its own (see onAuthentication). */
  private readonly clientTls: boolean;
  /** Sent to the server once connected, then dropped. */
  private startupPacket: Buffer | null;
  /**
   * While connecting: client bytes read before the upstream connection was ready,
   * those read with the startup packet and those the re-created socket hands over
   * (the client is not read while connecting, so this is bounded by a read or two).
   */
  private early: Buffer[] | null = [];
  private closeTimer: NodeJS.Timeout | null = null;

  /** What the server still owes, oldest first. */
  private readonly pending = new PendingQueue();
  private readonly statements = new Map<string, BoundStatement>();
  /** The last Parse of the unnamed statement, as sent, and what it decoded to (see onParse). */
  private lastUnnamedParse: Buffer | null = null;
  private lastUnnamedStatement: BoundStatement | null = null;
  private readonly portals = new Map<string, Portal>();
  private unnamedPortal: Portal | null = null;
  /** From the server's last ReadyForQuery. */
  private transactionStatus: TransactionStatus = 'I';
  private dataRows = 0;
  private readonly completion: MutableCompletion;
  private readonly request: MutableRequest;
  /** The group being collected while the input phase is 'capturing'. */
  private capture: GroupCapture | null = null;
  /** What reroute.ts may do with this session; made on the first reroute. */
  private rerouteHost: RerouteHost | null = null;

  // The last finished statement, for snapshot(): plain field writes once per statement.
  private lastText = '';
  private lastStatementIndex = 0;
  private lastMark = 0;
  private lastDurationMs = 0;

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
    this.info = new MutableSessionInfo(id, socket, params);
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

  /** Where the session is in its life (see Lifecycle). */
  get lifecycle(): Lifecycle {
    return this.state;
  }

  /** True when no query is in flight and no transaction is open. */
  get idle(): boolean {
    return this.pending.length === 0 && this.transactionStatus === 'I' && !this.clientFramer.holding;
  }

  private changeLifecycle(to: Lifecycle): void {
    if (!LIFECYCLE_NEXT[this.state].includes(to)) {
      throw new Error(`session ${this.info.id}: lifecycle cannot go from ${this.state} to ${to}`);
    }
    this.state = to;
  }

  private changeInput(to: InputPhase): void {
    if (!INPUT_NEXT[this.input].includes(to)) {
      throw new Error(`session ${this.info.id}: input phase cannot go from ${this.input} to ${to}`);
    }
    this.input = to;
  }

  // ---- what the owner asks of a session --------------------------------------------

  /**
   * Graceful shutdown: an idle session is closed now, a busy one as soon as it
   * becomes idle (see onReadyForQuery).
   */
  drain(): void {
    if (this.state === 'draining') return;
    if (this.state === 'open' && !this.idle) this.changeLifecycle('draining');
    else this.shutdown();
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

  /** Who is connected, in which state, running what: for the live sessions view. */
  snapshot(): SessionSnapshot {
    const now = performance.now();
    let state: SessionSnapshot['state'];
    if (this.state === 'connecting' || this.state === 'closed') state = this.state;
    else if (this.pending.length > 0) state = 'active';
    else if (this.transactionStatus === 'T') state = 'idle in transaction';
    else if (this.transactionStatus === 'E') state = 'idle in transaction (aborted)';
    else state = 'idle';
    const head = this.pending.peek();
    let statement: SessionSnapshot['statement'] = null;
    if (head !== undefined && head.text !== '') {
      const { text, statementIndex, mark } = head;
      const startedAt = performance.timeOrigin + mark;
      statement = { text, statementIndex, startedAt, durationMs: now - mark, running: true };
    } else if (this.lastText !== '') {
      statement = {
        text: this.lastText,
        statementIndex: this.lastStatementIndex,
        startedAt: performance.timeOrigin + this.lastMark,
        durationMs: this.lastDurationMs,
        running: false,
      };
    }
    const { info, connectedAt, bytesFromClient, bytesFromServer } = this;
    return { id: info.id, info, connectedAt, state, statement, bytesFromClient, bytesFromServer };
  }

  // ---- start-up -------------------------------------------------------------------

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
      const upstream = this.options.upstream.name;
      this.options.log.warn({ err, session: this.info.id, upstream }, 'upstream unreachable');
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
    this.changeLifecycle('authenticating');
    if (!connection.usesReadBuffer) {
      socket.on('data', (data: Buffer) => this.onUpstreamData(data));
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

  /**
   * Without TLS toward pgwarden a client cannot bind SCRAM to the server's TLS
   * channel, and libpq or node-postgres refuse a server that offers
   * SCRAM-SHA-256-PLUS over a connection without TLS; so the offer is withdrawn.
   * (The client then says it does not support binding, which the server accepts.
   * A TLS client would say it could bind, which the server rightly refuses as a
   * downgrade: see docs/operations.md.)
   */
  private onAuthentication(buf: Buffer, start: number, end: number): Outcome {
    if (this.clientTls || authenticationCode(buf, start, end) !== AuthenticationCode.SASL) return CONTINUE;
    const replacement = withoutChannelBinding(buf, start, end);
    if (replacement === null) return CONTINUE;
    this.serverFramer.flushPending();
    this.writeClient(replacement);
    return SKIP;
  }

  /** The first ReadyForQuery: the client is authenticated, its queries are read from now on. */
  private onAuthenticated(): void {
    this.changeLifecycle('open');
    this.connection.activate();
    this.clientFramer.setKinds(FRONTEND_KINDS, this.options.maxMessageBytes);
    this.serverFramer.setKinds(BACKEND_KINDS);
  }

  private onBackendKeyData(buf: Buffer, start: number, end: number): void {
    this.backendPid = backendKeyProcessId(buf, start);
    this.backendKey = backendKeySecret(buf, start, end);
    this.events.backendKeyData(this);
  }

  private onParameterStatus(buf: Buffer, start: number, end: number): void {
    const applicationName = parameterStatusValue(buf, start, end, APPLICATION_NAME);
    if (applicationName !== null) {
      this.info.applicationName = applicationName;
      return;
    }
    const searchPath = parameterStatusValue(buf, start, end, SEARCH_PATH);
    if (searchPath !== null) this.info.settings.set('search_path', searchPath);
  }

  // ---- client to server ----------------------------------------------------------

  private onClientData(data: Buffer): void {
    if (this.state === 'connecting') {
      this.early!.push(Buffer.from(data)); // the read buffer is reused
      return;
    }
    this.toUpstream.begin();
    try {
      this.clientFramer.push(data);
    } finally {
      this.toUpstream.end();
    }
  }

  private readonly clientHandler: FrameHandler = {
    onMessage: (type, buf, start, end) => this.onClientMessage(type, buf, start, end),
    onForward: (bytes) => this.writeUpstream(bytes),
    onViolation: (reason) => this.onClientViolation(reason),
  };

  private onClientMessage(type: number, buf: Buffer, start: number, end: number): Outcome {
    try {
      if (this.input === 'capturing') return this.onCaptured(type, buf, start, end);
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
          this.pending.add(Owed.Sync, 0);
          return CONTINUE;
        case Frontend.Close:
          this.onClose(buf, start, end);
          return CONTINUE;
        case Frontend.FunctionCall:
          this.pending.add(Owed.FunctionCall, performance.now());
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
  private onMalformed(type: number): Outcome {
    // The primary answers the group, this message included.
    if (this.input === 'capturing') return this.abandonCapture();
    if (type === Frontend.Query) this.pending.add(Owed.MalformedQuery, 0);
    else if (type === Frontend.Execute) this.pending.add(Owed.MalformedExecute, 0);
    return CONTINUE;
  }

  private onClientViolation(reason: string): void {
    const { id: session, clientAddress: client } = this.info;
    this.options.log.warn({ session, client, reason }, 'malformed client message');
    this.failClient(SqlState.ProtocolViolation, `invalid client message: ${reason}`);
  }

  // -- the simple query

  private onQuery(buf: Buffer, start: number, end: number): Outcome {
    const mark = performance.now();
    const text = decodeQueryText(buf, start, end); // decoded first: a malformed message takes no Pending
    const query = this.pending.take(Owed.Simple, mark);
    query.text = text;
    return this.gate(query, buf, start, end);
  }

  // -- the extended query

  private onParse(buf: Buffer, start: number, end: number): Outcome {
    const statement = this.unnamedReparse(buf, start, end) ?? this.parsed(buf, start, end);
    this.statements.set(statement.name, statement);
    const query = this.pending.take(Owed.Parse, performance.now());
    query.text = statement.text;
    query.statement = statement;
    return this.gate(query, buf, start, end);
  }

  private parsed(buf: Buffer, start: number, end: number): BoundStatement {
    const parse = decodeParse(buf, start, end);
    const statement: BoundStatement = {
      name: parse.statement,
      text: parse.text,
      paramTypes: parse.paramTypes,
      binds: 0,
    };
    if (parse.statement === '' && end - start <= MAX_REMEMBERED_PARSE_BYTES) {
      this.lastUnnamedParse = Buffer.from(buf.subarray(start, end)); // the read buffer is reused
      this.lastUnnamedStatement = statement;
    }
    return statement;
  }

  /**
   * Drivers without named statements (pgbench -M extended, many ORMs) send the same
   * Parse of the unnamed statement before every execution: when the bytes are the
   * last one's, its statement is reused, so nothing is decoded or allocated and the
   * shape is found by statement, not by text. Unnamed statements are never cached
   * by the server, so the same object cannot stand for two different plans; its
   * count of Binds starts again, as the server's does for a new Parse (executions
   * already bound keep their number).
   */
  private unnamedReparse(buf: Buffer, start: number, end: number): BoundStatement | null {
    const last = this.lastUnnamedParse;
    if (last === null || buf[start + 5] !== 0 || last.length !== end - start) return null;
    if (buf.compare(last, 0, last.length, start, end) !== 0) return null;
    const statement = this.lastUnnamedStatement!;
    statement.binds = 0;
    return statement;
  }

  private onBind(buf: Buffer, start: number, end: number): void {
    const portalName = decodeBindPortal(buf, start, end);
    const statement = this.statements.get(decodeBindStatement(buf, start, end)) ?? null;
    const execution = statement === null ? 0 : ++statement.binds;
    // Kept until the execution completes, beyond this read: a copy, as the read
    // buffer is reused; only subscribers of the completion event read it.
    const bind = this.options.observers.length > 0 ? Buffer.from(buf.subarray(start, end)) : null;
    if (portalName === '') {
      if (this.unnamedPortal === null) this.unnamedPortal = { statement, bind, execution };
      else {
        this.unnamedPortal.statement = statement;
        this.unnamedPortal.bind = bind;
        this.unnamedPortal.execution = execution;
      }
    } else {
      this.portals.set(portalName, { statement, bind, execution });
    }
  }

  private onExecute(buf: Buffer, start: number, end: number): Outcome {
    const mark = performance.now();
    const portalName = decodeExecutePortal(buf, start, end);
    const query = this.pending.take(Owed.Execute, mark);
    const portal = portalName === '' ? this.unnamedPortal : (this.portals.get(portalName) ?? null);
    if (portal !== null) {
      query.statement = portal.statement;
      query.text = portal.statement?.text ?? '';
      query.bind = portal.bind;
      query.execution = portal.execution;
    }
    return this.gate(query, buf, start, end);
  }

  private onClose(buf: Buffer, start: number, end: number): void {
    const target = decodeCloseTarget(buf, start, end);
    if (target.kind === 0x53 /* 'S' */) this.statements.delete(target.name);
    else if (target.name === '') this.unnamedPortal = null;
    else this.portals.delete(target.name);
  }

  // -- the gate: every Query, Parse and Execute is asked about before it goes on

  /** Asks the gate about `query`, whose message is `buf[start, end)`, and applies the answer. */
  private gate(query: Pending, buf: Buffer, start: number, end: number): Outcome {
    // A replayed group was decided already, as a whole.
    const decision = this.input === 'replaying' ? FORWARD : this.options.gate.decide(this.ask(query));
    if (decision === FORWARD) {
      this.forward(query);
      return CONTINUE;
    }
    if (decision instanceof Promise) {
      this.holdForGate(query, decision, Buffer.from(buf.subarray(start, end)));
      return HOLD;
    }
    return this.decided(query, decision, buf, start, end);
  }

  private ask(query: Pending): MutableRequest {
    return this.request.fill(query, this.transactionStatus, this.pending.length > 0);
  }

  /** Holds this session's input (only this session's) until the gate answers about `message`. */
  private holdForGate(query: Pending, decision: Promise<GateDecision>, message: Buffer): void {
    query.held = message;
    this.changeInput('gating');
    this.client.pause();
    decision.then(
      (settled) => this.resumeAfterGate(query, settled),
      (err: Error) => {
        this.options.log.error({ err, session: this.info.id }, 'query gate failed; forwarding the query');
        this.resumeAfterGate(query, FORWARD);
      },
    );
  }

  private resumeAfterGate(query: Pending, decision: GateDecision): void {
    const message = query.held!;
    query.held = null;
    if (this.state === 'closed') {
      if (decision.action === 'forward') decision.done?.();
      this.pending.release(query);
      return;
    }
    this.changeInput('relaying');
    const outcome = this.decided(query, decision, message, 0, message.length);
    if (outcome === HOLD) return; // rerouted: resumes when the other upstream answers
    if (outcome === CONTINUE) this.writeUpstream(message);
    this.resumeClientInput();
    this.clientFramer.resume();
  }

  /** Applies a decision other than the plain forward to `query`, whose message is `buf[start, end)`. */
  private decided(query: Pending, decision: GateDecision, buf: Buffer, start: number, end: number): Outcome {
    switch (decision.action) {
      case 'forward':
        query.done = decision.done ?? null;
        this.forward(query);
        return CONTINUE;
      case 'refuse':
        this.clientFramer.flushPending();
        this.refuse(query, decision.error);
        return SKIP;
      case 'reroute':
        return this.reroute(query, decision.target, buf.subarray(start, end));
    }
  }

  /** Records what a forwarded query is owed; a Parse is owed nothing of its own. */
  private forward(query: Pending): void {
    if (query.kind !== Owed.Parse) {
      this.pending.enqueue(query);
      return;
    }
    query.done?.();
    this.pending.release(query);
  }

  /** Sends the server a message it will fail, and remembers to answer with `error` instead. */
  private refuse(query: Pending, error: ErrorFields): void {
    const simple = query.kind === Owed.Simple;
    query.kind = simple ? Owed.RefusedSimple : Owed.RefusedExtended;
    query.bind = null;
    query.refusal = encodeErrorResponse(error);
    query.refusalCode = error.code;
    this.pending.enqueue(query);
    this.writeUpstream(simple ? REFUSAL_QUERY : REFUSAL_PARSE);
  }

  // -- reroute (the running of it is in reroute.ts)

  /**
   * Reroute is only honoured where the result cannot differ from the primary's:
   * outside a transaction, with nothing in flight, for a simple Query or an
   * extended-protocol group on the unnamed statement; elsewhere the query is
   * forwarded.
   */
  private reroute(query: Pending, target: RerouteTarget, message: Buffer): Outcome {
    const idle = this.transactionStatus === 'I' && this.pending.length === 0;
    if (idle && query.kind === Owed.Simple) {
      this.changeInput('rerouting');
      this.client.pause();
      // The client's read buffer is not ours to keep across awaits.
      runRerouted(this.reroutes(), target, query, Buffer.from(message));
      return HOLD;
    }
    if (idle && query.kind === Owed.Parse && query.statement!.name === '') {
      this.clientFramer.flushPending();
      this.capture = new GroupCapture(target, query, message);
      this.changeInput('capturing');
      this.clientFramer.setKinds(CAPTURE_KINDS);
      return SKIP;
    }
    this.forward(query);
    return CONTINUE;
  }

  /** A message of the group being captured: at its Sync the group runs on the target. */
  private onCaptured(type: number, buf: Buffer, start: number, end: number): Outcome {
    const capture = this.capture!;
    const step = capture.add(type, buf, start, end);
    if (step === 'more') return SKIP;
    if (step === 'abandon') return this.abandonCapture();
    this.capture = null;
    this.clientFramer.setKinds(FRONTEND_KINDS);
    this.changeInput('rerouting');
    this.client.pause();
    const group = capture.group();
    const query = capture.query;
    query.bind = findMessage(group, Frontend.Bind);
    query.execution = 1; // the group parsed the unnamed statement afresh
    runRerouted(this.reroutes(), capture.target, query, group);
    return HOLD;
  }

  /** The captured group cannot be rerouted: it goes to the primary, in order, as it came. */
  private abandonCapture(): Outcome {
    const capture = this.capture!;
    this.capture = null;
    this.clientFramer.setKinds(FRONTEND_KINDS);
    this.pending.release(capture.query);
    this.replayToPrimary(capture.group(), 'relaying');
    return SKIP;
  }

  /** Handles a captured group's messages as if they had just come, forwarding each; then input goes on in `then`. */
  private replayToPrimary(group: Buffer, then: InputPhase): void {
    this.changeInput('replaying');
    try {
      const cursor = new MessageCursor(group);
      while (cursor.next()) {
        const { type, start, end } = cursor;
        if (this.onClientMessage(type, group, start, end) === CONTINUE) this.writeUpstream(group.subarray(start, end));
      }
    } finally {
      this.changeInput(then);
    }
  }

  /** What reroute.ts may do with this session. */
  private reroutes(): RerouteHost {
    if (this.rerouteHost !== null) return this.rerouteHost;
    this.rerouteHost = {
      sessionId: this.info.id,
      database: this.info.database,
      log: this.options.log,
      client: this.client,
      ended: () => this.state === 'closed',
      countServerBytes: (bytes) => {
        this.bytesFromServer += bytes;
      },
      writeClient: (bytes) => this.writeClient(bytes),
      complete: (query, rows, sqlstate) => {
        this.complete(query, performance.now(), rows, sqlstate);
        this.pending.release(query);
      },
      runOnPrimary: (query, messages) => {
        if (query.kind === Owed.Simple) {
          this.pending.enqueue(query);
          this.writeUpstream(messages);
          return;
        }
        this.pending.release(query); // a group: its messages are handled afresh
        this.replayToPrimary(messages, 'rerouting');
      },
      resumeInput: () => {
        this.changeInput('relaying');
        this.resumeClientInput();
        this.clientFramer.resume();
      },
      endClient: () => {
        this.clientFramer.stop();
        this.client.end();
      },
    };
    return this.rerouteHost;
  }

  // -- flow control toward the server

  private writeUpstream(bytes: Buffer): void {
    const upstream = this.upstream;
    if (upstream === null || upstream.writableEnded) return;
    this.bytesFromClient += bytes.length;
    this.toUpstream.write(bytes);
  }

  private afterUpstreamWrite(upstream: net.Socket, flushed: boolean): void {
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

  /** Reads the client again, unless the upstream is behind or input waits for the gate or a reroute. */
  private resumeClientInput(): void {
    if (this.clientBlockedByBackpressure || this.input === 'gating' || this.input === 'rerouting') return;
    if (this.state === 'connecting' || this.state === 'closed') return;
    this.client.resume();
  }

  // ---- server to client -----------------------------------------------------------

  private onUpstreamRead(bytesRead: number, buffer: Buffer): boolean {
    this.onUpstreamData(buffer.subarray(0, bytesRead));
    return !this.upstreamBlockedByBackpressure;
  }

  private onUpstreamData(data: Buffer): void {
    this.toClient.begin();
    try {
      this.serverFramer.push(data);
    } finally {
      this.toClient.end();
    }
  }

  private readonly serverHandler: FrameHandler = {
    onMessage: (type, buf, start, end) => this.onServerMessage(type, buf, start, end),
    onForward: (bytes) => this.writeClient(bytes),
    onViolation: (reason) => {
      this.options.log.error({ session: this.info.id, reason }, 'invalid data from upstream');
      this.failClient(SqlState.ConnectionFailure, `invalid data from upstream: ${reason}`);
    },
  };

  private onServerMessage(type: number, buf: Buffer, start: number, end: number): Outcome {
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
        this.onBackendKeyData(buf, start, end);
        return CONTINUE;
      case Backend.Authentication:
        return this.onAuthentication(buf, start, end);
      case Backend.ParameterStatus:
        this.onParameterStatus(buf, start, end);
        return CONTINUE;
    }
    return CONTINUE;
  }

  private onStatementComplete(rows: number): void {
    const head = this.pending.peek();
    this.dataRows = 0;
    if (head === undefined) return;
    const now = performance.now();
    if (head.kind === Owed.Execute) {
      this.complete(head, now, rows, null);
      this.finishHead();
    } else if (head.kind === Owed.Simple) {
      this.complete(head, now, rows, null);
      head.statementIndex++;
      head.mark = now;
    }
  }

  private onErrorResponse(buf: Buffer, start: number, end: number): Outcome {
    if (errorIsFatal(buf, start, end)) this.fatalRelayed = true;
    const head = this.pending.peek();
    this.dataRows = 0;
    if (head === undefined) return CONTINUE;
    const now = performance.now();
    switch (head.kind) {
      case Owed.RefusedSimple:
      case Owed.RefusedExtended:
        this.serverFramer.flushPending();
        this.writeClient(head.refusal!);
        this.complete(head, now, 0, head.refusalCode);
        if (head.kind === Owed.RefusedExtended) this.finishHead();
        return SKIP;
      case Owed.Execute:
        this.complete(head, now, 0, errorSqlState(buf, start, end));
        this.finishHead();
        this.skipToSync();
        return CONTINUE;
      case Owed.Simple:
        this.complete(head, now, 0, errorSqlState(buf, start, end));
        head.statementIndex++;
        return CONTINUE;
      case Owed.MalformedExecute:
        this.finishHead();
        this.skipToSync();
        return CONTINUE;
    }
    return CONTINUE;
  }

  /** After an error in an extended-protocol group the server skips all up to the next Sync: those owe nothing. */
  private skipToSync(): void {
    while (this.pending.length > 0 && this.pending.peek()!.kind !== Owed.Sync) this.finishHead();
  }

  private onReadyForQuery(status: TransactionStatus): void {
    if (this.state === 'authenticating') this.onAuthenticated();
    this.transactionStatus = status;
    // ReadyForQuery answers the oldest Sync, Query or FunctionCall; Executes still
    // ahead of it were skipped by the server after an error.
    while (this.pending.length > 0) {
      const kind = this.pending.peek()!.kind;
      this.finishHead();
      if (kind !== Owed.Execute && kind !== Owed.RefusedExtended && kind !== Owed.MalformedExecute) break;
    }
    if (this.state === 'draining' && this.idle) setImmediate(() => this.shutdown());
  }

  private finishHead(): void {
    const done = this.pending.peek()!.done;
    this.pending.shift();
    if (done !== null) done();
  }

  /** Publishes `query`'s completion (of its current statement), finished at `now`. */
  private complete(query: Pending, now: number, rows: number, sqlstate: string | null): void {
    this.lastText = query.text;
    this.lastStatementIndex = query.statementIndex;
    this.lastMark = query.mark;
    this.lastDurationMs = now - query.mark;
    const observers = this.options.observers;
    if (observers.length === 0) return;
    const completion = this.completion.fill(query, now, rows, sqlstate);
    for (let i = 0; i < observers.length; i++) {
      try {
        observers[i](completion);
      } catch (err) {
        // A subscriber's bug must never break the query path.
        this.options.log.error({ err, session: this.info.id }, 'query observer failed');
      }
    }
  }

  // -- flow control toward the client

  private writeClient(bytes: Buffer): void {
    if (this.client.writableEnded || this.client.destroyed) return;
    this.bytesFromServer += bytes.length;
    this.toClient.write(bytes);
  }

  private afterClientWrite(client: net.Socket, flushed: boolean): void {
    if (client.writableLength > 0) SERVER_READS.retain();
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

  // ---- termination ----------------------------------------------------------------

  /** Sends the client a FATAL ErrorResponse and closes both sides. */
  private failClient(code: string, message: string): void {
    this.clientFramer.stop();
    this.endClient(encodeErrorResponse({ severity: 'FATAL', code, message }));
    this.closeUpstream();
    this.markClosed();
  }

  /** Ends the client connection from pgwarden's side, destroyed in bounded time (see closeClient). */
  private endClient(lastBytes: Buffer | null): void {
    this.toClient.flush(); // what this read relayed goes before the last bytes
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
      this.toUpstream.flush();
      if (this.clientTerminated)
        upstream.end(); // the client's Terminate was forwarded already
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
        const message = 'upstream connection lost';
        this.options.log.warn({ session: this.info.id, upstream: this.options.upstream.name }, message);
        this.endClient(encodeErrorResponse({ severity: 'FATAL', code: SqlState.ConnectionFailure, message }));
      }
    } else if (!this.client.destroyed) this.endClient(null); // bound whatever end() already started
    this.markClosed();
  }

  private markClosed(): void {
    if (this.state === 'closed') return;
    this.changeLifecycle('closed');
    this.startupPacket = null;
    this.early = null;
    while (this.pending.length > 0) this.finishHead();
    this.events.closed(this);
  }
}
