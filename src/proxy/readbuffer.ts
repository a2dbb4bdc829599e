// Node offers `onread` (reading into a reusable buffer, no stream machinery per
// read) only for sockets it connects. An accepted plain TCP socket is re-created
// around the same handle with it, which saves the Readable bookkeeping on every
// client read. Relies on the socket's `_handle`, so anything unexpected (TLS, a
// Node without it) keeps the ordinary socket and its 'data' events.

import net from 'node:net';
import tls from 'node:tls';

export interface ReadBuffer {
  buffer: () => Uint8Array;
  callback: (bytesRead: number, buffer: Uint8Array) => boolean;
}

/**
 * The socket re-created with `onread`, plus any bytes the old one had already
 * read (to be handled first), or null when it must stay as it is. The new socket
 * starts paused: its owner resumes it when it can take input.
 */
export function withReadBuffer(
  socket: net.Socket,
  onread: ReadBuffer,
): { socket: net.Socket; pending: Buffer | null } | null {
  const internals = socket as unknown as { _handle?: { readStop?: () => number; reading?: boolean } | null };
  const handle = internals._handle;
  if (socket instanceof tls.TLSSocket || !handle || typeof handle.readStop !== 'function' || socket.destroyed)
    return null;
  if (handle.reading) {
    handle.readStop();
    handle.reading = false;
  }
  // Bytes already read into the old stream's buffer are handed over, not lost.
  const pending = socket.readableLength > 0 ? (socket.read() as Buffer | null) : null;
  internals._handle = null;
  // With no handle, destroy() only settles the old object (and the server's count).
  socket.destroy();
  return {
    socket: new net.Socket({
      handle,
      readable: true,
      writable: true,
      onread,
      pauseOnCreate: true,
    } as net.SocketConstructorOpts),
    pending,
  };
}

const READ_BUFFER_BYTES = 64 * 1024;

/**
 * One read buffer shared by every session for one direction. `onread` fills it
 * and the callback consumes it synchronously, so sessions can take turns with
 * it; only a write that did not complete at once still references it, and then
 * the next read goes to a fresh buffer. An idle session thus holds no buffer.
 */
export class SharedReadBuffer {
  private buffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
  private inUse = false;

  take(): Buffer {
    if (this.inUse) {
      this.buffer = Buffer.allocUnsafe(READ_BUFFER_BYTES);
      this.inUse = false;
    }
    return this.buffer;
  }

  /** A pending write still references the current buffer. */
  retain(): void {
    this.inUse = true;
  }
}
