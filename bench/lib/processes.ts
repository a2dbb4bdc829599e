// Starting and stopping the long-running processes of a benchmark (the proxies).
//
// Every process is a direct child in its own process group, so we always know
// the exact PID we own: we stop it by that PID (SIGTERM, then SIGKILL to its
// group after a deadline) and never look for anything by name. A terminal's
// Ctrl-C reaches the benchmark, not the proxies, so the benchmark decides the
// shutdown order.

import { execFile, spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import { promisify } from 'node:util';

export const execFileAsync = promisify(execFile);

const READY_DEADLINE_MS = 20_000;
const STOP_DEADLINE_MS = 10_000;

/** A started process and what is needed to stop it and explain its death. */
export interface Daemon {
  readonly name: string;
  readonly pid: number;
  readonly child: ChildProcess;
  readonly logFile: string;
  /** Why it exited, once it has ('code 1', 'signal SIGKILL'). */
  exitReason(): string | undefined;
  /** SIGTERM, then SIGKILL to the process group after a deadline. Safe to call twice. */
  stop(): Promise<void>;
  /** Synchronous last resort for process 'exit'. */
  killNow(): void;
}

export interface DaemonSpec {
  name: string;
  command: string;
  args: string[];
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  uid?: number;
  gid?: number;
  /** stdout and stderr go here; shown when the process fails. */
  logFile: string;
}

export async function spawnDaemon(spec: DaemonSpec): Promise<Daemon> {
  const logFd = fs.openSync(spec.logFile, 'a');
  let child: ChildProcess;
  try {
    child = spawn(spec.command, spec.args, {
      env: spec.env ?? process.env,
      cwd: spec.cwd,
      uid: spec.uid,
      gid: spec.gid,
      detached: true,
      stdio: ['ignore', logFd, logFd],
    });
  } finally {
    fs.closeSync(logFd);
  }
  let exitReason: string | undefined;
  const exited = new Promise<void>((resolve) => {
    child.once('error', (error) => {
      exitReason ??= `could not start: ${error.message}`;
      resolve();
    });
    child.once('exit', (code, signal) => {
      exitReason = signal ? `signal ${signal}` : `code ${code}`;
      resolve();
    });
  });
  const pid = child.pid;
  if (pid === undefined) {
    // spawn() reports ENOENT and friends asynchronously, through 'error'.
    await exited;
    throw new Error(`${spec.name}: ${spec.command} ${exitReason}`);
  }
  const killGroup = (): void => {
    if (exitReason !== undefined) return; // never signal a PID the kernel may have reused
    try {
      process.kill(-pid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  };
  let stopping: Promise<void> | undefined;
  return {
    name: spec.name,
    pid,
    child,
    logFile: spec.logFile,
    exitReason: () => exitReason,
    killNow: killGroup,
    stop: () => {
      stopping ??= (async () => {
        if (exitReason !== undefined) return;
        try {
          process.kill(pid, 'SIGTERM');
        } catch {
          return;
        }
        if (!(await settlesWithin(exited, STOP_DEADLINE_MS))) {
          killGroup();
          await exited;
        }
      })();
      return stopping;
    },
  };
}

/** Resolves once host:port accepts TCP connections; rejects if the daemon dies first. */
/** Waits until the daemon listens; a daemon that never does is stopped before the error is thrown. */
export async function listeningOrStopped(daemon: Daemon, host: string, port: number): Promise<void> {
  try {
    await waitUntilListening(daemon, host, port);
  } catch (error) {
    await daemon.stop();
    throw error;
  }
}

export async function waitUntilListening(daemon: Daemon, host: string, port: number): Promise<void> {
  const deadline = Date.now() + READY_DEADLINE_MS;
  for (;;) {
    const died = daemon.exitReason();
    if (died !== undefined) {
      throw new Error(`${daemon.name} exited during startup (${died}); end of its log:\n${tailOfFile(daemon.logFile)}`);
    }
    if (await canConnect(host, port)) return;
    if (Date.now() > deadline) {
      throw new Error(
        `${daemon.name} did not listen on ${host}:${port} within ${READY_DEADLINE_MS} ms; end of its log:\n` +
          tailOfFile(daemon.logFile),
      );
    }
    await delay(50);
  }
}

function canConnect(host: string, port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const socket = net.connect({ host, port });
    socket.once('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.once('error', () => resolve(false));
  });
}

export { freePort } from '../../src/embedded/postgres.ts';

/** uid/gid of a user from the passwd database, or undefined if there is none. */
export async function lookupUser(name: string): Promise<{ uid: number; gid: number } | undefined> {
  try {
    const { stdout } = await execFileAsync('getent', ['passwd', name]);
    const fields = stdout.trim().split(':');
    return { uid: Number(fields[2]), gid: Number(fields[3]) };
  } catch {
    return undefined; // getent exits 2 for an unknown user
  }
}

/** The first executable called name in $PATH or the extra directories, if any. */
export function findExecutable(name: string, extraDirs: string[] = []): string | undefined {
  const dirs = [...(process.env.PATH ?? '').split(':').filter(Boolean), ...extraDirs];
  for (const dir of dirs) {
    const file = `${dir}/${name}`;
    try {
      fs.accessSync(file, fs.constants.X_OK);
      if (fs.statSync(file).isFile()) return file;
    } catch {
      // Not here.
    }
  }
  return undefined;
}

export function tailOfFile(file: string, lines = 20): string {
  try {
    return tail(fs.readFileSync(file, 'utf8'), lines);
  } catch {
    return '(no log)';
  }
}

export function tail(text: string, lines = 20): string {
  return text.trimEnd().split('\n').slice(-lines).join('\n');
}

async function settlesWithin(promise: Promise<void>, ms: number): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timedOut = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
  const settled = await Promise.race([promise.then(() => true), timedOut]);
  clearTimeout(timer);
  return settled;
}

function delay(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
