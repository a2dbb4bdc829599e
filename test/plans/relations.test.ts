// Relation names from plans (schema-qualified) and from events that may not know
// the schema (bare): a bare name is anyone's, a qualified one only its schema's.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { touchedObjects } from '../../src/detect/attribution.ts';
import { EventLog } from '../../src/events/timeline.ts';
import { kindSwitch } from '../../src/plans/sampler.ts';
import { bareName, RelationSet } from '../../src/plans/relations.ts';

describe('RelationSet', () => {
  const plans = new RelationSet(['tenant_b.Accounts', 'tenant_b.accounts_email_idx', 'audit']);

  test('a bare name matches the relation of that name in any schema', () => {
    assert.ok(plans.has('accounts'));
    assert.ok(plans.has('ACCOUNTS_EMAIL_IDX'));
    assert.ok(!plans.has('users'));
  });

  test("a qualified name matches only its own schema's relation", () => {
    assert.ok(plans.has('tenant_b.accounts_email_idx'));
    assert.ok(!plans.has('tenant_a.accounts_email_idx'));
  });

  test('a bare member, whose schema is unknown, matches a qualified name', () => {
    assert.ok(plans.has('public.audit'));
    assert.ok(plans.has('tenant_a.audit'));
  });

  test('iterates over its members, lower-cased', () => {
    assert.deepEqual([...plans], ['tenant_b.accounts', 'tenant_b.accounts_email_idx', 'audit']);
    assert.equal(plans.size, 3);
    assert.equal(bareName('a.b.c'), 'c');
  });
});

describe('touchedObjects', () => {
  test("the catalog watch's objects are qualified with the schema its details name; DDL stays as written", () => {
    const events = new EventLog({ now: () => 1000 });
    const catalog = events.add({
      type: 'schema_change',
      summary: 'index accounts_email_idx on tenant_b.accounts dropped',
      objects: ['accounts_email_idx', 'accounts'],
      details: { kind: 'index_dropped', database: 'app', since: 900, schema: 'tenant_b' },
    });
    assert.deepEqual(touchedObjects(catalog), ['tenant_b.accounts_email_idx', 'tenant_b.accounts']);
    const ddl = events.add({
      type: 'ddl',
      summary: 'DROP INDEX accounts_email_idx',
      objects: ['accounts_email_idx'],
      details: {
        command: 'DROP INDEX',
        statement: 'DROP INDEX accounts_email_idx',
        user: 'u',
        database: 'app',
        application_name: '',
      },
    });
    assert.deepEqual(touchedObjects(ddl), ['accounts_email_idx']);
  });
});

describe('kindSwitch', () => {
  test('says why a plan changed when its kind did', () => {
    assert.equal(
      kindSwitch('custom', 'generic', 'auto'),
      'the server switched this prepared statement to its generic plan after 5 executions',
    );
    assert.match(kindSwitch('custom', 'generic', 'force_generic_plan')!, /^plan_cache_mode = force_generic_plan/);
    assert.match(kindSwitch('generic', 'custom', 'auto')!, /custom plans/);
    assert.equal(kindSwitch('custom', 'custom', 'auto'), null);
    assert.equal(kindSwitch(null, 'generic', 'auto'), null);
  });
});
