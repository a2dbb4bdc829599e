// The one source of truth for configuration: each option is declared once with its
// schema, default and description; the config file keys, the --flags and the
// PGWARDEN_* environment variables, and docs/configuration.md all derive from it.
// Precedence: defaults < config file < environment < flags.

import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';

/** An option given as JSON on the command line or in the environment. */
const json = <T extends z.ZodType>(schema: T) =>
  z.preprocess((v) => {
    if (typeof v !== 'string') return v;
    try {
      return JSON.parse(v);
    } catch {
      return v; // reported by the schema as the wrong type
    }
  }, schema);
const list = z.preprocess(
  (v) =>
    typeof v === 'string'
      ? v
          .split(',')
          .map((s) => s.trim())
          .filter(Boolean)
      : v,
  z.array(z.string()),
);

const hostPort = z
  .string()
  .regex(/^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$/, 'expected HOST:PORT')
  .refine((v) => Number(v.slice(v.lastIndexOf(':') + 1)) <= 65535, 'port must be at most 65535');
const positiveInt = z.coerce.number().int().positive();
const nonNegative = z.coerce.number().min(0);
const bool = z
  .union([z.boolean(), z.enum(['true', 'false', '1', '0', 'on', 'off', 'yes', 'no'])])
  .transform((v) => v === true || v === 'true' || v === '1' || v === 'on' || v === 'yes');

