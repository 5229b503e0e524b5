// A silently dead connection (the network drops every packet, nothing is
// closed): the client's keep-alive notices it, gives the socket up without
// waiting for a closing handshake that cannot finish, and reconnects.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import * as h from './helpers.mjs';

// tcpProxy forwards a local port to target; swallow() makes the connections
// open so far drop every byte in both directions (new ones pass).
async function tcpProxy(t, target) {
  const conns = new Set();
  const srv = net.createServer((a) => {
    const b = net.connect(target.port, target.hostname);
    const pair = { a, b, dead: false };
    conns.add(pair);
    a.on('data', (d) => { if (!pair.dead) b.write(d); });
    b.on('data', (d) => { if (!pair.dead) a.write(d); });
    const end = () => { a.destroy(); b.destroy(); conns.delete(pair); };
    for (const s of [a, b]) { s.on('error', end); s.on('close', end); }
  });
  await new Promise((resolve) => srv.listen(0, '127.0.0.1', resolve));
  t.after(() => { for (const { a, b } of conns) { a.destroy(); b.destroy(); } srv.close(); });
  return {
    port: srv.address().port,
    swallow() { for (const pair of conns) pair.dead = true; },
  };
}

test('a connection that silently stops carrying data is replaced within ping interval + pong timeout', async (t) => {
  const server = await h.startServer(t);
  const proxy = await tcpProxy(t, new URL(server.url));
  const browser = await h.launchBrowser(t);
  const page = await (await browser.newContext()).newPage();
  // The page comes through the proxy too, so that its socket is same-origin.
  await page.goto(`http://127.0.0.1:${proxy.port}/healthz`);
  const conv = `c-test-${Math.random().toString(36).slice(2, 10)}`;
  // The ping interval is shorter than the pong timeout on purpose: later
  // pings must not keep pushing the timeout back.
  await page.evaluate(async (conv) => {
    const { TokenRelayClient } = await import('/client.js');
    const c = window.client = new TokenRelayClient({ pingIntervalMs: 250, pongTimeoutMs: 1000 });
    window.events = [];
    for (const type of ['status', 'joined', 'turn']) {
      c.addEventListener(type, (e) => window.events.push({ type, at: performance.now(), state: e.detail.state,
        code: e.detail.code, phase: e.detail.phase, turnId: e.detail.turn?.turn_id }));
    }
    c.connect();
    await c.join(conv);
  }, conv);

  const turnId = await page.evaluate((conv) => window.client.send(conv, 'Go on [sim tokens=60 rate=40]').turnId, conv);
  await page.waitForFunction((id) => window.events.some((e) => e.phase === 'delta' && e.turnId === id), turnId);
  const cutAt = await page.evaluate(() => performance.now());
  proxy.swallow();

  // Before the fix this took a minute (Chromium's closing handshake), or
  // forever with pings closer together than the pong timeout.
  await page.waitForFunction(() => window.events.filter((e) => e.type === 'status' && e.state === 'connected').length === 2,
    null, { timeout: 8000 });
  const ev = await page.evaluate(() => window.events);
  const lost = ev.find((e) => e.type === 'status' && e.state === 'reconnecting');
  assert.equal(lost.code, 4000, 'given up for want of a pong');
  assert.ok(lost.at - cutAt < 1250 + 1000, `noticed ${Math.round(lost.at - cutAt)} ms after the cut`);

  // The answer, streaming through the cut, ends once with the stored text
  // (whether it ended before the client was back or after).
  await page.waitForFunction(([conv, id]) => window.client.conversation(conv).byTurn.get(id)?.status === 'complete',
    [conv, turnId], { timeout: 15000 });
  const stored = await h.storedTurn(server, conv, turnId);
  const content = await page.evaluate(([conv, id]) => window.client.conversation(conv).byTurn.get(id).content, [conv, turnId]);
  assert.equal(content, stored.content);
  assert.equal(stored.status, 'complete');
  const ends = (await page.evaluate(() => window.events)).filter((e) => e.phase === 'end' && e.turnId === turnId);
  assert.equal(ends.length, 1, 'one end event');
});
