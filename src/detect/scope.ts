// Which database a timeline event and a shape belong to. Table and index names
// recur across databases (one application's schema in each), so a change in one
// database must not explain a shape that only ran in another: attribution
// (attribution.ts, causes.ts) and the EXPLAIN resample after a change ask here.

import type { TimelineEvent } from '../events/timeline.ts';
import { MAX_NAMES_PER_SHAPE } from '../shapes/registry.ts';

/**
 * The database a timeline event happened in, when it names one: the catalog and
 * statistics watches (each reads one database), DDL through the proxy (its
 * session's), per-database settings. Null: any database (a server or per-role
 * setting; an event recorded before events named their database).
 */
export function databaseOf(e: TimelineEvent): string | null {
  const database = (e.details as { database?: unknown } | undefined)?.database;
  return typeof database === 'string' && database !== '' ? database : null;
}

/**
 * The databases a shape ran in (ShapeStats.databases), or null when not known for
 * sure: no statistics, no names (a worker's replayed latencies), or a list full up
 * to the cap (a database past it went unrecorded).
 */
export function shapeDatabases(stats: { readonly databases: readonly string[] } | undefined): Set<string> | null {
  if (stats === undefined || stats.databases.length === 0 || stats.databases.length >= MAX_NAMES_PER_SHAPE) return null;
  return new Set(stats.databases);
}

/** Whether an event may concern a shape that ran in `databases` (null: unknown, so any). */
export function inDatabases(e: TimelineEvent, databases: ReadonlySet<string> | null): boolean {
  if (databases === null) return true;
  const database = databaseOf(e);
  return database === null || databases.has(database);
}
