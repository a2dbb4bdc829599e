// Subscribes to the proxy's completion events: finds each statement's shape,
// records it in the registry, and writes the slow-query log line. Runs on the
// query path, so it only does cached lookups and counter updates.

import type { Logger } from 'pino';
import type { QueryCompletion, QueryObserver } from '../proxy/seam.ts';
import type { ShapeFinder, StatementShape } from './fingerprint.ts';
import type { ShapeRegistry, ShapeStats } from './registry.ts';

export interface CollectorOptions {
  /** Queries at least this slow get a log line; 0 logs every query. */
  readonly slowQueryMs: number;
  /** Put the statement's literal text in log lines (off by default: it may hold secrets). */
  readonly logQueryValues: boolean;
  readonly log: Logger;
}

/** Called after a statement is recorded, for modules that watch shapes (detector, plans). */
export type ShapeListener = (stats: ShapeStats, shape: StatementShape, completion: QueryCompletion) => void;

export class ShapeCollector {
  /** Statements seen and failed, for the proxy-level metrics. */
  queries = 0;
  readonly errorsByClass = new Map<string, number>();
  private readonly listeners: ShapeListener[] = [];

  constructor(
    private readonly finder: ShapeFinder,
    readonly registry: ShapeRegistry,
    private options: CollectorOptions,
  ) {}

  /** Applies reloaded settings (slow-query threshold, literal values in logs). */
  reconfigure(options: CollectorOptions): void {
    this.options = options;
  }

  onShape(listener: ShapeListener): void {
    this.listeners.push(listener);
  }

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
