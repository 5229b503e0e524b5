// Send a message and watch the answer stream in; the keyboard; the
// conversation list (new, switch, delete).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

test('an answer streams in, renders as it grows, and ends equal to the stored text', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const { page, conv } = await h.openChat(t, browser, server);
  await assert.doesNotReject(page.locator('#connection[data-state="connected"]').waitFor());
  await h.send(page, 'Tell me about relays [sim tokens=60 rate=30]');

  const user = page.locator('article.msg.user').last();
  await user.getByText('Tell me about relays').waitFor();
  const answer = h.lastAnswer(page);
  const stop = page.getByRole('button', { name: 'Stop answer' });
  await stop.waitFor();
  assert.equal(await page.getByRole('button', { name: 'Send message' }).isVisible(), false, 'Stop replaces Send');

  // Seen growing while it streams, in a polite live region.
  await page.waitForFunction(() => {
    const a = [...document.querySelectorAll('article.msg.assistant')].at(-1);
    return a?.dataset.status === 'streaming' && a.querySelector('.body').textContent.length > 20;
  });
  const early = (await answer.locator('.body').textContent()).length;
  assert.equal(await answer.locator('.content').getAttribute('aria-live'), 'polite');
  await page.waitForFunction((n) => {
    const a = [...document.querySelectorAll('article.msg.assistant')].at(-1);
    return a.dataset.status === 'streaming' && a.querySelector('.body').textContent.length > n + 20;
  }, early);

  assert.equal(await h.waitAnswerEnded(answer), 'complete');
  const turnId = await answer.getAttribute('data-turn-id');
  const stored = await h.storedTurn(server, conv, turnId);
  assert.equal(stored.status, 'complete');
  assert.equal((await h.turnState(page, conv, turnId)).content, stored.content);
  assert.equal((await answer.locator('.body').innerText()).trim(), stored.content.trim());
  await page.getByRole('button', { name: 'Send message' }).waitFor();
  assert.equal(await answer.locator('.content').getAttribute('aria-busy'), 'false');

  // The list names the conversation after its first message.
  await page.locator('#conversations li.current a', { hasText: 'Tell me about relays' }).waitFor();
  await page.locator('#title', { hasText: 'Tell me about relays' }).waitFor();
  h.noPageErrors(assert, page);
});

test('Enter sends, Shift+Enter breaks the line', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page, conv } = await h.openChat(t, browser, server);
  const input = page.getByLabel('Message', { exact: true });
  await input.click();
  await page.keyboard.type('first line');
  await page.keyboard.press('Shift+Enter');
  await page.keyboard.type('second line [sim tokens=3]');
  assert.equal(await input.inputValue(), 'first line\nsecond line [sim tokens=3]');
  assert.equal(await page.locator('article.msg').count(), 0, 'Shift+Enter did not send');
  await page.keyboard.press('Enter');
  await page.locator('article.msg.user .body', { hasText: 'first line\nsecond line' }).waitFor();
  assert.equal(await input.inputValue(), '');
  await h.waitAnswerEnded(h.lastAnswer(page));
  const stored = await h.storedMessages(server, conv);
  assert.equal(stored[0].content, 'first line\nsecond line [sim tokens=3]');
  h.noPageErrors(assert, page);
});

