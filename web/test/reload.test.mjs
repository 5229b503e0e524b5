// Reload mid-answer: the history and the answer continue where they were,
// without doubled text and without the answer ever shrinking or blanking.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

test('reloading mid-answer shows the answer continuing, and its final text equals the stored one', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const { page, conv } = await h.openChat(t, browser, server);
  await h.send(page, 'Before the reload [sim tokens=6 rate=0]');
  await h.waitAnswerEnded(h.lastAnswer(page));
  await h.send(page, 'A long answer please [sim tokens=160 rate=40]');
  const answer = h.lastAnswer(page);
  await page.waitForFunction(() => {
    const a = [...document.querySelectorAll('article.msg.assistant')].at(-1);
    return a?.dataset.status === 'streaming' && a.querySelector('.body').textContent.length > 60;
  });
  const turnId = await answer.getAttribute('data-turn-id');
  const before = (await h.turnState(page, conv, turnId)).content;

  // From its first paint, the reloaded page records the answer's text on
  // every change: it must only ever grow.
  await page.addInitScript((id) => {
    window.__seen = [];
    new MutationObserver(() => {
      const body = document.querySelector(`article[data-turn-id="${id}"] .body`);
      if (body) {
        const text = body.textContent;
        if (window.__seen.at(-1) !== text) window.__seen.push(text);
      }
    }).observe(document, { subtree: true, childList: true, characterData: true });
  }, turnId);
  await page.reload();
  await h.waitJoined(page, conv);
  await page.locator('article.msg.user', { hasText: 'Before the reload' }).waitFor();
  await page.locator('article.msg.user', { hasText: 'A long answer please' }).waitFor();
  const resumed = await h.turnState(page, conv, turnId);
  assert.ok(resumed.content.startsWith(before), 'the snapshot continues the text seen before the reload');
  assert.notEqual(resumed.status, 'complete', 'the reload happened mid-answer');
  await page.getByRole('button', { name: 'Stop answer' }).waitFor();

  assert.equal(await h.waitAnswerEnded(page.locator(`article[data-turn-id="${turnId}"]`), 30000), 'complete');
  const stored = await h.storedTurn(server, conv, turnId);
  const final = await h.turnState(page, conv, turnId);
  assert.equal(final.content, stored.content);
  assert.equal((await page.locator(`article[data-turn-id="${turnId}"] .body`).innerText()).trim(), stored.content.trim());
  assert.equal(await page.locator('article.msg.assistant').count(), 2, 'one bubble per answer');

  const seen = await page.evaluate(() => window.__seen);
  assert.ok(seen.length > 2, `the answer was seen streaming after the reload (${seen.length} states)`);
  assert.ok(seen[0].length >= before.length, 'the first paint already holds the text from before the reload');
  for (let i = 1; i < seen.length; i++) {
    assert.ok(seen[i].startsWith(seen[i - 1].trimEnd()), `text only grows (state ${i})`);
  }
  h.noPageErrors(assert, page);
});
