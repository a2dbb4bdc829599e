// A monitoring pool on the test database for tests of what runs on it (EXPLAIN,
// prepared-statement replays). One connection: whatever one test leaves on it (an
// open transaction, a prepared statement) is seen by the next, so a leak fails.

import pino from 'pino';
import { MonitorPool, type MonitorOptions } from '../../src/plans/monitor.ts';
import { testDatabase } from './database.ts';

export function singleConnectionMonitor(options: Partial<MonitorOptions> = {}): MonitorPool {
  return new MonitorPool({
    url: testDatabase().url,
    concurrency: 1,
    statementTimeoutMs: 5_000,
    log: pino({ level: 'silent' }),
    ...options,
  });
}
