// One view over all proxy workers. With `--workers N` the relay runs in N cluster
// workers and exactly one process, the cluster primary, owns the statistics: the
// shape registry, the detector, EXPLAIN sampling, the catalog watch, the policy,
// webhooks, the control database and the admin API (/metrics, the dashboard).
//
// Workers fingerprint their own statements and send per-shape summaries
// (summary.ts: counters, a mergeable sketch, recent latencies, a few exemplars)
// plus their proxy counters every REPORT_MS; the primary merges them, so the API,
// the metrics and the detector see all traffic and side tasks run once. The
// primary sends the rules in force to every worker, which enforces them locally.
//
// Shed limits are split, not shared: each worker admits ceil(max_concurrent / N)
// executions at once (at least 1). A global limit would need an IPC round trip
// to the primary for every execution of a shed shape, on exactly the shape that
// is hurting the database; the split keeps the total within N-1 of the limit
// (ceil rounding) without it, at the price of one worker queueing while another
// has a free slot when connections are unevenly spread.
//
// Statements in flight travel with the summaries (the detector needs those stuck
// on a lock before they complete): see InFlightMerge. The sessions stay in the
// workers; GET /api/sessions and cancel/terminate ask them over the same channel
// (WorkerHub.sessions: a request, one answer per worker, a short timeout).
//
// Messages are objects with a `type` starting `pgwarden:stats`, `pgwarden:rules`, `pgwarden:sessions`:
// other IPC channels (cancel keys, reloads) coexist on the same connection and
// are ignored here.

import cluster, { type Worker } from 'node:cluster';
import type { Logger } from 'pino';
import type { ProxyCounters } from '../admin/metrics.ts';
import {
  noSession,
  parseSessionId,
  type SessionActed,
  type SessionDirectory,
  type SessionJson,
} from '../admin/sessions-api.ts';
import { ApiError } from '../admin/server.ts';
import type { Clock } from '../clock.ts';
import { DDL_COMMANDS } from '../detect/ddlwatch.ts';
import { STUCK_MIN_MS, type InFlightMerge, type InFlightReport, type InFlightTracker } from '../detect/inflight.ts';
import type { ProxyServer, ProxyStats } from '../proxy/server.ts';
import { CONNECTION_PHASES, REJECT_REASONS, type ConnectionPhase, type RejectReason } from '../proxy/connections.ts';
import type { RulesGate } from '../rules/gate.ts';
import { isRule, type Rule } from '../rules/rule.ts';
import type { RuleStore } from '../rules/store.ts';
import type { ShapeCollector } from '../shapes/collector.ts';
import type { ShapeFinder } from '../shapes/fingerprint.ts';
import { CompletionQueue } from '../shapes/queue.ts';
import { SummaryBatcher, type ShapeSummary } from '../shapes/summary.ts';
import type { RulePersistence } from '../rules/persistence.ts';

/** How often a worker reports: the API and the detector lag by at most this much. */
export const REPORT_MS = 250;
const RULES_TIMEOUT_MS = 30_000;
/**
 * Statements in flight a worker lists in each report: those running for at least
 * INFLIGHT_MIN_AGE_MS (so all of STUCK_MIN_MS and more are on the primary despite
 * the period's lag), at most INFLIGHT_MAX_STATEMENTS of them (the oldest), plus
 * counts for at most INFLIGHT_MAX_SHAPES shapes (the most loaded). A report older
 * than INFLIGHT_STALE_MS on the primary counts for nothing.
 */
const INFLIGHT_MIN_AGE_MS = STUCK_MIN_MS - REPORT_MS;
const INFLIGHT_MAX_STATEMENTS = 200;
const INFLIGHT_MAX_SHAPES = 500;
export const INFLIGHT_STALE_MS = 4 * REPORT_MS;

/** A worker's proxy counters (absolute since it started). */
export interface ProxySnapshot {
  connectionsAccepted: number;
  cancelRequests: number;
  upstreamConnectFailures: number;
  upstreamLost: number;
  sessions: number;
  bytesFromClient: number;
  bytesFromServer: number;
  /** Client sockets open now, by phase; connections refused so far, by reason. */
  phases: Record<ConnectionPhase, number>;
  rejected: Partial<Record<RejectReason, number>>;
}

export interface StatsMessage {
  readonly type: 'pgwarden:stats';
  readonly shapes: readonly ShapeSummary[];
  readonly proxy: ProxySnapshot;
  /** Upstream connect times (ms) since the last report. */
  readonly connectTimes: readonly number[];
  /** Queries refused or rerouted per rule id since the last report. */
  readonly applied: Readonly<Record<string, number>>;
  /** Its statements in flight (absent with statistics off). */
  readonly inflight?: InFlightReport;
}

