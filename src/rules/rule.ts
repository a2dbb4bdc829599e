// What a rule is: its JSON form (docs/api.md, Rules), how API input is validated
// into one, and how a rule matches a query. Pure: no clock of its own, no I/O.

import { randomBytes } from 'node:crypto';
import { z } from 'zod';

export type RuleAction = 'block' | 'shed' | 'reroute';

/** What every rule has, whatever it does (its JSON form keeps all fields: null where they do not apply). */
interface RuleBase {
  readonly id: string;
  readonly fingerprint: string;
  readonly user: string | null;
  readonly database: string | null;
  readonly application_name: string | null;
  readonly reason: string;
  readonly ttl_s: number | null;
  readonly created_by: string;
  /** ISO 8601. */
  readonly created_at: string;
  /** ISO 8601, or null without a TTL. */
  readonly expires_at: string | null;
}

/** Refuses the shape with 42501. */
export interface BlockRule extends RuleBase {
  readonly action: 'block';
  readonly max_concurrent: null;
  readonly queue_timeout_ms: null;
  readonly target: null;
}

/** At most `max_concurrent` executions at once; the rest wait up to `queue_timeout_ms`, then fail with 53400. */
export interface ShedRule extends RuleBase {
  readonly action: 'shed';
  readonly max_concurrent: number;
  readonly queue_timeout_ms: number;
  readonly target: null;
}

/** Runs the shape on `target`, a configured replica, where the result cannot differ. */
export interface RerouteRule extends RuleBase {
  readonly action: 'reroute';
  readonly max_concurrent: null;
  readonly queue_timeout_ms: null;
  readonly target: string;
}

export type Rule = BlockRule | ShedRule | RerouteRule;

const name = z.string().min(1).max(200);

/** The body of POST /api/rules: the rule's fields without id and times. */
export const RuleInput = z
  .object({
    action: z.enum(['block', 'shed', 'reroute']),
    fingerprint: z
      .string()
      .regex(/^([0-9a-f]{16}|u[0-9a-f]{15}|overflow)$/, 'must be a shape fingerprint (16 hex digits)'),
    user: name.nullish(),
    database: name.nullish(),
    application_name: name.nullish(),
    max_concurrent: z.number().int().min(0).max(100_000).nullish(),
    queue_timeout_ms: z.number().int().min(0).max(600_000).nullish(),
    target: name.nullish(),
    reason: z.string().min(1, 'a reason is required').max(1000),
    ttl_s: z
      .number()
      .int()
      .positive()
      .max(30 * 24 * 3600)
      .nullish(),
    created_by: name.nullish(),
    /** Needed for a rule on a transaction-control or session statement (see vetRule); not stored. */
    force: z.boolean().optional(),
  })
  .strict()
  .superRefine((r, ctx) => {
    if (r.action === 'shed' && (r.max_concurrent === undefined || r.max_concurrent === null)) {
      ctx.addIssue({ code: 'custom', path: ['max_concurrent'], message: 'a shed rule needs max_concurrent' });
    }
    if (r.action === 'reroute' && !r.target)
      ctx.addIssue({ code: 'custom', path: ['target'], message: 'a reroute rule needs a target' });
    if (r.action !== 'shed' && r.max_concurrent != null)
      ctx.addIssue({ code: 'custom', path: ['max_concurrent'], message: 'only shed rules take max_concurrent' });
    if (r.action !== 'reroute' && r.target != null)
      ctx.addIssue({ code: 'custom', path: ['target'], message: 'only reroute rules take a target' });
  });

export type RuleInputValue = z.infer<typeof RuleInput>;

/** A bad rule; the message says which field and why. */
export class RuleError extends Error {}

export const DEFAULT_QUEUE_TIMEOUT_MS = 1000;

