// What a test file needs to reach the PostgreSQL server that test/run.ts started
// (or that the developer pointed it at), plus the one sanctioned way to wait:
// polling with a deadline, never a fixed sleep.

import pg from 'pg';

export interface TestDatabase {
  /** postgres:// URL of a superuser on the test server. */
  url: string;
  host: string;
  port: number;
  user: string;
  database: string;
}

export function testDatabase(): TestDatabase {
  const url = process.env.PGWARDEN_TEST_DATABASE_URL;
  if (!url) {
    throw new Error(
      'PGWARDEN_TEST_DATABASE_URL is not set: run the tests via `npm test` (node --import tsx test/run.ts), ' +
        'which starts a throwaway PostgreSQL, or set it to a superuser postgres:// URL',
    );
  }
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch (error) {
    throw new Error(`PGWARDEN_TEST_DATABASE_URL is not a valid URL: ${url}`, { cause: error });
  }
  if (parsed.protocol !== 'postgres:' && parsed.protocol !== 'postgresql:') {
    throw new Error(`PGWARDEN_TEST_DATABASE_URL must be a postgres:// URL, got ${url}`);
  }
  // Same defaults as libpq: user from the environment is not consulted on purpose,
  // so a test run never depends on who happens to be logged in.
  const user = decodeURIComponent(parsed.username) || 'postgres';
  return {
    url,
    host: parsed.hostname || '127.0.0.1',
    port: parsed.port ? Number(parsed.port) : 5432,
    user,
    database: decodeURIComponent(parsed.pathname.replace(/^\//, '')) || user,
  };
}

/** Runs fn with a connected client and always closes it. */
export async function withClient<T>(fn: (client: pg.Client) => Promise<T>, url?: string): Promise<T> {
  const client = new pg.Client({ connectionString: url ?? testDatabase().url });
  await client.connect();
  try {
    return await fn(client);
  } finally {
    await client.end();
  }
}

export interface WaitForOptions {
  /** Overall deadline; default 10 000 ms. */
  timeoutMs?: number;
  /** Pause between attempts; default 25 ms. */
  intervalMs?: number;
  /** Completes "timed out waiting for ..." in the error message. */
  what?: string;
}

/**
 * Polls check until it returns something other than undefined or false, and
 * returns that. A throwing check counts as "not yet" (a proxy that is still
 * starting refuses connections), and a check that hangs cannot outlive the
 * deadline. On timeout the error names what was awaited and the last outcome.
 */
export async function waitFor<T>(
  check: () => Promise<T | undefined | false> | T | undefined | false,
  options: WaitForOptions = {},
): Promise<T> {
  const { timeoutMs = 10_000, intervalMs = 25, what = 'condition' } = options;
  const started = Date.now();
  const deadline = started + timeoutMs;
  let attempts = 0;
  let last: { result: unknown } | { error: unknown } | undefined;

  for (;;) {
    attempts++;
    const remaining = deadline - Date.now();
    const outcome = await withinDeadline(check, Math.max(remaining, 0));
    if ('result' in outcome && outcome.result !== undefined && outcome.result !== false) {
      return outcome.result as T;
    }
    if (!('timedOut' in outcome)) last = outcome;
    const left = deadline - Date.now();
    if (left <= 0 || 'timedOut' in outcome) {
      const lastOutcome =
        last === undefined
          ? 'no attempt completed'
          : 'error' in last
            ? `last attempt threw: ${describeError(last.error)}`
            : `last result: ${String(last.result)}`;
      throw new Error(
        `waitFor: timed out after ${timeoutMs} ms waiting for ${what} (${attempts} attempt${attempts === 1 ? '' : 's'}; ${lastOutcome})`,
        last !== undefined && 'error' in last ? { cause: last.error } : undefined,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, Math.min(intervalMs, left)));
  }
}

type Outcome = { result: unknown } | { error: unknown } | { timedOut: true };

async function withinDeadline(check: () => unknown, ms: number): Promise<Outcome> {
  let timer: NodeJS.Timeout | undefined;
  const attempt = (async (): Promise<Outcome> => {
    try {
      return { result: await check() };
    } catch (error) {
      return { error };
    }
  })();
  const timeout = new Promise<Outcome>((resolve) => (timer = setTimeout(() => resolve({ timedOut: true }), ms)));
  try {
    return await Promise.race([attempt, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

function describeError(error: unknown): string {
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    return code === undefined ? error.message : `${error.message} (${String(code)})`;
  }
  return String(error);
}
