// An answer (and a question) holding HTML is shown as text and never run,
// while ordinary Markdown still renders.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

const payload = [
  '**bold** and `code`',
  '',
  '<script>window.__xss = "script"</script>',
  '',
  '<img src="x" onerror="window.__xss = \'img\'">',
  '',
  'Inline <img src=y onerror=window.__xss=1> and <b onmouseover="window.__xss=2">b</b>',
  '',
  '[a link](javascript:window.__xss=3) <svg onload="window.__xss=4"></svg>',
].join('\n');

async function assertSafe(page, answer) {
  const body = answer.locator('.body');
  const text = await body.textContent();
  assert.ok(text.includes('<script>window.__xss = "script"</script>'), 'the script tag is shown as text');
  assert.ok(text.includes('<img src="x" onerror="window.__xss = \'img\'">'), 'the img tag is shown as text');
  assert.ok(text.includes('<img src=y onerror=window.__xss=1>'), 'inline HTML is shown as text');
  assert.equal(await body.locator('strong', { hasText: 'bold' }).count(), 1, 'Markdown still renders');
  assert.equal(await body.locator('code', { hasText: 'code' }).count(), 1);
  assert.equal(await body.locator('script, img, svg, b, iframe, [onerror], [onload], [onmouseover]').count(), 0, 'no element from the answer\'s HTML');
  assert.equal(await body.locator('a[href^="javascript:" i]').count(), 0, 'no javascript: link');
  await answer.locator('.body a').first().hover().catch(() => {});
  assert.equal(await page.evaluate(() => window.__xss), undefined, 'nothing ran');
}

test('an answer with <script> and an onerror image is shown as text, not run', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const dialogs = [];
  const { page, conv } = await h.openChat(t, browser, server, {
    setup: (p) => p.on('dialog', (d) => { dialogs.push(d.message()); d.dismiss(); }),
  });
  await h.send(page, `${payload} [sim echo=1 rate=200]`);
  const answer = h.lastAnswer(page);
  assert.equal(await h.waitAnswerEnded(answer), 'complete');
  const turnId = await answer.getAttribute('data-turn-id');
  const stored = await h.storedTurn(server, conv, turnId);
  assert.equal(stored.content.trim(), payload, 'the simulator echoed the payload');
  await assertSafe(page, answer);
  // The question is plain text too.
  const question = page.locator('article.msg.user .body').last();
  assert.ok((await question.textContent()).includes('<script>window.__xss = "script"</script>'));
  assert.equal(await question.locator('*').count(), 0);

  // The same from history after a reload.
  await page.reload();
  await h.waitJoined(page, conv);
  await assertSafe(page, page.locator(`article[data-turn-id="${turnId}"]`));
  assert.deepEqual(dialogs, []);
  h.noPageErrors(assert, page);
});
