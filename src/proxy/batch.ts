// One socket write per read. A read usually forwards as one chunk (the framer
// forwards runs of messages it does not change in one piece), but a read that
// holds a replaced or gathered message forwards several: the bytes before it,
// the replacement, the bytes after. Sent one by one those are one syscall (and
// one TCP segment for the peer to wake up for) each; held until the read is
// handled they go out together, one write for the first chunk alone and one
// writev (Node's corked write) for several.
//
// The batch spans one read callback and no more: chunks point into the shared
// read buffer, which the next read reuses, so holding them across reads (a batch
// per event-loop turn) would mean copying every chunk. strace shows the relay at
// one write per read already (2.00 reads and 2.00 writes per pgbench
// transaction, as PgBouncer's recvfrom/sendto), so the batch only changes the
// reads that split.

import type net from 'node:net';

export class WriteBatch {
  private held: Buffer | null = null;
  private corked = false;
  private open = false;

  /**
   * @param socket the socket written to (null: none yet, writes are dropped)
   * @param written told after each write that reached the socket whether it was flushed (false: wait for 'drain')
   */
  constructor(
    private readonly socket: () => net.Socket | null,
    private readonly written: (socket: net.Socket, flushed: boolean) => void,
  ) {}

  /** Holds writes from now until end(); called as a read starts being handled. */
  begin(): void {
    this.open = true;
  }

  write(bytes: Buffer): void {
    const socket = this.socket();
    if (socket === null) return;
    if (!this.open) {
      this.written(socket, socket.write(bytes));
      return;
    }
    if (this.held === null && !this.corked) {
      this.held = bytes; // valid until the read callback returns, when end() sends it
      return;
    }
    if (!this.corked) {
      socket.cork();
      this.corked = true;
      socket.write(this.held!);
      this.held = null;
    }
    socket.write(bytes);
  }

  /** Sends what the read held, in order; also before anything else is written outside the batch (an end). */
  end(): void {
    this.open = false;
    const socket = this.socket();
    if (this.corked) {
      this.corked = false;
      if (socket === null || socket.destroyed) return;
      socket.uncork();
      this.written(socket, !socket.writableNeedDrain);
      return;
    }
    const held = this.held;
    if (held === null) return;
    this.held = null;
    if (socket !== null && !socket.destroyed && !socket.writableEnded) this.written(socket, socket.write(held));
  }

  /** Sends what is held now and keeps batching: for a write that must not overtake it (a final message). */
  flush(): void {
    if (!this.open) return;
    this.end();
    this.open = true;
  }
}
