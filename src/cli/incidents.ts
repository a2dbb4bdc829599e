// `pgwarden incidents list|show|postmortem`: the incident history of a running
// pgwarden, through its admin API, for the person on call at a terminal.

import type { Incident } from '../detect/record.ts';
import { adminClient, parseCommandArgs, refusal, type AdminResponse, type Output } from './admin-client.ts';

export const INCIDENTS_USAGE = `usage: pgwarden incidents <list|show|postmortem> [arguments] [options]

  pgwarden incidents list [--status active|resolved|all] [--limit N] [--offset N] [--json]
  pgwarden incidents show ID [--json]
  pgwarden incidents postmortem ID      the incident's timeline in Markdown

connection: --admin HOST:PORT (PGWARDEN_ADMIN, default 127.0.0.1:6465)
            --token TOKEN (PGWARDEN_ADMIN_TOKEN)
`;

const OPTIONS = {
  status: { type: 'string' },
  limit: { type: 'string' },
  offset: { type: 'string' },
  json: { type: 'boolean' },
  admin: { type: 'string' },
  token: { type: 'string' },
  help: { type: 'boolean' },
} as const;

/** Runs the subcommand; returns the exit code (0 done, 1 refused by pgwarden, 2 usage or connection). */
export async function runIncidents(
  args: string[],
  out: Output = process.stdout,
  err: Output = process.stderr,
): Promise<number> {
  const parsed = parseCommandArgs('incidents', args, OPTIONS, INCIDENTS_USAGE, err);
  if (parsed === null) return 2;
  const { values, positionals } = parsed;
  const [verb, id] = positionals;
  if (values.help || verb === undefined) {
    (values.help ? out : err).write(INCIDENTS_USAGE);
    return values.help ? 0 : 2;
  }
  if ((verb === 'show' || verb === 'postmortem') && !id) {
    err.write(`pgwarden incidents ${verb}: the incident ID is needed (see pgwarden incidents list)\n`);
    return 2;
  }
  const api = adminClient(values, 'incidents', err);
  if (api === null) return 2;
  try {
    switch (verb) {
      case 'list': {
        const query = new URLSearchParams({
          status: values.status ?? 'all',
          limit: values.limit ?? '20',
          offset: values.offset ?? '0',
        });
        const response = await api.request('GET', `/api/incidents?${query}`);
        if (response.status !== 200) return failed(err, response);
        const incidents = response.body as Incident[];
        if (values.json) out.write(`${JSON.stringify(incidents, null, 2)}\n`);
        else if (incidents.length === 0) out.write('no incidents\n');
        else for (const i of incidents) out.write(`${listLine(i)}\n`);
        return 0;
      }
      case 'show': {
        const response = await api.request('GET', `/api/incidents/${encodeURIComponent(id)}`);
        if (response.status !== 200) return failed(err, response);
        const incident = response.body as Incident;
        out.write(values.json ? `${JSON.stringify(incident, null, 2)}\n` : showText(incident));
        return 0;
      }
      case 'postmortem': {
        const response = await api.request('GET', `/api/incidents/${encodeURIComponent(id)}/postmortem`);
        if (response.status !== 200) return failed(err, response);
        out.write(String(response.body));
        return 0;
      }
      default:
        err.write(`pgwarden incidents: unknown subcommand '${verb}'\n${INCIDENTS_USAGE}`);
        return 2;
    }
  } catch (e) {
    err.write(`pgwarden incidents: cannot reach the admin API at ${api.base}: ${(e as Error).message}\n`);
    return 2;
  }
}

function listLine(i: Incident): string {
  const who = i.kind === 'database_wide' ? 'database-wide' : `root ${i.root}`;
  const victims = i.victims?.length ? ` +${i.victims.length} victim${i.victims.length === 1 ? '' : 's'}` : '';
  return `${i.id}  ${i.status.padEnd(8)}  ${i.onset}  ${who}${victims}  p95 ${i.baseline.p95_ms} -> peak ${i.peak?.p95_ms ?? i.current.p95_ms} ms  ${i.attributed ? 'attributed' : 'not attributed'}`;
}

function showText(i: Incident): string {
  const lines = [
    `${i.id} (${i.kind === 'database_wide' ? 'database-wide' : 'shape'}, ${i.status})`,
    `  ${i.summary}`,
    `  onset ${i.onset}, detected ${i.detected_at}, attributed ${i.attributed_at ?? '-'}, resolved ${i.resolved_at ?? '-'}`,
    `  p95 baseline ${i.baseline.p95_ms} ms, peak ${i.peak.p95_ms} ms, now ${i.current.p95_ms} ms`,
    `  impact: ${i.impact.shapes} shape(s), ${Math.round(i.impact.share_of_calls * 100)}% of calls; applications ${i.impact.applications.join(', ') || '-'}; users ${i.impact.users.join(', ') || '-'}`,
    ...i.causes.map((c) => `  cause: ${c.kind}: ${c.summary}`),
    ...i.ruled_out.map((r) => `  ruled out: ${r.summary}`),
    ...i.victims.map(
      (v) =>
        `  victim: ${v.fingerprint} (${Math.round(v.share_of_calls * 100)}% of calls) p95 ${v.baseline_p95_ms} -> ${v.peak_p95_ms} ms: ${v.query}`,
    ),
    ...(i.mitigation ? [`  mitigation: ${i.mitigation.mode}: ${i.mitigation.note}`] : []),
    ...(i.resolution ? [`  resolution: ${i.resolution.summary}`] : []),
  ];
  return `${lines.join('\n')}\n`;
}

function failed(err: Output, response: AdminResponse): number {
  err.write(`pgwarden incidents: ${refusal(response)}\n`);
  return 1;
}
