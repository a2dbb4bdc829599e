// The session-level settings a client starts with, as the proxy sees them in the
// startup packet: plain parameters (search_path=...) and `-c name=value` (or
// `--name=value`) inside `options`. The monitor plans a session's statements with
// them, so EXPLAIN sees the tables and plan choices the application gets.

/** Startup parameters that are not settings. */
const NOT_SETTINGS = new Set(['user', 'database', 'options', 'replication', 'application_name', 'client_encoding']);

/** Settings from startup parameters, lower-cased names, later ones (options) winning. */
export function startupSettings(params: ReadonlyMap<string, string>): Map<string, string> {
  const settings = new Map<string, string>();
  for (const [name, value] of params) {
    if (!NOT_SETTINGS.has(name) && !name.startsWith('_pq_.')) settings.set(name.toLowerCase(), value);
  }
  const options = params.get('options');
  if (options !== undefined) {
    const words = splitOptions(options);
    for (let i = 0; i < words.length; i++) {
      let setting: string | undefined;
      if (words[i] === '-c') setting = words[++i];
      else if (words[i].startsWith('-c')) setting = words[i].slice(2);
      else if (words[i].startsWith('--')) setting = words[i].slice(2);
      const eq = setting?.indexOf('=') ?? -1;
      if (setting !== undefined && eq > 0)
        settings.set(setting.slice(0, eq).toLowerCase().replace(/-/g, '_'), setting.slice(eq + 1));
    }
  }
  return settings;
}

/** libpq's `options` is split on spaces; a backslash escapes the next character. */
function splitOptions(options: string): string[] {
  const words: string[] = [];
  let word = '';
  let inWord = false;
  for (let i = 0; i < options.length; i++) {
    const c = options[i];
    if (c === '\\' && i + 1 < options.length) {
      word += options[++i];
      inWord = true;
    } else if (c === ' ' || c === '\t' || c === '\n') {
      if (inWord) words.push(word);
      word = '';
      inWord = false;
    } else {
      word += c;
      inWord = true;
    }
  }
  if (inWord) words.push(word);
  return words;
}
