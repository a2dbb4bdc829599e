// A rerouted statement's answer streams from the replica to the client with
// backpressure: a result far larger than any buffer passes with flat memory, and
// a replica that fails mid-answer ends the statement with 08006 while the session
// stays usable. (bench/reroute-stream.ts runs the same stream at 4 GB.)

import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { fingerprintSync } from 'libpg-query';
import { errorField } from '../../src/protocol/backend.ts';
import { Backend, ErrorField } from '../../src/protocol/constants.ts';
import { encodeQuery } from '../../src/protocol/encode.ts';
import { CONTINUE, Framer, WHOLE } from '../../src/protocol/framer.ts';
import { loadParser } from '../../src/shapes/fingerprint.ts';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { testDatabase, waitFor, withClient } from '../harness/database.ts';
import { startReplica, type Replica } from '../harness/replica.ts';

const binDir = process.env.PGWARDEN_TEST_PG_BIN_DIR;
/** The rerouted shape: `repeat` and the row count are literals, so every size is the same shape. */
const BIG = (rows: number) => `select g, repeat('x', 8000) as pad from generate_series(1, ${rows}) g`;
const ROW_BYTES = 8000;
const SUITE_BYTES = Number(process.env.PGWARDEN_REROUTE_STREAM_MB ?? 768) * 1024 * 1024;

interface Answer {
  bytes: number;
  sqlstate: string | null;
  message: string | null;
  status: string | null;
}

/**
 * A client that reads and drops what it is sent, as a streaming consumer would,
 * framing with the project's Framer only to see ErrorResponse and ReadyForQuery.
 */
class StreamingClient {
  private framer: Framer;
  private answer: Answer = { bytes: 0, sqlstate: null, message: null, status: null };
  private waiting: ((answer: Answer) => void) | null = null;
  private closedWith: ((answer: Answer) => void) | null = null;
  onBytes: ((total: number) => void) | null = null;
  closed = false;

  private constructor(private readonly socket: net.Socket) {
    const kinds = new Uint8Array(256);
    kinds[Backend.ErrorResponse] = WHOLE;
    kinds[Backend.ReadyForQuery] = WHOLE;
    this.framer = new Framer(kinds, 0x7fffffff, {
      onMessage: (type, buf, start, end) => {
        if (type === Backend.ErrorResponse) {
          this.answer.sqlstate = errorField(buf, start, end, ErrorField.Code);
          this.answer.message = errorField(buf, start, end, ErrorField.Message);
        } else {
          this.answer.status = String.fromCharCode(buf[start + 5]);
          const done = this.waiting;
          const answer = this.answer;
          this.waiting = null;
          this.answer = { bytes: 0, sqlstate: null, message: null, status: null };
          done?.(answer);
        }
        return CONTINUE;
      },
      onForward: (bytes) => {
        this.answer.bytes += bytes.length;
        this.onBytes?.(this.answer.bytes);
      },
      onViolation: (reason) => socket.destroy(new Error(reason)),
    });
    socket.on('data', (chunk: Buffer) => this.framer.push(chunk));
    socket.on('close', () => {
      this.closed = true;
      this.closedWith?.(this.answer);
    });
  }

  static async connect(port: number, user: string, database: string): Promise<StreamingClient> {
    const socket = net.connect(port, '127.0.0.1');
    await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    const client = new StreamingClient(socket);
    const params = Buffer.from(`user\0${user}\0database\0${database}\0\0`);
    const startup = Buffer.alloc(8 + params.length);
    startup.writeInt32BE(startup.length, 0);
    startup.writeInt32BE(196608, 4);
    params.copy(startup, 8);
    const ready = client.next();
    socket.write(startup);
    await ready;
    return client;
  }

  /** Resolves at the next ReadyForQuery (or at the close) with what came before it. */
  private next(): Promise<Answer> {
    return new Promise((resolve) => {
      this.waiting = resolve;
      this.closedWith = resolve;
    });
  }

  query(text: string): Promise<Answer> {
    const answer = this.next();
    this.socket.write(encodeQuery(text));
    return answer;
  }

  end(): void {
    this.socket.end();
  }

  /** Leaves at once, unread data and all. */
  destroy(): void {
    this.socket.destroy();
  }
}

