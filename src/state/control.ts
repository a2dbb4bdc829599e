// Rules and incidents shared by a fleet of proxies through a small `pgwarden`
// schema in a control PostgreSQL database. A change is written and announced
// (NOTIFY) in one statement, so the announcement goes out exactly when the change
// commits; every instance LISTENs and reloads the whole (small) rule set, which
// needs no ordering or merging. The control database is a side system: when it
// goes away the instance keeps enforcing the last rules it knew, refuses changes
// it could not share (the admin API answers 503), and reconnects in the
// background with capped exponential backoff, reloading what it missed.
//
// Notifications of an instance's own changes are not skipped: they trigger a
// reload like any other, and onExternalChange listeners are called only when a
// reload yields a rule set different from the last known one. An instance's own
// add/remove updates that set when it commits, so its own changes do not call its
// listeners (except, rarely, when another instance changed something at the same
// time, and then with the correct full set).

import { randomBytes } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';
import pg from 'pg';
import type { Logger } from 'pino';
import { isRule, type Rule } from '../rules/rule.ts';
import type { DetectorState, DetectorStateStore } from '../detect/incidents.ts';
import type { IncidentSharing, RulePersistence } from '../rules/persistence.ts';

const RULES_CHANNEL = 'pgwarden_rules';
const INCIDENTS_CHANNEL = 'pgwarden_incidents';
/** pg_advisory_xact_lock key serializing schema creation across instances ('pgwd'). */
const SCHEMA_LOCK = 0x70677764;
const MAX_INCIDENTS = 500;
const DEFAULT_POLL_MS = 10_000;
const RECONNECT_INITIAL_MS = 250;
const RECONNECT_MAX_MS = 10_000;
const CONNECT_TIMEOUT_MS = 5_000;
const QUERY_TIMEOUT_MS = 5_000;

const SCHEMA_DDL = `
  create schema if not exists pgwarden;
  create table if not exists pgwarden.rules (
    id text primary key,
    rule jsonb not null,
    created_at timestamptz not null default now()
  );
  create table if not exists pgwarden.incidents (
    id text primary key,
    instance text not null,
    incident jsonb not null,
    updated_at timestamptz not null default now()
  );
  create index if not exists incidents_updated_at on pgwarden.incidents (updated_at desc);
  create table if not exists pgwarden.instances (
    instance text primary key,
    heartbeat timestamptz not null default now()
  );
  create table if not exists pgwarden.shape_summaries (
    instance text not null,
    fingerprint text not null,
    summary jsonb not null,
    primary key (instance, fingerprint)
  );
  create table if not exists pgwarden.detector_state (
    instance text primary key,
    state jsonb not null,
    updated_at timestamptz not null default now()
  );
`;

// Added after the first release: a schema provisioned before it gets the table on
// first use (or, for a role without CREATE, baselines are simply not shared).
const DETECTOR_STATE_DDL = `create table if not exists pgwarden.detector_state (
  instance text primary key, state jsonb not null, updated_at timestamptz not null default now())`;

export interface ControlDatabaseOptions {
  /** postgres:// URL of the control database. */
  readonly url: string;
  /** This instance's name, recorded with its incidents and in application_name. */
  readonly instance: string;
  readonly log: Logger;
  /** Safety-net reload interval, ms (notifications are the fast path); default 10 000. */
  readonly pollMs?: number;
}

export type SharedIncident = { id: string; instance: string } & Record<string, unknown>;

/** The control database cannot be reached; the change was not made. The admin API answers 503. */
export class ControlDatabaseUnreachableError extends Error {
  override name = 'ControlDatabaseUnreachableError';
}

export class ControlDatabase implements RulePersistence, IncidentSharing, DetectorStateStore {
  /** The last known rules, by id, in the control database's order. */
  private rules = new Map<string, Rule>();
  private incidents: SharedIncident[] = [];
  private readonly listeners: Array<(rules: Rule[]) => void> = [];
  private readonly pool: pg.Pool;
  private readonly log: Logger;
  private readonly where: string;
  private readonly origin = randomBytes(6).toString('hex');

  /** The LISTEN connection; it also runs the reloads, so a reload proves it alive. */
  private listener: pg.Client | undefined;
  private connecting: pg.Client | undefined;
  private connected = false;
  private lastError: unknown;
  private downSince = 0;
  private reconnectDelay = RECONNECT_INITIAL_MS;
  private reconnectTimer: NodeJS.Timeout | undefined;
  private pollTimer: NodeJS.Timeout | undefined;
  private closed = false;

