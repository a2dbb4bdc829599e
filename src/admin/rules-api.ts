// JSON API routes over rules: list, add (validated: 400 says what is wrong; 409 for
// a dangerous rule without force; a warning for a shape never seen), lift.

import type { Clock } from '../clock.ts';
import type { RulesGate } from '../rules/gate.ts';
import { createRule, DangerousRuleError, RuleError, vetRule, type ShapeFacts } from '../rules/rule.ts';
import type { RuleStore } from '../rules/store.ts';
import { ApiError, type Route } from './server.ts';

/** Looks up a shape this instance has seen (null when shape statistics are off). */
export type ShapeLookup = ((fingerprint: string) => ShapeFacts | undefined) | null;

export function ruleRoutes(
  store: RuleStore,
  gate: RulesGate,
  replicaNames: readonly string[],
  clock: Clock,
  shapes: ShapeLookup = null,
): Route[] {
  // seen: whether this instance has seen the rule's shape (null: it cannot tell).
  const withCounts = (rule: ReturnType<RuleStore['list']>[number]) => ({
    ...rule,
    applied: gate.applied.get(rule.id) ?? 0,
    seen: shapes === null ? null : shapes(rule.fingerprint) !== undefined,
  });
  return [
    {
      method: 'GET',
      path: '/api/rules',
      handle: () => ({ status: 200, body: store.list().map(withCounts) }),
    },
    {
      method: 'POST',
      path: '/api/rules',
      async handle({ body }) {
        if (typeof body !== 'object' || body === null || Array.isArray(body))
          throw new ApiError(400, 'request body must be a JSON object with the rule fields');
        let rule;
        try {
          rule = createRule(body, clock.now(), 'api');
        } catch (err) {
          if (err instanceof RuleError) throw new ApiError(400, err.message);
          throw err;
        }
        if (rule.target !== null && !replicaNames.includes(rule.target)) {
          throw new ApiError(
            400,
            `target: no replica named '${rule.target}' is configured${replicaNames.length ? ` (configured: ${replicaNames.join(', ')})` : ' (none are)'}`,
          );
        }
        let warnings = ['shape statistics are off (stats: false): this instance cannot check the fingerprint'];
        if (shapes !== null) {
          try {
            warnings = vetRule(rule, shapes(rule.fingerprint), (body as { force?: unknown }).force === true);
          } catch (err) {
            if (err instanceof DangerousRuleError) throw new ApiError(409, err.message);
            throw err;
          }
        }
        try {
          await store.add(rule);
        } catch (err) {
          throw new ApiError(503, `rule not stored: ${(err as Error).message}`);
        }
        return { status: 201, body: { ...withCounts(rule), warnings } };
      },
    },
    {
      method: 'DELETE',
      path: '/api/rules/:id',
      async handle({ params, query }) {
        let removed: boolean;
        try {
          removed = await store.remove(params.id, query.get('by') ?? 'api');
        } catch (err) {
          throw new ApiError(503, `rule not lifted: ${(err as Error).message}`);
        }
        if (!removed) throw new ApiError(404, `no rule '${params.id}'`);
        return { status: 200, body: { id: params.id, removed: true } };
      },
    },
  ];
}

/** GET /api/mitigation: the policy's mode, budget, automatic rules in force and recent decisions (with what it refused). */
export function mitigationRoutes(policy: { status(): unknown }): Route[] {
  return [{ method: 'GET', path: '/api/mitigation', handle: () => ({ status: 200, body: policy.status() }) }];
}
