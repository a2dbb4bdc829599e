import assert from 'node:assert/strict';
import path from 'node:path';
import { after, describe, test } from 'node:test';
import { loadConfig, parseHostPort } from '../../src/config.ts';
import { exists, read, root, runNodeScript, startAdminServer } from './support.ts';

interface Instruction {
  readonly keyword: string;
  readonly args: string;
}

/** The Dockerfile's instructions by stage (continuation lines joined, comments dropped). */
function parseDockerfile(): { name: string | null; from: string; instructions: Instruction[] }[] {
  const lines = read('Dockerfile').split('\n');
  const logical: string[] = [];
  let current = '';
  for (const line of lines) {
    if (current === '' && /^\s*#/.test(line)) continue;
    if (line.endsWith('\\')) {
      current += `${line.slice(0, -1)} `;
      continue;
    }
    current += line;
    if (current.trim() !== '') logical.push(current.trim());
    current = '';
  }
  const stages: { name: string | null; from: string; instructions: Instruction[] }[] = [];
  for (const text of logical) {
    const [, keyword, args] = /^(\w+)\s+([\s\S]*)$/.exec(text) ?? [];
    if (!keyword) continue;
    if (keyword.toUpperCase() === 'FROM') {
      const m = /^(\S+)(?:\s+AS\s+(\S+))?/i.exec(args)!;
      stages.push({ from: m[1], name: m[2] ?? null, instructions: [] });
    } else {
      assert.ok(stages.length > 0, `${keyword} before FROM`);
      stages.at(-1)!.instructions.push({ keyword: keyword.toUpperCase(), args: args.trim() });
    }
  }
  return stages;
}

/** COPY's flags, sources and destination (shell form only; that is all the Dockerfile uses). */
function copyParts(args: string): { from: string | null; sources: string[]; dest: string } {
  const words = args.split(/\s+/);
  const flags = words.filter((w) => w.startsWith('--'));
  const paths = words.filter((w) => !w.startsWith('--'));
  const from = flags.find((f) => f.startsWith('--from='))?.slice('--from='.length) ?? null;
  return { from, sources: paths.slice(0, -1), dest: paths.at(-1)! };
}

const dockerignore = (): string[] =>
  exists('.dockerignore')
    ? read('.dockerignore')
        .split('\n')
        .map((l) => l.trim())
        .filter((l) => l !== '' && !l.startsWith('#'))
    : [];

const stages = parseDockerfile();
const runtime = stages.at(-1)!;
const build = stages.find((s) => s.name === 'build');
const of = (stage: typeof runtime, keyword: string) => stage.instructions.filter((i) => i.keyword === keyword);

describe('Dockerfile', () => {
  test('is multi-stage: built in a build stage, run from a separate one', () => {
    assert.ok(build, 'a stage named build');
    assert.notEqual(runtime, build);
    const run = of(build, 'RUN')
      .map((i) => i.args)
      .join(' && ');
    assert.match(run, /npm ci\b/, 'dependencies installed with npm ci (exactly the lock file)');
    assert.match(run, /npm run build\b/, 'compiled with npm run build');
    assert.match(run, /npm prune --omit=dev\b/, 'dev dependencies pruned before they are copied');
  });

  test('every file COPY takes from the build context exists in the repository and is not ignored', () => {
    const ignored = dockerignore();
    for (const stage of stages) {
      for (const { args } of of(stage, 'COPY')) {
        const { from, sources } = copyParts(args);
        if (from !== null) continue;
        for (const source of sources) {
          assert.ok(exists(source), `COPY ${source}: no such file in the repository`);
          const first = source.split('/')[0];
          assert.ok(!ignored.includes(source) && !ignored.includes(first), `COPY ${source}: excluded by .dockerignore`);
        }
      }
    }
  });

  test('the runtime stage has what `node bin/pgwarden.js start` needs', () => {
    const copied = of(runtime, 'COPY').flatMap(({ args }) => {
      const { from, sources } = copyParts(args);
      return from === 'build' ? sources.map((s) => path.posix.relative('/app', s)) : [];
    });
    for (const needed of ['package.json', 'node_modules', 'dist', 'bin'])
      assert.ok(copied.includes(needed), `runtime stage lacks ${needed}`);
    // The dashboard is served from src/dashboard/ at run time.
    assert.ok(
      copied.includes('src') || !exists('src/dashboard') || copied.includes('src/dashboard'),
      'runtime stage lacks src/dashboard',
    );
    // What the build stage copies from the build stage was put there: copied in, installed or compiled.
    const builtThere = new Set(['node_modules', 'dist']);
    for (const { args } of of(build!, 'COPY')) {
      const { sources, dest } = copyParts(args);
      if (dest === './') for (const s of sources) builtThere.add(s);
      else builtThere.add(path.posix.normalize(dest));
    }
    for (const c of copied)
      assert.ok(builtThere.has(c), `COPY --from=build /app/${c}: the build stage never creates it`);
    const entry = of(runtime, 'ENTRYPOINT').at(-1)?.args ?? '';
    assert.deepEqual(JSON.parse(entry), ['node', 'bin/pgwarden.js']);
    assert.ok(exists('bin/pgwarden.js'));
    assert.deepEqual(JSON.parse(of(runtime, 'CMD').at(-1)?.args ?? '[]'), ['start']);
  });

  test('runs as a non-root user', () => {
    const user = of(runtime, 'USER').at(-1)?.args;
    assert.ok(user, 'the runtime stage sets USER');
    const name = user.split(':')[0];
    assert.ok(name !== 'root' && name !== '0', `USER ${user} is root`);
  });

  test('EXPOSE matches the ports the baked-in config and the defaults listen on', () => {
    const exposed = of(runtime, 'EXPOSE')
      .flatMap((i) => i.args.split(/\s+/))
      .map((p) => Number(p.split('/')[0]))
      .sort();
    const env = of(runtime, 'ENV')
      .map((i) => i.args)
      .join(' ');
    const configFile = /PGWARDEN_CONFIG=(\S+)/.exec(env)?.[1];
    assert.ok(configFile, 'the image names its config file in PGWARDEN_CONFIG');
    const baked = of(runtime, 'COPY')
      .map((i) => copyParts(i.args))
      .find((c) => c.from === null && c.dest === configFile);
    assert.ok(baked, `${configFile} is copied into the image`);
    const config = loadConfig({ file: path.join(root, baked.sources[0]) });
    const ports = [parseHostPort(config.listen).port, parseHostPort(config.admin).port].sort();
    assert.deepEqual(exposed, ports, 'EXPOSE = listen and admin ports of the baked-in config');
    const defaults = loadConfig();
    assert.deepEqual(
      ports,
      [parseHostPort(defaults.listen).port, parseHostPort(defaults.admin).port].sort(),
      'and those are the default ports',
    );
    assert.ok(
      config.state_file.startsWith('/var/lib/pgwarden/'),
      'the state file is in the directory the image makes writable',
    );
    assert.ok(of(runtime, 'RUN').some((i) => i.args.includes('/var/lib/pgwarden') && i.args.includes('chown')));
  });

  describe('HEALTHCHECK', () => {
    const healthcheck = of(runtime, 'HEALTHCHECK').at(-1)?.args ?? '';
    const command = JSON.parse(healthcheck.slice(healthcheck.indexOf('CMD') + 3).trim() || '[]') as string[];
    const token = 'healthcheck-token-0123456789';
    let ready = true;
    const admin = startAdminServer(token, () => ready);
    after(async () => (await admin).close());

    test('is present and fetches /healthz on the admin server', () => {
      assert.ok(healthcheck, 'the runtime stage has a HEALTHCHECK');
      assert.deepEqual(command.slice(0, 2), ['node', '-e']);
      assert.match(command[2], /\/healthz/);
    });

    test('passes against a running admin server, whatever its readiness', async () => {
      const { port } = await admin;
      ready = false;
      assert.equal(await runNodeScript(command[2], { PGWARDEN_ADMIN: `127.0.0.1:${port}` }), 0);
      assert.equal(
        await runNodeScript(command[2], { PGWARDEN_ADMIN: `0.0.0.0:${port}` }),
        0,
        'a wildcard admin address is checked on loopback',
      );
      ready = true;
    });

    test('fails when nothing answers on the admin port', async () => {
      const gone = await startAdminServer(token, () => true);
      await gone.close();
      assert.equal(await runNodeScript(command[2], { PGWARDEN_ADMIN: `127.0.0.1:${gone.port}` }), 1);
    });
  });
});
