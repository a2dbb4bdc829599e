import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { ConfigError, configurationReference, loadConfig } from '../src/config.ts';

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'pgw-config-'));
after(() => fs.rmSync(dir, { recursive: true, force: true }));
let fileCount = 0;

function tempFile(name: string, content: string): string {
  const file = path.join(dir, `${fileCount++}-${name}`);
  fs.writeFileSync(file, content);
  return file;
}

describe('configuration', () => {
  test('defaults are the documented ones (docs/configuration.md)', () => {
    const config = loadConfig();
    assert.equal(config.listen, '127.0.0.1:6464');
    assert.equal(config.admin, '127.0.0.1:6465');
    assert.equal(config.upstream, '127.0.0.1:5432');
    assert.equal(config.upstream_tls, 'disable');
  });

  test('flags override the environment, which overrides the file', () => {
    const file = tempFile('c.yaml', 'listen: 127.0.0.1:1111\nupstream: db:5432\nworkers: 2\n');
    const config = loadConfig({
      file,
      env: { PGWARDEN_LISTEN: '127.0.0.1:2222', PGWARDEN_WORKERS: '3' },
      flags: { listen: '127.0.0.1:3333' },
    });
    assert.equal(config.listen, '127.0.0.1:3333');
    assert.equal(config.workers, 3);
    assert.equal(config.upstream, 'db:5432');
  });

  test('JSON files are read as JSON', () => {
    const file = tempFile('c.json', JSON.stringify({ upstream: '10.0.0.5:6432', max_message_bytes: 4096 }));
    const config = loadConfig({ file });
    assert.equal(config.upstream, '10.0.0.5:6432');
    assert.equal(config.max_message_bytes, 4096);
  });

  test('a bad value names the option and where it came from', () => {
    assert.throws(
      () => loadConfig({ flags: { listen: 'nonsense' } }),
      (err: Error) => {
        assert.ok(err instanceof ConfigError);
        assert.match(err.message, /listen \(from --listen\): expected HOST:PORT/);
        return true;
      },
    );
    assert.throws(() => loadConfig({ env: { PGWARDEN_WORKERS: '-1' } }), /workers \(from PGWARDEN_WORKERS\)/);
  });

  test('an unknown key in the file is an error, not silently ignored', () => {
    const file = tempFile('c.yaml', 'listen: 127.0.0.1:1\nlisen_typo: 1\n');
    assert.throws(() => loadConfig({ file }), /lisen_typo/);
  });

  test('a certificate without its key is refused', () => {
    assert.throws(() => loadConfig({ flags: { tls_cert: '/x.pem' } }), /tls_cert and tls_key must be given together/);
  });

  test('an unreadable or unparsable file gets one clear message', () => {
    assert.throws(
      () => loadConfig({ file: '/nonexistent/pgwarden.yaml' }),
      /cannot read config file \/nonexistent\/pgwarden.yaml: ENOENT/,
    );
    const file = tempFile('c.yaml', 'listen: [unclosed\n');
    assert.throws(() => loadConfig({ file }), /is not valid YAML/);
  });

  test('docs/configuration.md lists every option as the schema declares it', () => {
    const docs = fs.readFileSync(new URL('../docs/configuration.md', import.meta.url), 'utf8');
    assert.ok(docs.includes(configurationReference()), 'regenerate with `npm run docs:config`');
  });
});

describe('pgwarden start with a bad configuration', () => {
  test('prints one clear message and exits 2', () => {
    const file = tempFile('c.yaml', 'listen: 127.0.0.1:99999999\n');
    const result = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'start', '--config', file], {
      cwd: new URL('..', import.meta.url),
      encoding: 'utf8',
      timeout: 20_000,
    });
    assert.equal(result.status, 2, result.stderr);
    const lines = result.stderr.trim().split('\n');
    assert.equal(lines.length, 1);
    assert.match(lines[0], /^pgwarden: invalid configuration: listen \(from .*c\.yaml\)/);
  });

  test('an unknown flag exits 2 too', () => {
    const result = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'start', '--no-such-flag'], {
      cwd: new URL('..', import.meta.url),
      encoding: 'utf8',
      timeout: 20_000,
    });
    assert.equal(result.status, 2);
    assert.match(result.stderr, /^pgwarden: .*no-such-flag/);
  });
});
