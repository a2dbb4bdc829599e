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
  /** Per stream: [finished at (epoch ms), duration ms] of each successful call. */
  readonly latencies: [number, number][][];
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
  const latencies: [number, number][][] = streams.map(() => []);
  const loops = streams.map(async (stream, index) => {
    const client = clients[index];
    for (let i = 0; running; i++) {
      const { text, values } = stream.next(i);
      const started = performance.now();
      try {
        await client.query(text, values);
        calls[index]++;
        if (latencies[index].length < 200_000) latencies[index].push([Date.now(), performance.now() - started]);
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
    latencies,
    errors,
    lastError,
    async stop() {
      running = false;
      await Promise.all(loops);
      await Promise.all(clients.map((c) => c.end().catch(() => undefined)));
    },
  };
}

/** The p95 of one stream's call durations that finished between `from` and `to` (epoch ms). */
export function p95Between(latencies: [number, number][], from: number, to: number): number {
  const durations = latencies
    .filter(([at]) => at >= from && at <= to)
    .map(([, ms]) => ms)
    .sort((a, b) => a - b);
  if (durations.length === 0) return NaN;
  return durations[Math.min(durations.length - 1, Math.ceil(0.95 * durations.length) - 1)];
}