  // A reload that overlapped one of our own changes may have read the rules from
  // before it committed; its result is dropped and the reload done again.
  private mutationsInFlight = 0;
  private mutationEpoch = 0;
  private reloadDropped = false;

  private readonly rulesReload = new Coalesced(() => this.reloadRules());
  private readonly incidentsReload = new Coalesced(() => this.reloadIncidents());

  private constructor(private readonly options: ControlDatabaseOptions) {
    this.log = options.log.child({ component: 'control-database' });
    this.where = describeUrl(options.url);
    this.pool = new pg.Pool({ ...this.connectionConfig(), max: 4, idleTimeoutMillis: 30_000 });
    // An idle pooled connection that dies is dropped by the pool; the LISTEN
    // connection is the one that reports the outage.
    this.pool.on('error', (err) => this.log.debug({ err }, 'idle control database connection closed'));
  }

  /**
   * Connects, creates the schema if needed and loads the rules and incidents.
   * Rejects if the control database cannot be reached: starting without the
   * fleet's rules would silently stop enforcing them.
   */
  static async open(options: ControlDatabaseOptions): Promise<ControlDatabase> {
    const control = new ControlDatabase(options);
    try {
      await control.withPoolClient('create the pgwarden schema', (client) => ensureSchema(client));
      await control.connectListener();
    } catch (error) {
      await control.close();
      if (error instanceof ControlDatabaseUnreachableError) throw error;
      throw isConnectionError(error)
        ? control.unreachable('load the rules', error)
        : new Error(`control database ${control.where}: cannot open it: ${describeError(error)}`, { cause: error });
    }
    const pollMs = options.pollMs ?? DEFAULT_POLL_MS;
    control.pollTimer = setInterval(() => control.poll(), pollMs);
    control.pollTimer.unref();
    control.log.info(
      { where: control.where, rules: control.rules.size, incidents: control.incidents.length },
      'control database connected',
    );
    return control;
  }

  /** Whether the LISTEN connection is up (changes are refused while it is not). */
  get reachable(): boolean {
    return this.connected;
  }

  /** The last known rules: read at open, on every notification, on reconnect and every pollMs. */
  async load(): Promise<Rule[]> {
    return [...this.rules.values()];
  }

  async add(rule: Rule): Promise<void> {
    const stored = JSON.parse(JSON.stringify(rule)) as Rule;
    await this.mutate(
      `add rule ${rule.id}`,
      (client) =>
        client.query(
          `with saved as (
             insert into pgwarden.rules (id, rule) values ($1, $2)
             on conflict (id) do update set rule = excluded.rule
             returning id)
           select pg_notify($3, $4) from saved`,
          [rule.id, JSON.stringify(stored), RULES_CHANNEL, this.payload('add', rule.id)],
        ),
      () => this.rules.set(rule.id, stored),
    );
  }

  async remove(id: string): Promise<void> {
    await this.mutate(
      `remove rule ${id}`,
      (client) =>
        client.query(
          `with removed as (delete from pgwarden.rules where id = $1 returning id)
           select pg_notify($2, $3) from removed`,
          [id, RULES_CHANNEL, this.payload('remove', id)],
        ),
      () => this.rules.delete(id),
    );
  }

  onExternalChange(listener: (rules: Rule[]) => void): void {
    this.listeners.push(listener);
  }

  async publishIncident(incident: { id: string } & Record<string, unknown>): Promise<void> {
    const what = `publish incident ${incident.id}`;
    this.assertReachable(what);
    await this.withPoolClient(what, (client) =>
      client.query(
        `with saved as (
           insert into pgwarden.incidents (id, instance, incident, updated_at) values ($1, $2, $3, now())
           on conflict (id) do update set instance = excluded.instance, incident = excluded.incident, updated_at = now()
           returning id)
         select pg_notify($4, $5) from saved`,
        [
          incident.id,
          this.options.instance,
          JSON.stringify(incident),
          INCIDENTS_CHANNEL,
          this.payload('publish', incident.id),
        ],
      ),
    );
  }

  sharedIncidents(): SharedIncident[] {
    return [...this.incidents];
  }