export interface RulesMessage {
  readonly type: 'pgwarden:rules';
  readonly rules: readonly Rule[];
}

interface RulesRequest {
  readonly type: 'pgwarden:rules-request';
}

/** The primary asks a worker for its sessions, or to cancel or terminate one. */
interface SessionsRequest {
  readonly type: 'pgwarden:sessions-request';
  readonly seq: number;
  readonly op: 'list' | 'cancel' | 'terminate';
  /** The API id (`w<worker>-<n>`) for cancel and terminate. */
  readonly id?: string;
}

interface SessionsResponse {
  readonly type: 'pgwarden:sessions-response';
  readonly seq: number;
  readonly status: number;
  /** The sessions (list), the action's result, or `{ error }`. */
  readonly body: unknown;
}

/** How long the primary waits for a worker's sessions (a worker that is late is named instead). */
export const SESSIONS_LIST_TIMEOUT_MS = 500;
/** ... and for a cancel or terminate (a cancel opens a connection to the upstream). */
const SESSIONS_ACTION_TIMEOUT_MS = 5000;

export type ClusterRole =
  | { readonly role: 'primary'; readonly hub: WorkerHub }
  | { readonly role: 'worker'; readonly link: WorkerLink };

const COUNTERS = ['connectionsAccepted', 'cancelRequests', 'upstreamConnectFailures', 'upstreamLost'] as const;

/** What the primary's admin side needs to merge worker reports into. */
export interface HubTargets {
  readonly collector: ShapeCollector | null;
  readonly rules: RuleStore;
  readonly gate: RulesGate;
  /** Where the workers' statements in flight go (null with statistics off). */
  readonly inflight: InFlightMerge | null;
}

/**
 * The primary's end: merges worker reports, sends the rules. Reports arriving
 * before attach() (workers start while the primary opens its databases) wait.
 */
export class WorkerHub {
  private targets: HubTargets | null = null;
  private readonly early: Array<{ worker: Worker; message: StatsMessage | RulesRequest }> = [];
  private readonly snapshots = new Map<number, ProxySnapshot>();
  /** Counters of workers that have exited, so totals never go backwards. */
  private readonly departed: ProxySnapshot = emptySnapshot();
  private readonly connectTimes: number[] = [];
  private seq = 0;
  private readonly pending = new Map<number, { worker: number; settle: (response: SessionsResponse | null) => void }>();

  constructor(private readonly options: { readonly workers: number; readonly log: Logger }) {
    cluster.on('message', (worker, message: unknown) => {
      if (!isMessage(message)) return;
      if (message.type === 'pgwarden:sessions-response') {
        this.answered(worker, message as SessionsResponse);
        return;
      }
      if (message.type !== 'pgwarden:stats' && message.type !== 'pgwarden:rules-request') return;
      if (this.targets === null) this.early.push({ worker, message: message as StatsMessage | RulesRequest });
      else this.handle(worker, message as StatsMessage | RulesRequest);
    });
    // A worker that goes away mid-send: its exit is handled below, the pipe error is not news.
    cluster.on('fork', (worker) =>
      worker.on('error', (err: Error) => options.log.debug({ err, worker: worker.id }, 'worker IPC error')),
    );
    cluster.on('exit', (worker) => {
      this.targets?.inflight?.drop(worker.id);
      const last = this.snapshots.get(worker.id);
      if (last === undefined) return;
      this.snapshots.delete(worker.id);
      for (const key of [...COUNTERS, 'bytesFromClient', 'bytesFromServer'] as const) this.departed[key] += last[key];
      for (const reason of REJECT_REASONS)
        this.departed.rejected[reason] = (this.departed.rejected[reason] ?? 0) + (last.rejected[reason] ?? 0);
    });
  }

  attach(targets: HubTargets): void {
    this.targets = targets;
    targets.rules.onChange((rules) => {
      for (const worker of Object.values(cluster.workers ?? {})) if (worker) this.sendRules(worker, rules);
    });
    for (const { worker, message } of this.early.splice(0)) this.handle(worker, message);
  }

