// Frames a byte stream into protocol messages by their 5-byte headers only
// (type byte + int32 length), so the proxy can forward each received chunk as it
// is. A handler sees only the message types it asked for; everything else is
// forwarded without being looked at. Messages the handler must read whole (a Query,
// an ErrorResponse) are gathered when a read splits them; all others stream
// through, so a 1 GB COPY or a huge DataRow is never buffered.

// Kinds and outcomes are small numbers on the hot path, branded so the compiler
// keeps them apart: a kind is never returned as an outcome, nor stored the other way.
declare const messageKind: unique symbol;
declare const outcome: unique symbol;
declare const kindTableBrand: unique symbol;

/** Per message type: what the handler needs. */
export type MessageKind = number & { readonly [messageKind]: true };
export const PASS = 0 as MessageKind; // not shown to the handler
export const WHOLE = 1 as MessageKind; // shown once complete (gathered if split across reads)
export const HEADER = 2 as MessageKind; // shown at its header; the body may not be in the buffer yet

/** What the handler did with a message. */
export type Outcome = number & { readonly [outcome]: true };
export const CONTINUE = 0 as Outcome; // forward it
export const SKIP = 1 as Outcome; // do not forward it (the handler wrote something else instead)
export const HOLD = 2 as Outcome; // stop here; the handler will call resume() later

/** The MessageKind of each of the 256 message type bytes, indexed by the type byte. */
export type KindTable = Uint8Array & { readonly [kindTableBrand]: true };

/**
 * A KindTable: `fallback` for every type byte, then each listed group of types set
 * to its kind (later groups win). Built once at module load, never per message.
 */
export function kindTable(fallback: MessageKind, ...groups: (readonly [readonly number[], MessageKind])[]): KindTable {
  const table = new Uint8Array(256).fill(fallback);
  for (const [types, kind] of groups) for (const t of types) table[t] = kind;
  return table as KindTable;
}

/** A copy of `base` with each listed group of types set to its kind. */
export function withKinds(base: KindTable, ...groups: (readonly [readonly number[], MessageKind])[]): KindTable {
  const table = Uint8Array.from(base);
  for (const [types, kind] of groups) for (const t of types) table[t] = kind;
  return table as KindTable;
}

export interface FrameHandler {
  /**
   * A message of a WHOLE or HEADER type. `buf[start]` is the type byte and `end` is
   * one past the message; for HEADER types `end` may lie beyond `buf`.
   */
  onMessage(type: number, buf: Buffer, start: number, end: number): Outcome;
  /** Bytes to pass on verbatim, in order. */
  onForward(bytes: Buffer): void;
  /** The stream is not valid protocol; nothing more will be framed. */
  onViolation(reason: string): void;
}

/** A module-local copy of MESSAGE_HEADER_BYTES (constants.ts): a plain const folds into the hot loop. */
const HEADER_BYTES = 5;

export class Framer {
  /** Bytes of a streamed (PASS or HEADER) message still to come. */
  private passRemaining = 0;
  /** A message, or just its header, split across reads. */
  private gathered: Buffer | null = null;
  private gatheredFill = 0;
  private gatheringHeader = false;
  /** Input that arrived while the handler held a message. */
  private held: Buffer[] | null = null;
  private stopped = false;
  private chunk: Buffer = Buffer.alloc(0);
  private runStart = 0;
  private messageStart = 0;

  constructor(
    private kinds: KindTable,
    private maxMessageLength: number,
    private readonly handler: FrameHandler,
  ) {}

  /**
   * Changes which message types the handler sees (from the next message on), and
   * optionally the largest message length accepted.
   */
  setKinds(kinds: KindTable, maxMessageLength = this.maxMessageLength): void {
    this.kinds = kinds;
    this.maxMessageLength = maxMessageLength;
  }

  get holding(): boolean {
    return this.held !== null;
  }

  /** Part of a streamed message has been forwarded and the rest has not arrived yet. */
  get midMessage(): boolean {
    return this.passRemaining > 0;
  }

  /** The input so far ends inside a message (forwarded in part, or being gathered). */
  get partial(): boolean {
    return this.passRemaining > 0 || this.gathered !== null;
  }

