// The listener: accepts client connections, runs the startup negotiation, creates a
// Session per client, routes CancelRequests to the session that owns the backend,
// and drains gracefully on shutdown.

import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { once } from 'node:events';
import type { Logger } from 'pino';
import { SqlState } from '../protocol/constants.ts';
import { encodeErrorResponse } from '../protocol/encode.ts';
import { decodeCancelRequest } from '../protocol/frontend.ts';
import { negotiateStartup } from './startup.ts';
import { Session, type SessionEvents } from './session.ts';
import { OPEN_GATE, type QueryGate, type QueryObserver } from './seam.ts';
import { closeClient } from './closing.ts';
import { ClientConnections, type ClientConnection } from './connections.ts';
import type { UpstreamTarget } from './upstream.ts';

export interface ProxyOptions {
  readonly host: string;
  readonly port: number;
  /** Also accept clients on a Unix socket in this directory (`.s.PGSQL.<port>`, as PostgreSQL names it). */
  readonly unixSocketDir?: string;
  readonly upstream: UpstreamTarget;
  readonly maxMessageBytes: number;
  /** Time a connection has to finish its startup packet and authentication. */
  readonly startupTimeoutMs: number;
  /** Client connections held at once; past it a new one gets 53300 and is closed. */
  readonly maxClientConnections: number;
  /** PEM certificate and key for TLS toward clients; without them SSLRequest gets 'N'. */
  readonly tlsCert?: string | Buffer;
  readonly tlsKey?: string | Buffer;
  readonly gate?: QueryGate;
  /** Shares cancel keys with the other processes serving the same port (see CancelKeyDirectory). */
  readonly cancelKeys?: CancelKeyDirectory;
  readonly log: Logger;
}

/**
 * Cancel keys shared between the processes of one multi-process proxy: a
 * CancelRequest arrives on whichever worker the kernel picks, not necessarily the
 * one whose session handed the key out.
 */
export interface CancelKeyDirectory {
  handedOut(processId: number, secretKey: Buffer): void;
  withdrawn(processId: number, secretKey: Buffer): void;
  /** A CancelRequest for a key this process does not hold: deliver it to its owner, or drop it. */
  route(processId: number, secretKey: Buffer): void;
}

/** Proxy-level counters, read by the metrics at scrape time (nothing is pushed per query). */
export class ProxyStats {
  connectionsAccepted = 0;
  cancelRequests = 0;
  upstreamConnectFailures = 0;
  upstreamLost = 0;
  /** Bytes of sessions that have ended; live sessions are added at read time. */
  closedBytesFromClient = 0;
  closedBytesFromServer = 0;
  /** Upstream connect times (ms) not yet taken by the metrics. */
  readonly connectTimes: number[] = [];
}

/** The last part of a drain in which sessions told to end may still flush their 57P01. */
const SHUTDOWN_GRACE_MS = 500;

const TOO_MANY_CONNECTIONS = encodeErrorResponse({
  severity: 'FATAL',
  code: SqlState.TooManyConnections,
  message: 'pgwarden: too many client connections',
  hint: 'Raise max_client_connections, or use fewer client connections.',
});

export class ProxyServer {
  readonly stats = new ProxyStats();
  /** Every client socket held, by phase (see connections.ts). */
  readonly connections: ClientConnections;
  private readonly servers: net.Server[] = [];
  private readonly sessions = new Set<Session>();
  /** Sessions by the cancel key the server handed out through them. */
  private readonly cancelKeys = new Map<string, Session>();
  private readonly observers: QueryObserver[] = [];
  private secureContext: tls.SecureContext | null;
  private gate: QueryGate;
  private nextSessionId = 1;
  private accepting = true;
  private unixSocketPath: string | null = null;

  constructor(private readonly options: ProxyOptions) {
    this.gate = options.gate ?? OPEN_GATE;
    this.connections = new ClientConnections(options.maxClientConnections);
    this.secureContext =
      options.tlsCert && options.tlsKey
        ? tls.createSecureContext({ cert: options.tlsCert, key: options.tlsKey })
        : null;
    this.servers.push(this.createListener());
  }

  /** Subscribes to every statement's completion (see QueryCompletion: copy what you keep). */
  onQueryComplete(observer: QueryObserver): void {
    this.observers.push(observer);
  }

  /** Installs the gate consulted before each query is forwarded. */
  setGate(gate: QueryGate): void {
    this.gate = gate;
  }

  get sessionCount(): number {
    return this.sessions.size;
  }

