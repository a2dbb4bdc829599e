// Rule fixtures shared by the state tests.

import type { Rule } from '../../src/rules/rule.ts';

/** A block rule with every optional field null; overrides replace fields. */
export function rule(id: string, overrides: Partial<Rule> = {}): Rule {
  return {
    id,
    action: 'block',
    fingerprint: '0123456789abcdef',
    user: null,
    database: null,
    application_name: null,
    max_concurrent: null,
    queue_timeout_ms: null,
    target: null,
    reason: `test rule ${id}`,
    ttl_s: null,
    created_by: 'test',
    created_at: '2026-01-01T00:00:00.000Z',
    expires_at: null,
    ...overrides,
  } as Rule;
}
