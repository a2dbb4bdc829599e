#!/usr/bin/env node
// Runs the compiled CLI (dist/, built by `npm run build` or on `npm ci`); from a
// source checkout without dist/ it falls back to the TypeScript sources via tsx.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const compiled = new URL('../dist/cli/main.js', import.meta.url);
let main;
if (existsSync(fileURLToPath(compiled))) {
  ({ main } = await import(compiled.href));
} else {
  const { register } = await import('tsx/esm/api');
  register();
  ({ main } = await import(new URL('../src/cli/main.ts', import.meta.url).href));
}
const code = await main(process.argv.slice(2));
if (code >= 0) process.exit(code);
