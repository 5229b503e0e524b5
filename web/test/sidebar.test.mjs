// The conversation list: busy dots of conversations not on screen, and the
// list as a dialog on a narrow screen.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

test('the busy dot of a conversation not on screen goes when its answer ends', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page, conv: b } = await h.openChat(t, browser, server);
  await h.send(page, 'Busy elsewhere [sim tokens=150 rate=50]');
  await page.getByRole('button', { name: 'Stop answer' }).waitFor();
  await page.locator('#conversations li.current a.busy').waitFor();

  // Look at another conversation while B's answer runs.
  await page.getByRole('button', { name: 'New chat', exact: true }).click();
  await page.waitForFunction((c) => window.tokenrelay.conversationId !== c, b);
  const row = page.locator(`#conversations li[data-id="${b}"] a`);
  await row.and(page.locator('.busy')).waitFor();

  await h.waitFor(async () => (await h.storedMessages(server, b)).at(-1)?.status === 'complete', { what: 'B\'s answer to end' });
  await row.and(page.locator(':not(.busy)')).waitFor({ timeout: 10000 });
  h.noPageErrors(assert, page);
});

test('on a narrow screen the open list takes the focus and keeps it until Esc', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page } = await h.openChat(t, browser, server, { viewport: { width: 360, height: 640 } });
  await h.send(page, 'A question [sim tokens=3]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'complete');
  const focused = () => page.evaluate(() => {
    const e = document.activeElement;
    return { inSidebar: !!e.closest('#sidebar'), name: e.id || e.getAttribute('aria-label') || e.textContent.trim() };
  });

  await page.getByRole('button', { name: 'Show conversations' }).click();
  await page.locator('#sidebar.open').waitFor();
  assert.equal((await focused()).inSidebar, true, 'focus moved into the list');
  const seen = new Set();
  for (let i = 0; i < 8; i++) {
    await page.keyboard.press('Tab');
    const f = await focused();
    assert.equal(f.inSidebar, true, `Tab ${i + 1} stays in the list (at ${f.name})`);
    seen.add(f.name);
  }
  assert.ok(seen.size >= 3, `Tab goes round the list's controls: ${[...seen]}`);
  for (let i = 0; i < 4; i++) {
    await page.keyboard.press('Shift+Tab');
    assert.equal((await focused()).inSidebar, true, 'Shift+Tab stays in the list');
  }

  await page.keyboard.press('Escape');
  await page.locator('#sidebar:not(.open)').waitFor({ state: 'attached' });
  assert.equal((await focused()).name, 'open-sidebar', 'focus back on the menu button');
  await page.keyboard.press('Tab');
  assert.equal((await focused()).inSidebar, false, 'the page behind is reachable again');
  h.noPageErrors(assert, page);
});

test('a malformed hash is ignored like an invalid id, at start and later', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const page = await (await browser.newContext()).newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err));
  await page.goto(`${server.url}/#100%`);
  const conv = await page.waitForFunction(() => {
    const id = window.tokenrelay?.conversationId;
    return id && window.tokenrelay.client.conversation(id)?.joined && id;
  }).then((h) => h.jsonValue());
  assert.match(conv, /^c-/, 'a new conversation instead of the malformed one');
  await h.send(page, 'Still works [sim tokens=5 rate=0]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page), 10000), 'complete');
  // The app's hashchange listener, registered first, has run when ours does.
  await page.evaluate(() => new Promise((resolve) => {
    addEventListener('hashchange', () => setTimeout(resolve), { once: true });
    location.hash = '#bad%zz';
  }));
  assert.deepEqual(errors.map(String), []);
});

test('a delete that fails keeps the conversation on screen and says so', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const { page, conv } = await h.openChat(t, browser, server);
  await h.send(page, 'Keep me [sim tokens=5 rate=0]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page), 10000), 'complete');
  // The server cannot be reached for the delete.
  await page.route('**/v1/conversations/*', (route) => (route.request().method() === 'DELETE' ? route.abort('connectionrefused') : route.continue()));
  await h.deleteFromSidebar(page, conv);
  await page.locator('#alert', { hasText: 'was not deleted' }).waitFor({ state: 'visible' });
  assert.equal(await page.evaluate(() => window.tokenrelay.conversationId), conv, 'still on the conversation');
  assert.ok(await page.evaluate((c) => window.tokenrelay.client.conversation(c)?.joined, conv), 'still joined');
  assert.equal(await page.locator('#conversations li.current').getAttribute('data-id'), conv);
  assert.equal((await h.storedMessages(server, conv)).length, 2, 'nothing was deleted');
});

