// The pgwarden command line: parses the subcommand and its flags (flags derive
// from the configuration schema), and turns configuration errors into one clear
// message and exit code 2.

// First: V8 flags for the parser's WebAssembly must be set before it is compiled.
import '../shapes/wasm-tiering.ts';
import { parseArgs } from 'node:util';
import { ConfigError, envName, flagName, loadConfig, OPTIONS, optionKeys, type OptionKey } from '../config.ts';
import { runCheckMigration } from './check-migration.ts';
import { runDemo } from './demo.ts';
import { runIncidents } from './incidents.ts';
import { runRules } from './rules.ts';
import { runSessions } from './sessions.ts';
import { VERSION } from '../version.ts';
import { runStart } from './start.ts';
import { runWorkload } from './workload.ts';

const USAGE = `usage: pgwarden <command> [options]

commands:
  start     run the proxy
  rules     list, add (block, shed, reroute) and lift rules on a running pgwarden
  sessions  list the live sessions of a running pgwarden; cancel or terminate one
  incidents list incidents of a running pgwarden, show one, or print its postmortem (Markdown)
  demo      replay the index-change incident on an embedded PostgreSQL (--once to exit after it)
  workload  export the captured workload of a running pgwarden (workload export --help)
  check-migration  EXPLAIN the workload before and after a migration on a staging database (--help)
  help      show this help (--version: the version)

signals to start: SIGTERM/SIGINT drain and exit; SIGHUP reloads the config file

options of start (each also PGWARDEN_<NAME> in the environment, or a key of --config FILE):
  --config FILE   YAML or JSON configuration file (PGWARDEN_CONFIG)
${optionKeys.map((key) => `  --${flagName(key).padEnd(20)} ${(OPTIONS[key] as { description?: string }).description ?? ''} (${envName(key)})`).join('\n')}
`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'start':
      return start(rest);
    case 'rules':
      return runRules(rest);
    case 'incidents':
      return runIncidents(rest);
    case 'sessions':
      return runSessions(rest);
    case 'version':
    case '--version':
    case '-V':
      process.stdout.write(`pgwarden ${VERSION}\n`);
      return 0;
    case 'demo':
      return runDemo(rest);
    case 'workload':
      return runWorkload(rest);
    case 'check-migration':
      return runCheckMigration(rest);
    case undefined:
    case 'help':
    case '--help':
    case '-h':
      process.stdout.write(USAGE);
      return command === undefined ? 2 : 0;
    default:
      process.stderr.write(`pgwarden: unknown command '${command}'\n${USAGE}`);
      return 2;
  }
}

async function start(args: string[]): Promise<number> {
  const flagOptions: Record<string, { type: 'string' | 'boolean' }> = {
    config: { type: 'string' },
    help: { type: 'boolean' },
  };
  for (const key of optionKeys) flagOptions[flagName(key)] = { type: 'string' };
  let values: Record<string, string | boolean | undefined>;
  try {
    ({ values } = parseArgs({ args, options: flagOptions, strict: true, allowPositionals: false }));
  } catch (err) {
    process.stderr.write(`pgwarden: ${(err as Error).message}\n`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const flags: Partial<Record<OptionKey, string>> = {};
  for (const key of optionKeys) {
    const value = values[flagName(key)];
    if (typeof value === 'string') flags[key] = value;
  }
  try {
    const file = (values.config as string | undefined) ?? process.env.PGWARDEN_CONFIG;
    const sources = { file, env: process.env, flags };
    const config = loadConfig(sources);
    await runStart(config, sources);
    return -1; // keeps running until a signal
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`pgwarden: ${err.message}\n`);
      return 2;
    }
    process.stderr.write(`pgwarden: ${(err as Error).message}\n`);
    return 1;
  }
}

const isEntryPoint = process.argv[1] !== undefined && import.meta.url.endsWith(process.argv[1].replace(/\\/g, '/'));
if (isEntryPoint) {
  main(process.argv.slice(2)).then((code) => {
    if (code >= 0) process.exit(code);
  });
}
