// `pgwarden workload export`: the captured workload of a running pgwarden, from
// its admin API, for `pgwarden check-migration`.

import fs from 'node:fs';
import { adminClient, parseCommandArgs, refusal, type AdminResponse, type Output } from './admin-client.ts';

export const WORKLOAD_USAGE = `usage: pgwarden workload export [--output FILE] [options]

  writes the captured workload (GET /api/workload) as JSON, to stdout or FILE:
  every shape with its normalized text, calls, latency percentiles and current
  plan, heaviest first; sample parameter values only if the running pgwarden
  has workload_sample_params on

connection: --admin HOST:PORT (PGWARDEN_ADMIN, default 127.0.0.1:6465)
            --token TOKEN (PGWARDEN_ADMIN_TOKEN)
`;

const OPTIONS = {
  output: { type: 'string', short: 'o' },
  admin: { type: 'string' },
  token: { type: 'string' },
  help: { type: 'boolean' },
} as const;

/** Runs the subcommand; returns the exit code (0 done, 1 refused by pgwarden, 2 usage or connection). */
export async function runWorkload(
  args: string[],
  out: Output = process.stdout,
  err: Output = process.stderr,
): Promise<number> {
  const parsed = parseCommandArgs('workload', args, OPTIONS, WORKLOAD_USAGE, err);
  if (parsed === null) return 2;
  const { values, positionals } = parsed;
  const [verb, extra] = positionals;
  if (values.help || verb === undefined) {
    (values.help ? out : err).write(WORKLOAD_USAGE);
    return values.help ? 0 : 2;
  }
  if (verb !== 'export' || extra !== undefined) {
    err.write(`pgwarden workload: unknown subcommand '${positionals.join(' ')}'\n${WORKLOAD_USAGE}`);
    return 2;
  }
  const api = adminClient(values, 'workload', err);
  if (api === null) return 2;
  let response: AdminResponse;
  try {
    response = await api.request('GET', '/api/workload', undefined, 30_000);
  } catch (e) {
    err.write(`pgwarden workload: cannot reach the admin API at ${api.base}: ${(e as Error).message}\n`);
    return 2;
  }
  if (response.status !== 200) {
    err.write(`pgwarden workload: ${refusal(response)}\n`);
    return 1;
  }
  const body = response.body;
  const json = `${JSON.stringify(body, null, 2)}\n`;
  if (values.output === undefined || values.output === '-') {
    out.write(json);
    return 0;
  }
  // Written whole or not at all: a half-written workload would fail check-migration later, far from here.
  const temporary = `${values.output}.${process.pid}.tmp`;
  try {
    fs.writeFileSync(temporary, json);
    fs.renameSync(temporary, values.output);
  } catch (e) {
    fs.rmSync(temporary, { force: true });
    err.write(
      `pgwarden workload: cannot write ${values.output}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}\n`,
    );
    return 2;
  }
  const shapes = (body as { shapes?: unknown[] }).shapes?.length ?? 0;
  err.write(`pgwarden workload: wrote ${shapes} shape${shapes === 1 ? '' : 's'} to ${values.output}\n`);
  return 0;
}
