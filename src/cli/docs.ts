// Writes docs/configuration.md from the configuration schema, so the reference
// can never drift from the code (a test compares them). Run: npm run docs:config
import fs from 'node:fs';
import { configurationReference } from '../config.ts';

const header = `# Configuration reference

pgwarden reads its options from, in increasing precedence: built-in defaults, a YAML
or JSON file given with \`--config FILE\` (or \`PGWARDEN_CONFIG\`), \`PGWARDEN_*\`
environment variables, and command-line flags. An invalid value, an unknown key or
an unreadable file stops \`pgwarden start\` with one message naming the option and
where it came from, and exit code 2.

This table is generated from \`src/config.ts\` by \`npm run docs:config\`.

`;
fs.writeFileSync(new URL('../../docs/configuration.md', import.meta.url), `${header}${configurationReference()}\n`);