  push(data: Buffer): void {
    if (this.stopped) return;
    if (this.held !== null) {
      this.held.push(Buffer.from(data)); // callers may reuse `data` once push returns
      return;
    }
    this.chunk = data;
    this.runStart = 0;
    const n = data.length;
    let p = 0;
    while (p < n) {
      if (this.passRemaining > 0) {
        const take = Math.min(this.passRemaining, n - p);
        this.passRemaining -= take;
        p += take;
        continue;
      }
      if (this.gathered !== null) {
        p = this.gather(data, p);
        if (p < 0) return; // held or stopped
        continue;
      }
      if (n - p < HEADER_BYTES) {
        this.flushTo(p);
        this.startGathering(Buffer.allocUnsafe(HEADER_BYTES), data, p, true);
        return;
      }
      const type = data[p];
      const length = data.readInt32BE(p + 1);
      if (!this.validLength(length, p)) return;
      const end = p + 1 + length;
      const kind = this.kinds[type] as MessageKind;
      if (end <= n) {
        if (kind !== PASS) {
          this.messageStart = p;
          const outcome = this.handler.onMessage(type, data, p, end);
          if (this.stopped) return; // the handler ended the connection: nothing after this message counts
          if (outcome !== CONTINUE) {
            if (outcome === HOLD) {
              this.hold(data, end);
              return;
            }
            this.flushTo(p);
            this.runStart = end;
          }
        }
        p = end;
        continue;
      }
      // The message runs past this read.
      if (kind === WHOLE) {
        this.flushTo(p);
        this.startGathering(Buffer.allocUnsafe(1 + length), data, p, false);
        return;
      }
      if (kind === HEADER) {
        this.messageStart = p;
        this.handler.onMessage(type, data, p, end);
        if (this.stopped) return;
      }
      this.passRemaining = end - n;
      p = n;
    }
    this.flushTo(n);
  }

  /**
   * Forwards what precedes the message being handled, so that a handler that
   * writes a replacement keeps the stream's order.
   */
  flushPending(): void {
    this.flushTo(this.messageStart);
  }

  /** Continues after a HOLD, with the input that arrived meanwhile. */
  resume(): void {
    const chunks = this.held;
    if (chunks === null) return;
    this.held = null;
    for (let i = 0; i < chunks.length; i++) {
      const heldAgain = this.held as Buffer[] | null; // push() may hold again
      if (heldAgain !== null) {
        // Held again by a later message: keep the rest in order.
        for (let j = i; j < chunks.length; j++) heldAgain.push(chunks[j]);
        return;
      }
      if (this.stopped) return;
      this.push(chunks[i]);
    }
  }

  /**
   * Stops framing: the rest of the current input and all later input are dropped
   * (the connection is going away), even when called from inside a handler.
   */
  stop(): void {
    this.stopped = true;
    this.held = null;
    this.gathered = null;
  }

  private flushTo(position: number): void {
    if (position > this.runStart) {
      const chunk = this.chunk;
      this.handler.onForward(
        this.runStart === 0 && position === chunk.length ? chunk : chunk.subarray(this.runStart, position),
      );
    }
    this.runStart = position;
  }

  private hold(data: Buffer, resumeAt: number): void {
    this.flushTo(this.messageStart);
    this.held = resumeAt < data.length ? [Buffer.from(data.subarray(resumeAt))] : [];
  }

  private validLength(length: number, position: number): boolean {
    if (length >= 4 && length <= this.maxMessageLength) return true;
    this.flushTo(position);
    this.stopped = true;
    this.handler.onViolation(
      length < 4
        ? `invalid message length ${length}`
        : `message of ${length} bytes exceeds the limit of ${this.maxMessageLength}`,
    );
    return false;
  }

  private startGathering(target: Buffer, data: Buffer, from: number, headerOnly: boolean): void {
    const take = Math.min(target.length, data.length - from);
    data.copy(target, 0, from, from + take);
    this.gathered = target;
    this.gatheredFill = take;
    this.gatheringHeader = headerOnly;
    this.runStart = data.length;
  }

  /** Feeds a split message; returns the next position in `data`, or -1 to stop this read. */
  private gather(data: Buffer, p: number): number {
    const target = this.gathered!;
    const take = Math.min(target.length - this.gatheredFill, data.length - p);
    data.copy(target, this.gatheredFill, p, p + take);
    this.gatheredFill += take;
    p += take;
    this.runStart = p;
    if (this.gatheredFill < target.length) return p;
    this.gathered = null;
    this.messageStart = p; // nothing of this read precedes the gathered message
    const type = target[0];
    const length = target.readInt32BE(1);
    if (this.gatheringHeader) {
      if (!this.validLength(length, p)) return -1;
      const kind = this.kinds[type] as MessageKind;
      if (kind === WHOLE) {
        const whole = Buffer.allocUnsafe(1 + length);
        target.copy(whole, 0);
        this.gathered = whole;
        this.gatheredFill = HEADER_BYTES;
        this.gatheringHeader = false;
        return whole.length === HEADER_BYTES ? this.gather(data, p) : p;
      }
      if (kind === HEADER) this.handler.onMessage(type, target, 0, 1 + length);
      if (this.stopped) return -1;
      this.handler.onForward(target);
      this.passRemaining = 1 + length - HEADER_BYTES;
      return p;
    }
    // A whole message is complete: hand it over as a buffer of its own.
    const outcome = this.handler.onMessage(type, target, 0, target.length);
    if (this.stopped) return -1;
    if (outcome === CONTINUE) this.handler.onForward(target);
    else if (outcome === HOLD) {
      this.held = p < data.length ? [Buffer.from(data.subarray(p))] : [];
      return -1;
    }
    return p;
  }
}
