// Per-shape summaries (src/shapes/summary.ts, fleet.ts): what proxy workers send
// the primary and instances publish to the control database. Merging summaries
// must give the same counters and (within the sketch's accuracy) the same
// percentiles as recording every call in one place.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { ManualClock } from '../../src/clock.ts';
import type { QueryCompletion, SessionInfo } from '../../src/proxy/seam.ts';
import { ShapeCollector } from '../../src/shapes/collector.ts';
import { ShapeFinder } from '../../src/shapes/fingerprint.ts';
import { mergeFleet, publishedOf } from '../../src/shapes/fleet.ts';
import { ShapeRegistry } from '../../src/shapes/registry.ts';
import { newSketch } from '../../src/shapes/series.ts';
import { sketchFromJson, sketchToJson, SummaryBatcher } from '../../src/shapes/summary.ts';
import pino from 'pino';

const SESSION: SessionInfo = {
  id: 1,
  user: 'app',
  database: 'shop',
  applicationName: 'web',
  clientAddress: '127.0.0.1',
  replication: false,
  settings: new Map(),
};

function completion(text: string, durationMs: number, overrides: Partial<QueryCompletion> = {}): QueryCompletion {
  return {
    session: SESSION,
    text,
    statement: null,
    statementIndex: 0,
    bind: null,
    execution: 0,
    startedAt: 0,
    durationMs,
    rows: 1,
    sqlstate: null,
    upstream: 'primary',
    refused: false,
    ...overrides,
  };
}

async function setup() {
  const clock = new ManualClock();
  const finder = await ShapeFinder.create({ cacheEntries: 100, maxTextBytes: 10_000 });
  const registry = () =>
    new ShapeRegistry({ maxShapes: 100, clock, series: { bucketMs: 10_000, buckets: 360, sketchBuckets: 6 } });
  const collector = (r = registry()) =>
    new ShapeCollector(finder, r, { slowQueryMs: 1e9, logQueryValues: false, log: pino({ level: 'silent' }) });
  return { clock, finder, registry, collector };
}

/** A deterministic spread of latencies: 0.1 ms to ~50 ms. */
const latency = (i: number) => 0.1 + ((i * 7919) % 500) / 10;

