// Copies the browser builds of marked and DOMPurify from node_modules (pinned
// by package-lock.json) into web/static/vendor/, where the page loads them
// without a build step. Run `npm ci && npm run vendor` after bumping either
// package; web/test/vendor.test.mjs fails while the copies are stale.
import { readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

/** The vendored files: source in node_modules → destination under web/static/vendor. */
export const vendored = [
  { from: 'node_modules/marked/lib/marked.esm.js', to: 'web/static/vendor/marked.esm.js' },
  { from: 'node_modules/dompurify/dist/purify.es.mjs', to: 'web/static/vendor/purify.es.js' },
  { from: 'node_modules/marked/LICENSE', to: 'web/static/vendor/LICENSE.marked.txt' },
  { from: 'node_modules/dompurify/LICENSE', to: 'web/static/vendor/LICENSE.dompurify.txt' },
];

/** vendorCopy returns the bytes the vendored copy of src should hold: the
 * source without its sourceMappingURL line (the maps are not vendored). */
export function vendorCopy(src) {
  return readFileSync(path.join(root, src), 'utf8').replace(/\n\/\/# sourceMappingURL=\S+\s*$/, '\n');
}

if (import.meta.url === `file://${process.argv[1]}`) {
  mkdirSync(path.join(root, 'web/static/vendor'), { recursive: true });
  for (const { from, to } of vendored) {
    writeFileSync(path.join(root, to), vendorCopy(from));
    console.log(`${from} → ${to}`);
  }
}
