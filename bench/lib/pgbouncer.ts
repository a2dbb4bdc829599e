// Starts PgBouncer in session mode, the yardstick pgwarden's overhead is held to.
//
// Session pooling is the closest PgBouncer comes to pgwarden's one upstream
// connection per client: both relay every message of a session, so comparing
// them compares the cost of the relay itself. PgBouncer refuses to run as root,
// so under root it runs as the 'postgres' user.

import fs from 'node:fs';
import path from 'node:path';
import type { Endpoint } from './pgbench.ts';
import { execFileAsync, findExecutable, freePort, lookupUser, spawnDaemon, listeningOrStopped } from './processes.ts';
import type { StartedProxy } from './pgwarden.ts';

const RUN_AS_WHEN_ROOT = 'postgres';

/** The pgbouncer binary, or undefined when it is not installed. */
export function findPgbouncer(): string | undefined {
  return findExecutable('pgbouncer', ['/usr/sbin']);
}

export async function pgbouncerVersion(binary: string): Promise<string> {
  const { stdout } = await execFileAsync(binary, ['--version']);
  return stdout.split('\n')[0].trim();
}

/** tempDir must be traversable by the 'postgres' user when we are root. */
export async function startPgbouncer(binary: string, upstream: Endpoint, tempDir: string): Promise<StartedProxy> {
  const runAs = process.getuid?.() === 0 ? await lookupUser(RUN_AS_WHEN_ROOT) : undefined;
  if (process.getuid?.() === 0 && !runAs) {
    throw new Error(`PgBouncer refuses to run as root and there is no '${RUN_AS_WHEN_ROOT}' user to run it as`);
  }
  const dir = fs.mkdtempSync(path.join(tempDir, 'pgbouncer-'));
  const port = await freePort();
  const configFile = writeConfig(dir, port, upstream);
  if (runAs) {
    for (const file of [dir, ...fs.readdirSync(dir).map((name) => path.join(dir, name))]) {
      fs.chownSync(file, runAs.uid, runAs.gid);
    }
  }
  const daemon = await spawnDaemon({
    name: 'pgbouncer',
    command: binary,
    args: [configFile],
    cwd: dir,
    uid: runAs?.uid,
    gid: runAs?.gid,
    logFile: path.join(dir, 'pgbouncer.log'),
  });
  await listeningOrStopped(daemon, '127.0.0.1', port);
  return { daemon, port, adminPort: 0 };
}

/** pgbouncer.ini and its auth file; returns the path of the ini. */
function writeConfig(dir: string, port: number, upstream: Endpoint): string {
  const quote = (value: string): string => `"${value.replaceAll('"', '""')}"`;
  // trust still requires the user in auth_file; the password there is what
  // PgBouncer itself presents to the server.
  fs.writeFileSync(path.join(dir, 'userlist.txt'), `${quote(upstream.user)} ${quote(upstream.password ?? '')}\n`);
  const ini = `; Written by pgwarden's overhead benchmark.
[databases]
${upstream.database} = host=${upstream.host} port=${upstream.port} dbname=${upstream.database}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = ${port}
unix_socket_dir =
auth_type = trust
auth_file = ${path.join(dir, 'userlist.txt')}
pool_mode = session
max_client_conn = 1000
default_pool_size = 200
max_db_connections = 0
server_tls_sslmode = disable
ignore_startup_parameters = extra_float_digits
pidfile = ${path.join(dir, 'pgbouncer.pid')}
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
`;
  const file = path.join(dir, 'pgbouncer.ini');
  fs.writeFileSync(file, ini);
  return file;
}
