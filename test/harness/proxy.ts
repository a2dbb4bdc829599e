// Starts a pgwarden proxy in the test process, in front of the test database, and
// records copies of the completion events it publishes.

import pino from 'pino';
import { ProxyServer } from '../../src/proxy/server.ts';
import type { QueryCompletion, QueryGate } from '../../src/proxy/seam.ts';
import type { UpstreamTlsMode } from '../../src/proxy/upstream.ts';
import { testDatabase } from './database.ts';

export interface RecordedCompletion {
  text: string;
  statementName: string | null;
  statementIndex: number;
  /** Which Bind of its prepared statement (0: a simple Query). */
  execution: number;
  hasBind: boolean;
  durationMs: number;
  rows: number;
  sqlstate: string | null;
  user: string;
  database: string;
  applicationName: string;
  upstream: string;
}

export interface TestProxy {
  readonly host: string;
  readonly port: number;
  readonly server: ProxyServer;
  readonly completions: RecordedCompletion[];
  /** A postgres:// URL through the proxy. */
  url(user?: string, database?: string, password?: string): string;
  stop(): Promise<void>;
}

export interface TestProxyOptions {
  gate?: QueryGate;
  maxMessageBytes?: number;
  startupTimeoutMs?: number;
  maxClientConnections?: number;
  unixSocketDir?: string;
  upstreamHost?: string;
  upstreamPort?: number;
  upstreamTls?: UpstreamTlsMode;
  tlsCert?: Buffer;
  tlsKey?: Buffer;
}

export async function startProxy(options: TestProxyOptions = {}): Promise<TestProxy> {
  const db = testDatabase();
  const log = pino({ level: process.env.PGWARDEN_TEST_LOG_LEVEL ?? 'silent' });
  const server = new ProxyServer({
    host: '127.0.0.1',
    port: 0,
    upstream: {
      name: 'primary',
      host: options.upstreamHost ?? db.host,
      port: options.upstreamPort ?? db.port,
      tls: options.upstreamTls ?? 'disable',
      connectTimeoutMs: 3000,
    },
    maxMessageBytes: options.maxMessageBytes ?? 128 * 1024 * 1024,
    startupTimeoutMs: options.startupTimeoutMs ?? 10_000,
    maxClientConnections: options.maxClientConnections ?? 10_000,
    unixSocketDir: options.unixSocketDir,
    tlsCert: options.tlsCert,
    tlsKey: options.tlsKey,
    gate: options.gate,
    log,
  });
  const completions: RecordedCompletion[] = [];
  server.onQueryComplete((c: QueryCompletion) =>
    completions.push({
      text: c.text,
      statementName: c.statement?.name ?? null,
      statementIndex: c.statementIndex,
      execution: c.execution,
      hasBind: c.bind !== null,
      durationMs: c.durationMs,
      rows: c.rows,
      sqlstate: c.sqlstate,
      user: c.session.user,
      database: c.session.database,
      applicationName: c.session.applicationName,
      upstream: c.upstream,
    }),
  );
  const address = await server.listen();
  return {
    host: '127.0.0.1',
    port: address.port,
    server,
    completions,
    url(user = db.user, database = db.database, password?: string) {
      const auth =
        password === undefined
          ? encodeURIComponent(user)
          : `${encodeURIComponent(user)}:${encodeURIComponent(password)}`;
      return `postgres://${auth}@127.0.0.1:${address.port}/${encodeURIComponent(database)}`;
    },
    stop: () => server.drain(2000),
  };
}
