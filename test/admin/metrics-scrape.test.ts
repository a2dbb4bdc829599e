// A real /metrics scrape after traffic through the proxy: the exposition passes
// `promtool check metrics` (when promtool is installed), and carries the process
// and runtime metrics, the build info and the per-shape latency histogram.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { after, before, describe, test } from 'node:test';
import pg from 'pg';
import { startTestApp, type TestApp } from '../harness/app.ts';
import { findPromtool, PROMTOOL_MISSING } from '../deploy/support.ts';

describe('/metrics scraped from a running pgwarden', () => {
  let pgw: TestApp;
  let text: string;

  before(async () => {
    pgw = await startTestApp({ metrics_top_shapes: 2 });
    const client = new pg.Client({ connectionString: pgw.url() });
    await client.connect();
    // Four shapes: two get their own series, the rest are summed as "other".
    for (let i = 0; i < 20; i++) {
      await client.query('select $1::int as n', [i]);
      await client.query('select pg_sleep(0.002)');
      if (i % 4 === 0) await client.query('select 1 from pg_class limit 1');
      if (i % 5 === 0) await client.query('select count(*) from pg_namespace');
    }
    await client.end();
    const response = await pgw.api('/metrics');
    assert.equal(response.status, 200);
    text = response.body as string;
  });

  after(() => pgw?.stop());

  test('promtool check metrics accepts the exposition', { skip: findPromtool() ? false : PROMTOOL_MISSING }, () => {
    const result = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
    assert.equal(result.status, 0, `promtool check metrics:\n${result.stdout}${result.stderr}`);
  });

  test('process and runtime metrics are exported, open file descriptors and event-loop lag among them', () => {
    for (const name of [
      'process_cpu_seconds_total',
      'process_resident_memory_bytes',
      'process_open_fds',
      'nodejs_heap_size_used_bytes',
      'nodejs_eventloop_lag_seconds',
    ]) {
      assert.match(text, new RegExp(`^${name}(\\{[^}]*\\})? [0-9.e+-]+$`, 'm'), `${name} is exported`);
    }
  });

  test('pgwarden_build_info carries the version and the Node.js version', () => {
    const line = text.split('\n').find((l) => l.startsWith('pgwarden_build_info{'));
    assert.ok(line, 'pgwarden_build_info is exported');
    assert.match(line, /version="\d+\.\d+\.\d+[^"]*"/);
    assert.match(line, new RegExp(`node="${process.versions.node.replace(/\./g, '\\.')}"`));
    assert.match(line, / 1$/);
  });

  test('per-shape latency is a histogram over the top shapes plus "other", with counts that add up', () => {
    assert.match(text, /^# TYPE pgwarden_shape_latency_seconds histogram$/m);
    const counts = new Map<string, number>();
    for (const m of text.matchAll(/^pgwarden_shape_latency_seconds_count\{fingerprint="([^"]+)"\} (\d+)$/gm))
      counts.set(m[1], Number(m[2]));
    assert.equal(counts.size, 3, `two top shapes and "other": ${[...counts.keys()].join(', ')}`);
    assert.ok(counts.has('other'));
    for (const [fp, count] of counts) {
      const inf = new RegExp(
        `^pgwarden_shape_latency_seconds_bucket\\{fingerprint="${fp}",le="\\+Inf"\\} (\\d+)$`,
        'm',
      ).exec(text);
      assert.equal(Number(inf?.[1]), count, `${fp}: the +Inf bucket equals the count`);
      const buckets = [
        ...text.matchAll(
          new RegExp(`^pgwarden_shape_latency_seconds_bucket\\{fingerprint="${fp}",le="[^"]+"\\} (\\d+)$`, 'gm'),
        ),
      ].map((m) => Number(m[1]));
      assert.ok(
        buckets.every((v, i) => i === 0 || v >= buckets[i - 1]),
        `${fp}: buckets are cumulative`,
      );
    }
    const total = [...counts.values()].reduce((a, b) => a + b, 0);
    assert.equal(total, 20 + 20 + 5 + 4, 'every statement run is counted once, in its shape or in "other"');
  });
});