test('the conversation list shows more than 100 conversations on request', async (t) => {
  const server = await h.startServer(t, { simRate: 0, args: ['--limit-sends', '0', '--limit-turns', '0'] });
  for (let i = 0; i < 105; i++) {
    const r = await fetch(`${server.url}/v1/conversations/many-${i}/messages`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ text: `Conversation ${i} [sim tokens=1 rate=0]` }),
    });
    assert.equal(r.status, 202);
  }
  const browser = await h.launchBrowser(t);
  const { page } = await h.openChat(t, browser, server);
  const rows = page.locator('#conversations li[data-id^="many-"]');
  await page.locator('#conversations li.more button', { hasText: 'Show more' }).waitFor();
  assert.equal(await rows.count(), 100);
  await page.locator('#conversations li.more button').click();
  await page.waitForFunction(() => document.querySelectorAll('#conversations li[data-id^="many-"]').length === 105);
  assert.equal(await page.locator('#conversations li.more').count(), 0, 'nothing more to show');
  h.noPageErrors(assert, page);
});

test('switching between two conversations while both answers stream keeps each one\'s text its own', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page, conv: a } = await h.openChat(t, browser, server);
  const streaming = () => page.waitForFunction(() => {
    const x = document.querySelector('article.msg.assistant');
    return x?.dataset.status === 'streaming' && x.querySelector('.body').textContent.length > 30;
  });
  await h.send(page, 'Alpha [sim tokens=200 rate=50]');
  await streaming();
  const turnA = await h.lastAnswer(page).getAttribute('data-turn-id');
  await page.getByRole('button', { name: 'New chat', exact: true }).click();
  await page.waitForFunction((c) => window.tokenrelay.conversationId !== c, a);
  const b = await page.evaluate(() => window.tokenrelay.conversationId);
  await h.waitJoined(page, b);
  assert.equal(await page.locator('#stop').isHidden(), true, 'no Stop in the conversation with no answer running');
  await h.send(page, 'Beta [sim tokens=200 rate=50]');
  await streaming();
  const turnB = await h.lastAnswer(page).getAttribute('data-turn-id');

  // Back and forth through the list while both run: each time the one
  // conversation's question and answer, none of the other's.
  for (const [conv, question, turn, other] of [[a, 'Alpha', turnA, turnB], [b, 'Beta', turnB, turnA], [a, 'Alpha', turnA, turnB]]) {
    await page.locator(`#conversations li[data-id="${conv}"] a`).click();
    await h.waitJoined(page, conv);
    await page.locator(`article[data-turn-id="${turn}"]`).waitFor();
    assert.deepEqual(await page.locator('article.msg.user .body').allTextContents(), [`${question} [sim tokens=200 rate=50]`]);
    assert.equal(await page.locator('article.msg.assistant').count(), 1);
    assert.equal(await page.locator(`article[data-turn-id="${other}"]`).count(), 0);
  }
  for (const [conv, turn] of [[a, turnA], [b, turnB]]) {
    if (conv === b) {
      await page.locator(`#conversations li[data-id="${b}"] a`).click();
      await h.waitJoined(page, b);
    }
    const answer = page.locator(`article[data-turn-id="${turn}"]`);
    assert.equal(await h.waitAnswerEnded(answer), 'complete');
    const stored = await h.storedTurn(server, conv, turn);
    assert.equal((await h.turnState(page, conv, turn)).content, stored.content);
    assert.equal((await answer.locator('.body').innerText()).trim(), stored.content.trim());
    await page.getByRole('button', { name: 'Send message' }).waitFor();
  }
  h.noPageErrors(assert, page);
});

test('the busy dot shows beside a title too long for its row', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const { page } = await h.openChat(t, browser, server);
  await h.send(page, 'A question whose title is much longer than the row of the list [sim tokens=400 rate=40]');
  const link = page.locator('#conversations li.current a.busy');
  await link.waitFor();
  // The dot is the link's ::after; the DevTools protocol gives its box.
  // (A refresh of the list may replace the row meanwhile: then look again.)
  const cdp = await page.context().newCDPSession(page);
  const [[dotLeft, , dotRight], box] = await h.waitFor(async () => {
    const { root } = await cdp.send('DOM.getDocument', { depth: -1 });
    const { nodeId } = await cdp.send('DOM.querySelector', { nodeId: root.nodeId, selector: '#conversations li.current a.busy' });
    const { node } = await cdp.send('DOM.describeNode', { nodeId, depth: 1 });
    const dot = node.pseudoElements?.find((p) => p.pseudoType === 'after');
    if (!dot) return null;
    const quad = (await cdp.send('DOM.getBoxModel', { backendNodeId: dot.backendNodeId })).model.border;
    return [quad, await link.boundingBox()];
  }, { what: 'the busy link and its dot' });
  assert.ok(dotRight - dotLeft > 0 && dotLeft >= box.x && dotRight <= box.x + box.width,
    `the dot (${dotLeft}–${dotRight}) lies within its row's link (${box.x}–${box.x + box.width}), not past the cut title`);
  await page.getByRole('button', { name: 'Stop answer' }).click();
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'cancelled');
  h.noPageErrors(assert, page);
});
