// What is still running: each session's statements that were forwarded and have not
// completed yet, and since when. Only finished calls reach the latency figures, so a
// shape whose every call waits on a lock would otherwise look idle rather than
// regressed; stuck statements are also the first evidence of a lock.
//
// Built on the gate seam without touching the session: the tracker wraps the gate,
// records a statement when the gate forwards it, and forgets it when the decision's
// `done` is called (the session calls it when the statement completes, and for
// every pending statement when the session ends). On the query path it stores two
// references and a number in a per-session ring; shapes are only looked up when
// someone asks who is stuck (every few seconds, for statements already old).
//
// With `--workers N` each worker runs its own tracker and sends report() with its
// summaries; the primary reads InFlightMerge, its own tracker plus the workers'
// latest reports, so a lock stalling a shape in any worker is seen where the
// detector runs.

import type { GateDecision, PreparedStatement, QueryGate, QueryRequest, SessionInfo } from '../proxy/seam.ts';
import { FORWARD } from '../proxy/seam.ts';
import type { ShapeFinder, StatementShape } from '../shapes/fingerprint.ts';
import type { DetectorOptions, Percentiles } from './detector.ts';

const RING = 64;
/** A session with nothing in flight for this long is forgotten (it is re-created if it queries again). */
const IDLE_FORGET_MS = 60_000;

/** Statements of one session awaiting their completion, oldest first. */
class SessionFlight {
  readonly texts: (string | null)[] = new Array(RING).fill(null);
  readonly statements: (PreparedStatement | null)[] = new Array(RING).fill(null);
  readonly since = new Float64Array(RING);
  head = 0;
  length = 0;
  lastActive: number;
  /**
   * The oldest statement's shape once looked up: a stuck statement is asked about at
   * every evaluation (and, in a cluster worker, every report), its text parsed once.
   */
  headShape: StatementShape | undefined = undefined;
  /** One decision object per session, so forwarding allocates nothing per query. */
  readonly decision: GateDecision;

  constructor(
    readonly sessionId: number,
    readonly user: string,
    readonly database: string,
    private readonly clock: () => number,
  ) {
    this.lastActive = clock();
    this.decision = Object.freeze({ action: 'forward', done: () => this.finish() });
  }

  start(text: string, statement: PreparedStatement | null, now: number): void {
    if (this.length === RING) this.finish(); // a pipeline deeper than the ring: the oldest is dropped
    const slot = (this.head + this.length) % RING;
    this.texts[slot] = text;
    this.statements[slot] = statement;
    this.since[slot] = now;
    this.length++;
    this.lastActive = now;
  }

  finish(): void {
    if (this.length === 0) return;
    this.texts[this.head] = null;
    this.statements[this.head] = null;
    this.headShape = undefined;
    this.head = (this.head + 1) % RING;
    this.length--;
    this.lastActive = this.clock();
  }
}

/** One statement in flight, as reported. */
export interface InFlightStatement {
  readonly session: number;
  /** The cluster worker running it (absent: this process). */
  readonly worker?: number;
  readonly user: string;
  readonly database: string;
  readonly fingerprint: string;
  /** Normalized text (no literal values). */
  readonly query: string;
  /** Epoch ms when the gate forwarded it. */
  readonly since: number;
  readonly ageMs: number;
}

/** One statement in flight in a cluster worker, as it reports it (its shape's text is in the report's `queries`). */
export interface ReportedStatement {
  readonly session: number;
  readonly user: string;
  readonly database: string;
  readonly fingerprint: string;
  readonly since: number;
}

/** A cluster worker's statements in flight, as sent to the primary (InFlightTracker.report). */
export interface InFlightReport {
  /** Statements in flight now per fingerprint, any age. */
  readonly counts: Readonly<Record<string, number>>;
  /** Those in flight for at least the report's minimum age, oldest first. */
  readonly statements: readonly ReportedStatement[];
  /** The normalized text of each fingerprint in `statements`. */
  readonly queries: Readonly<Record<string, string>>;
  /** Statements old enough but left out by the cap. */
  readonly omitted: number;
}

/** What the detector and the lock and saturation evidence read: statements in flight, wherever they run. */
export interface InFlightView {
  /** Statements in flight for at least `minAgeMs`, oldest first. */
  inFlight(minAgeMs?: number): InFlightStatement[];
  /** Per shape, its statements in flight for at least `minAgeMs`. */
  stuckByShape(minAgeMs: number): Map<string, StuckShape>;
  /** How many statements of each shape are in flight now (any age). */
  countsByShape(): Map<string, number>;
}

/** The stuck statements of one shape. */
export interface StuckShape {
  readonly fingerprint: string;
  readonly count: number;
  /** Epoch ms of the oldest. */
  readonly oldestSince: number;
  readonly ages: number[];
}

export class InFlightTracker implements QueryGate, InFlightView {
  private readonly sessions = new Map<number, SessionFlight>();
  private sweptAt = 0;

