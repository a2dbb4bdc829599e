// The client side of flood.test.ts, run as a child process so that the memory the
// test measures is pgwarden's, not the client's. Sends statement(i) for i in
// [0, count) over a few postgres.js connections, `inFlight` at a time (pipelined),
// and prints one JSON line per batch: {"sent": n}, then {"done": n, "seconds": s}.
//
// Usage: node --import tsx test/shapes/flood-client.ts URL COUNT CONNECTIONS IN_FLIGHT

import postgres from 'postgres';

/**
 * A distinct shape per i: the column reference changes the fingerprint (aliases
 * alone do not: libpg_query ignores them, so `select i as c_i` would be one shape).
 */
export const floodStatement = (i: number): string => `select c${i} from (select ${i} as c${i}) s`;

async function main(): Promise<void> {
  const [url, countText, connectionsText, inFlightText] = process.argv.slice(2);
  const count = Number(countText);
  const inFlight = Number(inFlightText);
  const sql = postgres(url, {
    max: Number(connectionsText),
    prepare: false,
    fetch_types: false,
    connect_timeout: 10,
    onnotice: () => undefined,
  });
  try {
    const started = performance.now();
    for (let from = 0; from < count; from += inFlight) {
      const batch: Promise<unknown>[] = [];
      for (let i = from; i < Math.min(from + inFlight, count); i++) batch.push(sql.unsafe(floodStatement(i)));
      await Promise.all(batch);
      process.stdout.write(`${JSON.stringify({ sent: Math.min(from + inFlight, count) })}\n`);
    }
    process.stdout.write(`${JSON.stringify({ done: count, seconds: (performance.now() - started) / 1000 })}\n`);
  } finally {
    await sql.end({ timeout: 5 });
  }
}

if (process.argv[1]?.endsWith('flood-client.ts')) {
  main().catch((err: Error) => {
    process.stderr.write(`flood client failed: ${err.stack ?? err.message}\n`);
    process.exit(1);
  });
}
