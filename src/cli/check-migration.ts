// `pgwarden check-migration`: before deploy, does this migration change the
// plans of the captured workload for the worse? Applies it inside a transaction
// on a staging database, EXPLAINs every shape before and after, rolls back.

import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { loadParser } from '../shapes/fingerprint.ts';
import { CheckError, checkMigration } from '../workload/check.ts';
import { parseWorkload, WorkloadError, type Workload } from '../workload/format.ts';
import { MigrationSyntaxError, parseMigration, type MigrationStatement } from '../workload/migration.ts';
import { FAIL_ON, failures, renderText, reportJson, type FailOn } from '../workload/report.ts';
import type { Output } from './admin-client.ts';

export const CHECK_MIGRATION_USAGE = `usage: pgwarden check-migration --database-url URL --workload FILE MIGRATION.sql [options]

  applies MIGRATION.sql inside one transaction on a staging database, EXPLAINs
  every shape of the workload (from pgwarden workload export) before and after,
  rolls back, and reports plan changes and cost ratios, heaviest shapes first

  --database-url URL    the staging database (PGWARDEN_CHECK_DATABASE_URL)
  --workload FILE       the workload JSON from pgwarden workload export
  --format text|json    the report's format (default text)
  --fail-on LIST        what fails the check, a comma list of regression, lock
                        (an outage pattern in the migration's locks), not-checked
                        (default regression)
  --strict              a shape that could not be checked fails (= --fail-on ...,not-checked)
  --explain-role ROLE   plan the captured shapes as ROLE (SET LOCAL ROLE; recommended:
                        the application's own role); without it, shapes calling
                        functions or operators outside pg_catalog are not checked
  --allow-user-functions  plan those shapes as the check's own role anyway
  --cost-ratio N        a changed plan at least N times the cost is a regression (default 2)
  --long-lock SECONDS   an ACCESS EXCLUSIVE held this long on a hot table is flagged (default 1)
  --timeout SECONDS     for the whole check; then it is stopped and rolled back (default 60)
  --lock-timeout SECONDS  lock_timeout of the check's session (default 5)

exit status: 0 clean, 1 a failure chosen by --fail-on, 2 usage or connection
error (or the migration failed on the staging database); nothing is ever committed
`;

const OPTIONS = {
  'database-url': { type: 'string' },
  workload: { type: 'string' },
  format: { type: 'string' },
  'cost-ratio': { type: 'string' },
  timeout: { type: 'string' },
  'lock-timeout': { type: 'string' },
  'fail-on': { type: 'string' },
  strict: { type: 'boolean' },
  'explain-role': { type: 'string' },
  'allow-user-functions': { type: 'boolean' },
  'long-lock': { type: 'string' },
  help: { type: 'boolean' },
} as const;

/** Exit code after Ctrl-C, as shells report a process ended by SIGINT. */
const INTERRUPTED = 130;

class UsageError extends Error {}

