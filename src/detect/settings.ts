// The settings watch: server settings (pg_settings, as changed by ALTER SYSTEM and a
// reload, or the configuration file) and per-database and per-role settings
// (pg_db_role_setting: ALTER DATABASE/ROLE ... SET) diffed periodically, so a plan
// that flips because random_page_cost or enable_indexscan changed has a cause on the
// timeline ('setting_change' events) instead of none.
//
// pg_settings shows the monitoring session's own view: settings its own session
// set (source client, session...) and per-database/role ones (which apply to new
// sessions only) are left to pg_db_role_setting, so only server-wide sources count.

import type { Logger } from 'pino';
import type { Clock } from '../clock.ts';
import type { MonitorPool } from '../plans/monitor.ts';
import type { EventLog } from '../events/timeline.ts';
import { Poller } from './poller.ts';

export interface ServerSetting {
  readonly name: string;
  readonly setting: string;
  readonly unit: string | null;
  readonly source: string;
  readonly sourcefile: string | null;
  readonly pendingRestart: boolean;
}

/** One ALTER DATABASE/ROLE ... SET entry. */
export interface ScopedSetting {
  /** '' for all databases / all roles. */
  readonly database: string;
  readonly role: string;
  readonly name: string;
  readonly value: string;
}

export interface SettingsSnapshot {
  readonly server: readonly ServerSetting[];
  readonly scoped: readonly ScopedSetting[];
  /** pg_conf_load_time(), epoch ms. */
  readonly reloadedAt: number;
}

export interface SettingChange {
  readonly name: string;
  readonly summary: string;
  readonly details: Record<string, unknown>;
}

/** Sources that describe the whole server, not the monitoring session. */
const SERVER_SOURCES = new Set(['default', 'configuration file', 'environment variable', 'command line', 'override']);

const SERVER_SQL = `
select name, setting, unit, source, sourcefile, pending_restart as "pendingRestart",
       (extract(epoch from pg_conf_load_time()) * 1000)::float8 as reloaded_at
  from pg_settings`;

const SCOPED_SQL = `
select coalesce(d.datname, '') as database, coalesce(r.rolname, '') as role, unnest(s.setconfig) as config
  from pg_db_role_setting s
  left join pg_database d on d.oid = s.setdatabase
  left join pg_roles r on r.oid = s.setrole`;

export interface SettingsWatcherOptions {
  readonly monitor: MonitorPool;
  readonly events: EventLog;
  readonly clock: Clock;
  readonly log: Logger;
  readonly intervalMs?: number;
}

export class SettingsWatcher {
  private previous: SettingsSnapshot | null = null;
  private previousAt = 0;
  private readonly poller: Poller;

  /** When the last completed read started: every change made before it has been seen. */
  get watchedUntil(): number {
    return this.previousAt;
  }

  constructor(private readonly options: SettingsWatcherOptions) {
    this.poller = new Poller({
      what: 'settings check',
      intervalMs: options.intervalMs ?? 5000,
      log: options.log,
      run: () => this.checkNow(),
    });
  }

  start(): void {
    this.poller.start();
  }

  stop(): void {
    this.poller.stop();
  }

  async snapshot(): Promise<SettingsSnapshot> {
    const server = await this.options.monitor.query<ServerSetting & { reloaded_at: number }>(SERVER_SQL);
    const scoped = await this.options.monitor.query<{ database: string; role: string; config: string }>(SCOPED_SQL);
    return {
      server: server.rows.filter((r) => SERVER_SOURCES.has(r.source)).map(({ reloaded_at: _, ...s }) => s),
      scoped: scoped.rows.map((r) => {
        const eq = r.config.indexOf('=');
        return { database: r.database, role: r.role, name: r.config.slice(0, eq), value: r.config.slice(eq + 1) };
      }),
      reloadedAt: Number(server.rows[0]?.reloaded_at ?? 0),
    };
  }

