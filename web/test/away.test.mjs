// A tab that was away (offline, its socket gone) comes back to what
// happened meanwhile and is told about it in words.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

/** goAway takes a page offline and drops its socket, as a dead network would. */
async function goAway({ page, context }) {
  await context.setOffline(true);
  await page.evaluate(() => window.tokenrelay.client._noPong());
  await page.waitForFunction(() => window.tokenrelay.client.state !== 'connected');
}

/** comeBack brings a page online again. */
async function comeBack({ page, context }) {
  await context.setOffline(false);
  await page.waitForFunction(() => window.tokenrelay.client.state === 'connected', null, { timeout: 15000 });
}

test('a conversation deleted while a tab was away is said to be deleted when it comes back', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const a = await h.openChat(t, browser, server);
  await h.send(a.page, 'Keep me [sim tokens=5]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(a.page)), 'complete');
  const b = await h.openChat(t, browser, server, { conv: a.conv });
  await b.page.locator('article.msg.user', { hasText: 'Keep me' }).waitFor();

  await goAway(b);
  await h.deleteFromSidebar(a.page, a.conv);
  await h.waitFor(async () => !(await h.api(server, 'GET', '/v1/conversations')).conversations
    .some((c) => c.conversation_id === a.conv), { what: 'the conversation to be deleted' });
  await comeBack(b);
  // Its re-join made the id anew, empty: the page says what happened and
  // moves on, as when the deletion is seen live.
  await b.page.getByRole('alert').getByText('This conversation was deleted in another tab or window.').waitFor();
  assert.notEqual(await b.page.evaluate(() => window.tokenrelay.conversationId), a.conv);
  h.noPageErrors(assert, b.page);
});

test('a send refused after the page moved to another conversation says so, and leaves the composer alone', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const a = await h.openChat(t, browser, server);
  await h.send(a.page, 'Seed [sim tokens=3]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(a.page)), 'complete');
  const b = await h.openChat(t, browser, server, { conv: a.conv });
  await b.page.locator('article.msg.user', { hasText: 'Seed' }).waitFor();

  // B writes in X while away, then opens a new chat; A starts an answer in X.
  await goAway(b);
  await h.send(b.page, 'Reply meant for X');
  await b.page.getByRole('button', { name: 'New chat', exact: true }).click();
  await b.page.waitForFunction((c) => window.tokenrelay.conversationId !== c, a.conv);
  await h.send(a.page, 'A asks [sim tokens=400 rate=40]');
  await a.page.getByRole('button', { name: 'Stop answer' }).waitFor();

  // B's send goes out on return and meets A's answer (turn_active).
  await comeBack(b);
  await b.page.getByRole('alert').getByText(/^Your message "Reply meant for X" in another conversation was not sent\. An answer is still being written/).waitFor();
  assert.equal(await b.page.getByLabel('Message', { exact: true }).inputValue(), '', 'the text stays out of the other conversation\'s composer');
  await a.page.getByRole('button', { name: 'Stop answer' }).click();
  h.noPageErrors(assert, b.page);
});

test('the alert that an answer is still being written goes when that answer ends', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const a = await h.openChat(t, browser, server);
  const b = await h.openChat(t, browser, server, { conv: a.conv });

  await goAway(b);
  await h.send(b.page, 'From B while away');
  await h.send(a.page, 'From A [sim tokens=40 rate=40]');
  const turn = await h.lastAnswer(a.page).getAttribute('data-turn-id');
  await a.page.locator(`article[data-turn-id="${turn}"][data-status="streaming"]`).waitFor();
  await comeBack(b);
  const alert = b.page.getByRole('alert');
  await alert.getByText('An answer is still being written').waitFor();
  assert.equal(await h.waitAnswerEnded(b.page.locator(`article[data-turn-id="${turn}"]`)), 'complete');
  await alert.waitFor({ state: 'hidden', timeout: 5000 });
  h.noPageErrors(assert, b.page);
});
