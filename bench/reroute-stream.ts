// The 4 GB acceptance run of reroute streaming: the suite streams 512 MB through a
// rerouted shape (test/rules/reroute-stream.test.ts); this runs the same test at
// 4 GB (or PGWARDEN_REROUTE_STREAM_MB) and prints its time, throughput and RSS.
//
// Usage: node --import tsx bench/reroute-stream.ts [megabytes]

import { spawn } from 'node:child_process';

const mb = process.argv[2] ?? process.env.PGWARDEN_REROUTE_STREAM_MB ?? '4096';
const child = spawn(process.execPath, ['--import', 'tsx', 'test/run.ts', 'test/rules/reroute-stream.test.ts'], {
  stdio: 'inherit',
  env: { ...process.env, PGWARDEN_REROUTE_STREAM_MB: mb, PGWARDEN_TEST_PATTERN: 'flat memory' },
});
child.on('exit', (code) => process.exit(code ?? 1));
