// The regression detector on simulated traffic with a fake clock: hours of noisy
// but healthy load in milliseconds of test time, over many random seeds.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import pino from 'pino';
import { ManualClock } from '../../src/clock.ts';
import { DEFAULT_DETECTOR_OPTIONS } from '../../src/detect/detector.ts';
import { EventLog } from '../../src/detect/events.ts';
import { IncidentManager } from '../../src/detect/incidents.ts';
import type { QueryCompletion, SessionInfo } from '../../src/proxy/seam.ts';
import type { StatementShape } from '../../src/shapes/fingerprint.ts';
import { ShapeRegistry } from '../../src/shapes/registry.ts';

const BUCKET_MS = 10_000;
const session: SessionInfo = { id: 1, user: 'app', database: 'shop', applicationName: 'web', clientAddress: '127.0.0.1:1', replication: false, settings: new Map() };

/** A deterministic PRNG (mulberry32), so a failing seed can be replayed. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function shape(fingerprint: string): StatementShape {
  return { fingerprint, query: `select /* ${fingerprint} */ $1`, fallback: false, command: 'SELECT' };
}

class Simulation {
  readonly clock = new ClockAt();
  readonly registry = new ShapeRegistry({ maxShapes: 100, clock: this.clock, series: { bucketMs: BUCKET_MS, buckets: 360, sketchBuckets: 6 } });
  readonly events = new EventLog(this.clock);
  readonly incidents = new IncidentManager({
    registry: this.registry,
    events: this.events,
    clock: this.clock,
    log: pino({ level: 'silent' }),
    detector: DEFAULT_DETECTOR_OPTIONS,
    bucketMs: BUCKET_MS,
    evaluateEveryMs: 2000,
  });
  private nextEvaluation = this.clock.now() + 2000;

  call(fingerprint: string, durationMs: number): void {
    const completion: QueryCompletion = {
      session,
      text: 'select 1',
      statement: null,
      statementIndex: 0,
      bind: null,
      startedAt: this.clock.now(),
      durationMs,
      rows: 1,
      sqlstate: null,
      upstream: 'primary',
      refused: false,
    };
    const s = shape(fingerprint);
    const stats = this.registry.record(s, completion);
    this.incidents.observe(stats, s, completion);
  }

  /** Advances time, evaluating every 2 s as the real timer would. */
  advance(ms: number): void {
    const target = this.clock.now() + ms;
    while (this.nextEvaluation <= target) {
      this.clock.set(this.nextEvaluation);
      this.incidents.evaluate();
      this.nextEvaluation += 2000;
    }
    this.clock.set(target);
  }
}

class ClockAt extends ManualClock {
  set(t: number): void {
    this.advance(t - this.now());
  }
}

/** Drives `seconds` of traffic: `rate` calls/s per shape with latencies from `latency`. */
function drive(sim: Simulation, shapes: string[], seconds: number, rate: number, latency: (fp: string, t: number) => number): void {
  const step = 1000 / rate;
  for (let t = 0; t < seconds * 1000; t += step) {
    for (const fp of shapes) sim.call(fp, latency(fp, t));
    sim.advance(step);
  }
}

describe('the regression detector', () => {
  test('two minutes of noisy but healthy load open no incident (50 seeds, after a warm-up)', () => {
    for (let seed = 1; seed <= 50; seed++) {
      const random = rng(seed);
      const sim = new Simulation();
      const shapes = ['a1', 'b2', 'c3', 'd4'];
      const base: Record<string, number> = { a1: 0.3, b2: 2, c3: 15, d4: 0.05 };
      let burstUntil = -1;
      const noisy = (fp: string, t: number) => {
        // Log-normal jitter, rare 20x outliers, and bursts of 3x latency lasting up to 5 s.
        if (burstUntil < t && random() < 0.0005) burstUntil = t + random() * 5000;
        const burst = t < burstUntil ? 3 : 1;
        const outlier = random() < 0.01 ? 20 : 1;
        return base[fp] * Math.exp((random() - 0.5) * 1.2) * burst * outlier;
      };
      drive(sim, shapes, 240, 50, noisy); // 2 minutes of warm-up, then 2 minutes judged
      assert.equal(sim.incidents.list().length, 0, `seed ${seed} opened ${JSON.stringify(sim.incidents.list()[0]?.summary)}`);
    }
  });

  test('a restart with no history opens no incident however slow the first minute is', () => {
    const sim = new Simulation();
    drive(sim, ['a1'], 50, 50, (_fp, t) => (t < 20_000 ? 0.3 : 40));
    assert.equal(sim.incidents.list().length, 0);
  });

  test('a shape seen a handful of times is never judged', () => {
    const sim = new Simulation();
    drive(sim, ['a1'], 600, 0.5, () => 0.3);
    drive(sim, ['a1'], 60, 0.2, () => 100);
    assert.equal(sim.incidents.list().length, 0);
  });

  test('a plan flip (0.3 ms -> 40 ms) opens one incident within 20 s, and recovery resolves it once', () => {
    const sim = new Simulation();
    drive(sim, ['hot', 'other'], 180, 50, (fp) => (fp === 'hot' ? 0.3 : 1));
    const flipAt = sim.clock.now();
    drive(sim, ['hot', 'other'], 30, 50, (fp) => (fp === 'hot' ? 40 : 1));
    const opened = sim.incidents.list('active');
    assert.equal(opened.length, 1);
    const incident = opened[0];
    assert.equal(incident.fingerprint, 'hot');
    const detectedAfter = Date.parse(incident.detected_at) - flipAt;
    assert.ok(detectedAfter <= 20_000, `detected ${detectedAfter} ms after the flip`);
    assert.ok(Math.abs(Date.parse(incident.onset) - flipAt) <= 1000, 'onset is the flip');
    assert.ok(incident.baseline.p95_ms < 1 && incident.current.p95_ms >= 30, JSON.stringify(incident));
    assert.deepEqual(
      incident.ruled_out.map((r) => r.check).sort(),
      ['other_shapes', 'traffic'],
      'traffic and other shapes are ruled out (no round-trip data in this simulation)',
    );
    drive(sim, ['hot', 'other'], 60, 50, (fp) => (fp === 'hot' ? 0.3 : 1));
    assert.equal(sim.incidents.list('active').length, 0);
    assert.equal(sim.incidents.list().length, 1, 'opened once, resolved once');
    const types = sim.events.recent(10).map((e) => e.type);
    assert.deepEqual(types, ['incident_opened', 'incident_resolved']);
  });

  test('an incident names plan and schema changes near the onset, the relevant ones first', () => {
    const sim = new Simulation();
    drive(sim, ['hot'], 180, 50, () => 0.3);
    sim.events.add({ type: 'ddl', summary: 'CREATE TABLE audit (id int)', objects: ['audit'], details: { statement: 'CREATE TABLE audit (id int)' } });
    sim.events.add({ type: 'ddl', summary: 'DROP INDEX users_email_idx', objects: ['users_email_idx'], details: { statement: 'DROP INDEX users_email_idx' } });
    drive(sim, ['hot'], 2, 50, () => 40);
    sim.events.add({
      type: 'plan_change',
      fingerprint: 'hot',
      summary: 'Index Scan using users_email_idx on users -> Seq Scan on users',
      objects: ['users', 'users_email_idx'],
    });
    drive(sim, ['hot'], 20, 50, () => 40);
    const incident = sim.incidents.list('active')[0];
    assert.ok(incident, 'incident opened');
    assert.equal(incident.attributed, true);
    assert.equal(incident.causes[0].type, 'plan_change');
    assert.equal(incident.causes[1].statement, 'DROP INDEX users_email_idx');
    assert.equal(incident.causes[1].relevant, true);
    assert.ok(!incident.causes.some((c) => c.summary.includes('audit')), 'an unrelated DDL is left out when a relevant one exists');
    assert.match(incident.summary, /plan changed Index Scan using users_email_idx on users -> Seq Scan on users, \d+ s after `DROP INDEX users_email_idx` was seen/);
  });
});
