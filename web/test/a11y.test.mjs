// What a screen reader is told about answers: that one started and how it
// ended (once each, not per delta), and which conversations in the list
// have one running.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

// recordAnnouncements keeps every text the page's status region is given;
// the function it returns reads them, oldest first.
async function recordAnnouncements(page) {
  await page.evaluate(() => {
    window.announced = [];
    const el = document.getElementById('announcer');
    new MutationObserver(() => { if (el.textContent) window.announced.push(el.textContent); })
      .observe(el, { childList: true, characterData: true, subtree: true });
  });
  return () => page.evaluate(() => window.announced);
}

test('an answer is announced once when it starts and once when it ends, and the list names a running one', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const { page } = await h.openChat(t, browser, server);
  assert.equal(await page.locator('#announcer').getAttribute('role'), 'status');
  const announced = await recordAnnouncements(page);

  await h.send(page, 'First question [sim tokens=60 rate=40]');
  const first = h.lastAnswer(page);
  // A running answer's row in the list says so in words, not only with its dot.
  const busyRow = page.locator('#conversations li.current').getByRole('link', { name: /answer being written/ });
  await busyRow.waitFor();
  assert.equal(await h.waitAnswerEnded(first), 'complete');
  await busyRow.waitFor({ state: 'detached' });
  await h.waitFor(async () => (await announced()).length >= 2, { what: 'the end to be announced' });
  assert.deepEqual(await announced(), ['Writing an answer…', 'Answer finished.']);

  await h.send(page, 'Second question [sim tokens=400 rate=40]');
  const second = page.locator('article.msg.assistant').nth(1);
  await second.locator('xpath=self::*[@data-status="streaming"]').waitFor();
  await page.getByRole('button', { name: 'Stop answer' }).click();
  assert.equal(await h.waitAnswerEnded(second), 'cancelled');
  await h.waitFor(async () => (await announced()).length >= 4, { what: 'the stop to be announced' });
  assert.deepEqual(await announced(), ['Writing an answer…', 'Answer finished.', 'Writing an answer…', 'Answer stopped.']);
  h.noPageErrors(assert, page);
});

test('an answer left running in another conversation has its end said once it is on screen again', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const { page, conv: x } = await h.openChat(t, browser, server);
  const announced = await recordAnnouncements(page);
  await h.send(page, 'A long one [sim tokens=400 rate=40]');
  await h.lastAnswer(page).locator('xpath=self::*[@data-status="streaming"]').waitFor();

  // Another conversation, with an answer of its own, while X's runs on.
  await page.getByRole('button', { name: 'New chat', exact: true }).click();
  await page.waitForFunction((c) => window.tokenrelay.conversationId !== c, x);
  await h.waitJoined(page, await page.evaluate(() => window.tokenrelay.conversationId));
  await h.send(page, 'A short one [sim tokens=5]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'complete');
  await h.waitFor(async () => (await announced()).length >= 3, { what: 'the short answer to be said' });

  // Back to X: its answer, said to be written already, is stopped.
  const before = (await announced()).length;
  await page.evaluate((c) => { location.hash = c; }, x);
  await h.waitJoined(page, x);
  const answer = h.lastAnswer(page);
  await answer.locator('xpath=self::*[@data-status="streaming"]').waitFor();
  await page.getByRole('button', { name: 'Stop answer' }).click();
  assert.equal(await h.waitAnswerEnded(answer), 'cancelled');
  await h.waitFor(async () => (await announced()).length > before, { what: 'the stop to be said' });
  assert.deepEqual((await announced()).slice(before), ['Answer stopped.']);
  h.noPageErrors(assert, page);
});
