// Shared by the cause tests (test/detect/cause-*.test.ts): pgwarden with default
// detection settings except the series bucket (2 s instead of 10 s, so a baseline
// forms in ~15 s instead of a minute and each file stays well under 90 s), and the
// waits those tests need.

import type { Config } from '../../src/config.ts';
import { testDatabase, waitFor } from './database.ts';
import type { TestApp } from './app.ts';

export function causeDetection(overrides: Partial<Config> = {}): Partial<Config> {
  return { monitor_url: testDatabase().url, series_bucket_s: 2, slow_query_ms: 60_000, ...overrides };
}

export interface ApiCause {
  type: string;
  summary: string;
  objects: string[];
  conclusive?: boolean;
  mitigable?: boolean;
  evidence?: Record<string, any>;
}

export interface ApiIncident {
  id: string;
  fingerprint: string;
  status: string;
  attributed: boolean;
  summary: string;
  causes: ApiCause[];
  detected_at: string;
  mitigation?: { note: string; action: string };
}

/** The fingerprint of the shape whose normalized text contains `fragment`, once it has a plan and a baseline. */
export async function warmShape(
  pgw: TestApp,
  fragment: string,
  timeoutMs = 45_000,
  planPattern?: RegExp,
): Promise<string> {
  return waitFor(
    async () => {
      const { body } = await pgw.api('/api/shapes?sort=calls&limit=100');
      const shape = (body as { fingerprint: string; query: string }[]).find((s) => s.query.includes(fragment));
      if (!shape) return undefined;
      const { body: detail } = await pgw.api(`/api/shapes/${shape.fingerprint}`);
      const planned =
        detail.plans?.current && (!planPattern || detail.plans.current.nodes.some((n: string) => planPattern.test(n)));
      // 6 buckets of history before the 5 s recent window, plus margin.
      return planned && detail.series.filter((p: { timed: number }) => p.timed >= 5).length >= 10
        ? shape.fingerprint
        : undefined;
    },
    { timeoutMs, intervalMs: 500, what: `the shape "${fragment}" to have a plan and a baseline` },
  );
}

/** Polls until no incident opened for `ms` (the control: same load, no fault); fails at the first one. */
export async function expectNoIncidentFor(pgw: TestApp, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    const { body } = await pgw.api('/api/incidents');
    if ((body as ApiIncident[]).length > 0)
      throw new Error(
        `control: an incident opened with no fault: ${(body as ApiIncident[]).map((i) => i.summary).join(' | ')}`,
      );
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

/** The first incident of `fingerprint` (any, if null) whose causes satisfy `ok`. */
export async function waitForIncident(
  pgw: TestApp,
  fingerprint: string | null,
  ok: (i: ApiIncident) => boolean,
  timeoutMs: number,
  what: string,
): Promise<ApiIncident> {
  return waitFor(
    async () => {
      const { body } = await pgw.api('/api/incidents');
      return (body as ApiIncident[]).find((i) => (fingerprint === null || i.fingerprint === fingerprint) && ok(i));
    },
    { timeoutMs, intervalMs: 250, what },
  ).catch(async (err: Error) => {
    // What was there instead, so a failure on a busy machine can be read.
    const { body: incidents } = await pgw.api('/api/incidents');
    const { body: events } = await pgw.api('/api/events?limit=30');
    err.message += `\nincidents: ${JSON.stringify((incidents as ApiIncident[]).map((i) => ({ summary: i.summary, causes: i.causes.map((c) => `${c.type}${c.conclusive ? '!' : ''}: ${c.summary}`) })))}`;
    err.message += `\nevents: ${JSON.stringify((events as { type: string; summary: string }[]).filter((e) => e.type !== 'mitigation').map((e) => `${e.type}: ${e.summary}`))}`;
    throw err;
  });
}
