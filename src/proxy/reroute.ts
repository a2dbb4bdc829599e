// Reroute: running one statement on another upstream (a replica) instead of the
// session's own. The session decides whether it may (the gate said so, nothing is
// in flight, no transaction is open) and holds its client input meanwhile; this
// module does the rest, behind RerouteHost:
//
// - GroupCapture collects an extended-protocol group up to its Sync and says
//   whether it has the one shape that can be rerouted (Parse, Bind, Describe,
//   Execute on unnamed objects, then Sync);
// - runRerouted streams the target's answer to the client, with the client's
//   backpressure, then ReadyForQuery; if the target fails before relaying
//   anything the statement runs on the primary instead, and if it fails
//   mid-answer the statement ends with an 08006 ErrorResponse.

import type net from 'node:net';
import type { Logger } from 'pino';
import { Frontend, SqlState } from '../protocol/constants.ts';
import { encodeErrorResponse, encodeReadyForQuery } from '../protocol/encode.ts';
import { decodeBindPortal, decodeBindStatement, decodeExecutePortal } from '../protocol/frontend.ts';
import type { Pending } from './query.ts';
import { RerouteInterrupted, type RerouteSink, type RerouteTarget } from './seam.ts';

/** What a reroute needs of its session. */
export interface RerouteHost {
  readonly sessionId: number;
  readonly database: string;
  readonly log: Logger;
  /** The client the answer streams to; its 'drain' and 'close' pace the target. */
  readonly client: net.Socket;
  /** The session has ended: the outcome is dropped. */
  ended(): boolean;
  /** Counts bytes the target relayed straight to the client. */
  countServerBytes(bytes: number): void;
  writeClient(bytes: Buffer): void;
  /** Publishes the query's completion (it ran on `query.upstream`) and recycles it. */
  complete(query: Pending, rows: number, sqlstate: string | null): void;
  /** The target could not take the statement: it runs on the primary instead, as the client sent it. */
  runOnPrimary(query: Pending, messages: Buffer): void;
  /** The reroute is over: the client's input is read again. */
  resumeInput(): void;
  /** A message was half-relayed when the target failed: the client's stream cannot go on, end it. */
  endClient(): void;
}

/** After a rerouted statement: the client's ReadyForQuery, with the primary's (idle) status. */
const READY_FOR_QUERY_IDLE = encodeReadyForQuery('I');

/**
 * Runs frontend messages (a simple Query, or a captured group) on `target`,
 * streaming its answer to the client; see the file header for how it ends.
 */
export function runRerouted(host: RerouteHost, target: RerouteTarget, query: Pending, messages: Buffer): void {
  const client = host.client;
  const sink: RerouteSink = {
    resumed: null,
    get closed() {
      return client.destroyed || client.writableEnded;
    },
    write: (bytes) => {
      if (client.destroyed) return false;
      host.countServerBytes(bytes.length);
      if (client.write(bytes)) return true;
      client.once('drain', wake);
      return false;
    },
  };
  // The target waits for this after a false write: on drain, or at once if the client goes.
  const wake = (): void => {
    client.off('drain', wake);
    sink.resumed?.();
  };
  client.once('close', wake);
  const resume = (): void => {
    client.off('close', wake);
    host.resumeInput();
  };
  target.run(messages, host.database, sink).then(
    (outcome) => {
      if (host.ended()) return;
      host.writeClient(READY_FOR_QUERY_IDLE);
      query.upstream = target.name;
      host.complete(query, outcome.rows, outcome.sqlstate);
      resume();
    },
    (err: Error) => {
      if (host.ended()) return;
      if (!(err instanceof RerouteInterrupted)) {
        host.log.warn({ err, session: host.sessionId, target: target.name }, 'reroute failed; running on the primary');
        host.runOnPrimary(query, messages);
        resume();
        return;
      }
      host.log.warn({ err, session: host.sessionId, target: target.name }, 'reroute target failed mid-answer');
      query.upstream = target.name;
      host.complete(query, 0, SqlState.ConnectionFailure);
      if (err.midMessage) {
        // Part of a message is out: nothing more can be framed by the client. Close.
        client.off('close', wake);
        host.endClient();
        return;
      }
      host.writeClient(
        encodeErrorResponse({
          severity: 'ERROR',
          code: SqlState.ConnectionFailure,
          message: `reroute target ${target.name} failed during the statement; the rest of its answer is lost`,
          detail: err.message,
          hint: 'The statement did not complete. It is safe to retry it; the session is still usable.',
        }),
      );
      host.writeClient(READY_FOR_QUERY_IDLE);
      resume();
    },
  );
}

/** What one more captured message means for the group. */
export type CaptureStep = 'more' | 'complete' | 'abandon';

/**
 * An extended-protocol group being collected, up to its Sync, to run on a reroute
 * target. Started by its Parse (of the unnamed statement), whose Pending it keeps.
 */
export class GroupCapture {
  private readonly messages: Buffer[];
  private executes = 0;

  constructor(
    readonly target: RerouteTarget,
    readonly query: Pending,
    parse: Buffer,
  ) {
    this.messages = [Buffer.from(parse)]; // the client's read buffer is not ours to keep
  }

  /**
   * Adds one client message (copied first, so an abandoned group holds it too).
   * Only the plain single-statement shape can be rerouted; anything else abandons
   * the group, which then goes to the primary as it came. May throw a
   * ProtocolError for a malformed message (abandon the group then, too).
   */
  add(type: number, buf: Buffer, start: number, end: number): CaptureStep {
    this.messages.push(Buffer.from(buf.subarray(start, end)));
    switch (type) {
      case Frontend.Bind:
        if (decodeBindPortal(buf, start, end) !== '' || decodeBindStatement(buf, start, end) !== '') return 'abandon';
        return 'more';
      case Frontend.Execute:
        if (decodeExecutePortal(buf, start, end) !== '' || ++this.executes > 1) return 'abandon';
        return 'more';
      case Frontend.Describe:
      case Frontend.Flush:
        return 'more';
      case Frontend.Sync:
        return 'complete';
      default:
        return 'abandon';
    }
  }

  /** The group's messages back to back, in the order they came. */
  group(): Buffer {
    return Buffer.concat(this.messages);
  }
}
