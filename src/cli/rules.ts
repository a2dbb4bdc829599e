// `pgwarden rules list|block|shed|reroute|delete`: the one-command containment,
// through the admin API of a running pgwarden.

import os from 'node:os';
import { adminClient, parseCommandArgs, refusal, type AdminResponse, type Output } from './admin-client.ts';

export const RULES_USAGE = `usage: pgwarden rules <list|block|shed|reroute|delete> [arguments] [options]

  pgwarden rules list [--json]
  pgwarden rules block FINGERPRINT [--reason TEXT] [--ttl SECONDS]
  pgwarden rules shed FINGERPRINT --max-concurrent N [--queue-timeout-ms MS] [--reason TEXT] [--ttl SECONDS]
  pgwarden rules reroute FINGERPRINT --target REPLICA [--reason TEXT] [--ttl SECONDS]
  pgwarden rules delete RULE_ID

--force: allow a rule on a transaction-control or session statement (BEGIN, COMMIT,
         SET...), which pgwarden refuses otherwise: refusing COMMIT fails every
         transaction that reaches it.

narrowing (block, shed, reroute): --user NAME --database NAME --application-name NAME
connection: --admin HOST:PORT (PGWARDEN_ADMIN, default 127.0.0.1:6465)
            --token TOKEN (PGWARDEN_ADMIN_TOKEN)
`;

const OPTIONS = {
  json: { type: 'boolean' },
  force: { type: 'boolean' },
  reason: { type: 'string' },
  ttl: { type: 'string' },
  'max-concurrent': { type: 'string' },
  'queue-timeout-ms': { type: 'string' },
  target: { type: 'string' },
  user: { type: 'string' },
  database: { type: 'string' },
  'application-name': { type: 'string' },
  admin: { type: 'string' },
  token: { type: 'string' },
  help: { type: 'boolean' },
} as const;

interface RuleJson {
  id: string;
  action: string;
  fingerprint: string;
  reason: string;
  created_by: string;
  expires_at: string | null;
  max_concurrent: number | null;
  target: string | null;
  applied?: number;
  /** Whether the instance has seen the rule's shape (null: it cannot tell). */
  seen?: boolean | null;
  warnings?: string[];
}

/** Runs the subcommand; returns the exit code (0 done, 1 refused by pgwarden, 2 usage or connection). */
export async function runRules(
  args: string[],
  out: Output = process.stdout,
  err: Output = process.stderr,
): Promise<number> {
  const parsed = parseCommandArgs('rules', args, OPTIONS, RULES_USAGE, err);
  if (parsed === null) return 2;
  const { values, positionals } = parsed;
  const [verb, target] = positionals;
  if (values.help || verb === undefined) {
    (values.help ? out : err).write(RULES_USAGE);
    return values.help ? 0 : 2;
  }
  const api = adminClient(values, 'rules', err);
  if (api === null) return 2;
  const call = (method: string, path: string, body?: unknown) => api.request(method, path, body);

  try {
    switch (verb) {
      case 'list': {
        const response = await call('GET', '/api/rules');
        if (response.status !== 200) return failed(err, response);
        const body = response.body;
        const rules = body as RuleJson[];
        if (values.json) out.write(`${JSON.stringify(rules, null, 2)}\n`);
        else if (rules.length === 0) out.write('no rules\n');
        else
          for (const r of rules)
            out.write(
              `${r.id}  ${r.action.padEnd(7)}  ${r.fingerprint}  ${detail(r)}  by ${r.created_by}${r.expires_at ? ` until ${r.expires_at}` : ''}  applied ${r.applied ?? 0}${r.seen === false ? '  (shape never seen here)' : ''}  -- ${r.reason}\n`,
            );
        return 0;
      }
      case 'block':
      case 'shed':
      case 'reroute': {
        if (!target) {
          err.write(`pgwarden rules ${verb}: which shape? Give its FINGERPRINT (see GET /api/shapes)\n`);
          return 2;
        }
        const number = (flag: string, value: string | undefined) => {
          if (value === undefined) return undefined;
          const n = Number(value);
          if (!Number.isInteger(n) || n < 0)
            throw new UsageError(`--${flag} must be a non-negative integer, got '${value}'`);
          return n;
        };
        const rule = {
          action: verb,
          fingerprint: target,
          reason: values.reason ?? `${verb} from the command line`,
          created_by: `${os.userInfo().username}@${os.hostname()}`,
          ttl_s: number('ttl', values.ttl),
          max_concurrent: number('max-concurrent', values['max-concurrent']),
          queue_timeout_ms: number('queue-timeout-ms', values['queue-timeout-ms']),
          target: values.target,
          user: values.user,
          database: values.database,
          application_name: values['application-name'],
          force: values.force || undefined,
        };
        const response = await call('POST', '/api/rules', JSON.parse(JSON.stringify(rule)));
        if (response.status !== 201) return failed(err, response);
        const body = response.body;
        const r = body as RuleJson;
        out.write(
          `${r.id}  ${r.action} ${r.fingerprint} ${detail(r)}${r.expires_at ? ` until ${r.expires_at}` : ''}\nlift it with: pgwarden rules delete ${r.id}\n`,
        );
        for (const warning of r.warnings ?? []) err.write(`pgwarden rules: warning: ${warning}\n`);
        return 0;
      }
      case 'delete': {
        if (!target) {
          err.write('pgwarden rules delete: which rule? Give its RULE_ID (see pgwarden rules list)\n');
          return 2;
        }
        const response = await call(
          'DELETE',
          `/api/rules/${encodeURIComponent(target)}?by=${encodeURIComponent(os.userInfo().username)}`,
        );
        if (response.status !== 200) return failed(err, response);
        out.write(`rule ${target} lifted\n`);
        return 0;
      }
      default:
        err.write(`pgwarden rules: unknown subcommand '${verb}'\n${RULES_USAGE}`);
        return 2;
    }
  } catch (e) {
    if (e instanceof UsageError) {
      err.write(`pgwarden rules: ${e.message}\n`);
      return 2;
    }
    err.write(`pgwarden rules: cannot reach the admin API at ${api.base}: ${(e as Error).message}\n`);
    return 2;
  }
}

class UsageError extends Error {}

function detail(r: RuleJson): string {
  if (r.action === 'shed') return `max ${r.max_concurrent}`;
  if (r.action === 'reroute') return `-> ${r.target}`;
  return '';
}

function failed(err: Output, response: AdminResponse): number {
  err.write(`pgwarden rules: ${refusal(response)}\n`);
  return 1;
}
