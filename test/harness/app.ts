// Starts a whole pgwarden (proxy, shapes, admin API) in the test process, wired
// exactly as `pgwarden start` wires it, in front of the test database.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { startApp, type App } from '../../src/cli/app.ts';
import type { Clock } from '../../src/clock.ts';
import { loadConfig, type Config } from '../../src/config.ts';
import { testDatabase } from './database.ts';

export interface TestApp {
  readonly app: App;
  readonly config: Config;
  /** A postgres:// URL through the proxy. */
  url(user?: string, database?: string): string;
  /** GET (or another method) on the admin API with the token; returns status and parsed JSON (or text). */
  api(
    path: string,
    init?: { method?: string; body?: unknown; token?: string | null },
  ): Promise<{ status: number; body: any }>;
  readonly logLines: Record<string, unknown>[];
  stop(): Promise<void>;
}

export async function startTestApp(overrides: Partial<Config> = {}, clock?: Clock): Promise<TestApp> {
  const db = testDatabase();
  // Each app keeps its rules in a state file of its own, removed at stop unless the
  // test chose the path (to restart on it).
  const stateDir = overrides.state_file === undefined ? fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-state-')) : null;
  const config: Config = {
    ...loadConfig(),
    listen: '127.0.0.1:0',
    admin: '127.0.0.1:0',
    upstream: `${db.host}:${db.port}`,
    admin_token: 'test-admin-token-0123456789',
    ...(stateDir ? { state_file: path.join(stateDir, 'state.json') } : {}),
    ...overrides,
  };
  const logLines: Record<string, unknown>[] = [];
  const log = pino({ level: 'info' }, { write: (line: string) => void logLines.push(JSON.parse(line)) });
  const app = await startApp(config, log, { clock });
  const adminBase = `http://127.0.0.1:${app.adminPort}`;
  return {
    app,
    config,
    logLines,
    url: (user = db.user, database = db.database) =>
      `postgres://${encodeURIComponent(user)}@127.0.0.1:${app.proxyPort}/${encodeURIComponent(database)}`,
    async api(path, init = {}) {
      const token = init.token === undefined ? config.admin_token : init.token;
      const response = await fetch(`${adminBase}${path}`, {
        method: init.method ?? 'GET',
        headers: {
          ...(token ? { Authorization: `Bearer ${token}` } : {}),
          ...(init.body !== undefined ? { 'Content-Type': 'application/json' } : {}),
        },
        body:
          init.body === undefined ? undefined : typeof init.body === 'string' ? init.body : JSON.stringify(init.body),
      });
      const text = await response.text();
      let body: unknown = text;
      try {
        body = JSON.parse(text);
      } catch {
        // /metrics is text
      }
      return { status: response.status, body };
    },
    async stop() {
      await app.stop(2000);
      if (stateDir) fs.rmSync(stateDir, { recursive: true, force: true });
    },
  };
}