  /**
   * Replaces this instance's published shape summaries (its top shapes, each
   * cumulative since it started) and renews its heartbeat, in one transaction.
   * Instances silent for `expireS` are deleted with their rows, by whichever
   * instance publishes next.
   */
  async publishShapes(shapes: readonly { fingerprint: string }[], expireS: number): Promise<void> {
    const what = 'publish shape summaries';
    this.assertReachable(what);
    await this.withPoolClient(what, async (client) => {
      await client.query('begin');
      try {
        await client.query(
          `insert into pgwarden.instances (instance, heartbeat) values ($1, now())
           on conflict (instance) do update set heartbeat = now()`,
          [this.options.instance],
        );
        await client.query('delete from pgwarden.shape_summaries where instance = $1', [this.options.instance]);
        await client.query(
          `insert into pgwarden.shape_summaries (instance, fingerprint, summary)
           select $1, s->>'fingerprint', s from jsonb_array_elements($2::jsonb) s`,
          [this.options.instance, JSON.stringify(shapes)],
        );
        await client.query(
          `with gone as (delete from pgwarden.instances where heartbeat < now() - make_interval(secs => $1) returning instance)
           delete from pgwarden.shape_summaries s using gone where s.instance = gone.instance`,
          [expireS],
        );
        await client.query('commit');
      } catch (error) {
        await client.query('rollback').catch(() => undefined);
        throw error;
      }
    });
  }

  /** Every live instance's published shape summaries (heartbeat within `maxAgeS`). */
  async fleetShapes(maxAgeS: number): Promise<Array<{ instance: string; summary: unknown }>> {
    const what = 'read the fleet shape summaries';
    this.assertReachable(what);
    return this.withPoolClient(what, async (client) => {
      const { rows } = await client.query<{ instance: string; summary: unknown }>(
        `select s.instance, s.summary from pgwarden.shape_summaries s join pgwarden.instances i using (instance)
         where i.heartbeat >= now() - make_interval(secs => $1)`,
        [maxAgeS],
      );
      return rows;
    });
  }

  /**
   * This instance's saved detector state; an instance seen for the first time (a
   * new name, or host:pid after a restart) gets the baselines of the instance
   * that saved last (same workload, same database) and no incident history.
   */
  async loadDetectorState(): Promise<DetectorState | null> {
    return this.withPoolClient('load the saved baselines', async (client) => {
      await this.ensureDetectorTable(client);
      const { rows } = await client.query<{ instance: string; state: DetectorState }>(
        `select instance, state from pgwarden.detector_state order by (instance = $1) desc, updated_at desc limit 1`,
        [this.options.instance],
      );
      if (rows.length === 0) return null;
      const state = rows[0].state;
      return rows[0].instance === this.options.instance ? state : { ...state, incidents: [] };
    });
  }

  async saveDetectorState(state: DetectorState): Promise<void> {
    const what = 'save the baselines';
    this.assertReachable(what);
    await this.withPoolClient(what, async (client) => {
      await this.ensureDetectorTable(client);
      await client.query(
        `insert into pgwarden.detector_state (instance, state, updated_at) values ($1, $2, now())
         on conflict (instance) do update set state = excluded.state, updated_at = now()`,
        [this.options.instance, JSON.stringify(state)],
      );
    });
  }

  private detectorTableReady = false;

  private async ensureDetectorTable(client: pg.PoolClient): Promise<void> {
    if (this.detectorTableReady) return;
    const { rows } = await client.query<{ ready: boolean }>(
      `select to_regclass('pgwarden.detector_state') is not null as ready`,
    );
    if (!rows[0].ready) await client.query(DETECTOR_STATE_DDL);
    this.detectorTableReady = true;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.connected = false;
    clearInterval(this.pollTimer);
    clearTimeout(this.reconnectTimer);
    const clients = [this.listener, this.connecting].filter((c): c is pg.Client => c !== undefined);
    this.listener = undefined;
    this.connecting = undefined;
    await Promise.all([...clients.map((c) => c.end().catch(() => undefined)), this.pool.end().catch(() => undefined)]);
  }

  // --- the LISTEN connection -------------------------------------------------

  private async connectListener(): Promise<void> {
    const client = new pg.Client(this.connectionConfig());
    client.on('error', (err) => this.listenerLost(client, err));
    client.on('end', () => this.listenerLost(client, new Error('connection ended')));
    client.on('notification', (message) => this.onNotification(message));
    this.connecting = client;
    try {
      await client.connect();
      if (this.closed) throw new Error('control database closed while connecting');
      await client.query(`listen ${RULES_CHANNEL}; listen ${INCIDENTS_CHANNEL}`);
      this.listener = client;
      // Listening before reading: a change committed in between is both read and announced.
      await this.rulesReload.run();
      await this.incidentsReload.run();
      if (this.closed) throw new Error('control database closed while connecting');
    } catch (error) {
      if (this.listener === client) this.listener = undefined;
      client.end().catch(() => undefined);
      throw error;
    } finally {
      if (this.connecting === client) this.connecting = undefined;
    }
    this.connected = true;
    this.reconnectDelay = RECONNECT_INITIAL_MS;
  }

