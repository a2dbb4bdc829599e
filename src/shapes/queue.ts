// Takes the statistics off the relay's critical path. The proxy reports a
// completion while it is still handling the server's answer, before relaying it;
// a CompletionQueue copies the completion into a reused record and hands the batch
// to its sink on setImmediate, after the event loop's I/O callbacks of this turn
// (the relay's writes among them), so the client's answer does not wait for the
// shape lookup and the bookkeeping. Nothing is allocated once the records exist:
// the strings, the Bind copy and the session are shared, not copied.

import type { QueryCompletion, QueryObserver } from '../proxy/seam.ts';

/** Completions queued at most before the queue is handed over at once (bounds its memory). */
const MAX_QUEUED = 4096;

type MutableCompletion = { -readonly [K in keyof QueryCompletion]: QueryCompletion[K] };

export class CompletionQueue {
  /** Copies of the completions not yet handed over: reused records, records[0, queued). */
  private readonly records: MutableCompletion[] = [];
  private queued = 0;
  private scheduled = false;

  /**
   * `sink` gets each completion in order (valid during the call only, like the
   * proxy's); `onError` hears of a sink that throws, which loses only that one.
   */
  constructor(
    private readonly sink: QueryObserver,
    private readonly onError: (err: unknown) => void,
  ) {}

  /** What the proxy calls. */
  readonly observe: QueryObserver = (c) => {
    if (this.queued === MAX_QUEUED) this.flush();
    let r = this.records[this.queued];
    if (r === undefined) {
      r = { ...c }; // every field of QueryCompletion: the branch below must copy each of them too
      this.records.push(r);
    } else {
      r.session = c.session;
      r.text = c.text;
      r.statement = c.statement;
      r.statementIndex = c.statementIndex;
      r.bind = c.bind;
      r.execution = c.execution;
      r.startedAt = c.startedAt;
      r.durationMs = c.durationMs;
      r.rows = c.rows;
      r.sqlstate = c.sqlstate;
      r.upstream = c.upstream;
      r.refused = c.refused;
    }
    this.queued++;
    if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(this.flush);
    }
  };

  /** Hands every queued completion to the sink now, oldest first (before reading or sending statistics). */
  readonly flush = (): void => {
    this.scheduled = false;
    const n = this.queued;
    this.queued = 0;
    for (let i = 0; i < n; i++) {
      const r = this.records[i];
      try {
        this.sink(r);
      } catch (err) {
        this.onError(err);
      }
      // An idle record keeps no text or Bind alive.
      r.text = '';
      r.statement = null;
      r.bind = null;
    }
  };
}