  /** The live sessions (for the sessions view: read, cancel, terminate). */
  liveSessions(): IterableIterator<Session> {
    return this.sessions.values();
  }

  findSession(id: number): Session | undefined {
    for (const session of this.sessions) if (session.info.id === id) return session;
    return undefined;
  }

  /**
   * Replaces the certificate and key offered to clients (a config reload): new
   * connections use them, sessions already established keep theirs. Throws, keeping
   * the old ones, if they do not make a valid TLS context.
   */
  setTlsCertificate(cert: string | Buffer | undefined, key: string | Buffer | undefined): void {
    this.secureContext = cert && key ? tls.createSecureContext({ cert, key }) : null;
  }

  /** The Unix socket clients may connect to, when listen_unix is set. */
  get unixSocket(): string | null {
    return this.unixSocketPath;
  }

  async listen(): Promise<net.AddressInfo> {
    const tcp = this.servers[0];
    tcp.listen(this.options.port, this.options.host);
    await once(tcp, 'listening');
    const address = tcp.address() as net.AddressInfo;
    if (this.options.unixSocketDir !== undefined) await this.listenUnix(this.options.unixSocketDir, address.port);
    return address;
  }

  /**
   * Stops accepting, lets sessions finish their in-flight queries, and ends within
   * `timeoutMs` whatever the peers do: sessions still busy near the deadline are
   * told 57P01, and every client socket still open at the deadline is destroyed, so
   * the listener closes and the process can exit.
   */
  async drain(timeoutMs: number): Promise<void> {
    this.accepting = false;
    const deadline = Date.now() + timeoutMs;
    const closed = Promise.all(
      this.servers.map((server) => new Promise<void>((resolve) => server.close(() => resolve()))),
    );
    // Not yet sessions: nothing is in flight on them.
    for (const connection of this.connections.inPhase('startup')) connection.socket.destroy();
    for (const session of this.sessions) session.drain();
    const shutdownAt = deadline - Math.min(SHUTDOWN_GRACE_MS, timeoutMs / 4);
    while (this.sessions.size > 0 && Date.now() < shutdownAt) await sleep(20);
    for (const session of this.sessions) session.shutdown();
    while (this.connections.size > 0 && Date.now() < deadline) await sleep(20);
    this.connections.destroyAll();
    await closed;
    if (this.unixSocketPath !== null) fs.rmSync(this.unixSocketPath, { force: true });
  }

  /** Cancels the query of the session holding this key; false if no session here holds it. */
  cancelLocal(processId: number, secretKey: Buffer): boolean {
    const session = this.cancelKeys.get(cancelKeyId(processId, secretKey));
    if (session === undefined) return false;
    void session.cancel();
    return true;
  }

