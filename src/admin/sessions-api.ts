// Live sessions, as PgBouncer's SHOW CLIENTS: who is connected, in which state
// (from ReadyForQuery and what is in flight), running which shape for how long,
// and cancel or terminate one. Statements are shown as their shape (fingerprint
// and normalized text), never with literal values.

import type { ProxyServer } from '../proxy/server.ts';
import type { Session } from '../proxy/session.ts';
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

export function sessionRoutes(proxy: ProxyServer, shapeOf: StatementShapeOf, upstream: string): Route[] {
  const find = (id: string): Session => {
    const session = /^\d+$/.test(id) ? proxy.findSession(Number(id)) : undefined;
    if (session === undefined) throw new ApiError(404, `no live session '${id}' (see GET /api/sessions)`);
    return session;
  };
  return [
    {
      method: 'GET',
      path: '/api/sessions',
      handle() {
        const now = Date.now();
        const sessions = [...proxy.liveSessions()]
          .filter((s) => s.lifecycle !== 'closed')
          .map((s) => sessionJson(s, shapeOf, upstream, now));
        return { status: 200, body: sessions.sort((a, b) => a.id - b.id) };
      },
    },
    {
      // Cancel the statement in flight: a CancelRequest with the session's key, as the client itself would send.
      method: 'DELETE',
      path: '/api/sessions/:id/query',
      async handle({ params }) {
        const session = find(params.id);
        if (session.backendKey === null)
          throw new ApiError(409, `session ${params.id} has no backend key yet: nothing to cancel`);
        try {
          await session.cancel();
        } catch (err) {
          throw new ApiError(502, `cancel request not delivered to the upstream: ${(err as Error).message}`);
        }
        return { status: 200, body: { id: session.info.id, cancel_sent: true } };
      },
    },
    {
      // Terminate: the client gets FATAL 57P01, the upstream connection is ended with Terminate.
      method: 'DELETE',
      path: '/api/sessions/:id',
      handle({ params }) {
        const session = find(params.id);
        session.terminate();
        return { status: 200, body: { id: session.info.id, terminated: true } };
      },
    },
  ];
}
