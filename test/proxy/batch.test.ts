// The write batch of one read, on a real loopback TCP pair: chunks arrive in
// order, one chunk goes as one plain write, several as one writev, and a flush
// (before a connection's last bytes) keeps the order.

import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import { WriteBatch } from '../../src/proxy/batch.ts';
import { waitFor } from '../harness/database.ts';

interface Pair {
  writer: net.Socket;
  received: () => string;
  calls: { write: number; writev: number };
}

async function pair(server: net.Server): Promise<Pair> {
  const { port } = server.address() as net.AddressInfo;
  const accepted = new Promise<net.Socket>((resolve) => server.once('connection', resolve));
  const writer = net.connect(port, '127.0.0.1');
  await new Promise((resolve) => writer.once('connect', resolve));
  const reader = await accepted;
  let text = '';
  reader.on('data', (d: Buffer) => (text += d.toString()));
  // Counts what reaches the socket's own write paths (the syscalls' callers).
  const calls = { write: 0, writev: 0 };
  const internals = writer as unknown as { _write: (...a: unknown[]) => void; _writev: (...a: unknown[]) => void };
  const write = internals._write.bind(writer);
  const writev = internals._writev.bind(writer);
  internals._write = (...a) => {
    calls.write++;
    write(...a);
  };
  internals._writev = (...a) => {
    calls.writev++;
    writev(...a);
  };
  return { writer, received: () => text, calls };
}

describe('WriteBatch', () => {
  let server: net.Server;
  const open: net.Socket[] = [];

  before(async () => {
    server = net.createServer((s) => open.push(s));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  });
  after(async () => {
    for (const s of open) s.destroy();
    await new Promise((resolve) => server.close(resolve));
  });

  test('one chunk of a read is one plain write, sent when the read ends', async () => {
    const p = await pair(server);
    open.push(p.writer);
    const flushes: boolean[] = [];
    const batch = new WriteBatch(
      () => p.writer,
      (_s, flushed) => flushes.push(flushed),
    );
    batch.begin();
    batch.write(Buffer.from('one'));
    assert.equal(p.calls.write + p.calls.writev, 0, 'nothing is written before the read ends');
    batch.end();
    assert.deepEqual(p.calls, { write: 1, writev: 0 });
    assert.deepEqual(flushes, [true]);
    await waitFor(() => p.received() === 'one', { what: 'the chunk' });
  });

  test('several chunks of one read are one writev, in order', async () => {
    const p = await pair(server);
    open.push(p.writer);
    const batch = new WriteBatch(
      () => p.writer,
      () => undefined,
    );
    batch.begin();
    for (const part of ['a', 'bb', 'ccc', 'dddd']) batch.write(Buffer.from(part));
    batch.end();
    assert.deepEqual(p.calls, { write: 0, writev: 1 });
    await waitFor(() => p.received() === 'abbcccdddd', { what: 'the chunks in order' });
  });

  test('outside a read, and after a flush, writes keep their order', async () => {
    const p = await pair(server);
    open.push(p.writer);
    const batch = new WriteBatch(
      () => p.writer,
      () => undefined,
    );
    batch.write(Buffer.from('1'));
    batch.begin();
    batch.write(Buffer.from('2'));
    batch.write(Buffer.from('3'));
    batch.flush(); // as before a connection's last message
    p.writer.write('4');
    batch.write(Buffer.from('5'));
    batch.end();
    await waitFor(() => p.received() === '12345', { what: 'the chunks in order' });
  });

  test('a destroyed socket gets nothing and reports nothing', async () => {
    const p = await pair(server);
    let reported = 0;
    const batch = new WriteBatch(
      () => p.writer,
      () => reported++,
    );
    batch.begin();
    batch.write(Buffer.from('x'));
    p.writer.destroy();
    batch.end();
    assert.equal(reported, 0);
    assert.equal(p.calls.write + p.calls.writev, 0);
  });
});