describe('shape summaries', { timeout: 10_000 }, () => {
  test('a sketch survives its JSON form: same count, sum and quantiles', () => {
    const sketch = newSketch();
    for (let i = 0; i < 1000; i++) sketch.accept(latency(i));
    sketch.accept(0);
    const back = sketchFromJson(JSON.parse(JSON.stringify(sketchToJson(sketch))));
    assert.equal(back.count, sketch.count);
    assert.equal(back.sum, sketch.sum);
    assert.equal(back.zeroCount, 1);
    for (const q of [0.5, 0.95, 0.99]) assert.equal(back.getValueAtQuantile(q), sketch.getValueAtQuantile(q));
    assert.equal(sketchToJson(newSketch()), null, 'an empty sketch is null');
    assert.throws(() => sketchFromJson(['x'] as unknown as number[]), /not a sketch/);
  });

  test("two workers' summaries merged equal every call recorded in one collector", async () => {
    const { clock, finder, collector } = await setup();
    const direct = collector();
    const merged = collector();
    const workers = [new SummaryBatcher(finder, { clock }), new SummaryBatcher(finder, { clock })];
    for (let i = 0; i < 2000; i++) {
      const c = completion(
        `select * from orders where id = ${i}`,
        latency(i),
        i % 100 === 0 ? { sqlstate: '57014' } : {},
      );
      direct.observe(c);
      workers[i % 2].observe(c);
      if (i % 500 === 499) for (const w of workers) for (const s of w.drain()) merged.ingest(s);
    }
    const [a] = direct.registry.all();
    const [b] = merged.registry.all();
    assert.equal(merged.registry.size, 1);
    assert.equal(b.fingerprint, a.fingerprint);
    assert.equal(b.query, a.query);
    for (const key of ['calls', 'timedCalls', 'errors', 'rows'] as const) assert.equal(b[key], a[key], key);
    assert.ok(Math.abs(b.totalMs - a.totalMs) < 1e-6);
    assert.deepEqual(Object.fromEntries(b.errorsByClass), { '57': 20 });
    for (const q of [0.5, 0.95, 0.99]) assert.equal(b.quantile(q), a.quantile(q), `p${q * 100}`);
    assert.equal(merged.queries, 2000);
    const [pa] = a.series.points(clock.now());
    const [pb] = b.series.points(clock.now());
    assert.deepEqual(pb, pa, 'the time series holds the same bucket');
    assert.deepEqual([...b.users], ['app']);
  });

  test('exemplars: the first execution of a shape, then at most one a second; every DDL', async () => {
    const { clock, finder } = await setup();
    const batcher = new SummaryBatcher(finder, { clock, everyExecutionOf: new Set(['CREATE']) });
    const bind = Buffer.from('bind-bytes');
    for (let i = 0; i < 10; i++) batcher.observe(completion(`select ${i} from t`, 1, { bind }));
    batcher.observe(completion('create table a (x int)', 1));
    batcher.observe(completion('create table a (x int)', 1));
    let [select, create] = batcher.drain();
    assert.equal(select.exemplars.length, 1);
    assert.equal(select.exemplars[0].text, 'select 0 from t');
    assert.equal(
      Buffer.from(select.exemplars[0].bind!, 'base64').toString(),
      'bind-bytes',
      'the Bind message is copied',
    );
    assert.equal(create.exemplars.length, 2);
    assert.equal(select.recent.length, 10);

    batcher.observe(completion('select 11 from t', 1));
    [select] = batcher.drain();
    assert.equal(select.exemplars.length, 0, 'within the second: none');
    clock.advance(1000);
    batcher.observe(completion('select 12 from t', 1, { sqlstate: '57014' }));
    batcher.observe(completion('select 13 from t', 1));
    [select] = batcher.drain();
    assert.deepEqual(
      select.exemplars.map((e) => e.text),
      ['select 13 from t'],
      'a failed execution is no exemplar',
    );
    assert.deepEqual(batcher.drain(), [], 'a drained window starts empty');
  });

  test('ingest gives statement listeners the exemplars and latency listeners each recent latency', async () => {
    const { clock, finder, collector } = await setup();
    const primary = collector();
    const statements: string[] = [];
    const latencies: number[] = [];
    primary.onShape((_s, _shape, c) => statements.push(c.text));
    primary.onShape((_s, _shape, c) => latencies.push(c.durationMs), 'latencies');
    const batcher = new SummaryBatcher(finder, { clock, maxRecent: 4 });
    for (let i = 1; i <= 6; i++) batcher.observe(completion(`select ${i}`, i));
    batcher.observe(completion('select 7', 7, { refused: true, sqlstate: '42501' }));
    for (const s of batcher.drain()) primary.ingest(s);
    assert.deepEqual(statements, ['select 1']);
    assert.deepEqual(latencies, [3, 4, 5, 6], 'the newest, oldest first; a refused call has no latency');
    const [stats] = primary.registry.all();
    assert.equal(stats.calls, 7);
    assert.equal(stats.timedCalls, 6);
  });

  test('past its cap a window counts further shapes under the overflow shape, which the primary keeps as its own', async () => {
    const { clock, finder, collector } = await setup();
    const batcher = new SummaryBatcher(finder, { clock, maxShapes: 3 });
    for (let i = 0; i < 10; i++) batcher.observe(completion(`select c${i} from t`, 1));
    const window = batcher.drain();
    assert.equal(window.length, 4);
    const overflow = window.find((s) => s.fingerprint === 'overflow')!;
    assert.equal(overflow.calls, 7);
    assert.equal(overflow.exemplars.length, 0);
    const primary = collector();
    const seen: string[] = [];
    primary.onShape((s) => seen.push(s.fingerprint));
    for (const s of window) primary.ingest(s);
    assert.equal(primary.registry.size, 3);
    assert.equal(primary.registry.get('overflow')!.calls, 7);
    assert.equal(primary.queries, 10);
    assert.ok(!seen.includes('overflow'), 'listeners never see the overflow shape');
  });

  test('the fleet merge sums counters, merges sketches and counts instances', async () => {
    const { collector } = await setup();
    const a = collector();
    const b = collector();
    const both = collector();
    for (let i = 0; i < 300; i++) {
      const c = completion(`select * from t where id = ${i}`, latency(i));
      (i < 100 ? a : b).observe(c);
      both.observe(c);
    }
    a.observe(completion('select 1 from only_a', 1));
    const rows = [
      ...a.registry.all().map((s) => ({ instance: 'a', summary: JSON.parse(JSON.stringify(publishedOf(s))) })),
      ...b.registry.all().map((s) => ({ instance: 'b', summary: JSON.parse(JSON.stringify(publishedOf(s))) })),
      { instance: 'c', summary: { fingerprint: 'x' } },
    ];
    const { shapes, skipped } = mergeFleet(rows);
    assert.equal(skipped, 1, 'a row that is not a summary is skipped');
    const shared = shapes.find((s) => s.query.includes('from t where'))!;
    const expected = both.registry.all()[0];
    assert.equal(shared.calls, 300);
    assert.equal(shared.instances.length, 2);
    assert.equal(shared.quantile(0.95), expected.quantile(0.95));
    assert.equal(shapes.find((s) => s.query.includes('only_a'))!.instances.length, 1);
  });
});
