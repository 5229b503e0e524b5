// Makes docs/screenshots/{desktop,phone}-{light,dark}.png: the chat page on a
// conversation whose last answer is Markdown with a code block (the
// simulator's echo directive repeats the prompt as the answer).
//
//   node web/test/screenshots.mjs        (TOKENRELAY_BIN to skip the build)
import { mkdirSync } from 'node:fs';
import path from 'node:path';
import * as h from './helpers.mjs';

const out = path.join(h.root, 'docs/screenshots');

const answer = `Sure! A page that streams an answer as it is written:

\`\`\`js
import { TokenRelayClient } from '/client.js';

const client = new TokenRelayClient();
client.addEventListener('turn', (e) => show(e.detail.turn.content));
client.connect();
await client.join('c-demo');
const { turnId } = client.send('c-demo', 'Hello!');
\`\`\`

- **Stop** works at once: \`client.cancel(turnId)\`
- After a drop it *continues* the text`;

// A stand-in for node:test's context: run the cleanups at the end.
const cleanups = [];
const t = { after: (fn) => cleanups.push(fn) };

try {
  mkdirSync(out, { recursive: true });
  const server = await h.startServer(t, { simRate: 0, args: ['--sim-tokens', '45'] });
  for (const title of ['Plan a weekend in Lisbon', 'Explain WebSocket backpressure', 'Draft the release notes']) {
    await fetch(`${server.url}/v1/conversations/c-${title.replaceAll(' ', '-').toLowerCase()}/messages`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ text: title }),
    });
  }
  const browser = await h.launchBrowser(t);
  const conv = 'c-screenshot-demo';
  const { page, context } = await h.openChat(t, browser, server, { conv });
  await h.send(page, 'How do I stream answers into my own page?');
  await h.waitAnswerEnded(h.lastAnswer(page));
  await h.send(page, `${answer} [sim echo=1]`);
  await h.waitAnswerEnded(h.lastAnswer(page));
  await context.close();

  const shots = [
    { name: 'desktop', viewport: { width: 1280, height: 860 }, deviceScaleFactor: 1 },
    { name: 'phone', viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true },
  ];
  for (const shot of shots) {
    for (const colorScheme of ['light', 'dark']) {
      const ctx = await browser.newContext({ viewport: shot.viewport, deviceScaleFactor: shot.deviceScaleFactor,
        isMobile: shot.isMobile, hasTouch: shot.hasTouch, colorScheme });
      const p = await ctx.newPage();
      await p.goto(`${server.url}/#${conv}`);
      await h.waitJoined(p, conv);
      await p.locator('#connection[data-state="connected"]').waitFor();
      await p.locator('#conversations a', { hasText: 'Draft the release notes' }).waitFor({ state: 'attached' });
      await p.evaluate(() => document.activeElement?.blur());
      await p.waitForFunction(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r(true)))));
      const file = path.join(out, `${shot.name}-${colorScheme}.png`);
      await p.screenshot({ path: file, animations: 'disabled' });
      console.log(`wrote ${path.relative(h.root, file)}`);
      await ctx.close();
    }
  }
} finally {
  for (const fn of cleanups.reverse()) await fn();
}
