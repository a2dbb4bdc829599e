// The local state file: rules survive a rewrite and a restart, a rewrite is atomic
// and leaves nothing behind, and a damaged file is an error rather than "no rules".

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, test } from 'node:test';
import pino from 'pino';
import type { Rule } from '../../src/rules/rule.ts';
import { StateFile } from '../../src/state/file.ts';
import { rule } from './rules.ts';

const log = pino({ level: 'silent' });

describe('StateFile', () => {
  let dir: string;
  let file: string;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgwarden-state-'));
    file = path.join(dir, 'state.json');
  });

  afterEach(() => {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  test('rules added and removed are what a new instance loads from the same file', async () => {
    const first = new StateFile(file, log);
    await first.add(rule('r-1'));
    await first.add(rule('r-2', { action: 'shed', max_concurrent: 2, queue_timeout_ms: 1000 }));
    await first.add(
      rule('r-3', { action: 'reroute', target: 'replica', ttl_s: 60, expires_at: '2026-01-01T00:01:00.000Z' }),
    );
    await first.remove('r-1');
    await first.remove('r-unknown');
    await first.close();

    const second = new StateFile(file, log);
    assert.deepEqual(await second.load(), [
      rule('r-2', { action: 'shed', max_concurrent: 2, queue_timeout_ms: 1000 }),
      rule('r-3', { action: 'reroute', target: 'replica', ttl_s: 60, expires_at: '2026-01-01T00:01:00.000Z' }),
    ]);
    const onDisk = JSON.parse(fs.readFileSync(file, 'utf8'));
    assert.equal(onDisk.version, 1);
    assert.deepEqual(
      onDisk.rules.map((r: Rule) => r.id),
      ['r-2', 'r-3'],
    );
  });

  test('adding a rule with an existing id replaces it', async () => {
    const state = new StateFile(file, log);
    await state.add(rule('r-1'));
    await state.add(rule('r-1', { reason: 'second thoughts' }));
    assert.deepEqual(await state.load(), [rule('r-1', { reason: 'second thoughts' })]);
  });

  test('a rewrite replaces the file by rename, leaves no temp file and is readable only by its owner', async () => {
    const state = new StateFile(file, log);
    await state.add(rule('r-1'));
    const inodeBefore = fs.statSync(file).ino;
    await state.add(rule('r-2'));
    const stat = fs.statSync(file);
    assert.notEqual(stat.ino, inodeBefore, 'the file was replaced, not rewritten in place');
    assert.equal(stat.mode & 0o777, 0o600);
    assert.deepEqual(fs.readdirSync(dir), ['state.json']);
  });

  test('a missing file means no rules, and the first change creates it and its directory', async () => {
    const nested = path.join(dir, 'not', 'yet', 'state.json');
    const state = new StateFile(nested, log);
    assert.deepEqual(await state.load(), []);
    assert.equal(fs.existsSync(nested), false, 'loading does not create the file');
    await state.add(rule('r-1'));
    assert.deepEqual(
      (await new StateFile(nested, log).load()).map((r) => r.id),
      ['r-1'],
    );
  });

  test('a corrupt file is an error naming the file and the problem, and is left untouched', async () => {
    fs.writeFileSync(file, '{"version": 1, "rules": [');
    const state = new StateFile(file, log);
    await assert.rejects(state.load(), (error: Error) => {
      assert.ok(error.message.includes(file), error.message);
      assert.match(error.message, /not valid JSON/);
      return true;
    });
    await assert.rejects(state.add(rule('r-1')), /not valid JSON/);
    assert.equal(fs.readFileSync(file, 'utf8'), '{"version": 1, "rules": [');
  });

  test('a file of another shape or version is an error, not an empty rule set', async () => {
    for (const [contents, problem] of [
      ['[]', /expected an object/],
      ['{"version": 2, "rules": []}', /unsupported version 2/],
      ['{"version": 1, "rules": {}}', /"rules" must be an array/],
    ] as const) {
      fs.writeFileSync(file, contents);
      await assert.rejects(new StateFile(file, log).load(), problem, contents);
    }
  });

  test('entries that are not rules are skipped with a warning, the others kept', async () => {
    fs.writeFileSync(
      file,
      JSON.stringify({ version: 1, rules: [rule('r-1'), { id: 'r-bad', action: 'explode' }, 42, rule('r-2')] }),
    );
    const warnings: unknown[] = [];
    const recording = pino({ level: 'warn' }, { write: (line: string) => warnings.push(JSON.parse(line)) });
    const rules = await new StateFile(file, recording).load();
    assert.deepEqual(
      rules.map((r) => r.id),
      ['r-1', 'r-2'],
    );
    assert.equal(warnings.length, 2);
  });

  test('an entry that is not a valid rule survives the next rewrite untouched', async () => {
    const bad = { id: 'r-bad', action: 'explode', fingerprint: 'not-hex', note: { kept: true } };
    fs.writeFileSync(file, JSON.stringify({ version: 1, rules: [rule('r-1'), bad] }));
    const warnings: { msg: string; id?: string }[] = [];
    const state = new StateFile(
      file,
      pino({ level: 'warn' }, { write: (line: string) => warnings.push(JSON.parse(line)) }),
    );
    await state.load();
    assert.equal(warnings[0].id, 'r-bad');
    assert.match(warnings[0].msg, /NOT applied, and kept in the file/);
    await state.add(rule('r-2'));
    await state.remove('r-1');
    const written = JSON.parse(fs.readFileSync(file, 'utf8'));
    assert.deepEqual(
      written.rules.map((r: { id: string }) => r.id),
      ['r-2', 'r-bad'],
    );
    assert.deepEqual(written.rules[1], bad);
  });

  test('concurrent adds and removes do not lose each other', async () => {
    const state = new StateFile(file, log);
    await state.add(rule('r-doomed'));
    const ids = Array.from({ length: 25 }, (_, i) => `r-${i}`);
    await Promise.all([...ids.map((id) => state.add(rule(id))), state.remove('r-doomed')]);
    const loaded = (await new StateFile(file, log).load()).map((r) => r.id).sort();
    assert.deepEqual(loaded, [...ids].sort());
    assert.deepEqual(fs.readdirSync(dir), ['state.json']);
  });

  test('a failed rewrite leaves the previous file and no temp file', {
    skip: process.getuid?.() === 0 ? 'root ignores directory permissions' : false,
  }, async () => {
    const state = new StateFile(file, log);
    await state.add(rule('r-1'));
    fs.chmodSync(dir, 0o500);
    try {
      await assert.rejects(
        state.add(rule('r-2')),
        (error: Error) => error.message.includes(file) && /cannot write/.test(error.message),
      );
    } finally {
      fs.chmodSync(dir, 0o700);
    }
    assert.deepEqual(
      (await state.load()).map((r) => r.id),
      ['r-1'],
    );
    assert.deepEqual(fs.readdirSync(dir), ['state.json']);
  });
});