  /**
   * The sessions of all workers, for the admin API: each live worker is asked, and
   * one that does not answer within SESSIONS_LIST_TIMEOUT_MS is named in the list's
   * `unanswered` rather than failing it. Ids are `w<worker>-<n>`; a cancel or
   * terminate goes to the worker the id names.
   */
  readonly sessions: SessionDirectory = {
    list: async () => {
      const workers = liveWorkers();
      const answers = await Promise.all(workers.map((w) => this.ask(w, { op: 'list' }, SESSIONS_LIST_TIMEOUT_MS)));
      const sessions: SessionJson[] = [];
      const unanswered: string[] = [];
      answers.forEach((answer, i) => {
        if (answer === null || answer.status !== 200 || !Array.isArray(answer.body))
          unanswered.push(`w${workers[i].id}`);
        else sessions.push(...(answer.body as SessionJson[]));
      });
      // Oldest first, as in one process.
      sessions.sort((a, b) => a.since.localeCompare(b.since) || String(a.id).localeCompare(String(b.id)));
      return { sessions, unanswered };
    },
    cancel: (id) => this.act('cancel', id) as Promise<SessionActed & { cancel_sent: true }>,
    terminate: (id) => this.act('terminate', id) as Promise<SessionActed & { terminated: true }>,
  };

  private async act(op: 'cancel' | 'terminate', id: string): Promise<unknown> {
    const parsed = parseSessionId(id);
    const worker = parsed?.worker != null ? cluster.workers?.[parsed.worker] : undefined;
    if (worker === undefined || !worker.isConnected()) throw noSession(id);
    const answer = await this.ask(worker, { op, id }, SESSIONS_ACTION_TIMEOUT_MS);
    if (answer === null)
      throw new ApiError(504, `worker w${worker.id} did not answer within ${SESSIONS_ACTION_TIMEOUT_MS} ms`);
    if (answer.status !== 200) {
      const error = (answer.body as { error?: unknown } | null)?.error;
      throw new ApiError(answer.status, typeof error === 'string' ? error : `worker w${worker.id} refused`);
    }
    return answer.body;
  }

  /** Sends a sessions request to one worker; its answer, or null if none came in `timeoutMs`. */
  private ask(
    worker: Worker,
    request: Pick<SessionsRequest, 'op' | 'id'>,
    timeoutMs: number,
  ): Promise<SessionsResponse | null> {
    const seq = ++this.seq;
    return new Promise((resolve) => {
      const timer = setTimeout(() => settle(null), timeoutMs);
      const settle = (response: SessionsResponse | null) => {
        clearTimeout(timer);
        this.pending.delete(seq);
        resolve(response);
      };
      this.pending.set(seq, { worker: worker.id, settle });
      const message: SessionsRequest = { type: 'pgwarden:sessions-request', seq, ...request };
      try {
        worker.send(message, (err: Error | null) => err && settle(null));
      } catch {
        settle(null); // the channel closed under us
      }
    });
  }

  private answered(worker: Worker, response: SessionsResponse): void {
    const pending = this.pending.get(response.seq);
    // Only the worker asked may answer (a late answer after the timeout finds nothing).
    if (pending !== undefined && pending.worker === worker.id) pending.settle(response);
  }

  /** The proxy counters of all workers, for /metrics (read at scrape time). */
  readonly proxyCounters: ProxyCounters = countersOf(this);

  /** Sums of the live workers' last reports and the departed ones'. */
  total(): ProxySnapshot {
    const sum: ProxySnapshot = {
      ...this.departed,
      phases: { ...this.departed.phases },
      rejected: { ...this.departed.rejected },
    };
    for (const s of this.snapshots.values()) {
      for (const key of [...COUNTERS, 'sessions', 'bytesFromClient', 'bytesFromServer'] as const) sum[key] += s[key];
      for (const phase of CONNECTION_PHASES) sum.phases[phase] += s.phases?.[phase] ?? 0;
      for (const reason of REJECT_REASONS)
        sum.rejected[reason] = (sum.rejected[reason] ?? 0) + (s.rejected?.[reason] ?? 0);
    }
    return sum;
  }

  /** Upstream connect times reported and not yet taken by the metrics (which empty it). */
  pendingConnectTimes(): number[] {
    return this.connectTimes;
  }

  private handle(worker: Worker, message: StatsMessage | RulesRequest): void {
    const targets = this.targets!;
    if (message.type === 'pgwarden:rules-request') {
      this.sendRules(worker, targets.rules.list());
      return;
    }
    this.snapshots.set(worker.id, message.proxy);
    for (const ms of message.connectTimes) if (this.connectTimes.length < 10_000) this.connectTimes.push(ms);
    for (const [id, n] of Object.entries(message.applied))
      targets.gate.applied.set(id, (targets.gate.applied.get(id) ?? 0) + n);
    if (message.inflight !== undefined) targets.inflight?.set(worker.id, message.inflight);
    if (targets.collector === null) return;
    for (const summary of message.shapes) {
      try {
        targets.collector.ingest(summary);
      } catch (err) {
        // A listener failing on one shape (or a malformed summary) must not cost the others their counts.
        this.options.log.error(
          { err, worker: worker.id, fingerprint: summary.fingerprint },
          'worker shape summary could not be merged',
        );
      }
    }
  }

