// The server restarts while the page is open: the page says so, reconnects
// by itself, shows the interrupted answer as stored, and carries on.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

// SIGTERM: the server ends the answer itself on its way out. SIGKILL: it
// dies mid-answer, and the next start ends the answer from its journal.
for (const signal of ['SIGTERM', 'SIGKILL']) {
  test(`the page reconnects and resumes after a server restart (${signal})`, async (t) => {
    let server = await h.startServer(t);
    const { dataDir, addr } = server;
    const browser = await h.launchBrowser(t);
    const { page, conv } = await h.openChat(t, browser, server);
    await page.locator('#connection[data-state="connected"]').waitFor();

    await h.send(page, 'Keep going [sim tokens=400 rate=40]');
    const answer = h.lastAnswer(page);
    await page.waitForFunction(() => {
      const a = [...document.querySelectorAll('article.msg.assistant')].at(-1);
      return a?.dataset.status === 'streaming' && a.querySelector('.body').textContent.length > 30;
    });
    const turnId = await answer.getAttribute('data-turn-id');

    const exit = await server.stop(signal);
    if (signal === 'SIGTERM') assert.equal(exit.code, 0, 'graceful shutdown');
    await page.locator('#connection[data-state="reconnecting"]').waitFor({ timeout: 5000 });
    assert.equal(await page.locator('#connection-label').textContent(), 'Reconnecting…');

    server = await h.startServer(t, { dataDir, addr });
    await page.locator('#connection[data-state="connected"]').waitFor({ timeout: 20000 });
    assert.equal(await h.waitAnswerEnded(answer, 15000), 'interrupted');
    await answer.locator('.meta', { hasText: 'Interrupted' }).waitFor();
    const stored = await h.storedTurn(server, conv, turnId);
    assert.equal(stored.status, 'interrupted');
    assert.equal((await h.turnState(page, conv, turnId)).content, stored.content);
    assert.equal((await answer.locator('.body').innerText()).trim(), stored.content.trim());
    assert.equal(await page.locator('article.msg.assistant').count(), 1);

    // The same page goes on working on the new server.
    await h.send(page, 'Still there? [sim tokens=20 rate=0]');
    // Wait for the new answer's bubble first: until it exists, the last
    // answer on the page is the interrupted one.
    await page.locator('article.msg.assistant').nth(1).waitFor();
    assert.equal(await h.waitAnswerEnded(page.locator('article.msg.assistant').nth(1)), 'complete');
    const second = await h.lastAnswer(page).getAttribute('data-turn-id');
    assert.equal((await h.turnState(page, conv, second)).content, (await h.storedTurn(server, conv, second)).content);
    h.noPageErrors(assert, page);
  });
}
