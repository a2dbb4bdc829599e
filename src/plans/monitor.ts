// The monitoring connection: its own role (configured by URL), bounded concurrency
// and a statement_timeout of its own, so EXPLAIN sampling and catalog checks can
// never pile up on the database or hold up the proxy. One small pool per database
// that shapes were seen in (a session's statements are explained in its own
// database), at most maxDatabases of them: the least recently used is closed.

import pg from 'pg';
import type { Logger } from 'pino';

export interface MonitorOptions {
  /** postgres:// URL of the monitoring role; its database is replaced per pool. */
  readonly url: string;
  /** Connections per database. */
  readonly concurrency: number;
  /** statement_timeout of monitoring queries, ms. */
  readonly statementTimeoutMs: number;
  /** Databases with a pool at once; default 8. */
  readonly maxDatabases?: number;
  /**
   * lock_timeout of monitoring queries, ms: EXPLAIN and catalog reads take relation
   * locks, and must fail fast rather than queue behind the very lock an incident is
   * about (pg_get_indexdef waits for an ACCESS EXCLUSIVE lock). 0: none.
   */
  readonly lockTimeoutMs?: number;
  readonly log: Logger;
}

const DEFAULT_MAX_DATABASES = 8;

export class MonitorPool {
  private readonly pools = new Map<string, pg.Pool>();
  private closed = false;

  constructor(private readonly options: MonitorOptions) {}

  /** The database named in the monitor URL. */
  get defaultDatabase(): string {
    return decodeURIComponent(new URL(this.options.url).pathname.replace(/^\//, '')) || 'postgres';
  }

  /** Runs one query on the monitoring connection of `database` (default: the URL's). */
  async query<R extends pg.QueryResultRow = pg.QueryResultRow>(
    sql: string,
    values: readonly unknown[] = [],
    database = this.defaultDatabase,
  ): Promise<pg.QueryResult<R>> {
    if (this.closed) throw new Error('monitor pool is closed');
    return this.pool(database).query<R>(sql, values as unknown[]);
  }

  /** A client of `database`'s pool for a multi-statement session (BEGIN ... ROLLBACK); release it. */
  connect(database = this.defaultDatabase): Promise<pg.PoolClient> {
    if (this.closed) return Promise.reject(new Error('monitor pool is closed'));
    return this.pool(database).connect();
  }

  /** Milliseconds for a trivial round trip to the database. */
  async roundTripMs(database = this.defaultDatabase): Promise<number> {
    const pool = this.pool(database);
    const client = await pool.connect();
    try {
      const started = performance.now();
      await client.query('select 1');
      return performance.now() - started;
    } finally {
      client.release();
    }
  }

  /** The server's major version (15, 18...). */
  async serverMajorVersion(): Promise<number> {
    // SHOW names its column after the setting: select it under a name of our own.
    const { rows } = await this.query<{ v: string }>("select current_setting('server_version_num') as v");
    return Math.floor(Number(rows[0].v) / 10_000);
  }

  async close(): Promise<void> {
    this.closed = true;
    await Promise.all([...this.pools.values()].map((p) => p.end().catch(() => undefined)));
    this.pools.clear();
  }

  private pool(database: string): pg.Pool {
    let pool = this.pools.get(database);
    if (pool !== undefined) {
      // Most recently used last, so the first is the one to close.
      this.pools.delete(database);
      this.pools.set(database, pool);
    } else {
      const max = this.options.maxDatabases ?? DEFAULT_MAX_DATABASES;
      while (this.pools.size >= max) {
        const [oldest, old] = this.pools.entries().next().value as [string, pg.Pool];
        this.pools.delete(oldest);
        // Clients in use finish their work first: end() closes them as they are released.
        old.end().catch(() => undefined);
        this.options.log.debug({ database: oldest }, 'monitoring pool closed (least recently used)');
      }
      const url = new URL(this.options.url);
      url.pathname = `/${encodeURIComponent(database)}`;
      pool = new pg.Pool({
        connectionString: url.toString(),
        max: this.options.concurrency,
        idleTimeoutMillis: 60_000,
        application_name: 'pgwarden-monitor',
        statement_timeout: this.options.statementTimeoutMs,
        ...(this.options.lockTimeoutMs ? { lock_timeout: this.options.lockTimeoutMs } : {}),
        connectionTimeoutMillis: 5_000,
      });
      pool.on('error', (err) => this.options.log.warn({ err, database }, 'monitoring connection failed'));
      this.pools.set(database, pool);
    }
    return pool;
  }
}