  private sendRules(worker: Worker, rules: readonly Rule[]): void {
    const message: RulesMessage = {
      type: 'pgwarden:rules',
      rules: rules.map((r) => perWorker(r, this.options.workers)),
    };
    if (worker.isConnected())
      worker.send(
        message,
        (err: Error | null) => err && this.options.log.debug({ err, worker: worker.id }, 'rules not sent: worker gone'),
      );
  }
}

/** A shed rule as one of `workers` workers enforces it: its share of the slots. */
export function perWorker(rule: Rule, workers: number): Rule {
  if (rule.action !== 'shed' || rule.max_concurrent === 0) return rule;
  return { ...rule, max_concurrent: Math.max(1, Math.ceil(rule.max_concurrent / workers)) };
}

function countersOf(hub: WorkerHub): ProxyCounters {
  return {
    stats: statsView(hub),
    get sessionCount() {
      return hub.total().sessions;
    },
    bytesRelayed() {
      const total = hub.total();
      return { fromClient: total.bytesFromClient, fromServer: total.bytesFromServer };
    },
    connections: {
      byPhase: () => hub.total().phases,
      rejected: (reason: RejectReason) => hub.total().rejected[reason] ?? 0,
    },
  };
}

function statsView(hub: WorkerHub): ProxyStats {
  const view = {
    get connectTimes() {
      return hub.pendingConnectTimes();
    },
  } as unknown as Record<string, unknown>;
  for (const key of COUNTERS) Object.defineProperty(view, key, { get: () => hub.total()[key], enumerable: true });
  Object.defineProperty(view, 'closedBytesFromClient', { get: () => 0 });
  Object.defineProperty(view, 'closedBytesFromServer', { get: () => 0 });
  return view as unknown as ProxyStats;
}

function emptySnapshot(): ProxySnapshot {
  return {
    connectionsAccepted: 0,
    cancelRequests: 0,
    upstreamConnectFailures: 0,
    upstreamLost: 0,
    sessions: 0,
    bytesFromClient: 0,
    bytesFromServer: 0,
    phases: { startup: 0, authenticating: 0, active: 0, closing: 0 },
    rejected: {},
  };
}

function liveWorkers(): Worker[] {
  return Object.values(cluster.workers ?? {}).filter((w): w is Worker => w?.isConnected() ?? false);
}

function isMessage(message: unknown): message is { type: string } {
  return typeof message === 'object' && message !== null && typeof (message as { type?: unknown }).type === 'string';
}

/**
 * A worker's end: batches its statements into summaries, reports them with its
 * proxy counters, and takes its rules from the primary (the rule persistence of
 * a worker: changes are made on the primary, never here).
 */
export class WorkerLink {
  private batcher: SummaryBatcher | null = null;
  private queue: CompletionQueue | null = null;
  private proxy: ProxyServer | null = null;
  private gate: RulesGate | null = null;
  private inflight: InFlightTracker | null = null;
  private readonly appliedSent = new Map<string, number>();
  private timer: NodeJS.Timeout | null = null;
  private readonly ruleListeners: Array<(rules: Rule[]) => void> = [];
  private firstRules: ((rules: Rule[]) => void) | null = null;
  private sessions: SessionDirectory | null = null;
  private readonly onMessage = (message: unknown) => {
    if (!isMessage(message)) return;
    if (message.type === 'pgwarden:sessions-request') {
      void this.answerSessions(message as SessionsRequest);
      return;
    }
    if (message.type !== 'pgwarden:rules') return;
    const rules = ((message as RulesMessage).rules ?? []).filter(isRule);
    if (this.firstRules) {
      this.firstRules(rules);
      this.firstRules = null;
    } else for (const listener of this.ruleListeners) listener(rules);
  };

  constructor(private readonly options: { readonly clock: Clock; readonly log?: Logger }) {
    process.on('message', this.onMessage);
  }

