// The admin HTTP server's edges: a malformed URL is the client's error (400), JSON
// answers tell browsers not to sniff them, and connections beyond the cap are
// answered 503 and closed instead of piling up.

import assert from 'node:assert/strict';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';
import pino from 'pino';
import client from 'prom-client';
import { AdminServer } from '../../src/admin/server.ts';
import { waitFor } from '../harness/database.ts';

const TOKEN = 'admin-server-test-token-0123456789';

describe('AdminServer', () => {
  let server: AdminServer;
  let base: string;
  let port: number;

  before(async () => {
    server = new AdminServer({
      host: '127.0.0.1',
      port: 0,
      token: TOKEN,
      metrics: new client.Registry(),
      routes: [
        { method: 'GET', path: '/api/things/:id', handle: ({ params }) => ({ status: 200, body: { id: params.id } }) },
      ],
      upstreamReady: async () => true,
      log: pino({ level: 'silent' }),
      maxConnections: 4,
    });
    port = (await server.listen()).port;
    base = `http://127.0.0.1:${port}`;
  });

  after(() => server.close());

  const get = (path: string) => fetch(`${base}${path}`, { headers: { Authorization: `Bearer ${TOKEN}` } });

  test('a bad percent-encoding in the path is a 400 that says so', async () => {
    const response = await get('/api/things/%E0%A4%A');
    assert.equal(response.status, 400);
    assert.match((await response.json()).error, /malformed percent-encoding/);
    assert.equal((await (await get('/api/things/a%20b')).json()).id, 'a b');
  });

  test('JSON and metrics responses carry X-Content-Type-Options: nosniff', async () => {
    for (const path of ['/api/things/1', '/api/nothing', '/metrics']) {
      assert.equal((await get(path)).headers.get('x-content-type-options'), 'nosniff', path);
    }
    const unauthorized = await fetch(`${base}/api/things/1`);
    assert.equal(unauthorized.status, 401);
    assert.equal(unauthorized.headers.get('x-content-type-options'), 'nosniff');
  });

  test('connections beyond the cap are answered 503 and closed; freed slots serve again', async () => {
    const idle: net.Socket[] = [];
    try {
      for (let i = 0; i < 4; i++) {
        const socket = net.connect(port, '127.0.0.1');
        await new Promise((resolve) => socket.once('connect', resolve));
        idle.push(socket);
      }
      const extra = net.connect(port, '127.0.0.1');
      let answer = '';
      extra.on('data', (d) => (answer += d));
      await new Promise((resolve) => extra.once('close', resolve));
      assert.match(answer, /^HTTP\/1\.1 503 /);
      assert.match(answer, /too many admin connections/);
    } finally {
      for (const socket of idle) socket.destroy();
    }
    await waitFor(async () => (await get('/api/things/2')).status === 200, { what: 'the admin server to serve again' });
  });
});
