// Subscribes to the proxy's completion events: finds each statement's shape,
// records it in the registry, and writes the slow-query log line. The proxy's
// events are queued (`deferred`, see queue.ts) and recorded in a batch once the
// event loop has done its I/O; the work itself is cached lookups and counter updates.

import type { Logger } from 'pino';
import type { QueryCompletion, QueryObserver } from '../proxy/seam.ts';
import type { ShapeFinder, StatementShape } from './fingerprint.ts';
import { OVERFLOW_FINGERPRINT, type ShapeRegistry, type ShapeStats } from './registry.ts';
import { completionOfExemplar, sketchFromJson, type ShapeSummary } from './summary.ts';
import { CompletionQueue } from './queue.ts';

export interface CollectorOptions {
  /** Queries at least this slow get a log line; 0 logs every query. */
  readonly slowQueryMs: number;
  /** Put the statement's literal text in log lines (off by default: it may hold secrets). */
  readonly logQueryValues: boolean;
  readonly log: Logger;
}

/** Called after a statement is recorded, for modules that watch shapes (detector, plans). */
export type ShapeListener = (stats: ShapeStats, shape: StatementShape, completion: QueryCompletion) => void;

/**
 * What a listener needs when statistics arrive as summaries from proxy workers
 * (ingest) instead of one completion at a time: 'statements' listeners get the
 * executions copied out whole (exemplars: at most about one per shape and second
 * per worker, and every DDL); 'latencies' listeners get one completion per recent
 * latency, without text or parameters. With the proxy in-process, every listener
 * gets every completion.
 */
export type ListenerNeeds = 'statements' | 'latencies';

export class ShapeCollector {
  /** Statements seen and failed, for the proxy-level metrics. */
  queries = 0;
  readonly errorsByClass = new Map<string, number>();
  private readonly listeners: ShapeListener[] = [];
  private readonly statementListeners: ShapeListener[] = [];
  private readonly latencyListeners: ShapeListener[] = [];
  /** Reused for the latencies replayed by ingest (listeners copy what they keep). */
  private readonly replayed = {
    session: {
      id: -1,
      user: '',
      database: '',
      applicationName: '',
      clientAddress: '',
      replication: false,
      settings: new Map(),
    },
    text: '',
    statement: null,
    statementIndex: 0,
    bind: null,
    execution: 0,
    startedAt: 0,
    durationMs: 0,
    rows: 0,
    sqlstate: null,
    upstream: 'primary',
    refused: false,
  } satisfies QueryCompletion as { -readonly [K in keyof QueryCompletion]: QueryCompletion[K] };

  private readonly queue = new CompletionQueue(
    (c) => this.observe(c),
    (err) => this.options.log.error({ err }, 'recording a statement failed'),
  );

  constructor(
    private readonly finder: ShapeFinder,
    readonly registry: ShapeRegistry,
    private options: CollectorOptions,
  ) {}

  /** Applies reloaded settings (slow-query threshold, literal values in logs). */
  reconfigure(options: CollectorOptions): void {
    this.options = options;
  }

  onShape(listener: ShapeListener, needs: ListenerNeeds = 'statements'): void {
    this.listeners.push(listener);
    (needs === 'statements' ? this.statementListeners : this.latencyListeners).push(listener);
  }

  /** Records a summary of calls proxied elsewhere (a worker's window) and replays it to the listeners. */
  ingest(summary: ShapeSummary): ShapeStats {
    this.queries += summary.calls;
    for (const [errorClass, n] of Object.entries(summary.errorsByClass))
      this.errorsByClass.set(errorClass, (this.errorsByClass.get(errorClass) ?? 0) + n);
    const stats = this.registry.ingest(summary, summary.sketch === null ? null : sketchFromJson(summary.sketch));
    // The overflow shape is a sum of many shapes: counted, never explained or judged.
    if (summary.fingerprint === OVERFLOW_FINGERPRINT) return stats;
    const shape: StatementShape = {
      fingerprint: summary.fingerprint,
      query: summary.query,
      command: summary.command,
      fallback: summary.fallback,
      kind: summary.kind,
      control: summary.control,
    };
    for (const exemplar of summary.exemplars) {
      const c = completionOfExemplar(exemplar);
      for (let i = 0; i < this.statementListeners.length; i++) this.statementListeners[i](stats, shape, c);
    }
    if (this.latencyListeners.length > 0 && summary.recent.length > 0) {
      const c = this.replayed;
      c.text = summary.query;
      for (const ms of summary.recent) {
        c.durationMs = ms;
        for (let i = 0; i < this.latencyListeners.length; i++) this.latencyListeners[i](stats, shape, c);
      }
    }
    return stats;
  }

  /** What the proxy calls: completions queued and recorded in a batch after this turn's I/O (see queue.ts). */
  get deferred(): QueryObserver {
    return this.queue.observe;
  }

  /** Records what is queued now. */
  drain(): void {
    this.queue.flush();
  }

  /** Records one completion now (the queue is for the proxy; tests and ingest call this directly). */
  readonly observe: QueryObserver = (c) => {
    if (c.session.replication) return; // replication commands are not SQL shapes
    this.queries++;
    if (c.sqlstate !== null) {
      const errorClass = c.sqlstate.slice(0, 2);
      this.errorsByClass.set(errorClass, (this.errorsByClass.get(errorClass) ?? 0) + 1);
    }
    const shape = this.shapeOf(c);
    const stats = this.registry.record(shape, c);
    if (c.durationMs >= this.options.slowQueryMs) this.logSlow(shape, c);
    for (let i = 0; i < this.listeners.length; i++) this.listeners[i](stats, shape, c);
  };

  shapeOf(c: QueryCompletion): StatementShape {
    if (c.statement !== null) return this.finder.shapeOfStatement(c.statement);
    const shapes = this.finder.shapesOfText(c.text);
    return shapes[Math.min(c.statementIndex, shapes.length - 1)];
  }

  private logSlow(shape: StatementShape, c: QueryCompletion): void {
    this.options.log.info(
      {
        fingerprint: shape.fingerprint,
        query: shape.query,
        ...(this.options.logQueryValues ? { text: c.text } : {}),
        duration_ms: Math.round(c.durationMs * 1000) / 1000,
        rows: c.rows,
        sqlstate: c.sqlstate,
        user: c.session.user,
        database: c.session.database,
        application_name: c.session.applicationName,
        client: c.session.clientAddress,
      },
      'slow query',
    );
  }
}
