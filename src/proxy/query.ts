// The in-flight query: one Pending object carries a query from the message that
// started it (a Query, Parse or Execute) through the gate, the upstream (or a
// reroute target) and back to its completion event. The session keeps the ones
// the server still owes an answer for in a PendingQueue, oldest first, so that
// pipelined responses are matched to their queries; entries are recycled, so
// steady traffic allocates none.

import { performance } from 'node:perf_hooks';
import type { PreparedStatement, QueryCompletion, QueryRequest, SessionInfo } from './seam.ts';
import type { TransactionStatus } from '../protocol/constants.ts';

/** What the server owes for a Pending entry, and so which response ends it. */
export const Owed = {
  /** A Query: completions per statement, ends at ReadyForQuery. */
  Simple: 0,
  /** An Execute: ends at CommandComplete, EmptyQueryResponse, PortalSuspended or ErrorResponse. */
  Execute: 1,
  /** A Sync: ends at ReadyForQuery. */
  Sync: 2,
  /** A FunctionCall: ends at ReadyForQuery. */
  FunctionCall: 3,
  /** A refused Query: its ErrorResponse is replaced; ends at ReadyForQuery. */
  RefusedSimple: 4,
  /** A refused Parse or Execute: its ErrorResponse is replaced, and ends it. */
  RefusedExtended: 5,
  /** A Query the server will reject: ends at ReadyForQuery, recorded nowhere. */
  MalformedQuery: 6,
  /** An Execute the server will reject: ends at its ErrorResponse. */
  MalformedExecute: 7,
  /**
   * A Parse while the gate decides on it. A forwarded Parse is owed nothing of its
   * own (its statement runs with a later Execute), so it never enters the queue.
   */
  Parse: 8,
} as const;
export type Owed = (typeof Owed)[keyof typeof Owed];

export class Pending {
  kind: Owed = Owed.Simple;
  text = '';
  statement: PreparedStatement | null = null;
  /** The Bind message with the execution's parameters (a copy), for completion observers. */
  bind: Buffer | null = null;
  /** Which Bind of its prepared statement this execution is (1-based); 0 for a simple Query. */
  execution = 0;
  /** performance.now() when the message arrived; advanced per statement of a multi-statement Query. */
  mark = 0;
  statementIndex = 0;
  /** For a refused query: the ErrorResponse that replaces the server's, and its SQLSTATE. */
  refusal: Buffer | null = null;
  refusalCode: string | null = null;
  /** The gate's callback, called once when the query completes or the session ends. */
  done: (() => void) | null = null;
  /** Which upstream ran it: 'primary' unless rerouted. */
  upstream = 'primary';
  /** While the gate decides asynchronously: a copy of the message, to forward (or not) once it has. */
  held: Buffer | null = null;

  /** Whether the gate refused it: the error is pgwarden's own, not an execution. */
  get refused(): boolean {
    return this.kind === Owed.RefusedSimple || this.kind === Owed.RefusedExtended;
  }

  /** What the gate is asked about this query. */
  get phase(): QueryRequest['phase'] {
    return this.kind === Owed.Simple ? 'query' : this.kind === Owed.Parse ? 'parse' : 'execute';
  }
}

/** A FIFO of Pending entries that recycles them, so steady traffic allocates none. */
export class PendingQueue {
  private items: (Pending | undefined)[] = [];
  private head = 0;
  private readonly spare: Pending[] = [];

  get length(): number {
    return this.items.length - this.head;
  }

  /** A recycled entry for a query that is not (yet) owed anything: queue it with enqueue(), or release() it. */
  take(kind: Owed, mark: number): Pending {
    const entry = this.spare.pop() ?? new Pending();
    entry.kind = kind;
    entry.mark = mark;
    return entry;
  }

  enqueue(entry: Pending): void {
    this.items.push(entry);
  }

  /** take() and enqueue() in one. */
  add(kind: Owed, mark: number): Pending {
    const entry = this.take(kind, mark);
    this.items.push(entry);
    return entry;
  }

  peek(): Pending | undefined {
    return this.items[this.head];
  }

  /** Removes the oldest entry and recycles it. */
  shift(): void {
    const entry = this.items[this.head]!;
    this.items[this.head++] = undefined;
    if (this.head === this.items.length) {
      this.items.length = 0;
      this.head = 0;
    } else if (this.head > 1024 && this.head * 2 > this.items.length) {
      this.items.splice(0, this.head);
      this.head = 0;
    }
    this.release(entry);
  }

  /** Recycles an entry that is not in the queue. */
  release(entry: Pending): void {
    entry.text = '';
    entry.statement = null;
    entry.bind = null;
    entry.execution = 0;
    entry.statementIndex = 0;
    entry.refusal = null;
    entry.refusalCode = null;
    entry.done = null;
    entry.upstream = 'primary';
    entry.held = null;
    this.spare.push(entry);
  }
}

/** The completion event, one instance per session, refilled per statement (see QueryCompletion). */
export class MutableCompletion implements QueryCompletion {
  text = '';
  statement: PreparedStatement | null = null;
  statementIndex = 0;
  bind: Buffer | null = null;
  execution = 0;
  startedAt = 0;
  durationMs = 0;
  rows = 0;
  sqlstate: string | null = null;
  upstream = 'primary';
  refused = false;
  constructor(readonly session: SessionInfo) {}

  /** This completion as `query`'s, finished at `now` (performance.now()). */
  fill(query: Pending, now: number, rows: number, sqlstate: string | null): this {
    this.text = query.text;
    this.statement = query.statement;
    this.statementIndex = query.statementIndex;
    this.bind = query.bind;
    this.execution = query.execution;
    this.startedAt = performance.timeOrigin + query.mark;
    this.durationMs = now - query.mark;
    this.rows = rows;
    this.sqlstate = sqlstate;
    this.upstream = query.upstream;
    this.refused = query.refused;
    return this;
  }
}

/** The gate's question, one instance per session, refilled per query (see QueryRequest). */
export class MutableRequest implements QueryRequest {
  phase: QueryRequest['phase'] = 'query';
  text = '';
  statement: PreparedStatement | null = null;
  transactionStatus: TransactionStatus = 'I';
  pipelineBusy = false;
  constructor(readonly session: SessionInfo) {}

  /** This request as `query`'s. */
  fill(query: Pending, transactionStatus: TransactionStatus, pipelineBusy: boolean): this {
    this.phase = query.phase;
    this.text = query.text;
    this.statement = query.statement;
    this.transactionStatus = transactionStatus;
    this.pipelineBusy = pipelineBusy;
    return this;
  }
}