  /** Rules as the worker's store sees them: loaded from the primary, replaced when it says so. */
  readonly rules: RulePersistence = {
    load: () =>
      new Promise<Rule[]>((resolve, reject) => {
        const timer = setTimeout(
          () => reject(new Error(`no rules from the cluster primary within ${RULES_TIMEOUT_MS} ms`)),
          RULES_TIMEOUT_MS,
        );
        this.firstRules = (rules) => {
          clearTimeout(timer);
          resolve(rules);
        };
        send({ type: 'pgwarden:rules-request' } satisfies RulesRequest);
      }),
    add: async () => {
      throw new Error('rules are changed through the admin API of the cluster primary');
    },
    // The primary expires rules itself and sends the new set; nothing to do here.
    remove: async () => undefined,
    onExternalChange: (listener) => void this.ruleListeners.push(listener),
    close: async () => undefined,
  };

  /**
   * Starts reporting; `finder` and `inflight` (the tracker around the proxy's gate)
   * null when statistics are off (only counters are sent).
   */
  start(proxy: ProxyServer, gate: RulesGate, finder: ShapeFinder | null, inflight: InFlightTracker | null): void {
    this.proxy = proxy;
    this.gate = gate;
    this.inflight = inflight;
    if (finder !== null) {
      const batcher = new SummaryBatcher(finder, { clock: this.options.clock, everyExecutionOf: DDL_COMMANDS });
      this.batcher = batcher;
      // Summarized after the relay's writes of each turn, like the collector in one process.
      this.queue = new CompletionQueue(batcher.observe, (err) =>
        this.options.log?.error({ err }, 'summarizing a statement failed'),
      );
      proxy.onQueryComplete(this.queue.observe);
    }
    this.timer = setInterval(() => this.report(), REPORT_MS);
    this.timer.unref();
  }

  /** This worker's number in the cluster (its sessions' ids are `w<id>-<n>`). */
  get id(): number {
    return cluster.worker?.id ?? 0;
  }

  /** Answers the primary's session requests from `sessions` (this worker's, see localSessions). */
  serveSessions(sessions: SessionDirectory): void {
    this.sessions = sessions;
  }

  private async answerSessions(request: SessionsRequest): Promise<void> {
    let status = 200;
    let body: unknown;
    try {
      const sessions = this.sessions;
      if (sessions === null) throw new ApiError(503, 'this worker is still starting');
      if (request.op === 'list') body = (await sessions.list()).sessions;
      else if (request.op === 'cancel' || request.op === 'terminate')
        body = await sessions[request.op](String(request.id));
      else throw new ApiError(400, `unknown sessions request '${String(request.op)}'`);
    } catch (err) {
      status = err instanceof ApiError ? err.status : 500;
      body = { error: (err as Error).message };
    }
    send({ type: 'pgwarden:sessions-response', seq: request.seq, status, body } satisfies SessionsResponse);
  }

  /** Sends what is left (after the proxy drained) and stops. */
  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    process.off('message', this.onMessage);
    await new Promise<void>((resolve) => {
      if (!this.report(resolve)) resolve();
    });
  }

  /** The window's summaries, with the completions still queued. */
  private drainShapes(): ShapeSummary[] {
    this.queue?.flush();
    return this.batcher?.drain() ?? [];
  }

  /** Sends one report; false if there was no channel to send it on. */
  private report(done?: () => void): boolean {
    const proxy = this.proxy;
    if (proxy === null || !process.connected) return false;
    const applied: Record<string, number> = {};
    for (const [id, n] of this.gate?.applied ?? []) {
      const delta = n - (this.appliedSent.get(id) ?? 0);
      if (delta > 0) applied[id] = delta;
      this.appliedSent.set(id, n);
    }
    const bytes = proxy.bytesRelayed();
    const stats = proxy.stats;
    const message: StatsMessage = {
      type: 'pgwarden:stats',
      shapes: this.drainShapes(),
      proxy: {
        connectionsAccepted: stats.connectionsAccepted,
        cancelRequests: stats.cancelRequests,
        upstreamConnectFailures: stats.upstreamConnectFailures,
        upstreamLost: stats.upstreamLost,
        sessions: proxy.sessionCount,
        bytesFromClient: bytes.fromClient,
        bytesFromServer: bytes.fromServer,
        phases: proxy.connections.byPhase(),
        rejected: Object.fromEntries(REJECT_REASONS.map((reason) => [reason, proxy.connections.rejected(reason)])),
      },
      connectTimes: stats.connectTimes.splice(0),
      applied,
      inflight: this.inflight?.report(INFLIGHT_MIN_AGE_MS, INFLIGHT_MAX_STATEMENTS, INFLIGHT_MAX_SHAPES),
    };
    return send(message, done);
  }
}

function send(message: object, done?: () => void): boolean {
  if (!process.send || !process.connected) return false;
  process.send(message, undefined, {}, (err: Error | null) => {
    // The primary is gone (it is stopping): nothing to report to.
    void err;
    done?.();
  });
  return true;
}
