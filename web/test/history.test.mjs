// A conversation longer than one join's history (50 messages): the older
// messages load when the person scrolls to the top, or asks for them.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

async function post(server, conv, text) {
  const res = await fetch(`${server.url}/v1/conversations/${conv}/messages`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ text }),
  });
  const body = await res.json();
  assert.equal(res.status, 202, JSON.stringify(body));
  const turnId = body.turn_id;
  await h.waitFor(async () => (await h.storedTurn(server, conv, turnId))?.status === 'complete', { what: `the answer to ${text}` });
}

test('scrolling to the top loads older messages and keeps the view in place', async (t) => {
  const server = await h.startServer(t, { simRate: 0, args: ['--limit-sends', '0'] });
  const conv = `c-test-long-${Date.now()}`;
  for (let i = 0; i < 27; i++) await post(server, conv, `Question ${i} [sim tokens=3]`); // 54 messages
  const browser = await h.launchBrowser(t);
  const { page } = await h.openChat(t, browser, server, { conv, viewport: { width: 1100, height: 700 } });
  const articles = page.locator('#log article');
  await page.locator('#log article.msg.user', { hasText: 'Question 26' }).waitFor();
  assert.equal(await articles.count(), 50);
  assert.equal(await articles.first().textContent(), 'Question 2 [sim tokens=3]');
  const older = page.getByRole('button', { name: 'Load older messages' });
  assert.equal(await older.isVisible(), true);

  // Scroll up to the top with the wheel, as a person does.
  const box = await page.locator('#scroller').boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  const q2 = page.locator('#log article.msg.user', { hasText: /^Question 2 \[/ });
  await page.mouse.wheel(0, -100000);
  await page.locator('#log article.msg.user', { hasText: /^Question 0 \[/ }).waitFor({ state: 'attached' });
  assert.equal(await articles.count(), 54);
  assert.equal(await articles.first().textContent(), 'Question 0 [sim tokens=3]');
  // What was at the top stays on screen: the older messages went above it.
  const scrolled = await page.evaluate(() => document.getElementById('scroller').scrollTop);
  assert.ok(scrolled > 100, `the view did not jump to the new top (scrollTop ${scrolled})`);
  const q2box = await q2.boundingBox();
  assert.ok(q2box.y > box.y - 50 && q2box.y < box.y + box.height, 'Question 2 still in view');
  await older.waitFor({ state: 'hidden' }); // nothing older is left

  // The whole history stays after a reconnect.
  await page.evaluate(() => window.tokenrelay.client._ws.close(4000, 'test'));
  await page.locator('#connection[data-state="reconnecting"]').waitFor();
  await h.waitJoined(page, conv);
  assert.equal(await articles.count(), 54);
  h.noPageErrors(assert, page);
});
