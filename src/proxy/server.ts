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

export class ProxyServer {
  private readonly server: net.Server;
  private readonly sessions = new Set<Session>();
  private readonly observers: QueryObserver[] = [];
  private readonly secureContext: tls.SecureContext | null;
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
          this.options.log.info({ client: socket.remoteAddress, reason: outcome.reason }, 'connection rejected during startup');
          return;
        }
        if (outcome.kind === 'cancel') {
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
          (s) => this.sessions.delete(s),
        );
        this.sessions.add(session);
        if (!this.accepting) session.drain();
        outcome.socket.resume();
        void session.start(outcome.leftover);
      },
      (err: Error) => this.options.log.error({ err }, 'startup negotiation failed'),
    );
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
