// The regression detector on simulated traffic with a fake clock: hours of noisy
// but healthy load in milliseconds of test time, over many random seeds.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import pino from 'pino';
import { ManualClock } from '../../src/clock.ts';
import { DEFAULT_DETECTOR_OPTIONS } from '../../src/detect/detector.ts';
import { EventLog } from '../../src/events/timeline.ts';
import { IncidentManager, type DetectorState, type DetectorStateStore } from '../../src/detect/incidents.ts';
import type { DdlCause } from '../../src/detect/record.ts';
import type { QueryCompletion, SessionInfo } from '../../src/proxy/seam.ts';
import type { StatementShape } from '../../src/shapes/fingerprint.ts';
import { ShapeRegistry } from '../../src/shapes/registry.ts';

const BUCKET_MS = 10_000;
const session: SessionInfo = {
  id: 1,
  user: 'app',
  database: 'shop',
  applicationName: 'web',
  clientAddress: '127.0.0.1:1',
  replication: false,
  settings: new Map(),
};

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
  readonly registry = new ShapeRegistry({
    maxShapes: 100,
    clock: this.clock,
    series: { bucketMs: BUCKET_MS, buckets: 360, sketchBuckets: 6 },
  });
  readonly events = new EventLog(this.clock);
  readonly incidents: IncidentManager;
  private nextEvaluation = this.clock.now() + 2000;

  constructor(readonly store: DetectorStateStore | null = null) {
    this.incidents = new IncidentManager({
      registry: this.registry,
      events: this.events,
      clock: this.clock,
      log: pino({ level: 'silent' }),
      detector: DEFAULT_DETECTOR_OPTIONS,
      bucketMs: BUCKET_MS,
      evaluateEveryMs: 2000,
      store,
    });
  }

  call(fingerprint: string, durationMs: number): void {
    const completion: QueryCompletion = {
      session,
      text: 'select 1',
      statement: null,
      statementIndex: 0,
      bind: null,
      execution: 0,
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
function drive(
  sim: Simulation,
  shapes: string[],
  seconds: number,
  rate: number,
  latency: (fp: string, t: number) => number,
): void {
  const step = 1000 / rate;
  for (let t = 0; t < seconds * 1000; t += step) {
    for (const fp of shapes) sim.call(fp, latency(fp, t));
    sim.advance(step);
  }
}

/** The details of a DDL event seen through the proxy (only the statement matters here). */
const ddlDetails = (statement: string) => ({
  command: statement.split(' ').slice(0, 2).join(' '),
  statement,
  user: 'app',
  database: 'shop', // the shapes' database: a change in another is no cause (scope.ts)
  application_name: '',
});

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
      assert.equal(
        sim.incidents.list().length,
        0,
        `seed ${seed} opened ${JSON.stringify(sim.incidents.list()[0]?.summary)}`,
      );
    }
  });

  test('a shape with thousands of calls in its first 20 s has a baseline: a regression then is detected', () => {
    const sim = new Simulation();
    drive(sim, ['a1'], 50, 50, (_fp, t) => (t < 20_000 ? 0.3 : 40));
    const incidents = sim.incidents.list();
    assert.equal(incidents.length, 1);
    assert.equal(incidents[0].baseline_from, 'recent_calls');
    assert.ok(incidents[0].baseline.p95_ms < 1, JSON.stringify(incidents[0].baseline));
  });

  test('a young shape with fewer calls than a baseline needs is not judged, however slow it gets', () => {
    const sim = new Simulation();
    drive(sim, ['a1'], 40, 4, (_fp, t) => (t < 20_000 ? 0.3 : 40));
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
    sim.events.add({
      type: 'ddl',
      summary: 'CREATE TABLE audit (id int)',
      objects: ['audit'],
      details: ddlDetails('CREATE TABLE audit (id int)'),
    });
    sim.events.add({
      type: 'ddl',
      summary: 'DROP INDEX users_email_idx',
      objects: ['users_email_idx'],
      details: ddlDetails('DROP INDEX users_email_idx'),
    });
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
    assert.equal((incident.causes[1] as DdlCause).statement, 'DROP INDEX users_email_idx');
    assert.equal(incident.causes[1].relevant, true);
    assert.ok(
      !incident.causes.some((c) => c.summary.includes('audit')),
      'an unrelated DDL is left out when a relevant one exists',
    );
    assert.match(
      incident.summary,
      /plan changed Index Scan using users_email_idx on users -> Seq Scan on users, \d+ s after `DROP INDEX users_email_idx` was seen/,
    );
  });

  test('a confirmed plan change and a p95 jump open the incident at the first evaluation', () => {
    const sim = new Simulation();
    drive(sim, ['hot'], 60, 50, () => 0.3);
    sim.events.add({
      type: 'plan_change',
      fingerprint: 'hot',
      summary: 'Index Scan using t_idx on t -> Seq Scan on t',
      objects: ['t', 't_idx'],
    });
    const flipAt = sim.clock.now();
    drive(sim, ['hot'], 2.5, 50, () => 40);
    const opened = sim.incidents.list('active');
    assert.equal(opened.length, 1, 'opened within one evaluation of the jump');
    assert.ok(Date.parse(opened[0].detected_at) - flipAt <= 2500);
  });

  test('a root whose plan changed and the shapes it slowed are one incident with victims', () => {
    const sim = new Simulation();
    const shapes = ['hot', 'v1', 'v2', 'v3', 'calm'];
    drive(sim, shapes, 60, 50, () => 1);
    sim.events.add({
      type: 'ddl',
      summary: 'DROP INDEX t_idx',
      objects: ['t_idx'],
      details: ddlDetails('DROP INDEX t_idx'),
    });
    sim.events.add({
      type: 'plan_change',
      fingerprint: 'hot',
      summary: 'Index Scan using t_idx on t -> Seq Scan on t',
      objects: ['t', 't_idx'],
    });
    drive(sim, shapes, 20, 50, (fp) => (fp === 'hot' ? 60 : fp === 'calm' ? 1 : 30));
    const all = sim.incidents.list();
    assert.equal(all.length, 1, all.map((i) => i.summary).join(' | '));
    const incident = all[0];
    assert.equal(incident.kind, 'shape');
    assert.equal(incident.root, 'hot');
    assert.equal(incident.fingerprint, 'hot');
    assert.deepEqual(incident.victims.map((v) => v.fingerprint).sort(), ['v1', 'v2', 'v3']);
    assert.equal(incident.impact.shapes, 4);
    assert.ok(incident.impact.share_of_calls >= 0.7, String(incident.impact.share_of_calls));
    assert.deepEqual(incident.impact.applications, ['web']);
    assert.equal(incident.attributed, true);
    assert.match(incident.summary, /3 other shapes slowed with it/);
    const types = sim.events.recent(50, { types: ['incident_opened'] });
    assert.equal(types.length, 1, 'one incident_opened event, not one per shape');
  });

  test('most shapes slowing together with no plan change is one database-wide incident', () => {
    const sim = new Simulation();
    const shapes = ['a', 'b', 'c', 'd'];
    drive(sim, shapes, 60, 50, () => 1);
    drive(sim, shapes, 20, 50, () => 30);
    const all = sim.incidents.list();
    assert.equal(all.length, 1, all.map((i) => i.summary).join(' | '));
    assert.equal(all[0].kind, 'database_wide');
    assert.equal(all[0].root, null);
    assert.equal(all[0].victims.length, 4);
    assert.match(all[0].summary, /database-wide slowdown: 4 of 4 shapes slowed together/);
    drive(sim, shapes, 30, 50, () => 1);
    assert.equal(sim.incidents.list('active').length, 0, 'resolves when the shapes recover');
  });

  test('a resolved incident keeps its peak, its causes as attributed, and the fix as its resolution', () => {
    const sim = new Simulation();
    drive(sim, ['hot'], 60, 50, () => 0.3);
    sim.events.add({
      type: 'ddl',
      summary: 'DROP INDEX t_idx',
      objects: ['t_idx', 't'],
      details: ddlDetails('DROP INDEX t_idx'),
    });
    sim.events.add({
      type: 'plan_change',
      fingerprint: 'hot',
      summary: 'Index Scan using t_idx on t -> Seq Scan on t',
      objects: ['t', 't_idx'],
    });
    drive(sim, ['hot'], 10, 50, (_fp, t) => (t < 5000 ? 400 : 40));
    const incident = sim.incidents.list('active')[0];
    assert.ok(incident?.attributed, 'attributed');
    const causes = JSON.stringify(incident.causes);
    sim.events.add({
      type: 'ddl',
      summary: 'CREATE INDEX t_idx ON t (email)',
      objects: ['t_idx', 't'],
      details: ddlDetails('CREATE INDEX t_idx ON t (email)'),
    });
    sim.events.add({
      type: 'plan_change',
      fingerprint: 'hot',
      summary: 'Seq Scan on t -> Index Scan using t_idx on t',
      objects: ['t', 't_idx'],
    });
    drive(sim, ['hot'], 20, 50, () => 0.3);
    const resolved = sim.incidents.get(incident.id)!;
    assert.equal(resolved.status, 'resolved');
    assert.ok(resolved.peak.p95_ms >= 300, `peak ${resolved.peak.p95_ms}`);
    assert.equal(JSON.stringify(resolved.causes), causes, 'causes frozen at attribution');
    assert.ok(
      resolved.causes.every((c) => c.seconds_before_onset >= 0 || c.kind === 'plan_change'),
      'no cause after the onset but the plan change',
    );
    assert.equal(resolved.resolution?.reason, 'recovered');
    assert.deepEqual(
      resolved.resolution?.events.map((e) => e.type),
      ['ddl', 'plan_change'],
    );
    assert.match(resolved.resolution!.summary, /CREATE INDEX t_idx/);
    assert.deepEqual(
      resolved.timeline.map((t) => t.what).filter((w) => w !== 'peak'),
      ['onset', 'detected', 'attributed', 'change', 'change', 'resolved'],
    );
  });

  test('a catalog change found after the onset but possibly made before it reads "between", never "after the onset"', () => {
    const sim = new Simulation();
    drive(sim, ['hot'], 60, 50, () => 0.3);
    const before = sim.clock.now() - 1000;
    drive(sim, ['hot'], 3, 50, () => 40);
    // The watch saw it 3 s after the slowdown began; its previous check was 1 s before.
    sim.events.add({
      type: 'schema_change',
      summary: 'index t_idx on public.t dropped',
      objects: ['t_idx', 't'],
      details: { since: before, kind: 'index_dropped', database: 'shop' },
    });
    sim.events.add({
      type: 'plan_change',
      fingerprint: 'hot',
      summary: 'Index Scan using t_idx on t -> Seq Scan on t',
      objects: ['t', 't_idx'],
    });
    drive(sim, ['hot'], 4, 50, () => 40);
    const incident = sim.incidents.list('active')[0];
    assert.ok(incident?.attributed, 'attributed');
    const schema = incident.causes.find((c) => c.kind === 'schema_change');
    assert.ok(schema && schema.kind === 'schema_change');
    assert.equal(schema.seconds_before_onset, 0, 'the window holds the onset');
    assert.equal(Date.parse(schema.between.from), before);
    assert.match(
      incident.summary,
      /the catalog showed: index t_idx on public.t dropped, between [\d:.]+ and [\d:.]+ UTC \(around the onset/,
    );
    assert.doesNotMatch(incident.summary, /after the onset/);
  });

  test('baselines saved at stop are used after a restart, before any new history', async () => {
    let saved: DetectorState | null = null;
    const store: DetectorStateStore = {
      loadDetectorState: async () => saved,
      saveDetectorState: async (s) => void (saved = s),
    };
    const first = new Simulation(store);
    drive(first, ['hot'], 90, 50, () => 0.3);
    await first.incidents.save();
    assert.equal(saved!.baselines.length, 1);
    const second = new Simulation(store);
    second.clock.set(first.clock.now() + 5000);
    await second.incidents.restore();
    drive(second, ['hot'], 3, 50, () => 0.3);
    drive(second, ['hot'], 15, 50, () => 40);
    const incident = second.incidents.list()[0];
    assert.ok(incident, 'a regression in the first seconds after the restart is judged');
    assert.equal(incident.baseline_from, 'restored');
  });

  test("a database-wide incident whose busiest shape turns out to have changed plan becomes that root's incident", () => {
    const sim = new Simulation();
    const shapes = ['a', 'b', 'c', 'd'];
    drive(sim, shapes, 60, 50, () => 1);
    drive(sim, shapes, 14, 50, () => 30);
    const wide = sim.incidents.list('active');
    assert.equal(wide.length, 1);
    assert.equal(wide[0].kind, 'database_wide');
    sim.events.add({
      type: 'plan_change',
      fingerprint: 'a',
      summary: 'Index Scan using t_idx on t -> Seq Scan on t',
      objects: ['t', 't_idx'],
    });
    drive(sim, shapes, 4, 50, (fp) => (fp === 'a' ? 60 : 30));
    const all = sim.incidents.list();
    assert.equal(all.length, 1, 'still one incident');
    assert.equal(all[0].id, wide[0].id);
    assert.equal(all[0].kind, 'shape');
    assert.equal(all[0].root, 'a');
    assert.deepEqual(all[0].victims.map((v) => v.fingerprint).sort(), ['b', 'c', 'd']);
  });
});
