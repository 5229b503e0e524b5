// A message too large for one WebSocket frame: refused before it is sent,
// and, should the server still close with 1009 (a lower limit than the
// client knows), failed instead of re-sent after every reconnect.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

async function assertRefused(page, frames, text) {
  const alert = page.getByRole('alert');
  await alert.getByText('That message is too long to send').waitFor();
  assert.equal(await page.getByLabel('Message', { exact: true }).inputValue(), text, 'the text stays in the composer');
  await h.waitFor(async () => await page.locator('article.msg').count() === 0, { what: 'the refused message to leave no bubble' });
  await page.getByRole('button', { name: 'Send message' }).waitFor();
  assert.equal(frames.filter((f) => f.dir === 'sent' && f.frame.type === 'send' && f.frame.text === text).length, 0,
    'the oversized frame was never sent');
}

test('a message over the 64 KiB frame limit is refused locally, with the text kept', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  let frames;
  const { page, conv } = await h.openChat(t, browser, server, { setup: (p) => { frames = h.recordFrames(p); } });
  const closes = [];
  page.on('websocket', (ws) => ws.on('close', () => closes.push(Date.now())));

  // 70,000 ASCII bytes, then 17,000 emoji = 68,000 UTF-8 bytes in 34,000 UTF-16 units.
  for (const text of ['x'.repeat(70000), '😀'.repeat(17000)]) {
    await h.send(page, text);
    await assertRefused(page, frames, text);
    await page.getByLabel('Message', { exact: true }).fill('');
  }
  // The connection stayed up and the conversation still works.
  assert.equal(await page.locator('#connection').getAttribute('data-state'), 'connected');
  await h.send(page, 'Small one [sim tokens=3]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'complete');
  assert.equal(closes.length, 0, 'no socket was closed');
  assert.equal((await h.storedMessages(server, conv)).length, 2);
  h.noPageErrors(assert, page);
});

test('a send that got the socket closed with 1009 fails with too_large and is not re-sent', async (t) => {
  // The server takes 4 KiB frames here; the client assumes 64 KiB.
  const server = await h.startServer(t, { simRate: 0, args: ['--limit-frame-bytes', '4096'] });
  const browser = await h.launchBrowser(t);
  let frames;
  const { page, conv } = await h.openChat(t, browser, server, { setup: (p) => { frames = h.recordFrames(p); } });
  const text = 'y'.repeat(5000);
  await h.send(page, text);
  await assertRefused(page, [], text);
  assert.equal(frames.filter((f) => f.dir === 'sent' && f.frame.type === 'send').length, 1, 'sent once, never again');
  // It reconnects, and a later send of a size the server takes goes through.
  await page.locator('#connection[data-state="connected"]').waitFor();
  await h.waitJoined(page, conv);
  await page.getByLabel('Message', { exact: true }).fill('');
  await h.send(page, 'After the refusal [sim tokens=3]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'complete');
  assert.equal(frames.filter((f) => f.dir === 'sent' && f.frame.type === 'send' && f.frame.text === text).length, 1);
  // The lowered limit is remembered: the same size is now refused locally.
  await h.send(page, text);
  await page.getByRole('alert').getByText('That message is too long to send').waitFor();
  assert.equal(frames.filter((f) => f.dir === 'sent' && f.frame.type === 'send' && f.frame.text === text).length, 1);
  const stored = await h.storedMessages(server, conv);
  assert.deepEqual(stored.map((m) => m.role), ['user', 'assistant']);
  h.noPageErrors(assert, page);
});