/** Validates API/CLI/config input and completes it into a rule created at `now`. */
export function createRule(input: unknown, now: number, defaultCreator: string, id?: string): Rule {
  const parsed = RuleInput.safeParse(input);
  if (!parsed.success) {
    throw new RuleError(
      parsed.error.issues
        .map(
          (i) => `${i.path.join('.') || (i.code === 'unrecognized_keys' ? i.keys.join(', ') : 'body')}: ${i.message}`,
        )
        .join('; '),
    );
  }
  const r = parsed.data;
  const base: RuleBase = {
    id: id ?? `r-${randomBytes(5).toString('hex')}`,
    fingerprint: r.fingerprint,
    user: r.user ?? null,
    database: r.database ?? null,
    application_name: r.application_name ?? null,
    reason: r.reason,
    ttl_s: r.ttl_s ?? null,
    created_by: r.created_by ?? defaultCreator,
    created_at: new Date(now).toISOString(),
    expires_at: r.ttl_s ? new Date(now + r.ttl_s * 1000).toISOString() : null,
  };
  // Field order as in docs/api.md: the action-specific fields after the matching ones.
  const { id: ruleId, fingerprint, user, database, application_name, ...rest } = base;
  const head = { id: ruleId, fingerprint, user, database, application_name };
  switch (r.action) {
    case 'block':
      return { ...head, action: 'block', max_concurrent: null, queue_timeout_ms: null, target: null, ...rest };
    case 'shed':
      return {
        ...head,
        action: 'shed',
        max_concurrent: r.max_concurrent!,
        queue_timeout_ms: r.queue_timeout_ms ?? DEFAULT_QUEUE_TIMEOUT_MS,
        target: null,
        ...rest,
      };
    case 'reroute':
      return { ...head, action: 'reroute', max_concurrent: null, queue_timeout_ms: null, target: r.target!, ...rest };
  }
}

/** What this instance knows of a rule's shape (from the shape registry). */
export interface ShapeFacts {
  readonly kind: string;
  readonly command: string;
  readonly control: boolean;
}

export const UNSEEN_SHAPE_WARNING = 'no shape with this fingerprint has been seen by this instance';

/** A rule that would do more harm than good without an explicit force. */
export class DangerousRuleError extends RuleError {}

/**
 * Checks a new rule against what is known of its shape. A rule on a
 * transaction-control or session statement is refused unless forced: blocking or
 * shedding COMMIT fails every transaction that reaches it (and SET, FETCH, CLOSE...
 * break the sessions that rely on them), turning a slow query into an outage. A rule
 * on a shape never seen is accepted with a warning, since it may be a typo (or a
 * shape that has not run here yet). Returns the warnings.
 */
export function vetRule(rule: Rule, shape: ShapeFacts | undefined, force: boolean): string[] {
  if (shape === undefined) return [UNSEEN_SHAPE_WARNING];
  if (shape.control && !force) {
    const verb = rule.action === 'block' ? 'blocking' : rule.action === 'shed' ? 'shedding' : 'rerouting';
    throw new DangerousRuleError(
      `shape ${rule.fingerprint} is a transaction-control or session statement (${shape.kind || shape.command}): ${verb} it fails the transactions ` +
        'and sessions that issue it (a refused COMMIT rolls back the whole transaction), which turns a slow query into an outage; ' +
        'send force: true (CLI: --force) if that is really intended',
    );
  }
  return [];
}

/** Whether a rule applies to a query of `fingerprint` run by this session. */
export function ruleMatches(
  rule: Rule,
  fingerprint: string,
  session: { user: string; database: string; applicationName: string },
): boolean {
  return (
    rule.fingerprint === fingerprint &&
    (rule.user === null || rule.user === session.user) &&
    (rule.database === null || rule.database === session.database) &&
    (rule.application_name === null || rule.application_name === session.applicationName)
  );
}

export function isExpired(rule: Rule, now: number): boolean {
  return rule.expires_at !== null && Date.parse(rule.expires_at) <= now;
}

/** Check of a rule read back from a state file or the control database: its action's fields must fit. */
export function isRule(value: unknown): value is Rule {
  const r = value as Rule;
  if (typeof r !== 'object' || r === null || typeof r.id !== 'string' || typeof r.fingerprint !== 'string')
    return false;
  if (typeof r.created_at !== 'string') return false;
  switch (r.action) {
    case 'block':
      return true;
    case 'shed':
      return typeof r.max_concurrent === 'number' && typeof r.queue_timeout_ms === 'number';
    case 'reroute':
      return typeof r.target === 'string';
    default:
      return false;
  }
}
