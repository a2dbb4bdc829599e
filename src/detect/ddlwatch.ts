// DDL seen through the proxy: every successful schema-changing statement becomes
// a 'ddl' event on the timeline (with the objects it touches, from the parse
// tree), and shapes whose plans touch those objects are re-explained at once.

import type { PlanSampler } from '../plans/sampler.ts';
import type { QueryCompletion } from '../proxy/seam.ts';
import type { StatementShape } from '../shapes/fingerprint.ts';
import type { ShapeStats } from '../shapes/registry.ts';
import { redactLiterals } from '../shapes/sqlscan.ts';
import { ddlChangesOf } from './ddl.ts';
import type { EventLog } from '../events/timeline.ts';

/** Commands that change the schema: each successful one is an event. */
export const DDL_COMMANDS: ReadonlySet<string> = new Set(['CREATE', 'DROP', 'ALTER', 'TRUNCATE', 'REINDEX', 'COMMENT']);

export class DdlWatch {
  /** The text last examined: later statements of the same multi-statement Query are not parsed again. */
  private lastText: string | null = null;

  constructor(
    private readonly events: EventLog,
    private readonly sampler: PlanSampler | null,
  ) {}

  readonly observe = (_stats: ShapeStats, shape: StatementShape, c: QueryCompletion): void => {
    if (c.sqlstate !== null || !DDL_COMMANDS.has(shape.command)) return;
    const text = c.statement?.text ?? c.text;
    if (c.statementIndex > 0 && text === this.lastText) return;
    this.lastText = text;
    for (const change of ddlChangesOf(text)) {
      // DDL keeps its constants after normalization (DEFAULT 'x', WHERE status = 'y'): blank them.
      const statement = redactLiterals(change.statement) ?? change.command;
      this.events.add({
        type: 'ddl',
        summary: statement,
        objects: change.objects,
        details: {
          command: change.command,
          statement,
          user: c.session.user,
          database: c.session.database,
          application_name: c.session.applicationName,
        },
      });
      this.sampler?.resampleTouching(change.objects);
    }
  };
}
