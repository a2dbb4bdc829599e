// Live sessions, as PgBouncer's SHOW CLIENTS: who is connected, in which state
// (from ReadyForQuery and what is in flight), running which shape for how long,
// and cancel or terminate one. Statements are shown as their shape (fingerprint
// and normalized text), never with literal values. With `--workers N` the sessions
// live in the workers: the primary asks each of them (SessionDirectory, workers.ts).
// Also the statements in flight, as the detector sees them (GET /api/inflight).

import type { Logger } from 'pino';
import type { InFlightView } from '../detect/inflight.ts';
import type { EventLog } from '../events/timeline.ts';
import type { ProxyServer } from '../proxy/server.ts';
import type { Session } from '../proxy/session.ts';
import type { ShapeFinder } from '../shapes/fingerprint.ts';
import { ApiError, type Route } from './server.ts';

/** The shape of statement `index` of a text (null when shape statistics are off). */
export type StatementShapeOf = ((text: string, index: number) => { fingerprint: string; query: string }) | null;

export function sessionJson(session: Session, shapeOf: StatementShapeOf, upstream: string, now = Date.now()) {
  const s = session.snapshot();
  const statement = s.statement;
  const shape = statement !== null && shapeOf !== null ? shapeOf(statement.text, statement.statementIndex) : null;
  return {
    id: s.id,
    client_address: s.info.clientAddress,
    user: s.info.user,
    database: s.info.database,
    application_name: s.info.applicationName,
    since: new Date(s.connectedAt).toISOString(),
    connected_s: Math.round((now - s.connectedAt) / 100) / 10,
    state: s.state,
    statement:
      statement === null
        ? null
        : {
            fingerprint: shape?.fingerprint ?? null,
            query: shape?.query ?? null,
            running: statement.running,
            started_at: new Date(statement.startedAt).toISOString(),
            /** How long it has run so far (running), or took (the last one). */
            duration_ms: Math.round(statement.durationMs * 1000) / 1000,
          },
    upstream,
    backend_pid: session.backendPid || null,
    bytes_in: s.bytesFromClient,
    bytes_out: s.bytesFromServer,
  };
}

/** A session as GET /api/sessions shows it. */
export type SessionJson = Omit<ReturnType<typeof sessionJson>, 'id'> & { readonly id: number | string };

/**
 * A session's id in the API: its number in one process; under `--workers N`, the
 * worker's number and the session's (`w2-17`), as each worker numbers its own.
 */
export function workerSessionId(worker: number, session: number): string {
  return `w${worker}-${session}`;
}

/** The worker (null: one process) and session number of an API id, or null if it is none. */
export function parseSessionId(id: string): { worker: number | null; session: number } | null {
  if (/^\d+$/.test(id)) return { worker: null, session: Number(id) };
  const m = /^w(\d+)-(\d+)$/.exec(id);
  return m ? { worker: Number(m[1]), session: Number(m[2]) } : null;
}

export function noSession(id: string): ApiError {
  return new ApiError(404, `no live session '${id}' (see GET /api/sessions)`);
}

/**
 * Where the sessions are: this process's proxy (localSessions), or with `--workers N`
 * every worker's, asked over IPC by the primary (workers.ts). Failures throw ApiError.
 */
export interface SessionDirectory {
  /** The live sessions, and the workers that did not answer in time (named, e.g. `w2`). */
  list(): Promise<{ sessions: SessionJson[]; unanswered: string[] }>;
  /** Cancels the session's running statement: a CancelRequest with its key, as the client itself would send. */
  cancel(id: string): Promise<SessionActed & { cancel_sent: true }>;
  /** Ends the session: the client gets FATAL 57P01, the upstream connection is ended with Terminate. */
  terminate(id: string): Promise<SessionActed & { terminated: true }>;
}

/** Whose session an action reached: the answer names it, and the audit event records it. */
export interface SessionActed {
  readonly id: number | string;
  readonly user: string;
  readonly application_name: string;
}

/** The shape of a statement of a text, as the sessions show it. */
export function statementShapes(finder: ShapeFinder): NonNullable<StatementShapeOf> {
  return (text, index) => {
    const shapes = finder.shapesOfText(text);
    return shapes[Math.min(index, shapes.length - 1)];
  };
}

