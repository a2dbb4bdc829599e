// Walks a buffer that holds whole messages back to back (an extended-protocol
// group captured for reroute, a batch sent to a replica), in place: the cursor
// names each message's type and bounds, so no caller reads a header itself.
// Streams that arrive in reads of any size go through the Framer instead.

import { MESSAGE_HEADER_BYTES } from './constants.ts';
import { ProtocolError } from './frontend.ts';

export class MessageCursor {
  /** The current message: its type byte, and `buf[start, end)` is all of it, header included. */
  type = 0;
  start = 0;
  end = 0;

  constructor(private readonly buf: Buffer) {}

  /**
   * Moves to the next message; false once the buffer is used up. Throws a
   * ProtocolError when a length is invalid or a message runs past the buffer.
   */
  next(): boolean {
    const buf = this.buf;
    const start = this.end;
    if (start >= buf.length) return false;
    if (buf.length - start < MESSAGE_HEADER_BYTES) throw new ProtocolError('truncated message header');
    const length = buf.readInt32BE(start + 1);
    if (length < 4) throw new ProtocolError(`invalid message length ${length}`);
    const end = start + 1 + length;
    if (end > buf.length) throw new ProtocolError('truncated message');
    this.type = buf[start];
    this.start = start;
    this.end = end;
    return true;
  }
}

/** The first message of `type` in a buffer of whole messages (a view into it), or null. */
export function findMessage(messages: Buffer, type: number): Buffer | null {
  const cursor = new MessageCursor(messages);
  while (cursor.next()) if (cursor.type === type) return messages.subarray(cursor.start, cursor.end);
  return null;
}
