// `pgwarden sessions [list|cancel ID|terminate ID]`: who is connected through a
// running pgwarden and what they run, as PgBouncer's SHOW CLIENTS, through its
// admin API; cancel a session's running statement or end the session.

import { UNANSWERED_HEADER } from '../admin/sessions-api.ts';
import { adminClient, parseCommandArgs, refusal, type Output } from './admin-client.ts';

export const SESSIONS_USAGE = `usage: pgwarden sessions [list|cancel|terminate] [ID] [options]

  pgwarden sessions [list] [--json]   live sessions: client, user, database, application,
                                      since, state, current (or last) statement's shape
  pgwarden sessions cancel ID         cancel the session's running statement (a CancelRequest)
  pgwarden sessions terminate ID      end the session (the client gets 57P01)

With --workers N, IDs name the worker holding the session (w2-17), and a worker
that does not answer in time is named on stderr (its sessions are not listed).

connection: --admin HOST:PORT (PGWARDEN_ADMIN, default 127.0.0.1:6465)
            --token TOKEN (PGWARDEN_ADMIN_TOKEN)
`;

const OPTIONS = {
  json: { type: 'boolean' },
  admin: { type: 'string' },
  token: { type: 'string' },
  help: { type: 'boolean' },
} as const;

interface SessionJson {
  /** A number in one process; `w<worker>-<n>` with --workers. */
  id: number | string;
  client_address: string;
  user: string;
  database: string;
  application_name: string;
  since: string;
  state: string;
  statement: { fingerprint: string | null; query: string | null; running: boolean; duration_ms: number } | null;
  bytes_in: number;
  bytes_out: number;
}

/** Runs the subcommand; returns the exit code (0 done, 1 refused by pgwarden, 2 usage or connection). */
export async function runSessions(
  args: string[],
  out: Output = process.stdout,
  err: Output = process.stderr,
): Promise<number> {
  const parsed = parseCommandArgs('sessions', args, OPTIONS, SESSIONS_USAGE, err);
  if (parsed === null) return 2;
  const { values, positionals } = parsed;
  const [verb = 'list', id, extra] = positionals;
  if (values.help) {
    out.write(SESSIONS_USAGE);
    return 0;
  }
  if (
    !['list', 'cancel', 'terminate'].includes(verb) ||
    extra !== undefined ||
    (verb === 'list') !== (id === undefined)
  ) {
    err.write(
      `pgwarden sessions: ${verb === 'list' || !['cancel', 'terminate'].includes(verb) ? `unexpected '${positionals.join(' ')}'` : `${verb} which session? Give its ID (see pgwarden sessions)`}\n${SESSIONS_USAGE}`,
    );
    return 2;
  }
  const api = adminClient(values, 'sessions', err);
  if (api === null) return 2;
  try {
    if (verb === 'list') {
      const response = await api.request('GET', '/api/sessions');
      if (response.status !== 200) {
        err.write(`pgwarden sessions: ${refusal(response)}\n`);
        return 1;
      }
      const sessions = response.body as SessionJson[];
      // With --workers, a worker that did not answer in time: its sessions are missing, say so.
      const unanswered = response.headers?.get(UNANSWERED_HEADER);
      if (unanswered)
        err.write(`pgwarden sessions: worker(s) ${unanswered} did not answer: their sessions are not listed\n`);
      if (values.json) out.write(`${JSON.stringify(sessions, null, 2)}\n`);
      else out.write(table(sessions));
      return 0;
    }
    const path =
      verb === 'cancel' ? `/api/sessions/${encodeURIComponent(id)}/query` : `/api/sessions/${encodeURIComponent(id)}`;
    const response = await api.request('DELETE', path);
    if (response.status !== 200) {
      err.write(`pgwarden sessions: ${refusal(response)}\n`);
      return 1;
    }
    out.write(verb === 'cancel' ? `cancel request sent for session ${id}\n` : `session ${id} terminated\n`);
    return 0;
  } catch (e) {
    err.write(`pgwarden sessions: cannot reach the admin API at ${api.base}: ${(e as Error).message}\n`);
    return 2;
  }
}

function table(sessions: SessionJson[]): string {
  if (sessions.length === 0) return 'no sessions\n';
  const rows = [
    ['ID', 'CLIENT', 'USER', 'DATABASE', 'APPLICATION', 'SINCE', 'STATE', 'FOR_MS', 'SHAPE', 'IN', 'OUT', 'QUERY'],
  ];
  for (const s of sessions) {
    const st = s.statement;
    rows.push([
      String(s.id),
      s.client_address,
      s.user,
      s.database,
      s.application_name || '-',
      s.since.slice(11, 19),
      s.state,
      st ? `${Math.round(st.duration_ms)}${st.running ? '' : ' (last)'}` : '-',
      st?.fingerprint ?? '-',
      String(s.bytes_in),
      String(s.bytes_out),
      st?.query ? st.query.replace(/\s+/g, ' ').slice(0, 60) : '-',
    ]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return (
    rows.map((r) => r.map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i]))).join('  ')).join('\n') +
    '\n'
  );
}