  private listenerLost(client: pg.Client, error: unknown): void {
    if (this.closed || client !== this.listener) return;
    this.listener = undefined;
    client.end().catch(() => undefined);
    if (this.connected) {
      this.connected = false;
      this.downSince = performance.now();
      this.log.warn(
        { err: error, where: this.where, rules: this.rules.size },
        'control database unreachable: keeping the last known rules, refusing rule changes, reconnecting',
      );
    }
    this.lastError = error;
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.closed || this.reconnectTimer !== undefined) return;
    const delay = this.reconnectDelay;
    this.reconnectDelay = Math.min(delay * 2, RECONNECT_MAX_MS);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      void this.reconnect();
    }, delay);
    this.reconnectTimer.unref();
  }

  private async reconnect(): Promise<void> {
    try {
      await this.connectListener();
    } catch (error) {
      if (this.closed) return;
      this.lastError = error;
      // Refused connections are the outage already reported; anything else (a
      // dropped schema, lost privileges) needs a person.
      const level = isConnectionError(error) ? 'debug' : 'warn';
      this.log[level](
        { err: error, where: this.where, nextAttemptMs: this.reconnectDelay },
        'control database: reconnecting failed',
      );
      this.scheduleReconnect();
      return;
    }
    this.log.info(
      { where: this.where, downMs: Math.round(performance.now() - this.downSince), rules: this.rules.size },
      'control database reachable again; rules reloaded',
    );
  }

  private onNotification(message: pg.Notification): void {
    if (message.channel === RULES_CHANNEL) this.reloadInBackground(this.rulesReload, 'rules');
    else if (message.channel === INCIDENTS_CHANNEL) this.reloadInBackground(this.incidentsReload, 'incidents');
  }

  private poll(): void {
    if (!this.connected) return;
    this.reloadInBackground(this.rulesReload, 'rules');
    this.reloadInBackground(this.incidentsReload, 'incidents');
  }

  private reloadInBackground(reload: Coalesced, what: string): void {
    const client = this.listener;
    reload.run().catch((error: unknown) => {
      if (this.closed) return;
      if (client !== undefined && isConnectionError(error)) {
        this.listenerLost(client, error);
      } else {
        this.log.warn(
          { err: error, where: this.where },
          `control database: cannot reload ${what}; keeping the last known ones`,
        );
      }
    });
  }

  // --- reloads (on the LISTEN connection) ------------------------------------

  private async reloadRules(): Promise<void> {
    const client = this.listener;
    if (client === undefined) return;
    const epoch = this.mutationEpoch;
    const { rows } = await client.query<{ rule: unknown }>('select rule from pgwarden.rules order by created_at, id');
    if (this.mutationsInFlight > 0) {
      this.reloadDropped = true; // the change's end reloads again
      return;
    }
    if (this.mutationEpoch !== epoch) return this.reloadRules();
    const rules = new Map<string, Rule>();
    for (const row of rows) {
      if (isRule(row.rule)) rules.set(row.rule.id, row.rule);
      else
        this.log.warn(
          { entry: row.rule, where: this.where },
          'control database: skipping a stored entry that is not a rule',
        );
    }
    const changed = !isDeepStrictEqual(rules, this.rules);
    this.rules = rules;
    if (changed) this.notifyListeners();
  }

  private async reloadIncidents(): Promise<void> {
    const client = this.listener;
    if (client === undefined) return;
    const { rows } = await client.query<{ id: string; instance: string; incident: unknown }>(
      'select id, instance, incident from pgwarden.incidents order by updated_at desc, id limit $1',
      [MAX_INCIDENTS],
    );
    this.incidents = rows.map((row) => ({
      ...(row.incident as Record<string, unknown>),
      id: row.id,
      instance: row.instance,
    }));
  }

  private notifyListeners(): void {
    const rules = [...this.rules.values()];
    for (const listener of this.listeners) {
      try {
        listener([...rules]);
      } catch (error) {
        this.log.error({ err: error }, 'control database: a rule change listener failed');
      }
    }
  }

  // --- changes (on the pool) -------------------------------------------------

  private async mutate(
    what: string,
    run: (client: pg.PoolClient) => Promise<unknown>,
    apply: () => void,
  ): Promise<void> {
    this.assertReachable(what);
    this.mutationsInFlight++;
    try {
      await this.withPoolClient(what, run);
      apply();
    } finally {
      this.mutationsInFlight--;
      this.mutationEpoch++;
      if (this.reloadDropped && this.mutationsInFlight === 0) {
        this.reloadDropped = false;
        this.reloadInBackground(this.rulesReload, 'rules');
      }
    }
  }

  private assertReachable(what: string): void {
    if (this.closed) throw new Error(`control database ${this.where}: cannot ${what}: it is closed`);
    if (!this.connected) {
      const downS = Math.round((performance.now() - this.downSince) / 1000);
      throw new ControlDatabaseUnreachableError(
        `control database ${this.where} is unreachable (for ${downS} s: ${describeError(this.lastError)}): cannot ${what}`,
        { cause: this.lastError },
      );
    }
  }

  private async withPoolClient<T>(what: string, run: (client: pg.PoolClient) => Promise<T>): Promise<T> {
    let client: pg.PoolClient;
    try {
      client = await this.pool.connect();
    } catch (error) {
      throw this.unreachable(what, error);
    }
    try {
      const result = await run(client);
      client.release();
      return result;
    } catch (error) {
      const lost = isConnectionError(error);
      client.release(lost);
      throw lost
        ? this.unreachable(what, error)
        : new Error(`control database ${this.where}: cannot ${what}: ${describeError(error)}`, { cause: error });
    }
  }

  private unreachable(what: string, error: unknown): ControlDatabaseUnreachableError {
    return new ControlDatabaseUnreachableError(
      `control database ${this.where} is unreachable: cannot ${what}: ${describeError(error)}`,
      {
        cause: error,
      },
    );
  }

  private payload(op: string, id: string): string {
    return JSON.stringify({ op, id, instance: this.options.instance, origin: this.origin });
  }

  private connectionConfig(): pg.ClientConfig {
    return {
      connectionString: this.options.url,
      application_name: `pgwarden-control ${this.options.instance}`.slice(0, 63),
      connectionTimeoutMillis: CONNECT_TIMEOUT_MS,
      query_timeout: QUERY_TIMEOUT_MS,
      statement_timeout: QUERY_TIMEOUT_MS,
      keepAlive: true,
      keepAliveInitialDelayMillis: 10_000,
    };
  }
}