/** Runs the check; returns the exit code (0 clean, 1 a failure chosen by --fail-on, 2 usage or connection error). */
export async function runCheckMigration(
  args: string[],
  out: Output = process.stdout,
  err: Output = process.stderr,
  signal?: AbortSignal,
): Promise<number> {
  const fail = (message: string) => {
    err.write(`pgwarden check-migration: ${message}\n`);
    return 2;
  };
  let parsed;
  try {
    parsed = parseArgs({ args, options: OPTIONS, allowPositionals: true, strict: true });
  } catch (e) {
    err.write(`pgwarden check-migration: ${(e as Error).message}\n${CHECK_MIGRATION_USAGE}`);
    return 2;
  }
  const { values, positionals } = parsed;
  if (values.help) {
    out.write(CHECK_MIGRATION_USAGE);
    return 0;
  }

  let settings: {
    databaseUrl: string;
    workloadFile: string;
    migrationFile: string;
    format: 'text' | 'json';
    costRatio: number;
    timeoutMs: number;
    lockTimeoutMs: number;
    failOn: FailOn[];
    explainRole: string | null;
    allowUserFunctions: boolean;
    longLockMs: number;
  };
  try {
    settings = {
      databaseUrl: required(
        values['database-url'] ?? process.env.PGWARDEN_CHECK_DATABASE_URL,
        '--database-url URL (or PGWARDEN_CHECK_DATABASE_URL) is required: the staging database to check on',
      ),
      workloadFile: required(values.workload, '--workload FILE is required: the output of pgwarden workload export'),
      migrationFile: migrationArgument(positionals),
      format: formatOf(values.format),
      costRatio: positiveNumber('cost-ratio', values['cost-ratio'], 2),
      timeoutMs: positiveNumber('timeout', values.timeout, 60) * 1000,
      lockTimeoutMs: positiveNumber('lock-timeout', values['lock-timeout'], 5) * 1000,
      failOn: failOnOf(values['fail-on'], values.strict === true),
      explainRole:
        values['explain-role'] === undefined
          ? null
          : required(values['explain-role'], '--explain-role needs a role name'),
      allowUserFunctions: values['allow-user-functions'] === true,
      longLockMs: positiveNumber('long-lock', values['long-lock'], 1) * 1000,
    };
    if (!/^postgres(ql)?:\/\//.test(settings.databaseUrl))
      throw new UsageError('--database-url must be a postgres:// URL');
  } catch (e) {
    if (e instanceof UsageError) {
      err.write(`pgwarden check-migration: ${e.message}\n${CHECK_MIGRATION_USAGE}`);
      return 2;
    }
    throw e;
  }

  let workload: Workload;
  try {
    workload = parseWorkload(JSON.parse(fs.readFileSync(settings.workloadFile, 'utf8')));
  } catch (e) {
    const reason =
      e instanceof WorkloadError
        ? e.message
        : e instanceof SyntaxError
          ? `not JSON: ${e.message}`
          : ((e as NodeJS.ErrnoException).code ?? (e as Error).message);
    return fail(`cannot use the workload ${settings.workloadFile}: ${reason}`);
  }

  let migration: MigrationStatement[];
  let sql: string;
  try {
    sql = settings.migrationFile === '-' ? fs.readFileSync(0, 'utf8') : fs.readFileSync(settings.migrationFile, 'utf8');
  } catch (e) {
    return fail(
      `cannot read the migration ${settings.migrationFile}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`,
    );
  }
  await loadParser();
  try {
    migration = parseMigration(sql);
  } catch (e) {
    if (!(e instanceof MigrationSyntaxError)) throw e;
    return fail(
      `the migration ${settings.migrationFile} does not parse${e.line === null ? '' : ` (line ${e.line})`}: ${e.message}`,
    );
  }
  if (migration.length === 0) return fail(`the migration ${settings.migrationFile} holds no SQL statement`);

  const name = settings.migrationFile === '-' ? 'the migration' : path.basename(settings.migrationFile);
  const interrupt = signal === undefined ? onInterrupt() : null;
  try {
    const report = await checkMigration({ ...settings, workload, migration, signal: signal ?? interrupt!.signal });
    out.write(
      settings.format === 'json'
        ? `${JSON.stringify(reportJson(report, name, settings.failOn), null, 2)}\n`
        : renderText(report, name, settings.failOn),
    );
    return failures(report, settings.failOn).failed ? 1 : 0;
  } catch (e) {
    if (!(e instanceof CheckError)) throw e;
    err.write(`pgwarden check-migration: ${e.message}\n`);
    return e.kind === 'interrupted' ? INTERRUPTED : 2;
  } finally {
    interrupt?.dispose();
  }
}

function required(value: string | undefined, message: string): string {
  if (value === undefined || value === '') throw new UsageError(message);
  return value;
}

function migrationArgument(positionals: string[]): string {
  if (positionals.length === 0) throw new UsageError('which migration? Give the MIGRATION.sql file (or - for stdin)');
  if (positionals.length > 1)
    throw new UsageError(`one migration file at a time, got ${positionals.length}: ${positionals.join(' ')}`);
  return positionals[0];
}

function formatOf(value: string | undefined): 'text' | 'json' {
  if (value === undefined || value === 'text' || value === 'json') return value ?? 'text';
  throw new UsageError(`--format must be text or json, got '${value}'`);
}

function failOnOf(value: string | undefined, strict: boolean): FailOn[] {
  const list =
    value === undefined
      ? ['regression']
      : value
          .split(',')
          .map((v) => v.trim())
          .filter((v) => v !== '');
  for (const item of list) {
    if (!(FAIL_ON as readonly string[]).includes(item))
      throw new UsageError(`--fail-on takes a comma list of ${FAIL_ON.join(', ')}; got '${item}'`);
  }
  if (list.length === 0) throw new UsageError(`--fail-on takes a comma list of ${FAIL_ON.join(', ')}`);
  if (strict && !list.includes('not-checked')) list.push('not-checked');
  return list as FailOn[];
}

function positiveNumber(flag: string, value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n) || n <= 0)
    throw new UsageError(`--${flag} must be a positive number, got '${value}'`);
  return n;
}

/** While the check runs, Ctrl-C (or SIGTERM) stops it and rolls back; a second one exits at once. */
function onInterrupt(): { signal: AbortSignal; dispose(): void } {
  const controller = new AbortController();
  const onSignal = () => {
    if (controller.signal.aborted) process.exit(INTERRUPTED);
    controller.abort();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  return {
    signal: controller.signal,
    dispose() {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
    },
  };
}
