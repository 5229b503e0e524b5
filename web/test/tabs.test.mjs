// Two tabs on one conversation show the same thing live: each other's
// questions, the streaming answers, and a Stop pressed in the other tab.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

const streamingText = (page, turnId, n) => page.waitForFunction(([id, n]) => {
  const a = document.querySelector(`article[data-turn-id="${id}"]`);
  return a?.dataset.status === 'streaming' && a.querySelector('.body').textContent.length > n;
}, [turnId, n]);

test('two pages on one conversation see each other\'s questions and answers live', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const a = await h.openChat(t, browser, server);
  const b = await h.openChat(t, browser, server, { conv: a.conv, context: a.context });
  const conv = a.conv;

  // Each page records its answer's text after every delta it applied, by seq.
  for (const p of [a.page, b.page]) {
    await p.evaluate(() => {
      window.__bySeq = {};
      window.tokenrelay.client.addEventListener('turn', (e) => {
        if (e.detail.phase === 'delta') (window.__bySeq[e.detail.turn.turn_id] ??= []).push([e.detail.turn.seq, e.detail.turn.content]);
      });
    });
  }
  await h.send(a.page, 'Question from tab A [sim tokens=80 rate=40]');
  const turnA = await h.lastAnswer(a.page).getAttribute('data-turn-id');
  await b.page.locator('article.msg.user', { hasText: 'Question from tab A' }).waitFor();
  await streamingText(b.page, turnA, 20); // B sees it while it streams
  await b.page.getByRole('button', { name: 'Stop answer' }).waitFor();
  for (const p of [a.page, b.page]) {
    assert.equal(await h.waitAnswerEnded(p.locator(`article[data-turn-id="${turnA}"]`)), 'complete');
  }
  const storedA = await h.storedTurn(server, conv, turnA);
  assert.equal((await h.turnState(a.page, conv, turnA)).content, storedA.content);
  assert.equal((await h.turnState(b.page, conv, turnA)).content, storedA.content);
  // Token by token: both saw the text grow through the same states (at
  // every seq both applied, the same text), each state a continuation of
  // the one before and of the stored text.
  const [seqA, seqB] = await Promise.all([a.page, b.page].map((p) => p.evaluate((id) => window.__bySeq[id], turnA)));
  assert.ok(seqB.length > 10, `B applied the answer in many steps (${seqB.length})`);
  const atA = new Map(seqA);
  for (const [i, [seq, text]] of seqB.entries()) {
    assert.ok(storedA.content.startsWith(text), `B's text at seq ${seq} continues into the stored text`);
    if (i) assert.ok(seq > seqB[i - 1][0] && text.length > seqB[i - 1][1].length, `B's text grows at seq ${seq}`);
    if (atA.has(seq)) assert.equal(text, atA.get(seq), `the same text at seq ${seq} in both tabs`);
  }

  // The other way round, and Stop from the tab that did not ask.
  await h.send(b.page, 'Question from tab B [sim tokens=400 rate=40]');
  await a.page.locator('article.msg.user', { hasText: 'Question from tab B' }).waitFor();
  const turnB = await h.lastAnswer(b.page).getAttribute('data-turn-id');
  await streamingText(a.page, turnB, 20);
  await a.page.getByRole('button', { name: 'Stop answer' }).click();
  for (const p of [a.page, b.page]) {
    assert.equal(await h.waitAnswerEnded(p.locator(`article[data-turn-id="${turnB}"]`), 10000), 'cancelled');
  }
  // Stop is gone and Send is back in both tabs, the one that asked too.
  for (const p of [a.page, b.page]) {
    await p.getByRole('button', { name: 'Send message' }).waitFor();
    assert.equal(await p.locator('#stop').isHidden(), true);
  }
  const storedB = await h.storedTurn(server, conv, turnB);
  assert.equal(storedB.status, 'cancelled');
  assert.equal((await h.turnState(a.page, conv, turnB)).content, storedB.content);
  assert.equal((await h.turnState(b.page, conv, turnB)).content, storedB.content);

  for (const p of [a.page, b.page]) {
    assert.deepEqual(await p.locator('article.msg.user .body').allTextContents(),
      ['Question from tab A [sim tokens=80 rate=40]', 'Question from tab B [sim tokens=400 rate=40]']);
    assert.equal(await p.locator('article.msg.assistant').count(), 2);
    h.noPageErrors(assert, p);
  }
});

test('a conversation deleted in one tab leaves the other tab, which says so', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  const a = await h.openChat(t, browser, server);
  const b = await h.openChat(t, browser, server, { conv: a.conv, context: a.context });
  await h.send(a.page, 'Soon gone [sim tokens=5 rate=0]');
  await b.page.locator('article.msg.user', { hasText: 'Soon gone' }).waitFor();
  // A was opened first, so B is the tab in front; a tab behind gets no
  // animation frames, which Playwright's clicks wait for.
  await a.page.bringToFront();
  await h.deleteFromSidebar(a.page, a.conv);
  await b.page.locator('#alert', { hasText: 'deleted in another tab' }).waitFor({ state: 'visible' });
  const now = await b.page.evaluate(() => window.tokenrelay.conversationId);
  assert.notEqual(now, a.conv, 'B moved to a new conversation');
  assert.equal(await b.page.locator('article.msg').count(), 0, 'none of the deleted messages is left');
  await h.waitJoined(b.page, now);
  // The tab that deleted it says nothing of the sort.
  await a.page.waitForFunction((c) => window.tokenrelay.conversationId !== c, a.conv);
  assert.ok(await a.page.locator('#alert').isHidden(),
    `no alert in the tab that deleted it, yet it says: ${await a.page.locator('#alert').textContent()}`);
  h.noPageErrors(assert, a.page);
  h.noPageErrors(assert, b.page);
});
