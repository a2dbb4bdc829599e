// Lock-wait evidence: when a shape's statements wait on a lock (seen in the sampled
// pg_stat_activity as wait_event_type 'Lock', matched to the shape by fingerprint or
// by the relation waited for), the incident names the session at the head of the
// wait chain: pid, user, application, its statement as a normalized shape, what it
// holds, and how long its transaction has been open; and offers the admin actions to
// cancel or terminate it. The plan is unchanged in this case: shedding the shape
// would not help, so the cause is marked not mitigable.

import type { Cause } from './record.ts';
import type { ActivitySample, ActivitySampler, Backend, RelationLock } from './activity.ts';
import type { CauseContext, CauseProvider } from './causes.ts';
import type { RelationLookup } from '../plans/relations.ts';

export interface Blocker {
  readonly pid: number;
  readonly user: string;
  readonly application: string;
  readonly client: string | null;
  readonly state: string;
  readonly fingerprint: string | null;
  /** Its current or last statement, normalized (never literal values). */
  readonly query: string | null;
  /** Seconds its transaction has been open: it has held its locks at most this long. */
  readonly transaction_s: number | null;
  /** Locks it holds on the relations its victims wait for. */
  readonly holds: { relation: string; mode: string }[];
}

export interface LockEvidence {
  readonly sampled_at: string;
  /** Backends of this shape (or on its relations) waiting on a lock. */
  readonly waiting: number;
  readonly waiting_pids: number[];
  readonly relations: string[];
  readonly blockers: Blocker[];
}

