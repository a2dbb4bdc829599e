// Every client socket pgwarden holds, from accept to close, with the phase it is in.
// It exists so that nothing can be held unseen: the metrics count sockets by phase
// (a leak shows as a count that never falls), max_client_connections is checked
// against it, one deadline covers startup and authentication, and at the end of a
// drain whatever is still open is destroyed so the listener can close.

import type net from 'node:net';

/**
 * `startup`: SSLRequest/StartupMessage not yet read; `authenticating`: a session
 * exists and the server has not yet sent its first ReadyForQuery; `active`: in
 * use; `closing`: pgwarden ended it and waits (bounded) for the peer.
 */
export type ConnectionPhase = 'startup' | 'authenticating' | 'active' | 'closing';
export const CONNECTION_PHASES: readonly ConnectionPhase[] = ['startup', 'authenticating', 'active', 'closing'];

/** Why a connection was refused or closed before it became a working session. */
export type RejectReason =
  | 'invalid_startup' // malformed or oversized startup packet, garbage, unsupported protocol
  | 'closed_during_startup' // the peer went away (or timed out) before its startup packet
  | 'startup_timeout' // startup or authentication took longer than startup_timeout_ms
  | 'too_many_connections' // max_client_connections reached
  | 'shutting_down' // arrived while draining
  | 'upstream_unreachable' // the upstream connection could not be opened
  | 'cancel_unknown_key'; // a CancelRequest for a key this instance never handed out
export const REJECT_REASONS: readonly RejectReason[] = [
  'invalid_startup',
  'closed_during_startup',
  'startup_timeout',
  'too_many_connections',
  'shutting_down',
  'upstream_unreachable',
  'cancel_unknown_key',
];

/** One client connection; the session swaps in its re-created socket with adopt(). */
export class ClientConnection {
  phase: ConnectionPhase = 'startup';
  /** Ends the connection when startup/authentication overruns (set by the listener). */
  deadline: NodeJS.Timeout | null = null;
  /** The session once the startup packet is accepted: it ends an authentication that overruns. */
  session: { authenticationTimeout(): void } | null = null;
  private readonly onSocketClose: () => void;

  constructor(
    public socket: net.Socket,
    private readonly registry: ClientConnections,
  ) {
    this.onSocketClose = () => registry.release(this);
    socket.once('close', this.onSocketClose);
  }

  /** Follows the connection to a socket re-created around the same handle (see readbuffer.ts). */
  adopt(socket: net.Socket): void {
    if (socket === this.socket) return;
    this.socket.removeListener('close', this.onSocketClose);
    this.socket = socket;
    if (socket.destroyed) this.registry.release(this);
    else socket.once('close', this.onSocketClose);
  }

  /** Startup and authentication are over: the deadline no longer applies. */
  activate(): void {
    if (this.phase === 'closing') return;
    this.phase = 'active';
    this.clearDeadline();
  }

  closing(): void {
    this.phase = 'closing';
    this.clearDeadline();
  }

  clearDeadline(): void {
    if (this.deadline !== null) clearTimeout(this.deadline);
    this.deadline = null;
  }
}

export class ClientConnections {
  private readonly live = new Set<ClientConnection>();
  private readonly rejectedBy = new Map<RejectReason, number>();

  constructor(readonly max: number) {}

  get size(): number {
    return this.live.size;
  }

  /**
   * Registers an accepted socket. Past max_client_connections it is registered
   * already `closing`, for the caller to refuse: still counted, so that a flood
   * of refusals is visible and bounded too.
   */
  admit(socket: net.Socket): ClientConnection {
    const connection = new ClientConnection(socket, this);
    if (this.live.size >= this.max) connection.phase = 'closing';
    this.live.add(connection);
    return connection;
  }

  release(connection: ClientConnection): void {
    connection.clearDeadline();
    connection.session = null;
    this.live.delete(connection);
  }

  reject(reason: RejectReason): void {
    this.rejectedBy.set(reason, (this.rejectedBy.get(reason) ?? 0) + 1);
  }

  rejected(reason: RejectReason): number {
    return this.rejectedBy.get(reason) ?? 0;
  }

  /** Open client sockets by phase, counted when asked (at scrape time). */
  byPhase(): Record<ConnectionPhase, number> {
    const counts: Record<ConnectionPhase, number> = { startup: 0, authenticating: 0, active: 0, closing: 0 };
    for (const c of this.live) counts[c.phase]++;
    return counts;
  }

  /** Connections not (yet) attached to a session, e.g. to close them when draining. */
  inPhase(phase: ConnectionPhase): ClientConnection[] {
    return [...this.live].filter((c) => c.phase === phase);
  }

  /** Destroys every client socket still open (the end of a drain). */
  destroyAll(): void {
    for (const c of this.live) c.socket.destroy();
  }
}