  constructor(
    private readonly inner: QueryGate,
    private readonly finder: ShapeFinder,
    private readonly now: () => number = Date.now,
  ) {}

  decide(request: QueryRequest): GateDecision | Promise<GateDecision> {
    const decision = this.inner.decide(request);
    // Parse is answered at once; only executions run.
    if (request.phase === 'parse' || request.session.replication) return decision;
    if (decision === FORWARD) return this.track(request.session, request.text, request.statement).decision;
    // The request object is reused by the session: keep what is needed past this call.
    const { session, text, statement } = request;
    if (decision instanceof Promise) return decision.then((settled) => this.wrap(settled, session, text, statement));
    return this.wrap(decision, session, text, statement);
  }

  private wrap(
    decision: GateDecision,
    session: SessionInfo,
    text: string,
    statement: PreparedStatement | null,
  ): GateDecision {
    if (decision === FORWARD) return this.track(session, text, statement).decision;
    if (decision.action !== 'forward') return decision; // refused or rerouted: not running here
    const flight = this.track(session, text, statement);
    const inner = decision.done;
    // Only under a shed rule: a closure per admitted execution is acceptable there.
    return {
      action: 'forward',
      done: () => {
        flight.finish();
        inner?.();
      },
    };
  }

  private track(session: SessionInfo, text: string, statement: PreparedStatement | null): SessionFlight {
    const now = this.now();
    let flight = this.sessions.get(session.id);
    if (flight === undefined) {
      flight = new SessionFlight(session.id, session.user, session.database, this.now);
      this.sessions.set(session.id, flight);
    }
    flight.start(text, statement, now);
    return flight;
  }

  /** Statements in flight for at least `minAgeMs`, oldest first. */
  inFlight(minAgeMs = 0): InFlightStatement[] {
    const now = this.now();
    this.sweep(now);
    const out: InFlightStatement[] = [];
    for (const flight of this.sessions.values()) {
      for (let i = 0; i < flight.length; i++) {
        const slot = (flight.head + i) % RING;
        const since = flight.since[slot];
        if (now - since < minAgeMs) break; // younger ones follow
        let shape = i === 0 ? flight.headShape : undefined;
        if (shape === undefined) {
          const statement = flight.statements[slot];
          shape =
            statement !== null
              ? this.finder.shapeOfStatement(statement)
              : this.finder.shapesOfText(flight.texts[slot] ?? '')[0];
          if (shape === undefined) continue;
          if (i === 0) flight.headShape = shape;
        }
        out.push({
          session: flight.sessionId,
          user: flight.user,
          database: flight.database,
          fingerprint: shape.fingerprint,
          query: shape.query,
          since,
          ageMs: now - since,
        });
      }
    }
    return out.sort((a, b) => a.since - b.since);
  }

  /** Per shape, its statements in flight for at least `minAgeMs`. */
  stuckByShape(minAgeMs: number): Map<string, StuckShape> {
    return stuckOf(this.inFlight(minAgeMs));
  }

  /** How many statements of each shape are in flight now (any age). */
  countsByShape(): Map<string, number> {
    return countsOf(this.inFlight(0));
  }

  /**
   * What a cluster worker sends the primary with each summary (see InFlightMerge):
   * the counts by shape of everything in flight, and the statements in flight for at
   * least `minAgeMs`, oldest first. Bounded: at most `maxStatements` statements (the
   * oldest: the most stuck; the rest only counted in `omitted`) and `maxShapes`
   * shapes counted (the most loaded). Shapes travel as fingerprint and normalized
   * text, never with literal values.
   */
  report(minAgeMs: number, maxStatements: number, maxShapes: number): InFlightReport {
    const all = this.inFlight(0);
    const counts = [...countsOf(all)].sort((a, b) => b[1] - a[1]).slice(0, maxShapes);
    const statements: ReportedStatement[] = [];
    const queries: Record<string, string> = {};
    let omitted = 0;
    for (const s of all) {
      if (s.ageMs < minAgeMs) break; // oldest first: the rest are younger
      if (statements.length === maxStatements) {
        omitted++;
        continue;
      }
      statements.push({
        session: s.session,
        user: s.user,
        database: s.database,
        fingerprint: s.fingerprint,
        since: s.since,
      });
      queries[s.fingerprint] = s.query;
    }
    return { counts: Object.fromEntries(counts), statements, queries, omitted };
  }

  private sweep(now: number): void {
    if (now - this.sweptAt < 10_000) return;
    this.sweptAt = now;
    for (const [id, flight] of this.sessions)
      if (flight.length === 0 && now - flight.lastActive > IDLE_FORGET_MS) this.sessions.delete(id);
  }
}

