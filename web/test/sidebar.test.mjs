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
