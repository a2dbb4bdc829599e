// The proxy's gate, filled in by rules: before a query is forwarded, find its
// shape and apply the rules on it. block refuses with 42501; shed admits at most N
// executions at once and makes the rest wait (only their own session) up to the
// queue timeout, then refuses with 53400; reroute sends read-only statements outside
// a transaction to a replica. Without rules the gate costs one check.

import type { Logger } from 'pino';
import { FORWARD, type GateDecision, type QueryGate, type QueryRequest, type RerouteTarget } from '../proxy/seam.ts';
import { SqlState } from '../protocol/constants.ts';
import type { ShapeFinder } from '../shapes/fingerprint.ts';
import { isReadOnlyStatement } from './readonly.ts';
import { ruleMatches, type RerouteRule, type Rule, type ShedRule } from './rule.ts';
import type { RuleStore } from './store.ts';

interface Waiter {
  resolve(decision: GateDecision): void;
  timer: NodeJS.Timeout;
}

/** Concurrency slots of one shed rule. */
class ShedSlots {
  active = 0;
  readonly waiters: Waiter[] = [];
}

export interface RulesGateOptions {
  readonly store: RuleStore;
  readonly finder: ShapeFinder;
  readonly replicas: ReadonlyMap<string, RerouteTarget>;
  readonly log: Logger;
}

export class RulesGate implements QueryGate {
  private readonly slots = new Map<string, ShedSlots>();
  private readonly readOnly = new Map<string, boolean>();
  /** Queries refused or rerouted, by rule id, for metrics and the API. */
  readonly applied = new Map<string, number>();

  constructor(private readonly options: RulesGateOptions) {
    // A lifted shed rule lets its waiters through at once.
    options.store.onChange((rules) => {
      const live = new Set(rules.map((r) => r.id));
      for (const [id, slots] of this.slots) {
        if (live.has(id)) continue;
        for (const waiter of slots.waiters.splice(0)) {
          clearTimeout(waiter.timer);
          waiter.resolve(FORWARD);
        }
        this.slots.delete(id);
      }
    });
  }

  decide(request: QueryRequest): GateDecision | Promise<GateDecision> {
    const store = this.options.store;
    if (store.empty) return FORWARD;
    if (request.phase === 'query') {
      const shapes = this.options.finder.shapesOfText(request.text);
      // Several statements in one Query: a block on any of them refuses the whole text.
      for (const shape of shapes) {
        const decision = this.apply(shape.fingerprint, request, shapes.length === 1);
        if (decision !== FORWARD || shapes.length === 1) return decision;
      }
      return FORWARD;
    }
    if (request.statement === null) return FORWARD;
    return this.apply(this.options.finder.shapeOfStatement(request.statement).fingerprint, request, true);
  }

  private apply(fingerprint: string, request: QueryRequest, single: boolean): GateDecision | Promise<GateDecision> {
    const rules = this.options.store.forFingerprint(fingerprint);
    if (rules === undefined) return FORWARD;
    let shed: ShedRule | null = null;
    let reroute: RerouteRule | null = null;
    for (const rule of rules) {
      if (!ruleMatches(rule, fingerprint, request.session)) continue;
      if (rule.action === 'block') return this.refuseBlocked(rule);
      if (rule.action === 'shed') shed ??= rule;
      else reroute ??= rule;
    }
    // Shed counts executions: decided at Execute (or Query), never at Parse.
    if (shed !== null && single && request.phase !== 'parse') return this.admit(shed);
    if (reroute !== null && single && request.phase !== 'execute') return this.reroute(reroute, fingerprint, request);
    return FORWARD;
  }

  private refuseBlocked(rule: Rule): GateDecision {
    this.count(rule);
    return {
      action: 'refuse',
      error: {
        severity: 'ERROR',
        code: SqlState.InsufficientPrivilege,
        message: `pgwarden: query blocked by rule ${rule.id}`,
        detail: describe(rule),
        hint: `Lift it with "pgwarden rules delete ${rule.id}" or DELETE /api/rules/${rule.id}.`,
      },
    };
  }

  private admit(rule: ShedRule): GateDecision | Promise<GateDecision> {
    let slots = this.slots.get(rule.id);
    if (slots === undefined) {
      slots = new ShedSlots();
      this.slots.set(rule.id, slots);
    }
    if (slots.active < rule.max_concurrent) {
      slots.active++;
      return { action: 'forward', done: this.releaser(rule.id, slots) };
    }
    const timeout = rule.queue_timeout_ms;
    if (timeout === 0) return this.refuseShed(rule);
    const queue = slots.waiters;
    return new Promise<GateDecision>((resolve) => {
      const waiter: Waiter = {
        resolve,
        timer: setTimeout(() => {
          const i = queue.indexOf(waiter);
          if (i >= 0) queue.splice(i, 1);
          resolve(this.refuseShed(rule));
        }, timeout),
      };
      queue.push(waiter);
    });
  }

  /** The slot of one admitted execution, released once (when it completes or its session ends). */
  private releaser(id: string, slots: ShedSlots): () => void {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      slots.active--;
      const next = slots.waiters.shift();
      if (next) {
        clearTimeout(next.timer);
        slots.active++;
        next.resolve({ action: 'forward', done: this.releaser(id, slots) });
      }
    };
  }

  private refuseShed(rule: ShedRule): GateDecision {
    this.count(rule);
    return {
      action: 'refuse',
      error: {
        severity: 'ERROR',
        code: SqlState.ConfigurationLimitExceeded,
        message: `pgwarden: query shed by rule ${rule.id}: at most ${rule.max_concurrent} concurrent executions of this shape, and no slot freed within ${rule.queue_timeout_ms} ms`,
        detail: describe(rule),
        hint: `Retry later, or lift the rule with "pgwarden rules delete ${rule.id}".`,
      },
    };
  }

  private reroute(rule: RerouteRule, fingerprint: string, request: QueryRequest): GateDecision {
    const target = this.options.replicas.get(rule.target);
    if (target === undefined || request.transactionStatus !== 'I') return FORWARD;
    let readOnly = this.readOnly.get(fingerprint);
    if (readOnly === undefined) {
      readOnly = isReadOnlyStatement(request.statement?.text ?? request.text);
      if (this.readOnly.size > 10_000) this.readOnly.clear();
      this.readOnly.set(fingerprint, readOnly);
    }
    if (!readOnly) return FORWARD;
    this.count(rule);
    return { action: 'reroute', target };
  }

  private count(rule: Rule): void {
    this.applied.set(rule.id, (this.applied.get(rule.id) ?? 0) + 1);
  }
}

function describe(rule: Rule): string {
  return `rule ${rule.id} (${rule.action} on shape ${rule.fingerprint}, by ${rule.created_by} at ${rule.created_at}${rule.expires_at ? `, until ${rule.expires_at}` : ''}): ${rule.reason}`;
}
