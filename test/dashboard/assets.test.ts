// The dashboard's files: served at / and /assets/ without the token (they hold no
// data) with their content types, a strict Content-Security-Policy and no caching
// of the page; the API next to them still wants the token.

import assert from 'node:assert/strict';
import { after, before, describe, test } from 'node:test';
import { startTestApp, type TestApp } from '../harness/app.ts';

describe('the dashboard files', () => {
  let pgw: TestApp;
  let base: string;

  before(async () => {
    pgw = await startTestApp();
    base = `http://127.0.0.1:${pgw.app.adminPort}`;
  });

  after(() => pgw?.stop());

  test('the page is served without the token, uncached, under a same-origin-only CSP', async () => {
    const response = await fetch(`${base}/`);
    assert.equal(response.status, 200);
    assert.equal(response.headers.get('content-type'), 'text/html; charset=utf-8');
    assert.equal(response.headers.get('cache-control'), 'no-store');
    const csp = response.headers.get('content-security-policy') ?? '';
    assert.match(csp, /default-src 'self'/);
    assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval|https?:/);
    const html = await response.text();
    assert.match(html, /<script type="module" src="\/assets\/app.js"><\/script>/);
    assert.doesNotMatch(html, /https?:\/\//, 'nothing is loaded from the internet');
  });

  test('scripts, styles and uPlot come with their content types', async () => {
    const expected: Record<string, string> = {
      '/assets/app.js': 'text/javascript; charset=utf-8',
      '/assets/views.js': 'text/javascript; charset=utf-8',
      '/assets/style.css': 'text/css; charset=utf-8',
      '/assets/uPlot.iife.min.js': 'text/javascript; charset=utf-8',
      '/assets/uPlot.min.css': 'text/css; charset=utf-8',
      '/assets/favicon.svg': 'image/svg+xml',
    };
    for (const [path, type] of Object.entries(expected)) {
      const response = await fetch(`${base}${path}`);
      assert.equal(response.status, 200, path);
      assert.equal(response.headers.get('content-type'), type, path);
      assert.equal(response.headers.get('x-content-type-options'), 'nosniff', path);
      assert.ok((await response.arrayBuffer()).byteLength > 0, path);
    }
    const etag = (await fetch(`${base}/assets/app.js`)).headers.get('etag')!;
    assert.equal((await fetch(`${base}/assets/app.js`, { headers: { 'If-None-Match': etag } })).status, 304);
  });

  test('unknown paths and the API still need the token', async () => {
    assert.equal((await fetch(`${base}/assets/missing.js`)).status, 401);
    assert.equal((await fetch(`${base}/api/shapes`)).status, 401);
    assert.equal((await fetch(`${base}/`, { method: 'POST' })).status, 401);
  });
});