/** The sessions of this process's proxy; `worker` its number in a cluster (its ids are then `w<worker>-<n>`). */
export function localSessions(
  proxy: ProxyServer,
  shapeOf: StatementShapeOf,
  upstream: string,
  worker: number | null = null,
): SessionDirectory {
  const idOf = (session: Session) => (worker === null ? session.info.id : workerSessionId(worker, session.info.id));
  const acted = (session: Session): SessionActed => ({
    id: idOf(session),
    user: session.info.user,
    application_name: session.info.applicationName,
  });
  const find = (id: string): Session => {
    const parsed = parseSessionId(id);
    const session = parsed !== null && parsed.worker === worker ? proxy.findSession(parsed.session) : undefined;
    if (session === undefined) throw noSession(id);
    return session;
  };
  return {
    async list() {
      const now = Date.now();
      const sessions = [...proxy.liveSessions()]
        .filter((s) => s.lifecycle !== 'closed')
        .sort((a, b) => a.info.id - b.info.id)
        .map((s) => ({ ...sessionJson(s, shapeOf, upstream, now), id: idOf(s) }));
      return { sessions, unanswered: [] };
    },
    async cancel(id) {
      const session = find(id);
      if (session.backendKey === null)
        throw new ApiError(409, `session ${id} has no backend key yet: nothing to cancel`);
      try {
        await session.cancel();
      } catch (err) {
        throw new ApiError(502, `cancel request not delivered to the upstream: ${(err as Error).message}`);
      }
      return { ...acted(session), cancel_sent: true };
    },
    async terminate(id) {
      const session = find(id);
      session.terminate();
      return { ...acted(session), terminated: true };
    },
  };
}

/** Names the workers whose sessions are missing from a list (they did not answer in time). */
export const UNANSWERED_HEADER = 'X-Pgwarden-Unanswered-Workers';

/** Where an operator's action on a session is recorded, as actions on blocking backends are. */
export interface SessionAudit {
  readonly events: EventLog;
  readonly log: Logger;
}

function audited<T extends SessionActed>(audit: SessionAudit, action: 'cancel' | 'terminate', acted: T): T {
  const who = `user ${acted.user}, application ${acted.application_name || '(none)'}`;
  audit.events.add({
    type: 'admin_action',
    summary: `${action} session ${acted.id} (${who})${action === 'cancel' ? ': cancel request sent' : ''}`,
    details: { action, session: acted.id, user: acted.user, application: acted.application_name },
  });
  audit.log.warn(
    { action, session: acted.id, user: acted.user, application: acted.application_name },
    'admin action on a session',
  );
  return acted;
}

export function sessionRoutes(sessions: SessionDirectory, audit: SessionAudit): Route[] {
  return [
    {
      method: 'GET',
      path: '/api/sessions',
      async handle() {
        const { sessions: list, unanswered } = await sessions.list();
        return {
          status: 200,
          body: list,
          headers: unanswered.length > 0 ? { [UNANSWERED_HEADER]: unanswered.join(',') } : undefined,
        };
      },
    },
    {
      method: 'DELETE',
      path: '/api/sessions/:id/query',
      async handle({ params }) {
        return { status: 200, body: audited(audit, 'cancel', await sessions.cancel(params.id)) };
      },
    },
    {
      method: 'DELETE',
      path: '/api/sessions/:id',
      async handle({ params }) {
        return { status: 200, body: audited(audit, 'terminate', await sessions.terminate(params.id)) };
      },
    },
  ];
}

/**
 * The statements in flight (with `--workers N`, every worker's, as last reported:
 * up to 250 ms behind, and only those of 750 ms and more, at most 200 per worker),
 * oldest first, with the counts by shape of everything in flight.
 */
export function inFlightRoutes(view: InFlightView): Route[] {
  return [
    {
      method: 'GET',
      path: '/api/inflight',
      handle({ query }) {
        const raw = query.get('min_ms') ?? '1000';
        const minMs = Number(raw);
        if (!/^\d+$/.test(raw) || !Number.isSafeInteger(minMs))
          throw new ApiError(400, `min_ms must be a whole number of milliseconds, not '${raw}'`);
        const statements = view.inFlight(minMs).map((s) => ({
          session: s.worker === undefined ? s.session : workerSessionId(s.worker, s.session),
          user: s.user,
          database: s.database,
          fingerprint: s.fingerprint,
          query: s.query,
          since: new Date(s.since).toISOString(),
          age_ms: Math.round(s.ageMs),
        }));
        const by_shape = [...view.countsByShape()]
          .map(([fingerprint, count]) => ({ fingerprint, count }))
          .sort((a, b) => b.count - a.count || a.fingerprint.localeCompare(b.fingerprint));
        return { status: 200, body: { statements, by_shape } };
      },
    },
  ];
}
