// The listener: accepts client connections, runs the startup negotiation, creates a
// Session per client, routes CancelRequests to the session that owns the backend,
// and drains gracefully on shutdown.

import net from 'node:net';
import tls from 'node:tls';
import { once } from 'node:events';
import type { Logger } from 'pino';
import { negotiateStartup } from './startup.ts';
import { Session } from './session.ts';
import { OPEN_GATE, type QueryGate, type QueryObserver } from './seam.ts';
import { sendCancelRequest, type UpstreamTarget } from './upstream.ts';

export interface ProxyOptions {
  readonly host: string;
  readonly port: number;
  readonly upstream: UpstreamTarget;
  readonly maxMessageBytes: number;
  readonly startupTimeoutMs: number;
  /** PEM certificate and key for TLS toward clients; without them SSLRequest gets 'N'. */
  readonly tlsCert?: string | Buffer;
  readonly tlsKey?: string | Buffer;
  readonly gate?: QueryGate;
  readonly log: Logger;
}

/** Proxy-level counters, read by the metrics at scrape time (nothing is pushed per query). */
export class ProxyStats {
  connectionsAccepted = 0;
  connectionsRejected = 0;
  cancelRequests = 0;
  upstreamConnectFailures = 0;
  upstreamLost = 0;
  /** Bytes of sessions that have ended; live sessions are added at read time. */
  closedBytesFromClient = 0;
  closedBytesFromServer = 0;
  /** Upstream connect times (ms) not yet taken by the metrics. */
  readonly connectTimes: number[] = [];
}

export class ProxyServer {
  readonly stats = new ProxyStats();
  private readonly server: net.Server;
  private readonly sessions = new Set<Session>();
  private readonly observers: QueryObserver[] = [];
  private secureContext: tls.SecureContext | null;
  private gate: QueryGate;
  private nextSessionId = 1;
  private accepting = true;

  constructor(private readonly options: ProxyOptions) {
    this.gate = options.gate ?? OPEN_GATE;
    this.secureContext =
      options.tlsCert && options.tlsKey ? tls.createSecureContext({ cert: options.tlsCert, key: options.tlsKey }) : null;
    this.server = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.onConnection(socket));
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

  async listen(): Promise<net.AddressInfo> {
    this.server.listen(this.options.port, this.options.host);
    await once(this.server, 'listening');
    return this.server.address() as net.AddressInfo;
  }

  /**
   * Stops accepting, lets sessions finish their in-flight queries for up to
   * `timeoutMs`, then closes whatever is left.
   */
  async drain(timeoutMs: number): Promise<void> {
    this.accepting = false;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    for (const session of this.sessions) session.drain();
    const deadline = Date.now() + timeoutMs;
    while (this.sessions.size > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    for (const session of this.sessions) session.shutdown();
    await closed;
  }

  private onConnection(socket: net.Socket): void {
    socket.on('error', () => undefined); // reported through the negotiation or session
    if (!this.accepting) {
      socket.destroy();
      return;
    }
    negotiateStartup(socket, { secureContext: this.secureContext, timeoutMs: this.options.startupTimeoutMs }).then(
      (outcome) => {
        if (outcome.kind === 'rejected') {
          this.stats.connectionsRejected++;
          this.options.log.info({ client: socket.remoteAddress, reason: outcome.reason }, 'connection rejected during startup');
          return;
        }
        if (outcome.kind === 'cancel') {
          this.stats.cancelRequests++;
          this.forwardCancel(outcome.packet);
          return;
        }
        const session = new Session(
          outcome.socket,
          outcome.packet,
          outcome.params,
          this.nextSessionId++,
          {
            upstream: this.options.upstream,
            maxMessageBytes: this.options.maxMessageBytes,
            gate: this.gateProxy,
            observers: this.observers,
            log: this.options.log,
          },
          (s) => this.onSessionClosed(s),
        );
        this.stats.connectionsAccepted++;
        this.sessions.add(session);
        if (!this.accepting) session.drain();
        outcome.socket.resume();
        void session.start(outcome.leftover).then(() => {
          if (session.upstreamConnectMs < 0) this.stats.upstreamConnectFailures++;
          else if (this.stats.connectTimes.length < 10_000) this.stats.connectTimes.push(session.upstreamConnectMs);
        });
      },
      (err: Error) => this.options.log.error({ err }, 'startup negotiation failed'),
    );
  }

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
    const stats = this.stats;
    stats.closedBytesFromClient += session.bytesFromClient;
    stats.closedBytesFromServer += session.bytesFromServer;
    if (session.upstreamLost) stats.upstreamLost++;
  }

  /** Lets setGate() take effect for sessions that already exist. */
  private readonly gateProxy: QueryGate = { decide: (request) => this.gate.decide(request) };

  /**
   * A CancelRequest carries the server's own process id and key (BackendKeyData is
   * passed through), so it goes to the session owning that backend; one for an
   * unknown backend (e.g. owned by another worker) goes to the primary as sent.
   */
  private forwardCancel(packet: Buffer): void {
    const pid = packet.readInt32BE(8);
    const key = packet.subarray(12);
    for (const session of this.sessions) {
      if (session.backendPid === pid && session.backendKey !== null && session.backendKey.equals(key)) {
        void session.cancel();
        return;
      }
    }
    void sendCancelRequest(this.options.upstream, packet);
  }
}