/** Creates the schema unless it is there (so a role without CREATE works on a provisioned one). */
async function ensureSchema(client: pg.PoolClient): Promise<void> {
  const { rows } = await client.query<{ ready: boolean }>(
    `select to_regclass('pgwarden.rules') is not null and to_regclass('pgwarden.incidents') is not null
        and to_regclass('pgwarden.instances') is not null and to_regclass('pgwarden.shape_summaries') is not null as ready`,
  );
  if (rows[0].ready) return;
  await client.query('begin');
  try {
    // Two instances starting at once would otherwise race on the catalog
    // ("duplicate key value violates unique constraint pg_namespace_nspname_index").
    await client.query('select pg_advisory_xact_lock($1)', [SCHEMA_LOCK]);
    await client.query(SCHEMA_DDL);
    await client.query('commit');
  } catch (error) {
    await client.query('rollback').catch(() => undefined);
    throw error;
  }
}

/**
 * Runs a task, never two at once; asking while it runs makes it run once more
 * afterwards, so a burst of notifications costs at most two reloads.
 */
class Coalesced {
  private running: Promise<void> | undefined;
  private again = false;

  constructor(private readonly task: () => Promise<void>) {}

  run(): Promise<void> {
    if (this.running !== undefined) {
      this.again = true;
      return this.running;
    }
    const running = (async () => {
      try {
        do {
          this.again = false;
          await this.task();
        } while (this.again);
      } finally {
        this.running = undefined;
        this.again = false;
      }
    })();
    this.running = running;
    return running;
  }
}

/**
 * Whether an error means the connection is gone (as opposed to the server
 * refusing one statement): socket errors, client-side timeouts and terminations
 * carry no SQLSTATE or one of class 08 (connection exception) or 57P (operator
 * intervention: shutdown, terminated backend).
 */
function isConnectionError(error: unknown): boolean {
  if (!(error instanceof Error)) return false;
  const code = (error as { code?: unknown }).code;
  if (typeof code !== 'string' || !/^[0-9A-Z]{5}$/.test(code)) return true;
  return code.startsWith('08') || code.startsWith('57P') || code === '53300';
}

function describeError(error: unknown): string {
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    const message =
      error.message || (error instanceof AggregateError ? error.errors.map(describeError).join('; ') : error.name);
    return code === undefined ? message : `${message} (${String(code)})`;
  }
  return String(error);
}

/** host:port/database of a URL, without credentials, for messages. */
function describeUrl(url: string): string {
  try {
    const parsed = new URL(url);
    return `${parsed.hostname || 'localhost'}:${parsed.port || 5432}${parsed.pathname || '/'}`;
  } catch {
    return '(unparsable URL)';
  }
}
