// Shared helpers of the browser tests: start the real tokenrelay binary, drive
// Debian's Chromium through playwright-core, read the stored state back over
// the HTTP API. Everything waits on conditions with deadlines, never on sleeps.
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');

let builtBin;
/**
 * binary returns the tokenrelay binary to test: $TOKENRELAY_BIN when set,
 * else one built from this tree into a temporary directory (once per process).
 */
export function binary() {
  if (process.env.TOKENRELAY_BIN) return process.env.TOKENRELAY_BIN;
  if (!builtBin) {
    const dir = mkdtempSync(path.join(tmpdir(), 'tokenrelay-bin-'));
    builtBin = path.join(dir, 'tokenrelay');
    execFileSync('go', ['build', '-o', builtBin, './cmd/tokenrelay'], { cwd: root, stdio: 'inherit' });
    process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  }
  return builtBin;
}

/**
 * tempDir makes a directory that the caller's cleanup removes. A server
 * using it may still be writing there when the hook runs (the hooks of a
 * test do not wait for each other's processes), so the removal is retried.
 */
export function tempDir(t, prefix = 'tokenrelay-test-') {
  const dir = mkdtempSync(path.join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 }));
  return dir;
}

/**
 * startServer runs `tokenrelay serve` and resolves once it printed its URL.
 * opts.addr defaults to 127.0.0.1:0; opts.args are extra flags. The server is
 * stopped (SIGTERM, then SIGKILL) when the test ends.
 */
export async function startServer(t, { dataDir, addr = '127.0.0.1:0', args = [], simRate = 40 } = {}) {
  // A data dir of its own is removed once the server has exited (below).
  const ownDir = !dataDir;
  dataDir ??= mkdtempSync(path.join(tmpdir(), 'tokenrelay-test-'));
  const proc = spawn(binary(), ['serve', '--addr', addr, '--data-dir', dataDir, '--sim-rate', String(simRate), ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stderr = '';
  proc.stderr.on('data', (d) => { stderr = (stderr + d).slice(-8000); });
  const exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve({ code, signal })));
  const url = await new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => reject(new Error(`server did not start in 20s; stderr:\n${stderr}`)), 20000);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = /listening on (http:\/\/\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1].replace(/\/$/, ''));
      }
    });
    exited.then(({ code }) => {
      clearTimeout(timer);
      reject(new Error(`server exited with ${code} before listening; stderr:\n${stderr}`));
    });
  });
  const server = {
    url, dataDir, proc,
    addr: new URL(url).host,
    /** stop ends the server with SIGTERM (a graceful shutdown) and waits for it to exit. */
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode !== null || proc.signalCode !== null) return exited;
      proc.kill(signal);
      const timer = setTimeout(() => proc.kill('SIGKILL'), 15000);
      const r = await exited;
      clearTimeout(timer);
      return r;
    },
    stderr: () => stderr,
  };
  t.after(async () => {
    await server.stop();
    if (ownDir) rmSync(dataDir, { recursive: true, force: true, maxRetries: 10, retryDelay: 100 });
  });
  return server;
}

/** launchBrowser starts headless Chromium (Debian's, or $CHROMIUM_PATH), closed when the test ends; args are extra flags. */
export async function launchBrowser(t, { args = [] } = {}) {
  const executablePath = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
  if (!existsSync(executablePath)) throw new Error(`no Chromium at ${executablePath}: apt-get install -y chromium`);
  const browser = await chromium.launch({
    executablePath,
    headless: true,
    args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-gpu', ...args],
  });
  t.after(() => browser.close());
  return browser;
}

/**
 * openChat opens the page on conversation conv (a new id when omitted) in a
 * new context and waits until it joined. Page errors fail the test.
 */
export async function openChat(t, browser, server, { conv, context, viewport, colorScheme, setup } = {}) {
  conv ??= `c-test-${Math.random().toString(36).slice(2, 10)}`;
  context ??= await browser.newContext({ viewport: viewport ?? { width: 1100, height: 800 }, colorScheme });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err));
  page.on('console', (msg) => {
    // A refused WebSocket or fetch while the server restarts is expected.
    if (msg.type() === 'error' && !/WebSocket|Failed to load resource|ERR_CONNECTION_REFUSED|Failed to fetch/.test(msg.text())) {
      errors.push(new Error(msg.text()));
    }
  });
  page.errors = errors;
  await setup?.(page);
  await page.goto(`${server.url}/#${conv}`);
  await waitJoined(page, conv);
  return { page, conv, context };
}