  private createListener(): net.Server {
    return net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.onConnection(socket));
  }

  private async listenUnix(dir: string, port: number): Promise<void> {
    const file = path.join(dir, `.s.PGSQL.${port}`);
    await removeStaleSocket(file);
    const server = this.createListener();
    this.servers.push(server);
    server.listen(file);
    await once(server, 'listening');
    fs.chmodSync(file, 0o777); // PostgreSQL's default unix_socket_permissions
    this.unixSocketPath = file;
  }

  private onConnection(socket: net.Socket): void {
    socket.on('error', () => undefined); // reported through the negotiation or session
    if (!this.accepting) {
      this.connections.reject('shutting_down');
      socket.destroy();
      return;
    }
    const connection = this.connections.admit(socket);
    if (connection.phase === 'closing') {
      this.connections.reject('too_many_connections');
      closeClient(socket, TOO_MANY_CONNECTIONS);
      return;
    }
    connection.deadline = setTimeout(() => this.onStartupTimeout(connection), this.options.startupTimeoutMs);
    connection.deadline.unref();
    negotiateStartup(socket, { secureContext: this.secureContext }).then(
      (outcome) => {
        if (outcome.kind === 'rejected') {
          if (connection.phase === 'closing') return; // timed out: counted then
          connection.closing();
          this.connections.reject(outcome.closedByPeer ? 'closed_during_startup' : 'invalid_startup');
          this.options.log.debug(
            { client: socket.remoteAddress, reason: outcome.reason },
            'connection rejected during startup',
          );
          return;
        }
        if (outcome.kind === 'cancel') {
          connection.closing();
          this.stats.cancelRequests++;
          this.forwardCancel(outcome.packet);
          return;
        }
        this.openSession(connection, outcome.socket, outcome.packet, outcome.params, outcome.leftover);
      },
      (err: Error) => {
        this.options.log.error({ err }, 'startup negotiation failed');
        connection.closing();
        socket.destroy();
      },
    );
  }

  private openSession(
    connection: ClientConnection,
    socket: net.Socket,
    startupPacket: Buffer,
    params: Map<string, string>,
    leftover: Buffer | null,
  ): void {
    connection.phase = 'authenticating';
    const session = new Session(
      { id: this.nextSessionId++, connection, socket, startupPacket, params, leftover },
      {
        upstream: this.options.upstream,
        maxMessageBytes: this.options.maxMessageBytes,
        gate: this.gateProxy,
        observers: this.observers,
        log: this.options.log,
      },
      this.sessionEvents,
    );
    connection.session = session;
    this.stats.connectionsAccepted++;
    this.sessions.add(session);
    if (!this.accepting) session.drain();
    void session.start().then(() => {
      if (session.upstreamConnectMs >= 0 && this.stats.connectTimes.length < 10_000)
        this.stats.connectTimes.push(session.upstreamConnectMs);
    });
  }

  /** startup_timeout_ms is over: silence before a startup packet, PostgreSQL's authentication timeout after. */
  private onStartupTimeout(connection: ClientConnection): void {
    connection.deadline = null;
    if (connection.phase !== 'startup' && connection.phase !== 'authenticating') return;
    this.connections.reject('startup_timeout');
    if (connection.session !== null) connection.session.authenticationTimeout();
    else {
      connection.closing();
      connection.socket.destroy();
    }
  }

  private readonly sessionEvents: SessionEvents = {
    backendKeyData: (session) => {
      this.cancelKeys.set(cancelKeyId(session.backendPid, session.backendKey!), session);
      this.options.cancelKeys?.handedOut(session.backendPid, session.backendKey!);
    },
    upstreamUnreachable: () => {
      this.stats.upstreamConnectFailures++;
      this.connections.reject('upstream_unreachable');
    },
    closed: (session) => this.onSessionClosed(session),
  };

  /** Bytes relayed so far, both ways, including live sessions. */
  bytesRelayed(): { fromClient: number; fromServer: number } {
    let fromClient = this.stats.closedBytesFromClient;
    let fromServer = this.stats.closedBytesFromServer;
    for (const s of this.sessions) {
      fromClient += s.bytesFromClient;
      fromServer += s.bytesFromServer;
    }
    return { fromClient, fromServer };
  }

  private onSessionClosed(session: Session): void {
    this.sessions.delete(session);
    if (session.backendKey !== null) {
      const id = cancelKeyId(session.backendPid, session.backendKey);
      if (this.cancelKeys.get(id) === session) {
        this.cancelKeys.delete(id);
        this.options.cancelKeys?.withdrawn(session.backendPid, session.backendKey);
      }
    }
    const stats = this.stats;
    stats.closedBytesFromClient += session.bytesFromClient;
    stats.closedBytesFromServer += session.bytesFromServer;
    if (session.upstreamLost) stats.upstreamLost++;
  }

  /** Lets setGate() take effect for sessions that already exist. */
  private readonly gateProxy: QueryGate = { decide: (request) => this.gate.decide(request) };

  /**
   * A CancelRequest carries the server's own process id and key (BackendKeyData is
   * passed through), so it goes to the session owning that backend. A key no
   * session of this proxy handed out is dropped without a word, as PgBouncer does:
   * forwarding it would let anyone make pgwarden open server connections at will.
   */
  private forwardCancel(packet: Buffer): void {
    const { processId, secretKey } = decodeCancelRequest(packet);
    if (this.cancelLocal(processId, secretKey)) return;
    if (this.options.cancelKeys !== undefined) this.options.cancelKeys.route(processId, Buffer.from(secretKey));
    else this.connections.reject('cancel_unknown_key');
  }
}

/** The map key of a cancel key (made once per session, not per message). */
export function cancelKeyId(processId: number, secretKey: Buffer): string {
  return `${processId}:${secretKey.toString('hex')}`;
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Removes a socket file left by a process that is gone; one still answering is in use. */
async function removeStaleSocket(file: string): Promise<void> {
  if (!fs.existsSync(file)) return;
  const inUse = await new Promise<boolean>((resolve) => {
    const probe = net.connect(file);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (inUse) throw new Error(`${file} is in use by another server`);
  fs.rmSync(file, { force: true });
}
