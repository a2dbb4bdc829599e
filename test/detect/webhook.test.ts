// The webhook URL often carries a secret (a token in its path or query): failed
// deliveries are logged with its scheme and host only.

import assert from 'node:assert/strict';
import http from 'node:http';
import { test } from 'node:test';
import pino from 'pino';
import { redactWebhookUrl, WebhookSender } from '../../src/detect/webhook.ts';
import { waitFor } from '../harness/database.ts';

test('failed deliveries are logged without the webhook path, query or credentials', async () => {
  const server = http.createServer((_req, res) => res.writeHead(500).end());
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as { port: number }).port;
  const lines: string[] = [];
  const log = pino({ level: 'warn' }, { write: (line: string) => lines.push(line) });
  try {
    // One answering with an error, one refusing the connection.
    const answering = new WebhookSender({
      url: `http://user:pw@127.0.0.1:${port}/hooks/T000/SECRET-TOKEN?key=SECRET-KEY`,
      log,
      maxAttempts: 1,
    });
    const refusing = new WebhookSender({ url: 'http://127.0.0.1:1/hooks/SECRET-TOKEN', log, maxAttempts: 1 });
    answering.send({ a: 1 });
    refusing.send({ a: 2 });
    await waitFor(() => answering.dropped === 1 && refusing.dropped === 1, { what: 'both deliveries to fail' });
    assert.ok(lines.length >= 2);
    for (const line of lines) {
      assert.doesNotMatch(line, /SECRET|user:pw|hooks/);
      assert.match(line, /"webhook":"http:\/\/127\.0\.0\.1:\d+\/\.\.\."/);
    }
  } finally {
    server.close();
  }
});

test('an unparsable webhook URL is not echoed either', () => {
  assert.equal(redactWebhookUrl('not a url SECRET'), '(invalid URL)');
});