/**
 * recordFrames collects the page's WebSocket frames, in order, as
 * {dir: 'sent'|'received', frame}; call it before the page connects.
 */
export function recordFrames(page) {
  const log = [];
  page.on('websocket', (ws) => {
    ws.on('framesent', (f) => log.push({ dir: 'sent', frame: JSON.parse(f.payload) }));
    ws.on('framereceived', (f) => log.push({ dir: 'received', frame: JSON.parse(f.payload) }));
  });
  return log;
}

/** waitJoined waits until the page shows conversation conv and its client has joined it. */
export async function waitJoined(page, conv, timeout = 15000) {
  await page.waitForFunction((c) => window.tokenrelay?.conversationId === c &&
    window.tokenrelay.client.conversation(c)?.joined === true, conv, { timeout });
}

/**
 * deleteFromSidebar deletes conversation conv with its row's delete button:
 * a first click arms it, a second deletes. The list is re-rendered now and
 * then (a refresh replaces its rows), and a click that lands while its row
 * is replaced is lost: each step is repeated until it shows (the armed
 * state survives a re-render, and goes once the second click is taken).
 */
export async function deleteFromSidebar(page, conv) {
  const row = page.locator(`#conversations li[data-id="${conv}"]`);
  const armed = row.locator('button.delete.confirm');
  for (let i = 0; !(await armed.count()); i++) {
    if (i === 10) throw new Error(`the delete button of ${conv} would not arm`);
    await row.locator('button.delete').click({ timeout: 5000 }).catch(() => {});
  }
  for (let i = 0; await armed.count(); i++) {
    if (i === 10) throw new Error(`the armed delete button of ${conv} would not take a click`);
    await armed.click({ timeout: 2000 }).catch(() => {});
  }
}

/** send types text into the composer and presses Enter. */
export async function send(page, text) {
  const input = page.getByLabel('Message', { exact: true });
  await input.fill(text);
  await input.press('Enter');
}

/** lastAnswer returns a locator for the newest answer on the page. */
export function lastAnswer(page) {
  return page.locator('article.msg.assistant').last();
}

/** turnState reads the client's model of a turn: {status, content, seq}. */
export function turnState(page, conv, turnId) {
  return page.evaluate(([c, t]) => {
    const item = window.tokenrelay.client.conversation(c)?.byTurn.get(t);
    return item && { status: item.status, content: item.content, seq: item.seq };
  }, [conv, turnId]);
}

/** waitAnswerEnded waits until the turn shown in answer has a terminal status and returns it. */
export async function waitAnswerEnded(answer, timeout = 30000) {
  await answer.locator('xpath=self::*[@data-status="complete" or @data-status="cancelled" or @data-status="error" or @data-status="interrupted"]')
    .waitFor({ timeout });
  return answer.getAttribute('data-status');
}

/** api fetches a JSON document of the server's HTTP API. */
export async function api(server, method, p) {
  const res = await fetch(server.url + p, { method });
  if (res.status === 204) return null;
  const body = await res.json();
  if (!res.ok) throw new Error(`${method} ${p}: ${res.status} ${JSON.stringify(body)}`);
  return body;
}

/** storedMessages returns the stored messages of conv, oldest first. */
export async function storedMessages(server, conv) {
  return (await api(server, 'GET', `/v1/conversations/${conv}/messages?limit=200`)).messages;
}

/** storedTurn returns the stored assistant message of turn turnId in conv. */
export async function storedTurn(server, conv, turnId) {
  return (await storedMessages(server, conv)).find((m) => m.role === 'assistant' && m.turn_id === turnId);
}

/** waitFor polls fn until it returns a truthy value, failing after timeout ms. */
export async function waitFor(fn, { timeout = 15000, interval = 50, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}; last: ${last instanceof Error ? last.message : JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, interval));
  }
}

/** noPageErrors fails when the page reported a script error. */
export function noPageErrors(assert, page) {
  assert.deepEqual(page.errors.map((e) => e.message), [], 'page errors');
}
