// How the CLI commands reach a running pgwarden: the admin API's address and
// token (from flags or PGWARDEN_ADMIN / PGWARDEN_ADMIN_TOKEN), one JSON request
// helper, and one way to word what the API refused.

import { parseArgs, type ParseArgsConfig } from 'node:util';

/** Where a command writes (stdout and stderr by default; tests pass their own). */
export interface Output {
  write(text: string): unknown;
}

export interface AdminResponse {
  status: number;
  body: unknown;
  headers?: Headers;
}

export interface AdminClient {
  /** http://HOST:PORT of the admin API. */
  readonly base: string;
  request(method: string, path: string, body?: unknown, timeoutMs?: number): Promise<AdminResponse>;
}

/**
 * The admin API of the flags or environment; null (after saying why on `err`)
 * when no token is given.
 */
export function adminClient(
  values: { admin?: string; token?: string },
  command: string,
  err: Output,
): AdminClient | null {
  const admin = values.admin ?? process.env.PGWARDEN_ADMIN ?? '127.0.0.1:6465';
  const token = values.token ?? process.env.PGWARDEN_ADMIN_TOKEN;
  if (!token) {
    err.write(`pgwarden ${command}: the admin token is needed: --token or PGWARDEN_ADMIN_TOKEN\n`);
    return null;
  }
  const base = `http://${admin}`;
  return {
    base,
    async request(method, path, body, timeoutMs = 10_000) {
      const response = await fetch(`${base}${path}`, {
        method,
        headers: {
          Authorization: `Bearer ${token}`,
          ...(body !== undefined ? { 'Content-Type': 'application/json' } : {}),
        },
        body: body !== undefined ? JSON.stringify(body) : undefined,
        signal: AbortSignal.timeout(timeoutMs),
      });
      const text = await response.text();
      try {
        return { status: response.status, body: JSON.parse(text), headers: response.headers };
      } catch {
        return { status: response.status, body: text, headers: response.headers };
      }
    },
  };
}

/** What the admin API refused, in one line for the terminal. */
export function refusal(response: AdminResponse): string {
  const { status, body } = response;
  if (status === 401) return `the admin token was refused (HTTP ${status})`;
  const message =
    typeof body === 'object' && body !== null && 'error' in body
      ? String((body as { error: unknown }).error)
      : String(body);
  return `${message} (HTTP ${status})`;
}

type CommandOptions = NonNullable<ParseArgsConfig['options']>;

/**
 * Parses a subcommand's flags and positionals strictly; on a bad flag writes
 * "pgwarden COMMAND: why" and the usage to `err`, and returns null (exit 2).
 */
export function parseCommandArgs<const T extends CommandOptions>(
  command: string,
  args: string[],
  options: T,
  usage: string,
  err: Output,
) {
  try {
    return parseArgs({ args, options, allowPositionals: true, strict: true });
  } catch (e) {
    err.write(`pgwarden ${command}: ${(e as Error).message}\n${usage}`);
    return null;
  }
}
