// The vendored browser builds must be exactly the versions package-lock.json pins.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, existsSync } from 'node:fs';
import path from 'node:path';
import { vendored, vendorCopy } from './vendor.mjs';
import { root } from './helpers.mjs';

test('web/static/vendor matches node_modules (run `npm run vendor` after a bump)', (t) => {
  if (!existsSync(path.join(root, 'node_modules/marked'))) return t.skip('node_modules missing: run npm ci');
  for (const { from, to } of vendored) {
    assert.ok(readFileSync(path.join(root, to), 'utf8') === vendorCopy(from), `${to} differs from ${from}`);
  }
});
