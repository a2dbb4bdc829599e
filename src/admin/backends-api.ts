// Admin actions on the database sessions that block others: cancel the statement of,
// or terminate, a backend named as a blocker in a lock-wait incident. Refused unless
// a fresh activity sample shows the backend blocking someone right now, so the
// endpoint cannot be used to kill arbitrary sessions. Each action is audited on the
// event timeline and in the log. Needs a monitoring role allowed to signal the
// backend (superuser, pg_signal_backend, or the same role).

import type { Logger } from 'pino';
import type { ActivitySampler } from '../detect/activity.ts';
import type { EventLog } from '../events/timeline.ts';
import type { MonitorPool } from '../plans/monitor.ts';
import { ApiError, type ApiRequest, type ApiResponse, type Route } from './server.ts';

export interface BackendsApiOptions {
  readonly activity: ActivitySampler;
  readonly monitor: MonitorPool;
  readonly events: EventLog;
  readonly log: Logger;
}

export function backendRoutes(options: BackendsApiOptions): Route[] {
  const act =
    (action: 'cancel' | 'terminate') =>
    async ({ params, body }: ApiRequest): Promise<ApiResponse> => {
      const pid = Number(params.pid);
      if (!Number.isInteger(pid) || pid <= 0)
        throw new ApiError(400, `pid must be a positive integer; got '${params.pid}'`);
      const reason = (body as { reason?: unknown } | null)?.reason;
      if (reason !== undefined && (typeof reason !== 'string' || reason.length > 500))
        throw new ApiError(400, 'reason must be a string of at most 500 characters');
      const sample = await options.activity.sampleNow();
      const victims = sample.backends.filter((b) => b.blockedBy.includes(pid));
      if (victims.length === 0)
        throw new ApiError(409, `backend ${pid} blocks no session right now; pgwarden only ${action}s lock blockers`);
      const target = sample.backends.find((b) => b.pid === pid);
      const fn = action === 'cancel' ? 'pg_cancel_backend' : 'pg_terminate_backend';
      const { rows } = await options.monitor.query<{ ok: boolean }>(`select ${fn}($1) as ok`, [pid]);
      const ok = rows[0]?.ok === true;
      const who = target
        ? `user ${target.user}, application ${target.application || '(none)'}${target.query ? `, \`${target.query}\`` : ''}`
        : 'not visible';
      const summary = `${action === 'cancel' ? 'cancel' : 'terminate'} backend ${pid} (${who}), blocking ${victims.length} session(s): ${ok ? 'done' : 'refused by the server'}${reason ? ` (reason: ${reason})` : ''}`;
      options.events.add({
        type: 'admin_action',
        summary,
        fingerprint: target?.fingerprint ?? undefined,
        details: {
          action,
          pid,
          ok,
          reason: reason ?? null,
          blocking: victims.map((v) => v.pid),
          user: target?.user ?? null,
          application: target?.application ?? null,
          query: target?.query ?? null,
        },
      });
      options.log.warn(
        {
          action,
          pid,
          ok,
          reason,
          blocking: victims.length,
          user: target?.user,
          application: target?.application,
          query: target?.query,
        },
        'admin action on a blocking backend',
      );
      if (!ok)
        throw new ApiError(
          502,
          `${fn}(${pid}) returned false: the monitoring role may lack the right to signal it (pg_signal_backend)`,
        );
      return { status: 200, body: { pid, action, ok, blocking: victims.map((v) => v.pid) } };
    };
  return [
    { method: 'POST', path: '/api/backends/:pid/cancel', handle: act('cancel') },
    { method: 'POST', path: '/api/backends/:pid/terminate', handle: act('terminate') },
  ];
}
