// Rendering answers: a message that cannot be rendered as Markdown, the
// streaming answer's rendering (incremental, interactive while it grows).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

test('an answer the Markdown parser cannot render is shown as plain text, and nothing else is affected', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page, conv } = await h.openChat(t, browser, server);
  await h.send(page, 'Before [sim tokens=5]');
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'complete');

  // Thousands of nested quotes overflow the parser's stack.
  const deep = `${'>'.repeat(3000)} deep`;
  await h.send(page, `${deep} [sim echo=1 rate=0]`);
  const answer = page.locator('article.msg.assistant').nth(1);
  assert.equal(await h.waitAnswerEnded(answer), 'complete');
  const turnId = await answer.getAttribute('data-turn-id');
  assert.equal((await h.storedTurn(server, conv, turnId)).content.trim(), deep);
  assert.equal((await answer.locator('.body').textContent()).trim(), deep, 'shown as plain text');
  await page.getByRole('button', { name: 'Send message' }).waitFor();

  // Later messages still render, Markdown and all.
  await h.send(page, '**After** it [sim echo=1 rate=0]');
  await page.locator('article.msg.assistant .body strong', { hasText: 'After' }).waitFor();
  assert.equal(await h.waitAnswerEnded(h.lastAnswer(page)), 'complete');

  // And so after a reload, from history.
  await page.reload();
  await h.waitJoined(page, conv);
  await page.locator('article.msg.assistant .body strong', { hasText: 'After' }).waitFor();
  assert.equal((await page.locator(`article[data-turn-id="${turnId}"] .body`).textContent()).trim(), deep);
  assert.equal(await page.locator('article.msg').count(), 6);
  await page.getByRole('button', { name: 'Send message' }).waitFor();
  h.noPageErrors(assert, page);
});

test('while an answer streams, its finished blocks stay put: a Copy button, a link and a selection in them work', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  // Tall enough for the question and the answer: nothing scrolls under the pointer.
  const context = await browser.newContext({ viewport: { width: 1100, height: 2000 } });
  await context.grantPermissions(['clipboard-read', 'clipboard-write']);
  const { page, conv } = await h.openChat(t, browser, server, { context });
  const prompt = ['```python', 'print("hello")', '```', '', 'See [the docs](https://example.invalid/docs) for details.', '',
    '- one', '- two', '', 'word '.repeat(300).trim()].join('\n');
  await h.send(page, `${prompt} [sim echo=1 rate=60]`);
  const answer = h.lastAnswer(page);
  const copy = answer.getByRole('button', { name: 'Copy python code' });
  await copy.waitFor();
  await page.waitForFunction(() => [...document.querySelectorAll('article.msg.assistant')].at(-1).querySelector('.body ul + p')?.textContent.startsWith('word word'));

  // Mark the rendered blocks and select the paragraph's text; let the answer grow.
  const length = async () => (await answer.locator('.body').textContent()).length;
  const marked = await page.evaluate(() => {
    const body = [...document.querySelectorAll('article.msg.assistant .body')].at(-1);
    window.__blocks = [body.querySelector('.codeblock'), body.querySelector('a'), body.querySelector('ul')];
    const r = document.createRange();
    r.selectNodeContents(body.querySelector('a').parentElement);
    getSelection().removeAllRanges();
    getSelection().addRange(r);
    return { selected: getSelection().toString(), length: body.textContent.length };
  });
  assert.equal(marked.selected, 'See the docs for details.');
  await page.waitForFunction((n) => [...document.querySelectorAll('article.msg.assistant .body')].at(-1).textContent.length > n + 200, marked.length);
  assert.equal(await answer.getAttribute('data-status'), 'streaming');
  assert.deepEqual(await page.evaluate(() => window.__blocks.map((b) => b.isConnected)), [true, true, true], 'the finished blocks were not rebuilt');
  assert.equal(await page.evaluate(() => getSelection().toString()), marked.selected, 'the selection survives');

  // A Copy click at a person's speed (100 ms between press and release) copies.
  await page.evaluate(() => navigator.clipboard.writeText('nothing yet'));
  await copy.click({ delay: 100 });
  await answer.getByRole('button', { name: 'Copy python code' }).getByText('Copied').waitFor();
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), 'print("hello")\n');
  assert.equal(await answer.getAttribute('data-status'), 'streaming');

  // A link click opens the link in a new tab.
  await page.evaluate(() => document.addEventListener('click', (e) => {
    if (e.target.closest('a')) { window.__clicked = e.target.closest('a').href; e.preventDefault(); }
  }, { once: true }));
  await answer.getByRole('link', { name: 'the docs' }).click({ delay: 100 });
  assert.equal(await page.evaluate(() => window.__clicked), 'https://example.invalid/docs');

  // The end brings the exact render of the whole text.
  assert.equal(await h.waitAnswerEnded(answer), 'complete');
  const stored = await h.storedTurn(server, conv, await answer.getAttribute('data-turn-id'));
  assert.equal(stored.content.trim(), prompt);
  assert.equal(await answer.locator('.body p.part').count(), 0);
  assert.equal(await answer.locator('.body > p').count(), 2);
  assert.equal((await answer.locator('.body').innerText()).replace(/\s+/g, ' ').trim(),
    `python Copy print("hello") See the docs for details. one two ${'word '.repeat(300).trim()}`);
  h.noPageErrors(assert, page);
});

test('a streaming answer whose text is replaced, not continued, is rendered afresh', async (t) => {
  const server = await h.startServer(t, { simRate: 0 });
  const browser = await h.launchBrowser(t);
  const { page, conv } = await h.openChat(t, browser, server);
  await h.send(page, 'Slow one [sim tokens=400 rate=20]');
  const answer = h.lastAnswer(page);
  await page.waitForFunction(() => [...document.querySelectorAll('article.msg.assistant')].at(-1)?.dataset.status === 'streaming' &&
    [...document.querySelectorAll('article.msg.assistant .body')].at(-1).textContent.length > 10);
  // As a re-join's snapshot could: the model's text is not a continuation of what was shown.
  await page.evaluate((c) => {
    const client = window.tokenrelay.client;
    const turn = client.conversation(c).byTurn.get(client.conversation(c).active);
    turn.content = 'Replaced **text**\n\nand more ';
    client.dispatchEvent(new CustomEvent('turn', { detail: { conversationId: c, turn, phase: 'delta' } }));
  }, conv);
  await answer.locator('.body strong', { hasText: 'text' }).waitFor();
  assert.equal(await answer.locator('.body.plain').count(), 0, 'rendered as Markdown, not fallen back to plain text');
  assert.match(await answer.locator('.body').textContent(), /^Replaced text\s*and more/);
  await page.keyboard.press('Escape');
  assert.equal(await h.waitAnswerEnded(answer), 'cancelled');
  h.noPageErrors(assert, page);
});