test('conversations: new, switch, delete', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page, conv: first } = await h.openChat(t, browser, server);
  await h.send(page, 'Alpha question [sim tokens=5]');
  await h.waitAnswerEnded(h.lastAnswer(page));

  await page.getByRole('button', { name: 'New chat', exact: true }).click();
  await page.waitForFunction((c) => window.tokenrelay.conversationId !== c, first);
  const second = await page.evaluate(() => window.tokenrelay.conversationId);
  assert.match(second, /^c-[0-9a-f-]{36}$/);
  assert.equal(new URL(page.url()).hash, `#${second}`);
  await h.waitJoined(page, second);
  await page.locator('#empty').waitFor();
  assert.equal(await page.locator('article.msg').count(), 0);
  await h.send(page, 'Beta question [sim tokens=5]');
  await h.waitAnswerEnded(h.lastAnswer(page));
  await page.locator('#conversations a', { hasText: 'Beta question' }).waitFor();

  // Switch back through the list: the history is there.
  await page.locator('#conversations a', { hasText: 'Alpha question' }).click();
  await h.waitJoined(page, first);
  await page.locator('article.msg.user', { hasText: 'Alpha question' }).waitFor();
  assert.equal(await page.locator('article.msg.user', { hasText: 'Beta question' }).count(), 0);
  // Back button returns to the other one.
  await page.goBack();
  await h.waitJoined(page, second);
  await page.locator('article.msg.user', { hasText: 'Beta question' }).waitFor();

  // Delete the current conversation: two clicks (arm, confirm).
  const row = page.locator('#conversations li', { hasText: 'Beta question' });
  await row.getByRole('button', { name: /Delete conversation/ }).click();
  await row.getByRole('button', { name: /Press again to delete/ }).click();
  await page.waitForFunction((c) => window.tokenrelay.conversationId !== c, second);
  await page.locator('#conversations a', { hasText: 'Beta question' }).waitFor({ state: 'detached' });
  const list = (await h.api(server, 'GET', '/v1/conversations')).conversations;
  assert.deepEqual(list.map((c) => c.conversation_id).filter((id) => id === second), []);
  assert.equal(await page.evaluate(() => window.tokenrelay.conversationId), first, 'shows the remaining conversation');
  h.noPageErrors(assert, page);
});

test('Enter while an answer is being written keeps the text and says why', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page, conv } = await h.openChat(t, browser, server);
  const input = page.getByLabel('Message', { exact: true });
  const alert = page.getByRole('alert');
  await h.send(page, 'Talk for a while [sim tokens=400 rate=40]');
  const answer = h.lastAnswer(page);
  await page.getByRole('button', { name: 'Stop answer' }).waitFor();

  await h.send(page, 'Next question [sim tokens=3]');
  await alert.getByText('An answer is still being written').waitFor();
  assert.equal(await input.inputValue(), 'Next question [sim tokens=3]', 'the text stays in the composer');
  assert.equal(await page.locator('article.msg.user').count(), 1, 'nothing was sent');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'input');

  // The alert goes with the answer; Enter then sends the kept text.
  await page.keyboard.press('Escape');
  assert.equal(await h.waitAnswerEnded(answer, 10000), 'cancelled');
  await alert.waitFor({ state: 'hidden' });
  await input.press('Enter');
  await page.locator('article.msg.user', { hasText: 'Next question' }).waitFor();
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'complete');
  assert.deepEqual((await h.storedMessages(server, conv)).filter((m) => m.role === 'user').map((m) => m.content),
    ['Talk for a while [sim tokens=400 rate=40]', 'Next question [sim tokens=3]']);
  h.noPageErrors(assert, page);
});

test('the message list is reached with Tab and scrolled with the keyboard', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page } = await h.openChat(t, browser, server, { viewport: { width: 1100, height: 600 } });
  await h.send(page, 'A long one [sim tokens=1500]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'complete');
  const top = () => page.evaluate(() => document.getElementById('scroller').scrollTop);
  await page.waitForFunction(() => {
    const s = document.getElementById('scroller');
    return s.scrollHeight - s.clientHeight > 1000 && s.scrollHeight - s.scrollTop - s.clientHeight <= 2;
  });
  const bottom = await top();

  // From the message box, Shift+Tab goes back to the messages (the answer
  // holds nothing focusable of its own).
  await page.getByLabel('Message', { exact: true }).focus();
  await page.keyboard.press('Shift+Tab');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'scroller');
  await page.keyboard.press('Home');
  await page.waitForFunction(() => document.getElementById('scroller').scrollTop === 0);
  await page.keyboard.press('PageDown');
  await page.waitForFunction(() => document.getElementById('scroller').scrollTop > 100);
  assert.ok(await top() < bottom);
  await page.keyboard.press('Tab');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'input', 'Tab goes on to the message box');
  h.noPageErrors(assert, page);
});