/** Every option: key (as in the config file) -> schema with default and description. */
export const OPTIONS = {
  listen: hostPort.default('127.0.0.1:6464').describe('Address the proxy accepts PostgreSQL clients on.'),
  listen_unix: z
    .string()
    .min(1)
    .optional()
    .describe(
      'Directory of a Unix socket to accept clients on too, named `.s.PGSQL.<port>` as PostgreSQL does (so `psql -h DIR -p PORT` works).',
    ),
  upstream: hostPort
    .default('127.0.0.1:5432')
    .describe('The PostgreSQL server (or PgBouncer) queries are forwarded to.'),
  admin: hostPort.default('127.0.0.1:6465').describe('Address of the admin HTTP server (API, metrics, dashboard).'),
  admin_token: z
    .string()
    .min(16, 'must be at least 16 characters')
    .optional()
    .describe('Bearer token required by the admin API.'),
  monitor_url: z
    .string()
    .regex(/^postgres(ql)?:\/\//, 'expected a postgres:// URL')
    .optional()
    .describe('Connection URL of the monitoring role used for EXPLAIN and catalog checks.'),
  upstream_tls: z
    .enum(['disable', 'prefer', 'require', 'verify-full'])
    .default('disable')
    .describe('TLS toward the upstream, with libpq sslmode meanings.'),
  upstream_tls_ca: z
    .string()
    .optional()
    .describe('PEM file with the CA that signed the upstream certificate (for verify-full).'),
  tls_cert: z
    .string()
    .optional()
    .describe('PEM certificate for TLS toward clients; without it SSLRequest is answered N.'),
  tls_key: z.string().optional().describe('PEM private key for tls_cert.'),
  max_message_bytes: positiveInt
    .min(1024)
    .default(128 * 1024 * 1024)
    .describe('Largest client message accepted; larger ones get 08P01 and the connection is closed.'),
  startup_timeout_ms: positiveInt
    .default(60_000)
    .describe(
      "Time a new connection has to send its startup packet and finish authentication (like PostgreSQL's authentication_timeout); then it is closed.",
    ),
  max_client_connections: positiveInt
    .optional()
    .describe(
      'Client connections held at once; past it a new one gets 53300 and is closed. Default: 10000, or fewer when the open-file limit cannot hold two descriptors per client.',
    ),
  connect_timeout_ms: positiveInt
    .default(5_000)
    .describe('Time allowed to connect to the upstream before the client gets 08006.'),
  drain_timeout_ms: positiveInt
    .default(30_000)
    .describe('On SIGTERM, how long in-flight queries may run before connections are closed.'),
  workers: z.coerce
    .number()
    .int()
    .min(0)
    .default(1)
    .describe('Proxy processes sharing the listen port; 0 means one per CPU core.'),
  stats: bool.default(true).describe('Fingerprint every statement and keep per-shape statistics (off: a plain proxy).'),
  max_shapes: positiveInt
    .default(2000)
    .describe('Shapes tracked at once; the least recently seen are folded into one overflow shape.'),
  shape_cache_entries: positiveInt.default(10_000).describe('Distinct statement texts whose shape is cached.'),
  shape_cache_mb: positiveInt
    .default(16)
    .describe(
      'Memory the shape caches may hold (texts, literal-free keys and shapes, estimated), in MiB; the least recently used entries go first.',
    ),
  max_shape_text_bytes: positiveInt
    .default(65_536)
    .describe('Statements longer than this get a cheap fallback shape instead of being parsed.'),
  slow_query_ms: nonNegative
    .default(1000)
    .describe('Statements at least this slow get a log line; 0 logs every statement.'),
  log_query_values: bool
    .default(false)
    .describe('Include the literal statement text in log lines (off: only normalized text, never values).'),
  workload_sample_params: bool
    .default(false)
    .describe('Include sample parameter values in the workload export (off: literal values never leave pgwarden).'),
  metrics_top_shapes: positiveInt
    .default(50)
    .describe('Shapes with their own Prometheus series (by total time); the rest are summed as "other".'),
  series_bucket_s: positiveInt.default(10).describe('Width of one bucket of the per-shape latency time series.'),
  series_buckets: positiveInt.default(360).describe('Buckets kept per shape (360 x 10 s = one hour).'),
  admin_max_connections: positiveInt
    .default(64)
    .describe('Open admin HTTP connections at most; more are answered 503 and closed.'),
  monitor_concurrency: positiveInt
    .default(2)
    .describe('Monitoring connections per database (EXPLAIN sampling, catalog checks).'),
  monitor_max_databases: positiveInt
    .default(8)
    .describe(
      "Databases the monitoring connection keeps a pool for at once (EXPLAIN runs in each session's own database); the least recently used pool is closed beyond it. Also the most databases whose catalog and statistics are watched (the monitor URL's and those seen in traffic, first come first watched).",
    ),
  monitor_statement_timeout_ms: positiveInt.default(5000).describe('statement_timeout of monitoring queries.'),
  monitor_lock_timeout_ms: positiveInt
    .default(1000)
    .describe(
      'lock_timeout of monitoring queries, so EXPLAIN and catalog reads never queue behind a lock held on the database.',
    ),
  plan_sample_period_s: positiveInt
    .default(60)
    .describe('Each shape is re-explained at least this often (and at once on a latency jump or schema change).'),
  plan_samples_per_second: positiveInt.default(10).describe('Upper bound on EXPLAINs per second across all shapes.'),
  schema_check_interval_s: positiveInt
    .default(5)
    .describe('How often the catalog is compared with its last snapshot (catches migrations run elsewhere).'),
  detect_min_samples: positiveInt.default(20).describe('Recent calls a shape needs before it can be judged regressed.'),
  detect_p95_ratio: z.coerce
    .number()
    .min(1)
    .default(3)
    .describe('Regressed when recent p95 is at least this many times the baseline p95...'),
  detect_p50_ratio: z.coerce
    .number()
    .min(1)
    .default(2)
    .describe('...and recent p50 at least this many times the baseline p50...'),
  detect_absolute_ms: nonNegative
    .default(10)
    .describe('...and recent p95 at least this many ms above the baseline p95.'),
  detect_min_baseline_calls: positiveInt
    .default(200)
    .describe("Calls that make a young shape's baseline (before it has a minute of history)."),
  detect_evaluate_ms: positiveInt.default(2000).describe('How often every busy shape is evaluated.'),
  activity_sample_ms: positiveInt
    .default(2000)
    .describe(
      'How often pg_stat_activity (and, during lock waits, pg_locks) is sampled for lock and saturation evidence.',
    ),
  new_shape_grace_s: nonNegative
    .default(60)
    .describe('Shapes first seen within this long of the start are the known workload; later ones are judged as new.'),
  new_shape_window_s: positiveInt
    .default(600)
    .describe('How long after it was first seen a shape can be flagged (and stays listed) as new.'),
  new_shape_slow_ms: nonNegative
    .default(100)
    .describe('A new shape whose p50 is at least this is flagged as slow from its first calls.'),
  new_shape_share: z.coerce
    .number()
    .min(0)
    .max(1)
    .default(0.2)
    .describe('A new shape taking at least this share of the database time of the last minute is flagged as heavy.'),
  alert_webhook_url: z
    .string()
    .url()
    .optional()
    .describe('Incident changes are POSTed here as JSON (retried with backoff).'),
  state_file: z
    .string()
    .min(1)
    .default('.pgwarden-state.json')
    .describe('Local file where rules survive a restart (when no control database is configured).'),
  control_url: z
    .string()
    .regex(/^postgres(ql)?:\/\//, 'expected a postgres:// URL')
    .optional()
    .describe('Control database shared by several pgwarden instances (rules and incidents, LISTEN/NOTIFY).'),
  instance_name: z
    .string()
    .min(1)
    .optional()
    .describe('Name of this instance in the control database (default: host:pid).'),
  fleet_publish_interval_s: positiveInt
    .default(10)
    .describe(
      'With a control database: how often this instance publishes its top shapes for the fleet view (?scope=fleet).',
    ),
  fleet_top_shapes: positiveInt
    .default(200)
    .describe('With a control database: shapes (by total time) this instance publishes for the fleet view.'),
  mitigation: z
    .enum(['off', 'dry-run', 'enforce'])
    .default('dry-run')
    .describe(
      'Automatic mitigation of regression incidents: off, dry-run (say what it would do) or enforce (shed the shape).',
    ),
  mitigation_protect: list
    .default([])
    .describe('Fingerprints the mitigation policy never touches (comma-separated in flags and environment).'),
  mitigation_max_concurrent: z.coerce
    .number()
    .int()
    .min(0)
    .default(1)
    .describe('Concurrent executions a shed rule of the policy allows.'),
  mitigation_queue_timeout_ms: z.coerce
    .number()
    .int()
    .min(0)
    .default(50)
    .describe('Queue wait of a shed rule of the policy before 53400.'),
  mitigation_ttl_s: positiveInt
    .default(600)
    .describe('TTL of a shed rule of the policy (it is lifted earlier when the shape recovers).'),
  mitigation_max_rules: z.coerce
    .number()
    .int()
    .min(0)
    .default(2)
    .describe('Automatic rules the policy keeps in force at once; beyond this it reports what it did not do.'),
  mitigation_max_traffic_share: z.coerce
    .number()
    .min(0)
    .max(1)
    .default(0.5)
    .describe(
      "Largest share of all recent calls (0-1) the policy's rules may cover together; a busier shape is left alone.",
    ),
  replicas: json(
    z.record(
      z.string().regex(/^[A-Za-z0-9_-]+$/, 'replica names are letters, digits, _ and -'),
      z
        .object({
          url: z.string().regex(/^postgres(ql)?:\/\//, 'expected a postgres:// URL'),
          pool_size: positiveInt.default(4),
        })
        .strict(),
    ),
  )
    .default({})
    .describe(
      'Reroute targets by name: { name: { url: postgres://role:password@host:port/db, pool_size: 4 } } (JSON in flags and environment).',
    ),
  rules: json(z.array(z.record(z.string(), z.unknown())))
    .default([])
    .describe('Rules that always apply, as in POST /api/rules (JSON in flags and environment).'),
  log_level: z
    .enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'])
    .default('info')
    .describe('pino log level (applied again on SIGHUP).'),
  log_format: z
    .enum(['auto', 'json', 'pretty'])
    .default('auto')
    .describe('Log lines as JSON or as readable text; auto: readable when stdout is a terminal.'),
  print_dashboard_token: bool
    .default(false)
    .describe(
      'Put the admin token in the dashboard URL of the ready log line (#token=...); off: the token is never printed.',
    ),
} as const;

const ConfigSchema = z
  .object(OPTIONS)
  .strict()
  .refine((c) => (c.tls_cert === undefined) === (c.tls_key === undefined), {
    message: 'tls_cert and tls_key must be given together',
    path: ['tls_cert'],
  });

export type Config = z.infer<typeof ConfigSchema>;
export type OptionKey = keyof typeof OPTIONS;

export const optionKeys = Object.keys(OPTIONS) as OptionKey[];
export const flagName = (key: string): string => key.replace(/_/g, '-');
export const envName = (key: string): string => `PGWARDEN_${key.toUpperCase()}`;

/** A configuration that cannot be used; the message says what and where. */
export class ConfigError extends Error {}

export interface ConfigSources {
  /** Path of a YAML or JSON config file. */
  file?: string;
  env?: NodeJS.ProcessEnv;
  /** Values from command-line flags, by option key. */
  flags?: Partial<Record<OptionKey, string>>;
}

/** Merges defaults, file, environment and flags, and validates the result. */
export function loadConfig(sources: ConfigSources = {}): Config {
  const origin = new Map<string, string>();
  const merged: Record<string, unknown> = {};
  if (sources.file) {
    for (const [key, value] of Object.entries(readConfigFile(sources.file))) {
      merged[key] = value;
      origin.set(key, sources.file);
    }
  }
  for (const key of optionKeys) {
    const value = sources.env?.[envName(key)];
    if (value !== undefined && value !== '') {
      merged[key] = value;
      origin.set(key, envName(key));
    }
  }
  for (const [key, value] of Object.entries(sources.flags ?? {})) {
    if (value === undefined) continue;
    merged[key] = value;
    origin.set(key, `--${flagName(key)}`);
  }
  const result = ConfigSchema.safeParse(merged);
  if (!result.success) {
    const problems = result.error.issues.map((issue) => {
      const key = issue.path.map(String).join('.') || (issue.code === 'unrecognized_keys' ? issue.keys.join(', ') : '');
      const from =
        origin.get(String(issue.path[0] ?? '')) ?? (issue.code === 'unrecognized_keys' ? sources.file : undefined);
      return `${key}${from ? ` (from ${from})` : ''}: ${issue.message}`;
    });
    throw new ConfigError(`invalid configuration: ${problems.join('; ')}`);
  }
  return result.data;
}

function readConfigFile(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(
      `cannot read config file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
    );
  }
  let parsed: unknown;
  try {
    parsed = path.extname(file) === '.json' ? JSON.parse(text) : YAML.parse(text);
  } catch (err) {
    throw new ConfigError(
      `config file ${file} is not valid ${path.extname(file) === '.json' ? 'JSON' : 'YAML'}: ${(err as Error).message.split('\n')[0]}`,
    );
  }
  if (parsed === null || parsed === undefined) return {};
  if (typeof parsed !== 'object' || Array.isArray(parsed))
    throw new ConfigError(`config file ${file} must contain a mapping of options`);
  return parsed as Record<string, unknown>;
}

/** Splits HOST:PORT (IPv6 in brackets). */
export function parseHostPort(value: string): { host: string; port: number } {
  const i = value.lastIndexOf(':');
  const host = value.slice(0, i).replace(/^\[(.*)\]$/, '$1');
  return { host, port: Number(value.slice(i + 1)) };
}

/** The options as a Markdown table, for docs/configuration.md. */
export function configurationReference(): string {
  const rows = optionKeys.map((key) => {
    const schema = OPTIONS[key] as z.ZodType;
    const parsed = z.object({ v: schema }).safeParse({});
    const value = parsed.success ? parsed.data.v : undefined;
    const fallback =
      value === undefined ? '' : `\`${typeof value === 'object' ? JSON.stringify(value) : String(value)}\``;
    return `| \`${key}\` | \`--${flagName(key)}\` | \`${envName(key)}\` | ${fallback} | ${schema.description ?? ''} |`;
  });
  return ['| file key | flag | environment | default | meaning |', '|---|---|---|---|---|', ...rows].join('\n');
}
