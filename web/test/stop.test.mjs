// Stop: the first click stops the answer, Esc does too, and it works before
// the server has acknowledged the send.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

test('Stop mid-answer works on the first click and the stored status is cancelled', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  let frames;
  const { page, conv } = await h.openChat(t, browser, server, { setup: (p) => { frames = h.recordFrames(p); } });
  await h.send(page, 'Talk for a while [sim tokens=400 rate=40]');
  const answer = h.lastAnswer(page);
  await page.waitForFunction(() => {
    const a = [...document.querySelectorAll('article.msg.assistant')].at(-1);
    return a?.dataset.status === 'streaming' && a.querySelector('.body').textContent.length > 30;
  });
  await page.getByRole('button', { name: 'Stop answer' }).click();
  assert.equal(await h.waitAnswerEnded(answer, 10000), 'cancelled');
  await answer.locator('.meta', { hasText: 'Stopped' }).waitFor();
  await page.getByRole('button', { name: 'Send message' }).waitFor();
  const turnId = await answer.getAttribute('data-turn-id');
  const stored = await h.storedTurn(server, conv, turnId);
  assert.equal(stored.status, 'cancelled');
  assert.equal((await h.turnState(page, conv, turnId)).content, stored.content);
  assert.ok(stored.content.length > 30 && stored.content.length < 2000, 'the partial text is kept');
  const cancels = frames.filter((f) => f.dir === 'sent' && f.frame.type === 'cancel');
  assert.equal(cancels.length, 1, 'one click, one cancel');
  const ack = frames.find((f) => f.dir === 'received' && f.frame.type === 'ack' && f.frame.id === cancels[0].frame.id);
  assert.deepEqual({ status: ack.frame.status, already: ack.frame.already }, { status: 'cancelled', already: false });
  h.noPageErrors(assert, page);
});

test('Esc right after Enter stops the turn before the server acknowledged it', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  let frames;
  const { page, conv } = await h.openChat(t, browser, server, { setup: (p) => { frames = h.recordFrames(p); } });
  // Enter and Esc in one task: the cancel frame leaves before any answer
  // from the server can have been processed, with the client-chosen turn id.
  const turnId = await page.evaluate(() => {
    const input = document.getElementById('input');
    input.value = 'Never mind [sim tokens=400 rate=40]';
    input.dispatchEvent(new KeyboardEvent('keydown', { key: 'Enter', bubbles: true }));
    const conv = window.tokenrelay.client.conversation(window.tokenrelay.conversationId);
    const id = conv.active;
    document.dispatchEvent(new KeyboardEvent('keydown', { key: 'Escape', bubbles: true }));
    return id;
  });
  assert.match(turnId, /^t-/);
  const answer = page.locator(`article[data-turn-id="${turnId}"]`);
  assert.equal(await h.waitAnswerEnded(answer, 10000), 'cancelled');
  const stored = await h.storedTurn(server, conv, turnId);
  assert.equal(stored.status, 'cancelled');
  assert.ok(stored.content.length < 200, `stopped at once (${stored.content.length} chars)`);
  assert.equal((await h.storedMessages(server, conv)).filter((m) => m.role === 'user').length, 1, 'the question is stored');
  const iSend = frames.findIndex((f) => f.dir === 'sent' && f.frame.type === 'send');
  const iCancel = frames.findIndex((f) => f.dir === 'sent' && f.frame.type === 'cancel');
  const sendId = frames[iSend].frame.id;
  const iAck = frames.findIndex((f) => f.dir === 'received' && f.frame.type === 'ack' && f.frame.id === sendId);
  assert.equal(frames[iCancel].frame.turn_id, turnId);
  assert.equal(frames[iSend].frame.turn_id, turnId, 'the turn id was chosen by the client');
  assert.ok(iSend < iCancel && (iAck === -1 || iCancel < iAck), `cancel left before the ack (send ${iSend}, cancel ${iCancel}, ack ${iAck})`);
  h.noPageErrors(assert, page);
});