/** The lock wait of one shape in one sample, or null if none of its statements waits. */
export function lockWaitOf(sample: ActivitySample, fingerprint: string, objects: RelationLookup): LockEvidence | null {
  const byPid = new Map(sample.backends.map((b) => [b.pid, b]));
  const waitsOn = (pid: number) => sample.locks.filter((l) => l.pid === pid && !l.granted);
  const unqualified = (relation: string) =>
    relation
      .slice(relation.lastIndexOf('.') + 1)
      .replace(/"/g, '')
      .toLowerCase();
  // Its own statements by fingerprint; only when none is recognisable (a text longer
  // than track_activity_query_size is truncated), those waiting on its relations.
  const waiting = sample.backends.filter((b) => b.blockedBy.length > 0);
  let waiters = waiting.filter((b) => b.fingerprint === fingerprint);
  if (waiters.length === 0)
    waiters = waiting.filter((b) => waitsOn(b.pid).some((l) => objects.has(unqualified(l.relation))));
  if (waiters.length === 0) return null;
  const relations = [...new Set(waiters.flatMap((w) => waitsOn(w.pid).map((l) => l.relation)))];
  // The head of each chain: follow blockers until one that waits for nobody.
  const heads = new Set<number>();
  for (const w of waiters) {
    const seen = new Set<number>();
    const stack = [...w.blockedBy];
    while (stack.length > 0) {
      const pid = stack.pop()!;
      if (seen.has(pid)) continue;
      seen.add(pid);
      const b = byPid.get(pid);
      if (b === undefined || b.blockedBy.length === 0) heads.add(pid);
      else stack.push(...b.blockedBy);
    }
  }
  const blockers = [...heads].map((pid) => describeBlocker(pid, byPid.get(pid), sample.locks, relations, sample.at));
  blockers.sort((a, b) => (b.transaction_s ?? 0) - (a.transaction_s ?? 0));
  return {
    sampled_at: new Date(sample.at).toISOString(),
    waiting: waiters.length,
    waiting_pids: waiters.map((w) => w.pid),
    relations,
    blockers,
  };
}

function describeBlocker(
  pid: number,
  b: Backend | undefined,
  locks: readonly RelationLock[],
  relations: string[],
  at: number,
): Blocker {
  const holds = locks
    .filter((l) => l.pid === pid && l.granted && relations.includes(l.relation))
    .map((l) => ({ relation: l.relation, mode: l.mode }));
  return {
    pid,
    user: b?.user ?? '?',
    application: b?.application ?? '?',
    client: b?.client ?? null,
    state: b?.state ?? 'unknown (not a client backend, or not visible to the monitoring role)',
    fingerprint: b?.fingerprint ?? null,
    query: b?.query ?? null,
    transaction_s: b?.xactStart ? Math.round((at - b.xactStart) / 100) / 10 : null,
    holds,
  };
}

/** One line naming the blocker, e.g. for the incident's summary. */
export function describeLockWait(e: LockEvidence): string {
  const head = e.blockers[0];
  const waiting = `${e.waiting} statement${e.waiting === 1 ? '' : 's'} of this shape wait${e.waiting === 1 ? 's' : ''} for a lock on ${e.relations.join(', ') || 'a relation'}`;
  if (head === undefined) return waiting;
  const holds =
    head.holds.length > 0 ? `, holding ${head.holds.map((h) => `${h.mode} on ${h.relation}`).join(', ')}` : '';
  const statement = head.query ? `, ${head.state === 'active' ? 'running' : 'last ran'} \`${head.query}\`` : '';
  const age = head.transaction_s !== null ? `, in its transaction for ${Math.round(head.transaction_s)} s` : '';
  const more =
    e.blockers.length > 1
      ? ` (and ${e.blockers.length - 1} other blocking session${e.blockers.length > 2 ? 's' : ''})`
      : '';
  return `${waiting}, held by pid ${head.pid} (user ${head.user}, application ${head.application || '(none)'}, ${head.state}${statement}${holds}${age})${more}`;
}

/**
 * The provider: from the newest activity sample (taken at most a few seconds ago),
 * else from what it saw earlier in the same incident, so the cause stays on the
 * record after the blocker has gone (marked as released).
 */
export class LockCauses implements CauseProvider {
  readonly name = 'locks';
  private readonly seen = new Map<string, { onset: number; evidence: LockEvidence; firstAt: number }>();

  constructor(
    private readonly activity: ActivitySampler,
    private readonly maxSampleAgeMs = 10_000,
  ) {}

  causes(context: CauseContext): Cause[] {
    const sample = this.activity.latest();
    let current: LockEvidence | null = null;
    if (
      sample !== null &&
      context.now - sample.at <= this.maxSampleAgeMs &&
      sample.at >= context.onset - this.maxSampleAgeMs
    ) {
      current = lockWaitOf(sample, context.fingerprint, context.objects);
    }
    let remembered = this.seen.get(context.fingerprint);
    if (remembered !== undefined && remembered.onset !== context.onset) {
      this.seen.delete(context.fingerprint);
      remembered = undefined;
    }
    if (current !== null) {
      remembered = {
        onset: context.onset,
        evidence: current,
        firstAt: remembered?.firstAt ?? Date.parse(current.sampled_at),
      };
      this.seen.set(context.fingerprint, remembered);
    }
    if (remembered === undefined) return [];
    if (this.seen.size > 1000) this.seen.delete(this.seen.keys().next().value!);
    const evidence = remembered.evidence;
    const released = current === null;
    const head = evidence.blockers[0];
    return [
      {
        kind: 'lock_wait',
        type: 'lock_wait',
        event_id: null,
        at: new Date(remembered.firstAt).toISOString(),
        seconds_before_onset: Math.round((context.onset - remembered.firstAt) / 10) / 100,
        summary: `waiting on a lock: ${describeLockWait(evidence)}${released ? ' (no longer waiting at the last sample)' : ''}`,
        relevant: true,
        conclusive: true,
        mitigable: false,
        objects: evidence.relations.map((r) => r.slice(r.lastIndexOf('.') + 1)),
        evidence: {
          ...evidence,
          released,
          ...(head
            ? {
                actions: {
                  cancel: `POST /api/backends/${head.pid}/cancel`,
                  terminate: `POST /api/backends/${head.pid}/terminate`,
                },
              }
            : {}),
        },
      },
    ];
  }
}
