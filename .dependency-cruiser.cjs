// Dependencies point one way (docs/architecture.md): a module may import its own
// layer or any layer below it, never one above. `npm run check:deps` fails on an
// upward arrow or a cycle. Order, lowest first; a folder not listed is refused so
// that a new one is placed deliberately.
const LAYERS = [
  ['src/protocol', 'src/clock.ts', 'src/log.ts', 'src/version.ts'],
  ['src/proxy'],
  ['src/shapes'],
  ['src/events'],
  ['src/plans'],
  ['src/detect'],
  ['src/rules'],
  ['src/state'],
  ['src/workload'],
  ['src/admin'],
  ['src/dashboard', 'src/embedded', 'src/config.ts'],
  ['src/cli'],
];

const pattern = (paths) => `^(${paths.map((p) => p.replace(/[.]/g, '\\.')).join('|')})(/|$)`;

const upward = LAYERS.slice(0, -1).map((layer, index) => ({
  name: `no-upward-from-${layer[0].replace(/^src\//, '')}`,
  comment: `${layer.join(', ')} may not import a higher layer (${LAYERS.slice(index + 1).flat().join(', ')})`,
  severity: 'error',
  from: { path: pattern(layer) },
  to: { path: pattern(LAYERS.slice(index + 1).flat()) },
}));

module.exports = {
  forbidden: [
    ...upward,
    { name: 'no-circular', severity: 'error', from: {}, to: { circular: true } },
    {
      name: 'no-unplaced-layer',
      comment: 'every source module belongs to a layer listed in .dependency-cruiser.cjs',
      severity: 'error',
      from: { path: '^src/', pathNot: pattern(LAYERS.flat()) },
      to: {},
    },
    {
      name: 'src-not-to-test-or-bench',
      severity: 'error',
      from: { path: '^src/' },
      to: { path: '^(test|bench)/' },
    },
  ],
  options: {
    // TypeScript 7 has no JavaScript API; swc parses the sources for the cruiser.
    parser: 'swc',
    tsConfig: { fileName: 'tsconfig.json' },
    doNotFollow: { path: 'node_modules' },
    exclude: { path: '^src/dashboard/public/' },
    enhancedResolveOptions: { extensions: ['.ts', '.js'] },
  },
};
