// How check-migration reads a migration: statements split by the parser, each
// in a form that runs inside the check's transaction, nothing that could commit.

import assert from 'node:assert/strict';
import { before, describe, test } from 'node:test';
import { loadParser } from '../../src/shapes/fingerprint.ts';
import { MigrationSyntaxError, parseMigration } from '../../src/workload/migration.ts';

const runOf = (sql: string) => parseMigration(sql).map((s) => s.run);

describe('parseMigration', () => {
  before(() => loadParser());

  test('statements are split by the parser, with their lines, semicolons in bodies and strings included', () => {
    const sql =
      "-- é first\nalter table users add column bio text;\n\ncreate function f() returns text language sql as $$ select 'a;b'; $$;\nselect ';';";
    const statements = parseMigration(sql);
    assert.deepEqual(
      statements.map((s) => [s.index, s.line, s.text, s.note]),
      [
        [1, 2, 'alter table users add column bio text', null],
        [2, 4, "create function f() returns text language sql as $$ select 'a;b'; $$", null],
        [3, 5, "select ';'", null],
      ],
    );
    assert.deepEqual(
      statements.map((s) => s.run),
      statements.map((s) => s.text),
    );
  });

  test('CONCURRENTLY variants run in their plain form', () => {
    assert.deepEqual(
      runOf(
        'CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS users_x ON users (lower(email));' +
          'DROP INDEX CONCURRENTLY IF EXISTS users_email_idx;' +
          'REINDEX INDEX CONCURRENTLY users_pkey;' +
          'REINDEX (VERBOSE, CONCURRENTLY) TABLE users;' +
          'REINDEX (CONCURRENTLY) INDEX users_pkey;',
      ),
      [
        'CREATE UNIQUE INDEX IF NOT EXISTS users_x ON users (lower(email))',
        'DROP INDEX IF EXISTS users_email_idx',
        'REINDEX INDEX users_pkey',
        'REINDEX (VERBOSE) TABLE users',
        'REINDEX INDEX users_pkey',
      ],
    );
    assert.match(
      parseMigration('create index concurrently i on t (a)')[0].note!,
      /CREATE INDEX CONCURRENTLY runs as CREATE INDEX/,
    );
  });

  test('VACUUM runs as the ANALYZE it implies, or is skipped', () => {
    const statements = parseMigration(
      'VACUUM (ANALYZE, VERBOSE) public.users (email), orders; VACUUM ANALYZE; VACUUM users; VACUUM (ANALYZE off) users; ANALYZE users;',
    );
    assert.deepEqual(
      statements.map((s) => s.run),
      ['ANALYZE public.users (email), orders', 'ANALYZE', null, null, 'ANALYZE users'],
    );
    assert.match(statements[2].note!, /skipped VACUUM: it cannot run inside a transaction block/);
    assert.equal(statements[4].note, null);
  });

  test('transaction control is skipped; savepoints run', () => {
    const statements = parseMigration(
      "BEGIN; START TRANSACTION; SAVEPOINT s; ROLLBACK TO SAVEPOINT s; RELEASE s; COMMIT; END; ROLLBACK; PREPARE TRANSACTION 'x'; COMMIT PREPARED 'x'",
    );
    assert.deepEqual(
      statements.map((s) => s.run),
      [null, null, 'SAVEPOINT s', 'ROLLBACK TO SAVEPOINT s', 'RELEASE s', null, null, null, null, null],
    );
    assert.match(
      statements[5].note!,
      /^skipped COMMIT: the check runs the whole migration in one transaction of its own/,
    );
  });

  test('statements that can never run in a transaction block are skipped with a note', () => {
    const statements = parseMigration(
      'create database x; alter system set work_mem = 1; reindex schema public; reindex database x; cluster;',
    );
    assert.deepEqual(
      statements.map((s) => s.run),
      [null, null, null, null, null],
    );
    assert.ok(statements.every((s) => /cannot run inside a transaction block/.test(s.note!)));
  });

  test('a syntax error names the line it is on', () => {
    assert.throws(
      () => parseMigration('alter table users add column ok int;\n\nalter tabel users drop column email;'),
      (error: unknown) =>
        error instanceof MigrationSyntaxError &&
        error.line === 3 &&
        /syntax error at or near "tabel"/.test(error.message),
    );
  });

  test('a file of comments holds no statement', () => {
    assert.deepEqual(parseMigration('-- nothing to do\n/* really */\n'), []);
  });
});
