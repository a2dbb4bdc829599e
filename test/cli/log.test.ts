// Logs as an operator reads them: readable text on a terminal, JSON for collectors,
// and a level that a reload changes for every module's logger at once.

import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import { describe, test } from 'node:test';
import { createLogger, setLogLevel } from '../../src/log.ts';

function capture(isTTY: boolean): PassThrough & { text(): string } {
  const stream = new PassThrough() as PassThrough & { text(): string; isTTY?: boolean };
  let text = '';
  stream.on('data', (d: Buffer) => (text += d.toString()));
  stream.isTTY = isTTY;
  stream.text = () => text;
  return stream;
}

const flush = () => new Promise((resolve) => setImmediate(resolve));

describe('logging', () => {
  test('on a terminal, lines are readable text with the level as a word', async () => {
    const out = capture(true);
    createLogger('info', 'auto', out).child({ component: 'proxy' }).info({ sessions: 3 }, 'pgwarden proxy listening');
    await flush();
    // Coloured on a terminal: compare without the escape sequences.
    const plain = out.text().replace(/\x1B\[[0-9;]*m/g, '');
    assert.match(plain, /INFO: pgwarden proxy listening/);
    assert.match(plain, /sessions: 3/);
    assert.ok(!out.text().trimStart().startsWith('{'), 'not JSON');
  });

  test('elsewhere (auto) and with json, lines are JSON', async () => {
    for (const [format, tty] of [
      ['auto', false],
      ['json', true],
    ] as const) {
      const out = capture(tty);
      createLogger('info', format, out).info('hello');
      await flush();
      const line = JSON.parse(out.text().trim());
      assert.equal(line.msg, 'hello');
      assert.equal(line.level, 30);
    }
  });

  test('pretty can be forced where stdout is not a terminal', async () => {
    const out = capture(false);
    createLogger('info', 'pretty', out).warn('careful');
    await flush();
    assert.match(out.text(), /WARN.*careful/);
  });

  test('a new level applies to the loggers modules already took', async () => {
    const out = capture(false);
    const log = createLogger('info', 'json', out);
    const child = log.child({ component: 'rules' }).child({ rule: 'r-1' });
    child.debug('hidden');
    setLogLevel(log, 'debug');
    child.debug('shown');
    setLogLevel(log, 'warn');
    child.info('hidden again');
    await flush();
    assert.deepEqual(
      out
        .text()
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l).msg),
      ['shown'],
    );
  });
});