describe('a rerouted result streams', { timeout: 300_000, skip: binDir ? false : 'PGWARDEN_TEST_PG_BIN_DIR is not set (run through npm test)' }, () => {
  let replica: Replica;
  let pgw: TestApp;

  before(async () => {
    const db = testDatabase();
    replica = await startReplica({ host: db.host, port: db.port, binDir: binDir! });
    pgw = await startTestApp({ mitigation: 'off', replicas: { replica1: { url: replica.url(), pool_size: 2 } } });
    await loadParser();
    const { status, body } = await pgw.api('/api/rules', {
      method: 'POST',
      body: { action: 'reroute', fingerprint: fingerprintSync(BIG(1)), target: 'replica1', reason: 'big reads to the replica' },
    });
    assert.equal(status, 201, JSON.stringify(body));
  });

  after(async () => {
    await pgw?.stop();
    await replica?.stop();
  });

  test('a result far larger than any buffer passes with flat memory', async (t) => {
    const db = testDatabase();
    const client = await StreamingClient.connect(pgw.app.proxyPort, db.user, db.database);
    try {
      // Warm up (JIT, pools, the replica connection) before taking the baseline.
      const warm = await client.query(BIG(2000));
      assert.equal(warm.sqlstate, null, warm.message ?? '');
      global.gc?.();
      const baseline = process.memoryUsage().rss;
      let peak = baseline;
      const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().rss)), 20);
      const rows = Math.ceil(SUITE_BYTES / ROW_BYTES);
      const started = performance.now();
      const answer = await client.query(BIG(rows)).finally(() => clearInterval(sampler));
      const seconds = (performance.now() - started) / 1000;
      assert.equal(answer.sqlstate, null, answer.message ?? '');
      assert.equal(answer.status, 'I');
      assert.ok(answer.bytes >= rows * ROW_BYTES, `relayed ${answer.bytes} bytes for ${rows} rows`);
      const growthMb = (peak - baseline) / 1024 / 1024;
      t.diagnostic(
        `${(answer.bytes / 1024 / 1024).toFixed(0)} MB rerouted in ${seconds.toFixed(1)} s ` +
          `(${(answer.bytes / 1024 / 1024 / seconds).toFixed(0)} MB/s); RSS ${(baseline / 1024 / 1024).toFixed(0)} MB -> peak ${(peak / 1024 / 1024).toFixed(0)} MB (+${growthMb.toFixed(1)} MB)`,
      );
      // Flat means independent of the result size: ~65 MB of garbage-collector headroom was
      // measured at 768 MB and at 2 GB alike; buffering would add the whole result.
      assert.ok(growthMb < 96, `RSS grew by ${growthMb.toFixed(1)} MB while streaming`);
      // It ran on the replica: the shape's completion says so.
      const shapes = (await pgw.api('/api/shapes?limit=100')).body as { fingerprint: string; calls: number }[];
      assert.ok(shapes.find((s) => s.fingerprint === fingerprintSync(BIG(1)))!.calls >= 2);
    } finally {
      client.end();
    }
  });

  test('a replica connection lost mid-answer ends the statement with 08006 and the session goes on', async () => {
    const db = testDatabase();
    const client = await StreamingClient.connect(pgw.app.proxyPort, db.user, db.database);
    try {
      let killed: Promise<unknown> | null = null;
      client.onBytes = (total) => {
        if (total < 4 * 1024 * 1024 || killed !== null) return;
        killed = withClient(
          (c) => c.query(`select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'pgwarden' and state = 'active'`),
          replica.url(),
        );
      };
      const answer = await client.query(BIG(200_000));
      client.onBytes = null;
      assert.ok(killed !== null, 'the answer finished before the replica connection could be ended');
      await killed;
      assert.equal(client.closed, false, 'the session was closed');
      assert.equal(answer.sqlstate, '08006');
      assert.match(answer.message ?? '', /^pgwarden: reroute target replica1 failed during the statement/);
      assert.equal(answer.status, 'I');
      // The session is usable: the next statement runs (on the primary, or on a new replica connection).
      const next = await client.query('select 1');
      assert.equal(next.sqlstate, null, next.message ?? '');
      const again = await client.query(BIG(10));
      assert.equal(again.sqlstate, null, again.message ?? '');
    } finally {
      client.end();
    }
  });

  test('a client that leaves mid-answer frees the replica connection', async () => {
    const db = testDatabase();
    const client = await StreamingClient.connect(pgw.app.proxyPort, db.user, db.database);
    let ended = false;
    client.onBytes = (total) => {
      if (total > 2 * 1024 * 1024 && !ended) {
        ended = true;
        client.destroy();
      }
    };
    void client.query(BIG(1_000_000));
    await waitFor(() => ended, { what: 'the client to leave' });
    await waitFor(
      () =>
        withClient(async (c) => {
          const { rows } = await c.query(`select count(*)::int as n from pg_stat_activity where application_name = 'pgwarden' and state = 'active'`);
          return rows[0].n === 0;
        }, replica.url()),
      { timeoutMs: 20_000, what: 'the replica statement to stop' },
    );
  });
});
