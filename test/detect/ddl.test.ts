import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { ddlChangesOf } from '../../src/detect/ddl.ts';
import { loadParser } from '../../src/shapes/fingerprint.ts';

before(() => loadParser());

function only(text: string) {
  const changes = ddlChangesOf(text);
  assert.equal(changes.length, 1, `one change expected from ${text}, got ${JSON.stringify(changes)}`);
  return changes[0];
}

describe('ddlChangesOf', () => {
  test('DROP INDEX names the index', () => {
    const change = only('DROP INDEX users_email_idx');
    assert.equal(change.command, 'DROP INDEX');
    assert.deepEqual(change.objects, ['users_email_idx']);
    assert.equal(change.statement, 'DROP INDEX users_email_idx');
  });

  test('DROP INDEX of several schema-qualified indexes gives their unqualified names', () => {
    const change = only('DROP INDEX CONCURRENTLY IF EXISTS app.a_idx, b_idx');
    assert.deepEqual(change.objects, ['a_idx', 'b_idx']);
    assert.deepEqual(change.details.names, ['app.a_idx', 'b_idx']);
    assert.equal(change.details.concurrent, true);
  });

  test('CREATE INDEX names the index and its table, and lists the columns', () => {
    const change = only('CREATE INDEX CONCURRENTLY users_created_idx ON public.users (created_at)');
    assert.equal(change.command, 'CREATE INDEX');
    assert.deepEqual(change.objects, ['users_created_idx', 'users']);
    assert.equal(change.details.relation, 'public.users');
    assert.deepEqual(change.details.columns, ['created_at']);
    assert.equal(change.details.concurrent, true);
    assert.equal(change.details.method, 'btree');
  });

  test('index columns keep expressions and ordering as written', () => {
    const change = only(
      `CREATE UNIQUE INDEX ON orders USING btree (lower(email), created_at DESC, (note || ')')) WHERE deleted_at IS NULL`,
    );
    assert.deepEqual(change.objects, ['orders']);
    assert.deepEqual(change.details.columns, ['lower(email)', 'created_at DESC', `(note || ')')`]);
    assert.equal(change.details.unique, true);
    assert.equal(change.details.partial, true);
    assert.equal(change.details.index, null);
  });

  test('ALTER TABLE lists its subcommands', () => {
    const change = only('ALTER TABLE users ADD COLUMN x int');
    assert.equal(change.command, 'ALTER TABLE');
    assert.deepEqual(change.objects, ['users']);
    assert.deepEqual(change.details.subcommands, ['ADD COLUMN x']);
  });

  test('ALTER TABLE with several subcommands names the referenced table and dropped key constraints', () => {
    const change = only(
      'ALTER TABLE ONLY users DROP COLUMN legacy, ALTER COLUMN id TYPE bigint, ' +
        'ADD CONSTRAINT users_org_fk FOREIGN KEY (org_id) REFERENCES orgs (id), ADD PRIMARY KEY (id), DROP CONSTRAINT users_old_key',
    );
    assert.deepEqual(change.objects, ['users', 'orgs', 'users_old_key']);
    assert.deepEqual(change.details.subcommands, [
      'DROP COLUMN legacy',
      'ALTER COLUMN TYPE id',
      'ADD CONSTRAINT users_org_fk',
      'ADD PRIMARY KEY',
      'DROP CONSTRAINT users_old_key',
    ]);
  });

  test('CREATE TABLE and DROP TABLE name their tables', () => {
    assert.deepEqual(only('CREATE TABLE orders (id bigint primary key, total numeric)').objects, ['orders']);
    const drop = only('DROP TABLE IF EXISTS public.orders, archive.orders_2020 CASCADE');
    assert.equal(drop.command, 'DROP TABLE');
    assert.deepEqual(drop.objects, ['orders', 'orders_2020']);
    assert.equal(drop.details.cascade, true);
  });

  test('a partition names its parent table', () => {
    const change = only('CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM (1) TO (2)');
    assert.deepEqual(change.objects, ['events_2026', 'events']);
    assert.deepEqual(change.details.partitionOf, ['events']);
  });

  test('temporary tables are not schema changes', () => {
    assert.deepEqual(ddlChangesOf('CREATE TEMP TABLE scratch (a int)'), []);
    assert.deepEqual(ddlChangesOf('CREATE TEMPORARY VIEW v AS SELECT 1'), []);
  });

  test('renames name the object before and after', () => {
    const index = only('ALTER INDEX users_email_idx RENAME TO users_email_old');
    assert.equal(index.command, 'ALTER INDEX');
    assert.deepEqual(index.objects, ['users_email_idx', 'users_email_old']);
    const table = only('ALTER TABLE users RENAME TO accounts');
    assert.deepEqual(table.objects, ['users', 'accounts']);
    const column = only('ALTER TABLE users RENAME COLUMN email TO mail');
    assert.equal(column.command, 'ALTER TABLE');
    assert.deepEqual(column.objects, ['users']);
    assert.deepEqual([column.details.from, column.details.to], ['email', 'mail']);
  });

  test('views and materialized views are created, altered and dropped', () => {
    assert.equal(
      only('CREATE OR REPLACE VIEW active_users AS SELECT * FROM users WHERE active').command,
      'CREATE VIEW',
    );
    const matview = only('CREATE MATERIALIZED VIEW daily AS SELECT count(*) FROM orders');
    assert.equal(matview.command, 'CREATE MATERIALIZED VIEW');
    assert.deepEqual(matview.objects, ['daily']);
    assert.equal(only('ALTER MATERIALIZED VIEW daily SET SCHEMA reports').command, 'ALTER MATERIALIZED VIEW');
    assert.equal(only('DROP MATERIALIZED VIEW daily').command, 'DROP MATERIALIZED VIEW');
    assert.deepEqual(only('DROP VIEW active_users').objects, ['active_users']);
  });

  test('TRUNCATE and REINDEX name their relations', () => {
    const truncate = only('TRUNCATE orders, ONLY app.items RESTART IDENTITY');
    assert.equal(truncate.command, 'TRUNCATE');
    assert.deepEqual(truncate.objects, ['orders', 'items']);
    const reindex = only('REINDEX INDEX CONCURRENTLY users_email_idx');
    assert.equal(reindex.command, 'REINDEX');
    assert.deepEqual(reindex.objects, ['users_email_idx']);
    assert.equal(reindex.details.kind, 'INDEX');
    assert.deepEqual(only('REINDEX SCHEMA app').objects, []);
  });

  test('triggers and policies are named by their table', () => {
    assert.deepEqual(only('DROP TRIGGER audit ON app.users').objects, ['users']);
    assert.deepEqual(only('CREATE POLICY own ON users USING (owner = current_user)').objects, ['users']);
  });

  test('a migration text gives one change per DDL statement, skipping the rest', () => {
    const changes = ddlChangesOf(
      'BEGIN; DROP INDEX users_email_idx; CREATE INDEX users_email_lower_idx ON users (lower(email)); ' +
        "UPDATE users SET email = lower(email) WHERE id > 10; COMMENT ON TABLE users IS 'people'; COMMIT;",
    );
    assert.deepEqual(
      changes.map((c) => [c.command, c.objects, c.statement]),
      [
        ['DROP INDEX', ['users_email_idx'], 'DROP INDEX users_email_idx'],
        [
          'CREATE INDEX',
          ['users_email_lower_idx', 'users'],
          'CREATE INDEX users_email_lower_idx ON users (lower(email))',
        ],
      ],
    );
    assert.deepEqual(changes[1].details.columns, ['lower(email)']);
  });

  test('statements after multi-byte characters are cut at the right place', () => {
    const changes = ddlChangesOf(`COMMENT ON TABLE t IS 'é日本'; CREATE INDEX "Idx_É" ON t (a); DROP TABLE "Café"`);
    assert.deepEqual(
      changes.map((c) => [c.statement, c.objects]),
      [
        ['CREATE INDEX "Idx_É" ON t (a)', ['Idx_É', 't']],
        ['DROP TABLE "Café"', ['Café']],
      ],
    );
  });

  test('quoted identifiers keep their case, unquoted ones are folded', () => {
    assert.deepEqual(only('CREATE INDEX "Users_Email" ON "Users" (email)').objects, ['Users_Email', 'Users']);
    assert.deepEqual(only('DROP TABLE Users').objects, ['users']);
  });

  test('SELECT INTO creates a table; a plain SELECT changes nothing', () => {
    assert.deepEqual(ddlChangesOf('SELECT 1'), []);
    assert.deepEqual(ddlChangesOf("SELECT * FROM users WHERE name = 'create table'"), []);
    assert.equal(only('SELECT * INTO users_copy FROM users').command, 'SELECT INTO');
  });

  test('statements that change no schema give nothing', () => {
    for (const text of [
      'COMMENT ON TABLE users IS $$x$$',
      'GRANT SELECT ON users TO reader',
      'VACUUM ANALYZE users',
      'INSERT INTO users VALUES (1)',
    ]) {
      assert.deepEqual(ddlChangesOf(text), [], text);
    }
  });

  test('text that does not parse gives nothing', () => {
    assert.deepEqual(ddlChangesOf('DROP INDEX'), []);
    assert.deepEqual(ddlChangesOf('CREATE TABLE ('), []);
    assert.deepEqual(ddlChangesOf(''), []);
  });

  test('function bodies are normalized away', () => {
    const change = only("CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 42'");
    assert.equal(change.command, 'CREATE FUNCTION');
    assert.equal(change.statement, 'CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS $1');
  });
});
