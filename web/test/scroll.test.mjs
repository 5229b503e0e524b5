// Following the answer as it streams: the view stays at the bottom until
// the person scrolls up, and follows again once they are back at the bottom.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

const view = (page) => page.evaluate(() => {
  const s = document.getElementById('scroller');
  const body = [...document.querySelectorAll('article.msg.assistant .body')].at(-1);
  return { top: s.scrollTop, gap: s.scrollHeight - s.scrollTop - s.clientHeight, length: body?.textContent.length ?? 0 };
});
// settled waits until a scroll the test started is over (smooth scrolling
// animates): the gap to the bottom is at least arg, or the top is above
// arg, and the position did not move since the last poll.
const settled = (page, check, arg) => page.waitForFunction(([check, arg]) => {
  const s = document.getElementById('scroller');
  const still = window.__lastTop === s.scrollTop;
  window.__lastTop = s.scrollTop;
  const gap = s.scrollHeight - s.scrollTop - s.clientHeight;
  return still && (check === 'gap' ? gap >= arg : s.scrollTop < arg);
}, [check, arg], { polling: 100 });
const grown = (page, length, by = 300) => page.waitForFunction(([n, by]) =>
  [...document.querySelectorAll('article.msg.assistant .body')].at(-1).textContent.length > n + by, [length, by]);

test('scrolling up while an answer streams stays put; scrolling back to the bottom follows again', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page } = await h.openChat(t, browser, server, { viewport: { width: 1100, height: 700 } });
  await h.send(page, 'Scroll along [sim tokens=4000 rate=150]');
  const answer = h.lastAnswer(page);
  // Following: the answer outgrows the view and the view stays at its end.
  await page.waitForFunction(() => document.getElementById('scroller').scrollHeight > document.getElementById('scroller').clientHeight + 600);
  let v = await view(page);
  await grown(page, v.length);
  assert.ok((await view(page)).gap <= 2, 'follows the end');

  // One notch of the wheel up (100 px, within what used to count as "at the bottom").
  const box = await page.locator('#scroller').boundingBox();
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  await page.mouse.wheel(0, -100);
  await settled(page, 'gap', 90);
  v = await view(page);
  await grown(page, v.length);
  let after = await view(page);
  assert.ok(Math.abs(after.top - v.top) <= 10, `stays where the wheel left it (${v.top} → ${after.top})`);
  assert.ok(after.gap > 100, 'no longer at the bottom');

  // The keyboard too: Page Up in the message list.
  await page.locator('#scroller').focus();
  await page.keyboard.press('PageUp');
  await settled(page, 'top', after.top - 200);
  v = await view(page);
  await grown(page, v.length);
  after = await view(page);
  assert.ok(Math.abs(after.top - v.top) <= 10, `stays where Page Up left it (${v.top} → ${after.top})`);

  // Back at the bottom: it follows again.
  await page.keyboard.press('End');
  await page.waitForFunction(() => {
    const s = document.getElementById('scroller');
    return s.scrollHeight - s.scrollTop - s.clientHeight <= 2;
  });
  v = await view(page);
  await grown(page, v.length);
  assert.ok((await view(page)).gap <= 2, 'follows the end again');
  // And a wheel notch up lets go again.
  await page.mouse.wheel(0, -100);
  await settled(page, 'gap', 90);
  v = await view(page);
  await grown(page, v.length);
  after = await view(page);
  assert.ok(Math.abs(after.top - v.top) <= 10, `stays where the wheel left it (${v.top} → ${after.top})`);
  assert.equal(await answer.getAttribute('data-status'), 'streaming');
  await page.keyboard.press('Escape');
  assert.equal(await h.waitAnswerEnded(answer), 'cancelled');
  h.noPageErrors(assert, page);
});

test('a 10,000-token answer takes typing as it streams, follows to its end and equals the stored text', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page, conv } = await h.openChat(t, browser, server, {
    viewport: { width: 1100, height: 700 },
  });
  await h.send(page, 'A very long answer [sim tokens=10000 rate=2500]');
  const answer = h.lastAnswer(page);
  // Typing while it streams: every key lands in the message box.
  await page.waitForFunction(() => document.querySelector('article.msg.assistant .body')?.textContent.length > 5000);
  await page.getByLabel('Message', { exact: true }).pressSequentially('still typing');
  assert.equal(await h.waitAnswerEnded(answer, 60000), 'complete');
  assert.equal(await page.getByLabel('Message', { exact: true }).inputValue(), 'still typing');

  const stored = await h.storedTurn(server, conv, await answer.getAttribute('data-turn-id'));
  assert.ok(stored.content.length > 50000, `a long answer (${stored.content.length} chars)`);
  assert.equal((await answer.locator('.body').innerText()).trim(), stored.content.trim());
  await page.waitForFunction(() => {
    const s = document.getElementById('scroller');
    return s.scrollHeight - s.scrollTop - s.clientHeight <= 2;
  });
  h.noPageErrors(assert, page);
});
