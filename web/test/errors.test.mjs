// Errors reach the person in words: too large, rate limited, turn_active,
// and a provider error ending the answer.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

test('refused sends and a failing model are explained in words', async (t) => {
  // One send a minute past the burst of 10: on a busy machine the default
  // (one every 2 s) would give the page's send below a send back before it
  // is made.
  const server = await h.startServer(t, { simRate: 0, args: ['--limit-text-bytes', '200', '--limit-sends', '1'] });
  const browser = await h.launchBrowser(t);
  const { page, conv } = await h.openChat(t, browser, server);
  const alert = page.getByRole('alert');
  const input = page.getByLabel('Message', { exact: true });

  // too_large: the text comes back to the composer to be shortened.
  const long = 'x'.repeat(300);
  await h.send(page, long);
  await alert.getByText('That message is too long to send').waitFor();
  assert.equal(await input.inputValue(), long);
  // The alert shows as the error arrives; the list drops the optimistic
  // bubble at its next render.
  await h.waitFor(async () => await page.locator('article.msg').count() === 0, { what: 'the refused message to leave no bubble' });

  // Provider error: the answer ends with the reason shown beside it.
  await h.send(page, 'Fail soon [sim tokens=50 error_after=5]');
  assert.equal(await alert.isVisible(), false, 'a new send clears the old alert');
  const failed = h.lastAnswer(page);
  assert.equal(await h.waitAnswerEnded(failed), 'error');
  await failed.locator('.meta', { hasText: 'The model could not finish this answer' }).waitFor();
  // Said with the answer's text: the note is in the answer's live region.
  assert.equal(await failed.locator('.meta').evaluate((el) => el.closest('[aria-live]')?.getAttribute('aria-live')), 'polite');
  const stored = await h.storedTurn(server, conv, await failed.getAttribute('data-turn-id'));
  assert.equal(stored.status, 'error');

  // turn_active: a second send (here straight through the client, as a
  // slow second tab would) while an answer is running.
  await page.evaluate(() => window.tokenrelay.client.send(window.tokenrelay.conversationId, 'Slow one [sim tokens=400 rate=40]'));
  await page.getByRole('button', { name: 'Stop answer' }).waitFor();
  await page.evaluate(() => window.tokenrelay.client.send(window.tokenrelay.conversationId, 'Too eager'));
  await alert.getByText('An answer is still being written').waitFor();
  await h.waitFor(async () => await page.locator('article.msg.user', { hasText: 'Too eager' }).count() === 0, { what: 'the refused message to leave no bubble' });
  await page.keyboard.press('Escape');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page), 10000), 'cancelled');

  // rate_limited: use up the burst of sends (10) over HTTP, then send. Every
  // attempt takes a send from the budget, also one refused by the limit on
  // turns running at once (also a 429), so all twelve are made.
  for (let i = 0; i < 12; i++) {
    await fetch(`${server.url}/v1/conversations/c-burn-${i}/messages`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ text: 'x [sim tokens=1]' }),
    });
  }
  await h.send(page, 'One more');
  await alert.getByText(/You are sending messages too quickly\. Try again in \d+ seconds?\./).waitFor();
  assert.equal(await input.inputValue(), 'One more');
  h.noPageErrors(assert, page);
});

test('a rate limit other than the send rate is shown in the server\'s words, with its retry delay', async (t) => {
  const server = await h.startServer(t, { simRate: 0, args: ['--limit-turns', '1'] });
  const browser = await h.launchBrowser(t);
  const { page } = await h.openChat(t, browser, server);
  // One answer running elsewhere uses up the user's turns.
  const res = await fetch(`${server.url}/v1/conversations/c-elsewhere/messages`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ text: 'Long [sim tokens=4000 rate=50]' }),
  });
  assert.equal(res.status, 202);

  await h.send(page, 'Mine');
  const alert = page.getByRole('alert');
  await alert.getByText(/^Too many turns running at once\. Try again in 1 second\.$/).waitFor();
  assert.equal(await alert.getByText('sending messages too quickly').count(), 0);
  assert.equal(await page.getByLabel('Message', { exact: true }).inputValue(), 'Mine');
  h.noPageErrors(assert, page);
});

test('a new conversation refused by the new-conversation limit still shows the answer its send starts', async (t) => {
  const server = await h.startServer(t, { simRate: 0, args: ['--limit-new-conversations', '1'] });
  const browser = await h.launchBrowser(t);
  // The page's own conversation uses up the one new conversation a minute
  // (New chat on an empty one stays on it: it has a message first).
  const { page, conv: first } = await h.openChat(t, browser, server);
  const alert = page.getByRole('alert');
  await h.send(page, 'First [sim tokens=3]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'complete');

  // A new chat: its join is refused, and the page says why.
  await page.getByRole('button', { name: 'New chat', exact: true }).click();
  await page.waitForFunction((c) => window.tokenrelay.conversationId !== c, first);
  await alert.getByText(/^Too many new conversations .*\. Try again in \d+ seconds?\.$/).waitFor();
  const conv = await page.evaluate(() => window.tokenrelay.conversationId);
  assert.equal(await page.evaluate((c) => window.tokenrelay.client.conversation(c), conv), undefined);

  // A send creates the conversation (it counts under --limit-sends): the
  // page joins it then, and shows the answer to the end.
  await h.send(page, 'Hello anyway [sim tokens=20]');
  await h.waitJoined(page, conv);
  const answer = h.lastAnswer(page);
  assert.equal(await h.waitAnswerEnded(answer), 'complete');
  const turnId = await answer.getAttribute('data-turn-id');
  const stored = await h.storedTurn(server, conv, turnId);
  assert.equal(stored.status, 'complete');
  assert.equal((await answer.locator('.body').innerText()).trim(), stored.content.trim());
  assert.equal(await alert.isVisible(), false, 'the refused join leaves no alert once its send went through');
  h.noPageErrors(assert, page);
});
