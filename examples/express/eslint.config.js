// ESLint flat config for the JavaScript of this repository: clients/node and
// examples/express. Run from the repository root: `make lint-js` (eslint is a devDependency
// of examples/express, pinned in its package.json).
import js from '@eslint/js';
import globals from 'globals';

export default [
  { ignores: ['**/node_modules/**'] },
  js.configs.recommended,
  {
    files: ['clients/node/**/*.js', 'examples/express/**/*.js'],
    languageOptions: {
      ecmaVersion: 2024,
      sourceType: 'module',
      globals: { ...globals.node },
    },
    linterOptions: { reportUnusedDisableDirectives: 'error' },
    rules: {
      'no-unused-vars': ['error', { argsIgnorePattern: '^_', varsIgnorePattern: '^_', caughtErrors: 'none' }],
      'prefer-const': ['error', { ignoreReadBeforeAssign: true }],
      'no-var': 'error',
      eqeqeq: ['error', 'always', { null: 'ignore' }],
      'no-shadow': 'error',
      'no-implicit-coercion': ['error', { allow: ['!!'] }],
      'max-lines-per-function': ['error', { max: 80, skipBlankLines: true, skipComments: true }],
      'max-len': ['error', { code: 160, ignoreStrings: true, ignoreTemplateLiterals: true, ignoreRegExpLiterals: true }],
    },
  },
  {
    // the chat page runs in the browser
    files: ['examples/express/public/**/*.js'],
    languageOptions: { globals: { ...globals.browser } },
  },
  {
    // code that drives the page: its page.evaluate() callbacks run in the browser
    files: ['examples/express/test/page.test.js', 'examples/express/testlib/page.js', 'examples/express/scripts/**/*.js'],
    languageOptions: { globals: { ...globals.node, ...globals.browser } },
  },
  {
    // test files: node:test callbacks read top to bottom like scripts
    files: ['**/test/**/*.js'],
    rules: { 'max-lines-per-function': 'off' },
  },
];