  /** Reads the settings, adds one 'setting_change' event per difference from the last read, returns them. */
  async checkNow(): Promise<SettingChange[]> {
    const at = this.options.clock.now();
    const snapshot = await this.snapshot();
    const previous = this.previous;
    const since = this.previousAt;
    this.previous = snapshot;
    this.previousAt = at;
    if (previous === null) return [];
    const changes = diffSettings(previous, snapshot);
    for (const change of changes) {
      // A change found now was made after the previous read, not at this one: it is
      // placed at the start of that window (as the catalog watch's "between"), so a
      // plan that flipped before this read still counts as after it. The reload time
      // the server reports cannot narrow it: pg_conf_load_time() is the monitor
      // session's own, and an idle session applies a reload only when its next
      // command arrives, possibly after the plans of busy sessions have flipped.
      const when = since + 1;
      this.options.events.add({
        type: 'setting_change',
        at: when,
        summary: change.summary,
        objects: [],
        details: { ...change.details, name: change.name, since },
      });
    }
    if (changes.length > 0) this.options.log.info({ changes: changes.map((c) => c.summary) }, 'setting changes found');
    return changes;
  }
}

/** The differences between two settings snapshots, server settings first. Pure. */
export function diffSettings(before: SettingsSnapshot, after: SettingsSnapshot): SettingChange[] {
  const changes: SettingChange[] = [];
  const old = new Map(before.server.map((s) => [s.name, s]));
  const reload =
    after.reloadedAt !== before.reloadedAt ? `, reloaded at ${new Date(after.reloadedAt).toISOString()}` : '';
  for (const now of after.server) {
    const was = old.get(now.name);
    if (was === undefined) continue; // a setting appearing from a source we ignore
    const unit = now.unit ? ` ${now.unit}` : '';
    if (was.setting !== now.setting) {
      const how = /postgresql\.auto\.conf$/.test(now.sourcefile ?? was.sourcefile ?? '')
        ? 'ALTER SYSTEM'
        : now.source === 'default'
          ? 'reset to default'
          : now.source;
      changes.push({
        name: now.name,
        summary: `${now.name} ${was.setting}${unit} -> ${now.setting}${unit} (${how}${reload})`,
        details: {
          scope: 'server',
          before: was.setting,
          after: now.setting,
          unit: now.unit,
          source: now.source,
          reloaded_at: new Date(after.reloadedAt).toISOString(),
        },
      });
    } else if (!was.pendingRestart && now.pendingRestart) {
      changes.push({
        name: now.name,
        summary: `${now.name} changed in the configuration, pending a restart (still ${now.setting}${unit})`,
        details: { scope: 'server', pending_restart: true, value: now.setting },
      });
    }
  }
  const key = (s: ScopedSetting) => `${s.database}\u0000${s.role}\u0000${s.name}`;
  const oldScoped = new Map(before.scoped.map((s) => [key(s), s]));
  const newScoped = new Map(after.scoped.map((s) => [key(s), s]));
  for (const [k, now] of newScoped) {
    const was = oldScoped.get(k);
    if (was !== undefined && was.value === now.value) continue;
    changes.push({
      name: now.name,
      summary: `${scopedStatement(now)} = ${now.value}${was ? ` (was ${was.value})` : ''}`,
      details: {
        scope: scopeOf(now),
        database: now.database || null,
        role: now.role || null,
        before: was?.value ?? null,
        after: now.value,
      },
    });
  }
  for (const [k, was] of oldScoped) {
    if (newScoped.has(k)) continue;
    changes.push({
      name: was.name,
      summary: `${scopedStatement(was).replace(' SET ', ' RESET ')} (was ${was.value})`,
      details: {
        scope: scopeOf(was),
        database: was.database || null,
        role: was.role || null,
        before: was.value,
        after: null,
      },
    });
  }
  return changes;
}

function scopeOf(s: ScopedSetting): string {
  return s.role && s.database ? 'role_in_database' : s.role ? 'role' : 'database';
}

function scopedStatement(s: ScopedSetting): string {
  if (s.role && s.database) return `ALTER ROLE ${s.role} IN DATABASE ${s.database} SET ${s.name}`;
  if (s.role) return `ALTER ROLE ${s.role} SET ${s.name}`;
  return `ALTER DATABASE ${s.database} SET ${s.name}`;
}
