// Memory per idle client: how much resident memory does a proxy add for each
// authenticated client that just sits there? Opens N logged-in connections that
// send nothing more, and reports the proxy's RSS growth divided by N, for
// pgwarden (the built dist/, as a separate process) and for PgBouncer when it is
// installed (session mode; note that PgBouncer authenticates idle clients itself
// and opens no server connection for them, while pgwarden holds one per client).
//
// usage: node --import tsx bench/idle.ts [--clients N] [--targets pgwarden,pgbouncer]

import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { startPostgres } from '../test/harness/postgres.ts';
import { findPgbouncer, startPgbouncer } from './lib/pgbouncer.ts';
import { buildPgwarden, startPgwarden, type StartedProxy } from './lib/pgwarden.ts';
import { treeRssKib } from './lib/procfs.ts';

interface Options {
  clients: number;
  targets: string[];
}

function parseArgs(argv: string[]): Options {
  const options: Options = { clients: 500, targets: ['pgwarden', 'pgbouncer'] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--clients') options.clients = Number(argv[++i]);
    else if (argv[i] === '--targets') options.targets = argv[++i].split(',');
    else if (argv[i] === '--help') {
      process.stdout.write(
        'usage: node --import tsx bench/idle.ts [--clients N (default 500)] [--targets pgwarden,pgbouncer]\n',
      );
      process.exit(0);
    } else throw new Error(`unknown option ${argv[i]}`);
  }
  if (!Number.isInteger(options.clients) || options.clients < 1)
    throw new Error('--clients must be a positive integer');
  return options;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** A StartupMessage for a trust user (protocol 3.0). */
function startupPacket(user: string, database: string): Buffer {
  const body = Buffer.from(`user\0${user}\0database\0${database}\0\0`);
  const out = Buffer.alloc(8 + body.length);
  out.writeInt32BE(out.length, 0);
  out.writeInt32BE(196608, 4);
  body.copy(out, 8);
  return out;
}

/** Opens a connection and resolves once it is logged in (first ReadyForQuery). */
function login(port: number, packet: Buffer): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    let seen = Buffer.alloc(0);
    socket.once('error', reject);
    socket.once('connect', () => socket.write(packet));
    socket.on('data', (data: Buffer) => {
      seen = Buffer.concat([seen, data]);
      for (let p = 0; p + 5 <= seen.length; p += 1 + seen.readInt32BE(p + 1)) {
        if (seen[p] === 0x45) return reject(new Error('login failed'));
        if (seen[p] === 0x5a) {
          socket.removeAllListeners('data');
          return resolve(socket);
        }
      }
    });
  });
}

async function measure(
  name: string,
  proxy: StartedProxy,
  user: string,
  database: string,
  clients: number,
): Promise<number> {
  const packet = startupPacket(user, database);
  // Warm up: the first connections pay for code paths, JIT and pools once.
  for (const s of await Promise.all(Array.from({ length: 20 }, () => login(proxy.port, packet)))) s.destroy();
  await sleep(2000);
  const before = treeRssKib(proxy.daemon.pid);
  const sockets: net.Socket[] = [];
  for (let i = 0; i < clients; i += 50) {
    sockets.push(
      ...(await Promise.all(Array.from({ length: Math.min(50, clients - i) }, () => login(proxy.port, packet)))),
    );
  }
  await sleep(3000);
  const after = treeRssKib(proxy.daemon.pid);
  for (const s of sockets) s.destroy();
  const perClient = ((after - before) * 1024) / clients;
  console.log(
    `${name.padEnd(10)} ${clients} idle clients: RSS ${before} -> ${after} KiB, ${(perClient / 1024).toFixed(2)} KiB per idle client`,
  );
  return perClient;
}

async function main(): Promise<void> {
  const options = parseArgs(process.argv.slice(2));
  const tempDir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgwarden-idle-'));
  fs.chmodSync(tempDir, 0o711);
  const server = await startPostgres({ extraConfig: { max_connections: String(options.clients + 60) } });
  try {
    const upstream = { host: server.host, port: server.port, user: server.superuser, database: 'postgres' };
    if (options.targets.includes('pgwarden')) {
      await buildPgwarden();
      const proxy = await startPgwarden(`${server.host}:${server.port}`, {
        name: 'pgwarden',
        stats: true,
        extraArgs: [],
        tempDir,
      });
      try {
        await measure('pgwarden', proxy, upstream.user, upstream.database, options.clients);
      } finally {
        await proxy.daemon.stop();
      }
    }
    if (options.targets.includes('pgbouncer')) {
      const binary = findPgbouncer();
      if (!binary) console.log('pgbouncer  SKIPPED: not installed (apt-get install -y pgbouncer)');
      else {
        const proxy = await startPgbouncer(binary, upstream, tempDir);
        try {
          await measure('pgbouncer', proxy, upstream.user, upstream.database, Math.min(options.clients, 1000));
        } finally {
          await proxy.daemon.stop();
        }
      }
    }
  } finally {
    await server.stop();
    fs.rmSync(tempDir, { recursive: true, force: true });
  }
}

main().catch((error: Error) => {
  process.stderr.write(`bench/idle: ${error.message}\n`);
  process.exit(1);
});
