// The narrow seam between the proxy and everything built on it. The proxy publishes
// one QueryCompletion per finished statement and asks a QueryGate before forwarding
// each query; it knows nothing else about shapes, plans or rules.

import type { TransactionStatus } from '../protocol/constants.ts';
import type { ErrorFields } from '../protocol/encode.ts';

/** Who is on the other end of a session, as the startup packet and server told us. */
export interface SessionInfo {
  readonly id: number;
  readonly user: string;
  readonly database: string;
  /** Tracks ParameterStatus, so a later `SET application_name` is reflected. */
  readonly applicationName: string;
  readonly clientAddress: string;
  /** A replication connection: its queries are replication commands, not SQL. */
  readonly replication: boolean;
  /**
   * Session-level settings known to the proxy: from the startup packet (parameters
   * and `-c` options), and search_path as the server reports it (ParameterStatus,
   * PostgreSQL 18+). Names are lower-case.
   */
  readonly settings: ReadonlyMap<string, string>;
}

/** A prepared statement as the client created it with Parse. */
export interface PreparedStatement {
  readonly name: string;
  readonly text: string;
  /** Parameter type OIDs declared in Parse (0 = let the server infer). */
  readonly paramTypes: readonly number[];
}

/**
 * One finished statement. The proxy reuses a single instance per session, so a
 * subscriber must copy what it keeps: the object is only valid during the call.
 */
export interface QueryCompletion {
  readonly session: SessionInfo;
  /** The statement text: the simple Query string, or the prepared statement's text. */
  readonly text: string;
  /** The prepared statement executed (extended protocol), or null for a simple Query. */
  readonly statement: PreparedStatement | null;
  /** Which statement of a multi-statement simple Query this is (0-based). */
  readonly statementIndex: number;
  /**
   * The raw Bind message carrying this execution's parameters (decode with
   * decodeBindParameters). Kept in memory only, never logged or stored by the proxy.
   */
  readonly bind: Buffer | null;
  /**
   * Which Bind of its prepared statement (in this session, since its Parse) this
   * execution was, 1-based; 0 for a simple Query. PostgreSQL's plan cache decides
   * between a custom and the generic plan by it (custom for the first five).
   */
  readonly execution: number;
  /** Epoch milliseconds when the query message reached the proxy. */
  readonly startedAt: number;
  /** From the query message reaching the proxy to its completion passing back through. */
  readonly durationMs: number;
  /** Rows from CommandComplete (or DataRows counted for a suspended portal). */
  readonly rows: number;
  /** SQLSTATE of the error that ended the statement, or null on success. */
  readonly sqlstate: string | null;
  /** Name of the upstream that ran it: 'primary' unless the gate rerouted it. */
  readonly upstream: string;
  /** Refused by the gate (the error is pgwarden's own): not an execution, so no latency sample. */
  readonly refused: boolean;
}

export type QueryObserver = (completion: QueryCompletion) => void;

/** What the gate is asked about, also reused per session: valid during the call only. */
export interface QueryRequest {
  readonly session: SessionInfo;
  /** 'query' for a simple Query, 'parse' for Parse, 'execute' for Execute. */
  readonly phase: 'query' | 'parse' | 'execute';
  readonly text: string;
  readonly statement: PreparedStatement | null;
  /** The server's transaction status from its last ReadyForQuery: 'I', 'T' or 'E'. */
  readonly transactionStatus: TransactionStatus;
  /** Whether earlier messages of this session still await their responses. */
  readonly pipelineBusy: boolean;
}

/**
 * Where a rerouted statement's answer goes: the session's client. Backend messages
 * arrive in order; a message may be split across writes, as on any relay.
 */
export interface RerouteSink {
  /** Relays bytes; false: the client is not keeping up, pause until `resumed` is called. */
  write(bytes: Buffer): boolean;
  /** The client has gone: stop, nobody reads the rest. */
  readonly closed: boolean;
  /** Set by the target while it is paused; called by the session when the client drains or closes. */
  resumed: (() => void) | null;
}

/** How a rerouted statement ended, for its QueryCompletion. */
export interface RerouteOutcome {
  /** Rows from the last CommandComplete. */
  readonly rows: number;
  /** SQLSTATE of the last ErrorResponse relayed, or null. */
  readonly sqlstate: string | null;
}

/** A rerouted run failed after part of its answer was relayed: it cannot be run on the primary instead. */
export class RerouteInterrupted extends Error {
  constructor(
    message: string,
    /** The failure left a message half-relayed: the client's protocol stream cannot be continued. */
    readonly midMessage: boolean,
    options?: ErrorOptions,
  ) {
    super(message, options);
    this.name = 'RerouteInterrupted';
  }
}

/** Where a rerouted statement is run and its responses produced. */
export interface RerouteTarget {
  readonly name: string;
  /**
   * Runs frontend messages elsewhere (a simple Query, or an extended-protocol group
   * ending with Sync) and streams the backend messages to `sink`, up to but
   * excluding the final ReadyForQuery, honouring the sink's backpressure. Rejects
   * with RerouteInterrupted once something was relayed; any other rejection means
   * nothing was, and the statement may run on the primary instead.
   */
  run(messages: Buffer, database: string, sink: RerouteSink): Promise<RerouteOutcome>;
}

export type GateDecision =
  /** `done` is called once when the statement completes or the session ends (e.g. to free a slot). */
  | { readonly action: 'forward'; readonly done?: () => void }
  | { readonly action: 'refuse'; readonly error: ErrorFields }
  | { readonly action: 'reroute'; readonly target: RerouteTarget };

/** The one forward decision, compared by identity on the hot path. */
export const FORWARD: GateDecision = Object.freeze({ action: 'forward' });

/**
 * Decides what happens to a query before it is forwarded. A Promise holds the
 * session's input (not other sessions) until it settles, e.g. while queueing for a
 * concurrency slot.
 */
export interface QueryGate {
  decide(request: QueryRequest): GateDecision | Promise<GateDecision>;
}

/** The gate used when nothing is configured: every query is forwarded. */
export const OPEN_GATE: QueryGate = { decide: () => FORWARD };
