// A mixed client workload for integration tests: each stream is a connection that
// runs its statement in a loop until stopped, pacing itself if asked.

import pg from 'pg';

export interface Stream {
  /** The statement and its parameters for the i-th call. */
  next(i: number): { text: string; values?: unknown[] };
  /** Minimum milliseconds between calls (0: back to back). */
  pauseMs?: number;
}

export interface RunningWorkload {
  /** Calls completed and failed, per stream index. */
  readonly calls: number[];
  readonly errors: number[];
  readonly lastError: (string | null)[];
  stop(): Promise<void>;
}

export async function startWorkload(url: string, streams: Stream[]): Promise<RunningWorkload> {
  const clients = await Promise.all(
    streams.map(async () => {
      const client = new pg.Client({ connectionString: url, application_name: 'pgwarden-test-workload' });
      client.on('error', () => undefined); // a dropped connection ends its loop below
      await client.connect();
      return client;
    }),
  );
  let running = true;
  const calls = streams.map(() => 0);
  const errors = streams.map(() => 0);
  const lastError: (string | null)[] = streams.map(() => null);
  const loops = streams.map(async (stream, index) => {
    const client = clients[index];
    for (let i = 0; running; i++) {
      const { text, values } = stream.next(i);
      try {
        await client.query(text, values);
        calls[index]++;
      } catch (err) {
        errors[index]++;
        lastError[index] = (err as Error).message;
        if ((err as Error).message.includes('Connection terminated')) return;
      }
      if (stream.pauseMs) await new Promise((resolve) => setTimeout(resolve, stream.pauseMs));
    }
  });
  return {
    calls,
    errors,
    lastError,
    async stop() {
      running = false;
      await Promise.all(loops);
      await Promise.all(clients.map((c) => c.end().catch(() => undefined)));
    },
  };
}
