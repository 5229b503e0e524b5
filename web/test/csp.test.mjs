// The page under the Content-Security-Policy the server sends: nothing it
// does is blocked, and an answer's Markdown image is a link, never fetched.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

const CSP = "default-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; style-src 'self'; script-src 'self'; " +
  "object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

const answerText = [
  '# Heading',
  '',
  'Some **bold**, `code`, a [link](https://example.invalid/docs) and a picture:',
  '',
  '![the secret](http://127.0.0.1:9/leak?q=secret-question)',
  '',
  '```js',
  'console.log("hi");',
  '```',
  '',
  '| a | b |',
  '|:-|-:|',
  '| 1 | 2 |',
  '',
  '> quoted',
  '',
  '- one',
  '- two',
].join('\n');

test('under the Content-Security-Policy a streamed answer causes no violation, and images are links', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  // A response made by page.route has no network origin of its own, and
  // Chromium's local-network checks would then block the page's socket to
  // 127.0.0.1; a real server's response is not affected.
  const browser = await h.launchBrowser(t, { args: ['--disable-features=LocalNetworkAccessChecks'] });
  const violations = [];
  const requests = [];
  const { page, conv } = await h.openChat(t, browser, server, {
    viewport: { width: 1100, height: 800 },
    setup: async (p) => {
      // The page's own response, with exactly the policy the server sends.
      await p.route(`${server.url}/`, async (route) => {
        const response = await route.fetch();
        await route.fulfill({ response, headers: { ...response.headers(), 'content-security-policy': CSP } });
      });
      p.on('console', (m) => { if (/Content Security Policy/i.test(m.text())) violations.push(m.text()); });
      p.on('request', (r) => requests.push(r.url()));
      await p.addInitScript(() => {
        window.__violations = [];
        document.addEventListener('securitypolicyviolation', (e) => window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`));
      });
    },
  });

  await h.send(page, `${answerText} [sim echo=1 rate=100]`);
  const answer = h.lastAnswer(page);
  await answer.locator('.body .image-link').waitFor(); // seen while streaming
  assert.equal(await h.waitAnswerEnded(answer), 'complete');
  const stored = await h.storedTurn(server, conv, await answer.getAttribute('data-turn-id'));
  assert.equal(stored.content.trim(), answerText);

  const body = answer.locator('.body');
  assert.equal(await body.locator('img').count(), 0, 'no <img>');
  const link = body.locator('a.image-link');
  assert.equal(await link.getAttribute('href'), 'http://127.0.0.1:9/leak?q=secret-question');
  assert.equal(await link.textContent(), 'the secret');
  assert.equal(await body.locator('table td').count(), 2);
  await body.getByRole('button', { name: 'Copy js code' }).waitFor();
  assert.deepEqual(requests.filter((u) => u.includes('/leak')), [], 'the image was never fetched');
  assert.deepEqual(await page.evaluate(() => window.__violations), [], 'no securitypolicyviolation events');
  assert.deepEqual(violations, [], 'no CSP messages in the console');
  h.noPageErrors(assert, page);
});
