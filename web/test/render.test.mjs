// Rendering answers: a message that cannot be rendered as Markdown, the
// streaming answer's rendering (incremental, interactive while it grows).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

test('an answer the Markdown parser cannot render is shown as plain text, and nothing else is affected', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page, conv } = await h.openChat(t, browser, server);
  await h.send(page, 'Before [sim tokens=5]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'complete');

  // Thousands of nested quotes overflow the parser's stack.
  const deep = `${'>'.repeat(3000)} deep`;
  await h.send(page, `${deep} [sim echo=1 rate=0]`);
  const answer = h.lastAnswer(page);
  assert.equal(await h.waitAnswerEnded(answer), 'complete');
  const turnId = await answer.getAttribute('data-turn-id');
  assert.equal((await h.storedTurn(server, conv, turnId)).content.trim(), deep);
  assert.equal((await answer.locator('.body').textContent()).trim(), deep, 'shown as plain text');
  await page.getByRole('button', { name: 'Send message' }).waitFor();

  // Later messages still render, Markdown and all.
  await h.send(page, '**After** it [sim echo=1 rate=0]');
  await page.locator('article.msg.assistant .body strong', { hasText: 'After' }).waitFor();
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'complete');

  // And so after a reload, from history.
  await page.reload();
  await h.waitJoined(page, conv);
  await page.locator('article.msg.assistant .body strong', { hasText: 'After' }).waitFor();
  assert.equal((await page.locator(`article[data-turn-id="${turnId}"] .body`).textContent()).trim(), deep);
  assert.equal(await page.locator('article.msg').count(), 6);
  await page.getByRole('button', { name: 'Send message' }).waitFor();
  h.noPageErrors(assert, page);
});