test('a Stop the server could not carry out says so, and Stop works again', async (t) => {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  // The server's answer when its broker fails for a moment: the page's
  // first cancel gets it; everything else goes through.
  const setup = (p) => p.routeWebSocket(/\/v1\/ws/, (ws) => {
    const upstream = ws.connectToServer();
    let refused = false;
    ws.onMessage((m) => {
      const f = JSON.parse(m);
      if (f.type === 'cancel' && !refused) {
        refused = true;
        ws.send(JSON.stringify({ type: 'error', id: f.id, code: 'unavailable', message: 'the message broker is unavailable' }));
        return;
      }
      upstream.send(m);
    });
  });
  const { page, conv } = await h.openChat(t, browser, server, { setup });
  await h.send(page, 'Talk for a while [sim tokens=400 rate=40]');
  const answer = h.lastAnswer(page);
  const stop = page.getByRole('button', { name: 'Stop answer' });
  // Stop is offered while the turn is still queued; wait for the answer to
  // stream so that "still streaming after the refusal" means something.
  await answer.locator('xpath=self::*[@data-status="streaming"]').waitFor();
  await stop.click();
  await page.getByRole('alert').getByText('The answer could not be stopped just now').waitFor();
  assert.equal(await answer.getAttribute('data-status'), 'streaming');
  await answer.locator('.meta').waitFor({ state: 'hidden' }); // no longer "Stopping…"
  assert.equal(await stop.getAttribute('aria-disabled'), 'false');

  await stop.click();
  assert.equal(await h.waitAnswerEnded(answer, 10000), 'cancelled');
  assert.equal((await h.storedTurn(server, conv, await answer.getAttribute('data-turn-id'))).status, 'cancelled');
  await page.getByRole('alert').waitFor({ state: 'hidden' }); // the alert goes with the answer
  h.noPageErrors(assert, page);
});

// clickAt presses and releases the mouse at (x, y) through the DevTools
// protocol, with the click count and the time stamp (seconds since the
// epoch) a browser would give it: a double-click's timing is the test's,
// not the machine's.
async function clickAt(cdp, x, y, clickCount, timestamp) {
  for (const type of ['mousePressed', 'mouseReleased']) {
    await cdp.send('Input.dispatchMouseEvent', { type, x, y, button: 'left', clickCount, timestamp });
  }
}

// clickSend opens a chat, types text and clicks Send at t0 (seconds since
// the epoch); it returns what the click tests look at. Stop appears where
// Send was once the message goes, so a second click at (x, y) lands on it.
async function clickSend(t, text) {
  const server = await h.startServer(t);
  const browser = await h.launchBrowser(t);
  let frames;
  const { page } = await h.openChat(t, browser, server, { setup: (p) => { frames = h.recordFrames(p); } });
  await page.fill('#input', text);
  const box = await page.getByRole('button', { name: 'Send message' }).boundingBox();
  const [x, y] = [box.x + box.width / 2, box.y + box.height / 2];
  const cdp = await page.context().newCDPSession(page);
  const t0 = Date.now() / 1000;
  await clickAt(cdp, x, y, 1, t0);
  await page.getByRole('button', { name: 'Stop answer' }).waitFor();
  const sent = (type) => frames.filter((f) => f.dir === 'sent' && f.frame.type === type).length;
  return { page, answer: h.lastAnswer(page), sent, click: (count, at) => clickAt(cdp, x, y, count, t0 + at) };
}

test('A double-click on Send sends once and does not stop the answer', async (t) => {
  const { page, answer, sent, click } = await clickSend(t, 'Keep going [sim tokens=20 rate=40]');
  await click(2, 0.2); // the second press of the pair
  assert.equal(await h.waitAnswerEnded(answer, 10000), 'complete');
  assert.equal(sent('send'), 1, 'one send');
  assert.equal(sent('cancel'), 0, 'no cancel');
  h.noPageErrors(assert, page);
});

test('A Stop clicked after Send stops the answer, also when the browser counts it as a second click', async (t) => {
  const { page, answer, sent, click } = await clickSend(t, 'Talk for a bit [sim tokens=80 rate=40]');
  await answer.locator('xpath=self::*[@data-status="streaming"]').waitFor();
  // A system whose double-click time is long (it can be set to seconds)
  // counts a Stop two seconds after Send as the second click of a pair.
  await click(2, 2);
  assert.equal(await h.waitAnswerEnded(answer, 10000), 'cancelled');
  assert.equal(sent('send'), 1, 'one send');
  h.noPageErrors(assert, page);
});

test('Clicking Stop again after a double-click on Send stops the answer', async (t) => {
  const { page, answer, sent, click } = await clickSend(t, 'Talk for a bit [sim tokens=80 rate=40]');
  await click(2, 0.2); // the double-click's second press: let go
  await click(3, 0.4); // one more: the person means Stop
  assert.equal(await h.waitAnswerEnded(answer, 10000), 'cancelled');
  assert.equal(sent('send'), 1, 'one send');
  assert.equal(sent('cancel'), 1, 'one cancel');
  h.noPageErrors(assert, page);
});
