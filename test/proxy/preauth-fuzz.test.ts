// A bounded, seeded fuzz of everything a peer can send before it is authenticated:
// random and mutated startup packets, SSLRequest/GSSENCRequest/CancelRequest,
// truncated and oversized lengths, bytes after the startup packet, abrupt closes.
// Whatever the bytes, pgwarden must not crash, must let go of every socket (the
// process's descriptor count comes back), and must still serve a normal client.
// The seed is printed on failure; PGWARDEN_FUZZ_SEED replays one run.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { serialize } from 'pg-protocol';
import { testDatabase, waitFor } from '../harness/database.ts';
import { startProxy, type TestProxy } from '../harness/proxy.ts';

const db = testDatabase();
const SEED = Number(process.env.PGWARDEN_FUZZ_SEED ?? 0x5eed1);
const CASES = 2000;
const CONCURRENCY = 50;

const openFds = (): number => fs.readdirSync('/proc/self/fd').length;

/** mulberry32: small, seedable, good enough to pick cases. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function request(code: number, extra = Buffer.alloc(0)): Buffer {
  const out = Buffer.alloc(8 + extra.length);
  out.writeInt32BE(out.length, 0);
  out.writeInt32BE(code, 4);
  extra.copy(out, 8);
  return out;
}

interface FuzzCase {
  bytes: Buffer;
  /** Close our side right after writing (or in the middle), instead of waiting for pgwarden. */
  abrupt: boolean;
}

function makeCase(random: () => number): FuzzCase {
  const int = (n: number) => Math.floor(random() * n);
  const bytes = (n: number) => Buffer.from(Array.from({ length: n }, () => int(256)));
  const users = [db.user, 'nobody_here', 'x'.repeat(int(200)), ''];
  const startup = () =>
    serialize.startup({
      user: users[int(users.length)],
      database: random() < 0.5 ? db.database : 'nope',
      application_name: bytes(int(20)).toString('latin1'),
    });
  const generators: (() => Buffer)[] = [
    () => bytes(int(64)), // garbage
    () => request(80877103), // SSLRequest
    () => Buffer.concat([request(80877103), bytes(int(32))]), // SSLRequest and unencrypted bytes
    () => request(80877104), // GSSENCRequest
    () => request(80877102, bytes(8)), // CancelRequest, random key
    () => request(80877102, bytes(int(8))), // CancelRequest, short
    () => startup().subarray(0, int(startup().length)), // truncated startup
    () => {
      const packet = Buffer.from(startup());
      for (let i = 0; i < 1 + int(4); i++) packet[int(packet.length)] = int(256); // mutated startup
      return packet;
    },
    () => {
      const packet = Buffer.from(startup());
      packet.writeInt32BE([0, 3, 7, 10_005, 0x7fffffff, -1][int(6)], 0); // bad length
      return Buffer.concat([packet, bytes(int(2000))]);
    },
    () => Buffer.concat([startup(), bytes(int(300))]), // bytes after the startup packet
    () => Buffer.concat([startup(), Buffer.from([0x43, 0, 0, 0, 4, 0x53, 0, 0, 0, 4])]), // Close(4) + Sync
    () => Buffer.concat([startup(), Buffer.from([0x58, 0, 0, 0, 4])]), // Terminate after startup
    () => Buffer.from([0x58, 0, 0, 0, 4]), // Terminate before startup
    () => Buffer.concat([request(196608 + int(3)), bytes(int(16))]), // protocol versions, odd layouts
    () => {
      const packet = Buffer.alloc(8 + int(40_000)); // oversized
      packet.writeInt32BE(packet.length, 0);
      packet.writeInt32BE(196608, 4);
      return packet;
    },
  ];
  return { bytes: generators[int(generators.length)](), abrupt: random() < 0.3 };
}

/** Plays one case; resolves once the connection is closed (by either side). */
function play(port: number, fuzz: FuzzCase, random: () => number): Promise<void> {
  return new Promise((resolve) => {
    const socket = net.connect({ host: '127.0.0.1', port });
    socket.on('error', () => undefined);
    socket.on('data', () => undefined);
    socket.once('close', () => resolve());
    socket.once('connect', () => {
      if (fuzz.abrupt) {
        const cut = Math.floor(random() * (fuzz.bytes.length + 1));
        socket.write(fuzz.bytes.subarray(0, cut));
        socket.destroy();
      } else {
        socket.write(fuzz.bytes);
        // A slow, silent client is ended by pgwarden's startup timeout; this is a backstop.
        setTimeout(() => socket.destroy(), 20_000).unref();
      }
    });
  });
}

describe(`pre-authentication fuzz (seed ${SEED}, ${CASES} cases)`, () => {
  let proxy: TestProxy;
  before(async () => {
    proxy = await startProxy({ startupTimeoutMs: 1000 });
  });
  after(() => proxy.stop());

  test('no crash, no descriptor left behind, and a normal client is served afterwards', {
    timeout: 180_000,
  }, async () => {
    const baseline = openFds();
    const random = prng(SEED);
    let next = 0;
    const worker = async () => {
      while (next < CASES) {
        next++;
        await play(proxy.port, makeCase(random), random);
      }
    };
    await Promise.all(Array.from({ length: CONCURRENCY }, worker));
    await waitFor(() => proxy.server.connections.size === 0, {
      timeoutMs: 20_000,
      what: `every client socket to be released (seed ${SEED}; left: ${JSON.stringify(proxy.server.connections.byPhase())})`,
    });
    await waitFor(() => openFds() <= baseline, {
      timeoutMs: 20_000,
      what: `open fds back to ${baseline} (seed ${SEED}; now ${openFds()})`,
    });
    const client = new pg.Client({ connectionString: proxy.url() });
    await client.connect();
    try {
      assert.equal((await client.query('select 7 as n')).rows[0].n, 7);
    } finally {
      await client.end();
    }
  });
});
