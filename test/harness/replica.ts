// Makes a real streaming replica of the test server, for the reroute tests.
//
// A replica is the only honest way to check that a rerouted statement runs on a
// server in recovery (read-only errors, pg_is_in_recovery(), data arriving by
// streaming). pg_basebackup does the copy when binDir has one of the server's own
// major version; the embedded PostgreSQL ships without it, so otherwise the base
// backup is taken with the low-level API: a WAL-reserving replication slot, then
// pg_backup_start / copy the data directory / pg_backup_stop on one connection,
// exactly as the documentation's "Making a Base Backup Using the Low Level API".
// Like the primary, the replica is a direct child run as the data directory's
// owner (PostgreSQL refuses root), so we always know the PID we own.

import { execFile, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import type fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';
import { waitFor } from './database.ts';
import {
  asUser,
  freePort,
  launch,
  LiveServers,
  PortInUseError,
  readLogFrom,
  serverEnv,
  stopPostmaster,
  tail,
  type LiveServer,
  type RunAs,
} from './postgres.ts';

const execFileAsync = promisify(execFile);

export interface StartReplicaOptions {
  /** The primary; the harness's superuser (`postgres`, trust on 127.0.0.1) must be able to log in. */
  host: string;
  port: number;
  /** Bin directory of the primary's PostgreSQL (postgres, and maybe pg_basebackup). */
  binDir: string;
  /** The primary's data directory; by default `show data_directory`. It must be on this machine. */
  dataDir?: string;
  /** Force a method; by default pg_basebackup when binDir has one of the server's major version. */
  method?: Replica['method'];
}

export interface Replica {
  readonly host: '127.0.0.1';
  readonly port: number;
  /** PID of the replica's postmaster (also its process group id). */
  readonly pid: number;
  /** The copy the replica runs on; removed by stop(). */
  readonly dataDir: string;
  /** The physical replication slot on the primary that retains the replica's WAL. */
  readonly slotName: string;
  /** How the base backup was made. */
  readonly method: 'pg_basebackup' | 'low-level API';
  /** How long startReplica took, from the first connection to the replica having caught up. */
  readonly startedMs: number;
  /** postgres:// URL; defaults to the superuser and the `postgres` database. */
  url(user?: string, database?: string): string;
  /** Fast shutdown, removes the copy, drops the slot on the primary. Safe to call more than once. */
  stop(): Promise<void>;
}

const HOST = '127.0.0.1';
const SUPERUSER = 'postgres';
const READY_DEADLINE_MS = 60_000;
const SLOT_DROP_DEADLINE_MS = 10_000;
const PORT_ATTEMPTS = 3;

// Top-level directories whose contents a base backup leaves out (as basebackup.c's
// excludeDirContents): they are rebuilt at startup or streamed (pg_wal).
const EXCLUDED_DIR_CONTENTS = new Set([
  'pg_wal',
  'pg_replslot',
  'pg_stat_tmp',
  'pg_dynshmem',
  'pg_notify',
  'pg_serial',
  'pg_snapshots',
  'pg_subtrans',
  'log',
]);
// Files left out anywhere (pg_internal.init) or at the top (the rest), as basebackup.c's excludeFiles.
const EXCLUDED_FILES = new Set([
  'postmaster.pid',
  'postmaster.opts',
  'pg_internal.init',
  'postgresql.auto.conf.tmp',
  'current_logfiles',
  'backup_label',
  'tablespace_map',
  'standby.signal',
  'recovery.signal',
]);

let replicaCounter = 0;

export async function startReplica(primary: StartReplicaOptions): Promise<Replica> {
  const started = performance.now();
  const admin = await connect(primary.host, primary.port);
  let copyDir: string | undefined;
  let guard: LiveServer | undefined;
  let slotName: string | undefined;
  let child: ChildProcess | undefined;
  try {
    const { rows } = await admin.query<{ version: string; data_directory: string }>(
      "select current_setting('server_version_num') as version, current_setting('data_directory') as data_directory",
    );
    const version = Math.floor(Number(rows[0].version) / 10_000);
    const primaryDataDir = primary.dataDir ?? rows[0].data_directory;
    const runAs = await ownerOf(primaryDataDir);

    copyDir = await fsp.mkdtemp(path.join(os.tmpdir(), 'pgwarden-replica-'));
    guard = { pid: undefined, dataDir: copyDir };
    liveReplicas.track(guard);
    if (runAs) await fsp.chown(copyDir, runAs.uid, runAs.gid);
    await fsp.chmod(copyDir, 0o700);

    const slot = `pgwarden_replica_${process.pid}_${++replicaCounter}_${randomBytes(3).toString('hex')}`;
    // Reserving WAL now keeps every segment from the backup's start until the
    // replica has streamed it, whatever checkpoints happen in between.
    await admin.query('select pg_create_physical_replication_slot($1, true)', [slot]);
    slotName = slot; // only now is it ours to drop

    const basebackup =
      primary.method === 'low-level API' ? undefined : await matchingBasebackup(primary.binDir, version, runAs);
    if (!basebackup && primary.method === 'pg_basebackup') {
      throw new Error(`no pg_basebackup of PostgreSQL ${version} in ${primary.binDir}`);
    }
    if (basebackup) {
      await runBasebackup(basebackup, primary, copyDir, slotName, runAs);
    } else {
      await lowLevelBackup(admin, version, primaryDataDir, copyDir, slotName, runAs);
    }
    // The primary's own server log came along with the pg_basebackup copy.
    await fsp.rm(path.join(copyDir, 'server.log'), { force: true });
    await fsp.writeFile(path.join(copyDir, 'standby.signal'), '');
    if (runAs) await fsp.chown(path.join(copyDir, 'standby.signal'), runAs.uid, runAs.gid);

    let port = 0;
    for (let attempt = 1; ; attempt++) {
      port = await freePort();
      await writeStandbyConfig(copyDir, primary, port, slotName);
      try {
        child = await launch({
          binDir: primary.binDir,
          dataDir: copyDir,
          port,
          runAs,
          guard,
          name: 'replica postgres',
          // Listening is enough here; logins are refused until recovery reaches consistency.
          ready: { what: 'listen', check: listening, deadlineMs: READY_DEADLINE_MS },
        });
        break;
      } catch (error) {
        if (!(error instanceof PortInUseError) || attempt >= PORT_ATTEMPTS) throw error;
      }
    }

    const running = child!;
    const outcome = await waitFor(
      async () => {
        if (running.exitCode !== null || running.signalCode !== null) return 'exited';
        const standby = await connect(HOST, port);
        try {
          const result = await standby.query<{ recovery: boolean }>('select pg_is_in_recovery() as recovery');
          return result.rows[0].recovery ? 'in recovery' : 'not in recovery';
        } finally {
          await standby.end().catch(() => {});
        }
      },
      { timeoutMs: READY_DEADLINE_MS, intervalMs: 50, what: `replica on port ${port} to accept connections` },
    );
    if (outcome !== 'in recovery') {
      const log = await readLogFrom(path.join(copyDir, 'server.log'), 0);
      throw new Error(
        `replica on port ${port}: ${outcome === 'exited' ? 'postgres exited during recovery' : 'not in recovery'}; end of its server.log:\n${tail(log)}`,
      );
    }
    await waitUntilCaughtUp(admin, port);

    const method = basebackup ? 'pg_basebackup' : 'low-level API';
    return makeReplica({
      child: child!,
      port,
      dataDir: copyDir,
      slotName,
      method,
      primary,
      guard,
      startedMs: performance.now() - started,
    });
  } catch (error) {
    await cleanUp(child, guard, slotName ? () => dropSlot(admin, slotName!) : undefined).catch(
      (cleanupError: unknown) => {
        throw new AggregateError(
          [error, cleanupError],
          `startReplica failed (${describeError(error)}), and so did its cleanup`,
        );
      },
    );
    throw error;
  } finally {
    await admin.end().catch(() => {});
  }
}

async function connect(host: string, port: number, database = 'postgres'): Promise<pg.Client> {
  const client = new pg.Client({ host, port, user: SUPERUSER, database, connectionTimeoutMillis: 5_000 });
  // Errors after connect() settles (a server shutting down) must not become uncaught exceptions.
  client.on('error', () => {});
  try {
    await client.connect();
  } catch (error) {
    await client.end().catch(() => {});
    throw error;
  }
  return client;
}

/** The user to run the replica as: the primary data directory's owner, when that is not us. */
async function ownerOf(dataDir: string): Promise<RunAs | undefined> {
  let stat: fs.Stats;
  try {
    stat = await fsp.stat(dataDir);
  } catch (error) {
    throw new Error(
      `the primary's data directory ${dataDir} is not readable here: startReplica needs a local primary`,
      {
        cause: error,
      },
    );
  }
  return stat.uid === process.getuid?.() ? undefined : { uid: stat.uid, gid: stat.gid };
}

/** binDir's pg_basebackup if it is of the server's major version (an older one cannot copy a newer server). */
async function matchingBasebackup(
  binDir: string,
  version: number,
  runAs: RunAs | undefined,
): Promise<string | undefined> {
  const program = path.join(binDir, 'pg_basebackup');
  try {
    await fsp.access(program, fsConstants.X_OK);
    const { stdout } = await execFileAsync(program, ['--version'], { ...asUser(runAs), cwd: os.tmpdir() });
    const match = /\(PostgreSQL\)\s+(\d+)/.exec(stdout);
    return match && Number(match[1]) === version ? program : undefined;
  } catch {
    return undefined; // absent, or not runnable as runAs: the low-level API needs neither
  }
}

async function runBasebackup(
  program: string,
  primary: StartReplicaOptions,
  copyDir: string,
  slotName: string,
  runAs: RunAs | undefined,
): Promise<void> {
  const args = ['-h', primary.host, '-p', String(primary.port), '-U', SUPERUSER, '-w', '-D', copyDir];
  // -c fast: an immediate checkpoint (a spread one paces itself over minutes); -R writes
  // standby.signal and primary_conninfo; -N: the copy is throwaway, skip the fsyncs.
  args.push('-X', 'stream', '-S', slotName, '-R', '-c', 'fast', '-N');
  try {
    await execFileAsync(program, args, { ...asUser(runAs), cwd: copyDir, env: serverEnv() });
  } catch (error) {
    const { stdout = '', stderr = '' } = error as { stdout?: string; stderr?: string };
    throw new Error(`pg_basebackup into ${copyDir} failed:\n${stdout}${stderr}`, { cause: error });
  }
}

/** A non-exclusive base backup: the backup lives as long as this one connection, which stays open throughout. */
async function lowLevelBackup(
  admin: pg.Client,
  version: number,
  primaryDataDir: string,
  copyDir: string,
  label: string,
  runAs: RunAs | undefined,
): Promise<void> {
  // fast = true: an immediate checkpoint instead of a spread one.
  if (version >= 15) await admin.query('select pg_backup_start($1, true)', [label]);
  else await admin.query('select pg_start_backup($1, true, false)', [label]);

  await copyTree(primaryDataDir, copyDir, runAs, true);

  // Not waiting for archiving: there is none, the replica streams through its slot.
  const stop =
    version >= 15
      ? 'select labelfile, spcmapfile from pg_backup_stop(false)'
      : 'select labelfile, spcmapfile from pg_stop_backup(false, false)';
  const { rows } = await admin.query<{ labelfile: string; spcmapfile: string | null }>(stop);
  await writeOwned(path.join(copyDir, 'backup_label'), rows[0].labelfile, runAs);
  if (rows[0].spcmapfile) await writeOwned(path.join(copyDir, 'tablespace_map'), rows[0].spcmapfile, runAs);
}

/**
 * Copies a live data directory. Files may vanish while we walk (temporary files,
 * stats): that is expected during an online backup, and WAL replay from the
 * backup's start repairs whatever was caught mid-write.
 */
async function copyTree(from: string, to: string, runAs: RunAs | undefined, top: boolean): Promise<void> {
  const entries = await ignoreVanished(() => fsp.readdir(from, { withFileTypes: true }));
  if (!entries) return;
  const files: Promise<void>[] = [];
  for (const entry of entries) {
    const source = path.join(from, entry.name);
    const target = path.join(to, entry.name);
    if (entry.name.startsWith('pgsql_tmp')) continue;
    if (entry.isDirectory()) {
      if (!(await makeDirLike(source, target, runAs))) continue;
      if (top && entry.name === 'pg_wal') {
        // No WAL files, but the directories the server expects (archive_status, summaries).
        for (const sub of (await ignoreVanished(() => fsp.readdir(source, { withFileTypes: true }))) ?? []) {
          if (sub.isDirectory()) await makeDirLike(path.join(source, sub.name), path.join(target, sub.name), runAs);
        }
      } else if (!(top && EXCLUDED_DIR_CONTENTS.has(entry.name))) {
        await copyTree(source, target, runAs, false);
      }
    } else if (entry.isFile()) {
      if (EXCLUDED_FILES.has(entry.name) && (top || entry.name === 'pg_internal.init')) continue;
      if (top && entry.name.endsWith('.log')) continue; // the harness's server.log
      files.push(copyFile(source, target, runAs));
    } else if (entry.isSymbolicLink()) {
      throw new Error(
        `startReplica cannot copy the symbolic link ${source} (tablespaces and a linked pg_wal are not supported)`,
      );
    }
  }
  await Promise.all(files);
}

async function copyFile(source: string, target: string, runAs: RunAs | undefined): Promise<void> {
  const copied = await ignoreVanished(async () => {
    await fsp.copyFile(source, target); // keeps the source's mode
    return true;
  });
  if (copied && runAs) await fsp.chown(target, runAs.uid, runAs.gid);
}

/** Creates target with source's mode; false if source vanished. */
async function makeDirLike(source: string, target: string, runAs: RunAs | undefined): Promise<boolean> {
  const stat = await ignoreVanished(() => fsp.stat(source));
  if (!stat) return false;
  await fsp.mkdir(target, { mode: stat.mode & 0o777 });
  if (runAs) await fsp.chown(target, runAs.uid, runAs.gid);
  return true;
}

async function ignoreVanished<T>(fn: () => Promise<T>): Promise<T | undefined> {
  try {
    return await fn();
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw error;
  }
}

async function writeOwned(file: string, content: string, runAs: RunAs | undefined): Promise<void> {
  await fsp.writeFile(file, content, { mode: 0o600 });
  if (runAs) await fsp.chown(file, runAs.uid, runAs.gid);
}

/**
 * postgresql.auto.conf is read last, so these override both the copied
 * postgresql.conf (and the harness's include with the primary's port and socket
 * directory) and what pg_basebackup -R wrote before them.
 */
async function writeStandbyConfig(
  copyDir: string,
  primary: StartReplicaOptions,
  port: number,
  slotName: string,
): Promise<void> {
  const file = path.join(copyDir, 'postgresql.auto.conf');
  const current = await fsp.readFile(file, 'utf8').catch(() => '');
  const marker = '# pgwarden replica harness\n';
  const base = current.includes(marker) ? current.slice(0, current.indexOf(marker)) : current;
  const settings: Record<string, string> = {
    primary_conninfo: `host=${primary.host} port=${primary.port} user=${SUPERUSER} application_name=${slotName}`,
    primary_slot_name: slotName,
    port: String(port),
    listen_addresses: HOST,
    unix_socket_directories: copyDir,
    hot_standby: 'on',
    logging_collector: 'off',
  };
  const lines = Object.entries(settings).map(([key, value]) => `${key} = '${value.replaceAll("'", "''")}'`);
  // Rewritten in place on a port retry rather than appended again.
  await fsp.writeFile(file, `${base}${base.endsWith('\n') || base === '' ? '' : '\n'}${marker}${lines.join('\n')}\n`);
}

function listening(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: HOST, port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

/**
 * Commits a transaction on the primary and waits until the replica has replayed
 * it, so everything committed before startReplica returned is visible there.
 * Comparing LSNs instead would be fooled by asynchronous commit (the harness runs
 * with synchronous_commit off) and by page-header offsets.
 */
async function waitUntilCaughtUp(admin: pg.Client, port: number): Promise<void> {
  const { rows } = await admin.query<{ xid: string }>('select txid_current()::text as xid');
  const xid = rows[0].xid;
  await waitFor(
    async () => {
      const standby = await connect(HOST, port);
      try {
        // Throws "transaction ID ... is in the future" until the replica has seen it.
        const result = await standby.query<{ status: string | null }>('select txid_status($1::bigint) as status', [
          xid,
        ]);
        return result.rows[0].status === 'committed';
      } finally {
        await standby.end().catch(() => {});
      }
    },
    { timeoutMs: READY_DEADLINE_MS, intervalMs: 25, what: `replica on port ${port} to replay transaction ${xid}` },
  );
}

async function dropSlot(admin: pg.Client, slotName: string): Promise<void> {
  // The primary's walsender may outlive the replica by a moment and keep the slot active.
  await waitFor(
    async () => {
      const { rows } = await admin.query<{ active_pid: number | null }>(
        'select active_pid from pg_replication_slots where slot_name = $1',
        [slotName],
      );
      if (rows.length === 0) return true;
      if (rows[0].active_pid !== null) return false;
      await admin.query('select pg_drop_replication_slot($1)', [slotName]);
      return true;
    },
    { timeoutMs: SLOT_DROP_DEADLINE_MS, what: `replication slot ${slotName} to become inactive and be dropped` },
  );
}

async function cleanUp(
  child: ChildProcess | undefined,
  guard: LiveServer | undefined,
  drop: (() => Promise<void>) | undefined,
): Promise<void> {
  if (child) await stopPostmaster(child);
  if (guard) {
    await fsp.rm(guard.dataDir, { recursive: true, force: true });
    liveReplicas.untrack(guard);
  }
  if (drop) await drop();
}

function makeReplica(args: {
  child: ChildProcess;
  port: number;
  dataDir: string;
  slotName: string;
  method: Replica['method'];
  primary: StartReplicaOptions;
  guard: LiveServer;
  startedMs: number;
}): Replica {
  const { child, port, dataDir, slotName, method, primary, guard } = args;
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= cleanUp(child, guard, async () => {
      let admin: pg.Client;
      try {
        admin = await connect(primary.host, primary.port);
      } catch (error) {
        // A primary that is already gone took its slot with it.
        if ((error as NodeJS.ErrnoException).code === 'ECONNREFUSED') return;
        throw new Error(`cannot reach the primary to drop replication slot ${slotName}`, { cause: error });
      }
      try {
        await dropSlot(admin, slotName);
      } finally {
        await admin.end().catch(() => {});
      }
    });
    return stopping;
  };
  return {
    host: HOST,
    port,
    pid: child.pid!,
    dataDir,
    slotName,
    method,
    startedMs: args.startedMs,
    url(user = SUPERUSER, database = 'postgres') {
      return `postgres://${encodeURIComponent(user)}@${HOST}:${port}/${encodeURIComponent(database)}`;
    },
    stop,
  };
}

function describeError(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

// Crash safety: a replica must not outlive the test process (it would keep
// retrying a primary that test/run.ts has stopped). Only synchronous work is
// possible on 'exit', so a crash leaves the slot behind; on a throwaway primary it
// goes with the server.
const liveReplicas = new LiveServers<LiveServer>((signal, live) => {
  // Clean up now, then step aside and re-raise: whoever else listens (the primary's
  // harness, a test runner) decides how the process ends; with nobody, the default
  // action ends it.
  live.killAllNow();
  live.stopListening();
  process.kill(process.pid, signal);
});
