// Imported first by the CLI entry point, before anything loads libpg_query:
// keeps V8 from recompiling the parser's WebAssembly with its optimizing compiler.
//
// By default V8 compiles WebAssembly with its baseline compiler (Liftoff) and then
// recompiles the functions that get hot with TurboFan, on background threads. For
// libpg_query's module that recompilation left ~85 MiB of malloc'd memory in the
// compiler threads' glibc arenas, touched and never returned: most of the gap
// between pgwarden's RSS with statistics on (~195 MiB) and off (~83 MiB), paid
// after the first few parses (bench/shapes-memory.ts measures it). Baseline code
// parses a new text ~25% slower (measured ~90 us against ~70 us for fingerprint +
// normalize of a join), which only cache misses pay: a parse happens once per new
// shape, never per execution. Wasm compiler flags are read when a module is
// compiled, so setting this before libpg_query's module is instantiated is enough.

import v8 from 'node:v8';

v8.setFlagsFromString('--liftoff-only');
