// Ending a client connection from pgwarden's side in bounded time, whatever the
// peer does. `end()` alone only half-closes: a peer that never closes its side (or
// keeps sending while its socket is paused) would keep the descriptor forever. So
// the last bytes (a FATAL ErrorResponse, or nothing) are written, whatever the peer
// still sends is read and dropped (unread input would make the kernel reset the
// connection before our message arrives), and the socket is destroyed once the peer
// closes or the linger time is over, whichever comes first.

import type net from 'node:net';

/** How long a closing connection may wait for the peer to read our last words. */
export const CLOSE_LINGER_MS = 2000;

/** Ends `socket` (after `lastBytes`, if any) and destroys it within `lingerMs`. */
export function closeClient(socket: net.Socket, lastBytes: Buffer | null = null, lingerMs = CLOSE_LINGER_MS): void {
  if (socket.destroyed) return;
  if (socket.writableEnded) {
    // Already ending (e.g. a second reason to close): only make sure it is bounded.
    armLinger(socket, lingerMs);
    return;
  }
  socket.removeAllListeners('data');
  socket.on('data', discard);
  if (lastBytes === null) socket.end();
  else socket.end(lastBytes);
  socket.resume();
  armLinger(socket, lingerMs);
}

const LINGER = Symbol('pgwarden.linger');

function armLinger(socket: net.Socket, lingerMs: number): void {
  const tagged = socket as net.Socket & { [LINGER]?: NodeJS.Timeout };
  if (tagged[LINGER] !== undefined) return;
  const timer = setTimeout(() => socket.destroy(), lingerMs);
  timer.unref();
  tagged[LINGER] = timer;
  socket.once('close', () => clearTimeout(timer));
}

function discard(): void {}
