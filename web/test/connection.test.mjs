// Alerts about the connection go away once the page is connected again.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as h from './helpers.mjs';

test('the "too many connections" alert is hidden once the page connects again', async (t) => {
  const server = await h.startServer(t, { simRate: 0, args: ['--limit-connections', '1'] });
  const browser = await h.launchBrowser(t);
  const { page: first, conv, context } = await h.openChat(t, browser, server);
  const second = await context.newPage();
  second.errors = [];
  second.on('pageerror', (err) => second.errors.push(err));
  await second.goto(`${server.url}/#${conv}`);
  const alert = second.getByRole('alert');
  await alert.getByText(/too many connections/i).waitFor();

  // The first tab goes; the second gets its connection at the next retry (5–10 s after 4009).
  await first.close();
  await h.waitJoined(second, conv, 20000);
  await second.locator('#connection[data-state="connected"]').waitFor();
  await alert.waitFor({ state: 'hidden' });
  h.noPageErrors(assert, second);
});