function stuckOf(statements: readonly InFlightStatement[]): Map<string, StuckShape> {
  const out = new Map<string, { fingerprint: string; count: number; oldestSince: number; ages: number[] }>();
  for (const s of statements) {
    let entry = out.get(s.fingerprint);
    if (entry === undefined) {
      entry = { fingerprint: s.fingerprint, count: 0, oldestSince: s.since, ages: [] };
      out.set(s.fingerprint, entry);
    }
    entry.count++;
    entry.oldestSince = Math.min(entry.oldestSince, s.since);
    entry.ages.push(s.ageMs);
  }
  return out;
}

function countsOf(statements: readonly InFlightStatement[]): Map<string, number> {
  const out = new Map<string, number>();
  for (const s of statements) out.set(s.fingerprint, (out.get(s.fingerprint) ?? 0) + 1);
  return out;
}

/**
 * One view over the statements in flight of this process and of every cluster
 * worker (with `--workers N` the statements run in the workers, the detector in the
 * primary). Keeps the latest report of each worker; a report older than `staleMs`
 * (a worker that stopped reporting: busy, hung or gone) counts for nothing, and
 * drop() forgets a worker that exited. Reports lag by up to one period, so a
 * statement that completed since still shows until the next one.
 *
 * Workers list only their statements older than the report's minimum age
 * (WorkerLink sends those of 750 ms and more, so everything of STUCK_MIN_MS is
 * there) and at most a capped number: inFlight() with a smaller minimum misses
 * their younger ones, which countsByShape() still counts.
 */
export class InFlightMerge implements InFlightView {
  private readonly reports = new Map<number, { report: InFlightReport; receivedAt: number }>();

  constructor(
    private readonly local: InFlightView | null,
    private readonly staleMs: number,
    private readonly now: () => number = Date.now,
  ) {}

  /** Replaces the report of `worker`. */
  set(worker: number, report: InFlightReport): void {
    this.reports.set(worker, { report, receivedAt: this.now() });
  }

  drop(worker: number): void {
    this.reports.delete(worker);
  }

  inFlight(minAgeMs = 0): InFlightStatement[] {
    const now = this.now();
    const out = this.local?.inFlight(minAgeMs) ?? [];
    for (const [worker, report] of this.fresh(now)) {
      for (const s of report.statements) {
        const ageMs = now - s.since;
        if (ageMs < minAgeMs) continue;
        const query = report.queries[s.fingerprint];
        if (typeof query !== 'string') continue; // a malformed report: no shape text, no statement
        out.push({ ...s, worker, query, ageMs });
      }
    }
    return out.sort((a, b) => a.since - b.since);
  }

  stuckByShape(minAgeMs: number): Map<string, StuckShape> {
    return stuckOf(this.inFlight(minAgeMs));
  }

  countsByShape(): Map<string, number> {
    const out = this.local?.countsByShape() ?? new Map<string, number>();
    for (const [, report] of this.fresh(this.now()))
      for (const [fingerprint, n] of Object.entries(report.counts))
        if (Number.isFinite(n)) out.set(fingerprint, (out.get(fingerprint) ?? 0) + n);
    return out;
  }

  /** The reports young enough to count, by worker; forgets the stale ones. */
  private *fresh(now: number): Generator<[number, InFlightReport]> {
    for (const [worker, entry] of this.reports) {
      if (now - entry.receivedAt > this.staleMs) this.reports.delete(worker);
      else yield [worker, entry.report];
    }
  }
}

/** Statements count as stuck past this age, whatever the baseline. */
export const STUCK_MIN_MS = 1000;
/** Stuck statements a shape needs before it counts as regressed. */
export const STUCK_MIN_COUNT = 2;

/** How old a statement of a shape with this baseline must be to count as stuck. */
export function stuckThresholdMs(baseline: Percentiles, options: DetectorOptions): number {
  return Math.max(STUCK_MIN_MS, baseline.p95_ms * options.p95Ratio * 3, baseline.p95_ms + options.absoluteMs * 10);
}

/**
 * The shape's stuck statements if they amount to a regression on their own (before
 * any of them completes), else null: at least STUCK_MIN_COUNT statements in flight
 * far longer than the baseline allows.
 */
export function stuckRegression(
  stuck: StuckShape | undefined,
  baseline: Percentiles,
  options: DetectorOptions,
): StuckShape | null {
  if (stuck === undefined) return null;
  const threshold = stuckThresholdMs(baseline, options);
  const ages = stuck.ages.filter((a) => a >= threshold);
  if (ages.length < STUCK_MIN_COUNT) return null;
  return { ...stuck, count: ages.length, ages };
}

/** The recent calls with the stuck statements added as calls lasting (at least) their age so far. */
export function withStuck(
  calls: { at: number[]; ms: number[] },
  stuck: StuckShape,
  now: number,
): { at: number[]; ms: number[] } {
  const pairs: [number, number][] = calls.at.map((t, i) => [t, calls.ms[i]]);
  for (const age of stuck.ages) pairs.push([now - age, age]);
  pairs.sort((a, b) => a[0] - b[0]);
  return { at: pairs.map((p) => p[0]), ms: pairs.map((p) => p[1]) };
}
