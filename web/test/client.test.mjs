// Unit tests of web/static/client.js against a scripted WebSocket: the
// delivery rules a correct server never makes the client exercise (gaps,
// repeats, stale frames) and the reconnect/resume sequence.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TokenRelayClient, ClientError } from '../static/client.js';

class FakeWS {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeWS.all.push(this);
  }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code = 1000) {
    this.closedWith = code;
    // A lingering socket is one whose peer is gone: the closing handshake
    // never finishes, so onclose does not come (Chromium gives up after a minute).
    if (this.lingers) this.readyState = 2;
    else this.drop(code);
  }
  // Test side.
  open() { this.readyState = 1; this.onopen?.(); }
  receive(frame) { this.onmessage?.({ data: JSON.stringify(frame) }); }
  drop(code) { this.readyState = 3; this.onclose?.({ code, reason: '' }); }
  frames(type) { return this.sent.filter((f) => f.type === type); }
}

function newClient(t, opts = {}) {
  FakeWS.all = [];
  const c = new TokenRelayClient({ url: 'ws://relay.test/v1/ws', WebSocket: FakeWS, pingIntervalMs: 0,
    backoffInitialMs: 5, backoffMaxMs: 20, ...opts });
  const events = [];
  for (const type of ['status', 'joined', 'message', 'turn', 'error', 'gap']) {
    c.addEventListener(type, (e) => events.push({ type, ...e.detail }));
  }
  c.events = events;
  t.after(() => c.close());
  return c;
}

const until = async (fn, what) => {
  const deadline = Date.now() + 2000;
  while (!fn()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
};

// settled waits (up to 2 s) for p to settle and returns 'resolved' or the rejection's error.
const settled = (p, what) => new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`${what} is still pending`)), 2000);
  p.then(() => { clearTimeout(timer); resolve('resolved'); }, (err) => { clearTimeout(timer); resolve(err); });
});

// flush lets every callback already queued run (promise continuations included).
const flush = () => new Promise((r) => setImmediate(r));

// fakeWindow gives globalThis the online/offline events of a browser window for one test.
function fakeWindow(t) {
  const win = new EventTarget();
  globalThis.addEventListener = win.addEventListener.bind(win);
  globalThis.removeEventListener = win.removeEventListener.bind(win);
  t.after(() => { delete globalThis.addEventListener; delete globalThis.removeEventListener; });
  return win;
}

const userMsg = (id, turn, content = 'hi') => ({ message_id: id, conversation_id: 'c1', role: 'user', content, status: 'complete', created_at: '2026-01-01T00:00:00.000Z', turn_id: turn });

// answerFromElsewhere delivers a question and the start of its answer, as
// another tab's send shows them: user message m9, turn t9, first delta text.
function answerFromElsewhere(ws, question, text) {
  ws.receive({ type: 'message', conversation_id: 'c1', message: userMsg('m9', 't9', question) });
  ws.receive({ type: 'turn.start', conversation_id: 'c1', turn_id: 't9', reply_to: 'm9', model: 'sim' });
  ws.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't9', seq: 1, text });
}

// opened connects c and opens its first socket, which it returns.
async function opened(c) {
  c.connect();
  await until(() => FakeWS.all.length === 1, 'a connection');
  const ws = FakeWS.all[0];
  ws.open();
  return ws;
}

async function joined(c, { messages = [], active = null } = {}) {
  c.connect();
  await until(() => FakeWS.all.length === 1, 'a connection');
  const ws = FakeWS.all.at(-1);
  const p = c.join('c1');
  ws.open();
  const j = ws.frames('join').at(-1);
  ws.receive({ type: 'joined', id: j.id, conversation_id: 'c1', messages, active });
  await p;
  return ws;
}

test('applies deltas in order, merged ranges too, and ignores repeats', async (t) => {
  const c = newClient(t);
  const ws = await joined(c, { messages: [userMsg('m1', 't1')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 2, text: 'ab', model: 'sim' } });
  ws.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', seq: 3, text: 'c' });
  ws.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', seq: 3, text: 'c' }); // repeat
  ws.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', from: 4, seq: 6, text: 'def' });
  ws.receive({ type: 'turn.end', conversation_id: 'c1', turn_id: 't1', seq: 6, status: 'complete' });
  const turn = c.conversation('c1').byTurn.get('t1');
  assert.equal(turn.content, 'abcdef');
  assert.equal(turn.status, 'complete');
  assert.equal(c.conversation('c1').active, null);
  assert.equal(c.events.filter((e) => e.type === 'gap').length, 0);
});

test('a gap re-joins with after, ignores stale frames, and continues from the snapshot', async (t) => {
  const c = newClient(t);
  const ws = await joined(c, { messages: [userMsg('m1', 't1')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 1, text: 'a', model: 'sim' } });
  ws.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', seq: 3, text: 'c' }); // seq 2 missing
  const gap = c.events.find((e) => e.type === 'gap');
  assert.deepEqual({ expected: gap.expected, got: gap.got }, { expected: 2, got: 3 });
  const rejoin = ws.frames('join').at(-1);
  assert.deepEqual(rejoin.after, { turn_id: 't1', seq: 1 });
  // Frames of the old view still in flight are superseded by the snapshot.
  ws.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', seq: 4, text: 'd' });
  ws.receive({ type: 'joined', id: rejoin.id, conversation_id: 'c1', messages: [userMsg('m1', 't1')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 4, from: 2, text: 'bcd', model: 'sim' } });
  ws.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', seq: 5, text: 'e' });
  assert.equal(c.conversation('c1').byTurn.get('t1').content, 'abcde');
});

test('a turn that ended during a drop is taken from the stored message, replayed deltas ignored', async (t) => {
  const c = newClient(t);
  const ws = await joined(c, { messages: [userMsg('m1', 't1')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 2, text: 'ab', model: 'sim' } });
  ws.drop(1001);
  assert.equal(c.state, 'reconnecting');
  await until(() => FakeWS.all.length === 2, 'a reconnect');
  const ws2 = FakeWS.all[1];
  ws2.open();
  const j = ws2.frames('join')[0];
  assert.deepEqual(j.after, { turn_id: 't1', seq: 2 });
  ws2.receive({ type: 'joined', id: j.id, conversation_id: 'c1', active: null, messages: [userMsg('m1', 't1'),
    { message_id: 't1', conversation_id: 'c1', role: 'assistant', content: 'abcd', status: 'interrupted', turn_id: 't1', reply_to: 'm1', created_at: '2026-01-01T00:00:00.000Z' }] });
  ws2.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', from: 3, seq: 4, text: 'cd' });
  ws2.receive({ type: 'turn.end', conversation_id: 'c1', turn_id: 't1', seq: 4, status: 'interrupted' });
  const turn = c.conversation('c1').byTurn.get('t1');
  assert.equal(turn.content, 'abcd');
  assert.equal(turn.status, 'interrupted');
  assert.equal(c.state, 'connected');
});

test('send is optimistic, cancel goes out before the ack, unanswered frames are re-sent after a reconnect', async (t) => {
  const c = newClient(t);
  const ws = await joined(c);
  const { messageId, turnId, ack } = c.send('c1', 'hello');
  const cancelled = c.cancel(turnId);
  assert.deepEqual(ws.sent.slice(-2).map((f) => [f.type, f.turn_id]), [['send', turnId], ['cancel', turnId]]);
  const conv = c.conversation('c1');
  assert.equal(conv.byMessage.get(messageId).pending, true);
  assert.equal(conv.active, turnId);
  ws.drop(1006);
  await until(() => FakeWS.all.length === 2, 'a reconnect');
  const ws2 = FakeWS.all[1];
  ws2.open();
  assert.deepEqual(ws2.sent.map((f) => f.type), ['join', 'send', 'cancel'], 'join first, then the unanswered frames in order');
  const [j, s, x] = ws2.sent;
  assert.equal(s.message_id, messageId);
  ws2.receive({ type: 'joined', id: j.id, conversation_id: 'c1', messages: [], active: null });
  assert.ok(conv.byMessage.get(messageId), 'the unsent message stays on screen across the join');
  ws2.receive({ type: 'message', conversation_id: 'c1', message: userMsg(messageId, turnId, 'hello') });
  ws2.receive({ type: 'turn.start', conversation_id: 'c1', turn_id: turnId, reply_to: messageId, model: 'sim' });
  ws2.receive({ type: 'ack', id: s.id, message_id: messageId, turn_id: turnId });
  ws2.receive({ type: 'turn.end', conversation_id: 'c1', turn_id: turnId, seq: 0, status: 'cancelled' });
  ws2.receive({ type: 'ack', id: x.id, turn_id: turnId, status: 'cancelled', already: false });
  assert.deepEqual(await ack, { message_id: messageId, turn_id: turnId });
  assert.deepEqual(await cancelled, { turn_id: turnId, status: 'cancelled', already: false });
  assert.equal(conv.byMessage.get(messageId).pending, undefined);
  assert.equal(conv.byTurn.get(turnId).status, 'cancelled');
});

test('a refused send takes its optimistic message away and reports the code', async (t) => {
  const c = newClient(t);
  const ws = await joined(c);
  const { messageId, turnId, ack } = c.send('c1', 'x'.repeat(10));
  const s = ws.frames('send')[0];
  ws.receive({ type: 'error', id: s.id, code: 'rate_limited', message: 'slow down', retry_after_ms: 1500 });
  await assert.rejects(ack, (err) => err.code === 'rate_limited' && err.retryAfterMs === 1500);
  const conv = c.conversation('c1');
  assert.equal(conv.byMessage.get(messageId), undefined);
  assert.equal(conv.byTurn.get(turnId), undefined);
  assert.equal(conv.active, null);
  const err = c.events.find((e) => e.type === 'error');
  assert.equal(err.request, 'send');
  assert.equal(err.conversationId, 'c1');
});

test('a send refused while an answer runs leaves that answer active, so Stop still reaches it', async (t) => {
  const c = newClient(t);
  const ws = await joined(c);
  answerFromElsewhere(ws, 'a long one', 'so');
  const { ack } = c.send('c1', 'too eager');
  const s = ws.frames('send')[0];
  ws.receive({ type: 'error', id: s.id, code: 'turn_active', message: 'an answer is still being written' });
  await assert.rejects(ack, (err) => err.code === 'turn_active');
  assert.equal(c.conversation('c1').active, 't9');
  c.cancel('t9').catch(() => {});
  assert.equal(ws.frames('cancel')[0]?.turn_id, 't9');
});

test('a refused cancel clears the answer\'s cancelling mark, so Stop can be pressed again', async (t) => {
  const c = newClient(t);
  const ws = await joined(c);
  answerFromElsewhere(ws, 'a long one', 'so');
  const first = c.cancel('t9');
  assert.equal(c.conversation('c1').byTurn.get('t9').cancelling, true);
  const f = ws.frames('cancel')[0];
  ws.receive({ type: 'error', id: f.id, code: 'unavailable', message: 'the message broker is not available' });
  await assert.rejects(first, (err) => err.code === 'unavailable');
  const turn = c.conversation('c1').byTurn.get('t9');
  assert.equal(turn.status, 'streaming');
  assert.ok(!turn.cancelling, 'no longer marked as being stopped');
  const last = c.events.filter((e) => e.type === 'turn').at(-1);
  assert.deepEqual([last.phase, last.turn.turn_id], ['cancelling', 't9'], 'listeners hear of the change');

  // A second cancel, while a first still waits, keeps the mark when either fails.
  const again = c.cancel('t9');
  const other = c.cancel('t9');
  const [f2, f3] = ws.frames('cancel').slice(1);
  ws.receive({ type: 'error', id: f2.id, code: 'unavailable', message: 'the message broker is not available' });
  await assert.rejects(again);
  assert.equal(turn.cancelling, true, 'the other cancel still waits');
  ws.receive({ type: 'ack', id: f3.id, turn_id: 't9', status: 'cancelled', already: false });
  await other;
  ws.receive({ type: 'turn.end', conversation_id: 'c1', turn_id: 't9', seq: 1, status: 'cancelled' });
  assert.equal(turn.status, 'cancelled');
  assert.ok(!turn.cancelling);
});

test('another tab\'s question and answer arrive as events', async (t) => {
  const c = newClient(t);
  const ws = await joined(c);
  answerFromElsewhere(ws, 'from elsewhere', 'ok');
  const conv = c.conversation('c1');
  assert.deepEqual(conv.items.map((i) => [i.role, i.content]), [['user', 'from elsewhere'], ['assistant', 'ok']]);
  assert.equal(conv.active, 't9');
});

test('pings closer together than the pong timeout still notice a dead connection', async (t) => {
  const c = newClient(t, { pingIntervalMs: 5, pongTimeoutMs: 40 });
  const ws = await opened(c);
  await until(() => FakeWS.all.length === 2, 'a reconnect after the pong timeout');
  assert.ok(ws.frames('ping').length >= 2, 'several pings went unanswered');
  assert.equal(ws.closedWith, 4000);
});

test('a pong timeout lets go of the socket at once, without waiting for its onclose', async (t) => {
  const c = newClient(t, { pingIntervalMs: 10, pongTimeoutMs: 10 });
  c.connect();
  await until(() => FakeWS.all.length === 1, 'a connection');
  const ws = FakeWS.all[0];
  ws.lingers = true;
  ws.open();
  await until(() => FakeWS.all.length === 2, 'a reconnect while the dead socket is still closing');
  assert.equal(ws.closedWith, 4000);
  assert.equal(ws.readyState, 2, 'its onclose never came');
  const ws2 = FakeWS.all[1];
  ws2.open();
  ws2.receive({ type: 'pong' });
  assert.equal(c.state, 'connected');
  const states = c.events.filter((e) => e.type === 'status').map((e) => e.state);
  assert.deepEqual(states, ['connecting', 'connected', 'reconnecting', 'connected']);
});

test('offline shows as offline; online pings an open socket at once and gives it up without a pong', async (t) => {
  const win = fakeWindow(t);
  const c = newClient(t, { pingIntervalMs: 0, pongTimeoutMs: 20 });
  const ws = await opened(c);
  win.dispatchEvent(new Event('offline'));
  assert.equal(c.state, 'offline', 'offline with the socket still open');
  win.dispatchEvent(new Event('online'));
  assert.equal(ws.frames('ping').length, 1, 'pinged at once');
  ws.receive({ type: 'pong' });
  assert.equal(c.state, 'connected', 'it answered: connected again');
  // Another change, after which the socket is dead: given up, reconnected.
  win.dispatchEvent(new Event('offline'));
  win.dispatchEvent(new Event('online'));
  assert.equal(ws.frames('ping').length, 2);
  await until(() => FakeWS.all.length === 2, 'a reconnect once the probe went unanswered');
  assert.equal(ws.closedWith, 4000);
  FakeWS.all[1].open();
  assert.equal(c.state, 'connected');
});

test('connect, close and connect again while the token is fetched opens one WebSocket', async (t) => {
  const tokens = [];
  const c = newClient(t, { token: () => new Promise((resolve) => tokens.push(resolve)) });
  c.connect();
  c.close();
  c.connect();
  assert.equal(tokens.length, 2);
  tokens[0]('old');
  tokens[1]('new');
  await until(() => FakeWS.all.length > 0, 'a connection');
  await flush(); // the older open has finished too
  assert.deepEqual(FakeWS.all.map((ws) => new URL(ws.url).searchParams.get('access_token')), ['new']);
});

test("the window's online event while the token is fetched does not open a second WebSocket", async (t) => {
  const win = fakeWindow(t);
  const tokens = [];
  const c = newClient(t, { token: () => new Promise((resolve) => tokens.push(resolve)) });
  c.connect();
  win.dispatchEvent(new Event('online'));
  for (const resolve of tokens) resolve('tok');
  await until(() => FakeWS.all.length > 0, 'a connection');
  await flush();
  assert.equal(FakeWS.all.length, 1);
  FakeWS.all[0].open();
  assert.equal(c.state, 'connected');
});

test('close 4001 with a fixed token fails every waiting request, and coming online does not retry', async (t) => {
  const win = fakeWindow(t);
  const c = newClient(t, { token: 'expired' });
  const ws = await opened(c);
  const joining = c.join('c1');
  const { messageId, turnId, ack } = c.send('c2', 'hi');
  const cancelling = c.cancel(turnId);
  ws.drop(4001);
  for (const [p, what] of [[joining, 'join'], [ack, 'send'], [cancelling, 'cancel']]) {
    const err = await settled(p, what);
    assert.ok(err instanceof ClientError, `${what} rejects with a ClientError`);
    assert.equal(err.code, 'unauthorized', what);
  }
  assert.equal(c.conversation('c2').byMessage.get(messageId), undefined, 'the optimistic message is removed');
  assert.equal(c.conversation('c2').byTurn.get(turnId), undefined, 'the optimistic answer is removed');
  assert.ok(c.events.some((e) => e.type === 'turn' && e.phase === 'removed' && e.turn.turn_id === turnId));
  assert.equal(c.state, 'offline');
  win.dispatchEvent(new Event('online'));
  await flush();
  assert.equal(FakeWS.all.length, 1, 'a fixed token is not tried again');
  assert.equal(c.state, 'offline');
  // A send made now fails at once too, and takes its optimistic message
  // away: nothing will ever send it.
  const later = c.send('c2', 'typed after the refusal');
  const err = await settled(later.ack, 'a later send');
  assert.equal(err?.code, 'unauthorized');
  assert.equal(c.conversation('c2').byMessage.get(later.messageId), undefined, 'its optimistic message is removed');
  assert.ok(c.events.some((e) => e.type === 'error' && e.request === 'send' && e.code === 'unauthorized'));
});

test('close() rejects what still waits with code closed and takes optimistic messages away', async (t) => {
  const c = newClient(t);
  const ws = await joined(c);
  const { messageId, turnId, ack } = c.send('c1', 'hi');
  const cancelling = c.cancel(turnId);
  const joining = c.join('c2');
  assert.equal(ws.frames('send').length, 1);
  c.close();
  for (const [p, what] of [[joining, 'join'], [ack, 'send'], [cancelling, 'cancel']]) {
    const err = await settled(p, what);
    assert.ok(err instanceof ClientError, `${what} rejects with a ClientError`);
    assert.equal(err.code, 'closed', what);
  }
  const conv = c.conversation('c1');
  assert.deepEqual(conv.items, []);
  assert.equal(conv.active, null);
  assert.equal(c.state, 'closed');
  assert.equal(ws.closedWith, 1000);
  assert.ok(!conv.byMessage.has(messageId));
});

test('a join or send made while stopped fails at once, also to a conversation not followed yet', async (t) => {
  const c = newClient(t);
  const ws = await joined(c);
  c.close();
  const err = await settled(c.join('c2'), 'a join after close()');
  assert.ok(err instanceof ClientError);
  assert.equal(err.code, 'closed');
  assert.equal(c.conversation('c2'), undefined, 'the refused join is not followed');
  assert.ok(c.events.some((e) => e.type === 'error' && e.request === 'join' && e.conversationId === 'c2' && e.code === 'closed'));
  const again = await settled(c.join('c1'), 'a join of a followed conversation after close()');
  assert.equal(again.code, 'closed');
  assert.ok(c.conversation('c1'), 'a followed conversation stays for connect()');
  const errors = c.events.filter((e) => e.type === 'error').length;
  const { ack } = c.send('c3', 'hi');
  assert.equal((await settled(ack, 'a send after close()')).code, 'closed');
  assert.equal(c.conversation('c3'), undefined);
  assert.equal(c.events.filter((e) => e.type === 'error').length, errors + 1, 'one error event, the send\'s');
  assert.deepEqual(ws.frames('join').length, 1, 'nothing went out');
});

test('a refused join is forgotten: a reconnect does not repeat it, joining again asks again', async (t) => {
  const c = newClient(t);
  const ws = await opened(c);
  const first = c.join('c1');
  const j = ws.frames('join').at(-1);
  ws.receive({ type: 'error', id: j.id, code: 'rate_limited', message: 'too many conversations joined' });
  const err = await settled(first, 'the join');
  assert.equal(err.code, 'rate_limited');
  assert.equal(c.conversation('c1'), undefined);
  assert.equal(c.events.find((e) => e.type === 'error').request, 'join');
  ws.drop(1006);
  await until(() => FakeWS.all.length === 2, 'a reconnect');
  const ws2 = FakeWS.all[1];
  ws2.open();
  assert.deepEqual(ws2.frames('join'), [], 'the refused join is not re-sent');
  const again = c.join('c1');
  const j2 = ws2.frames('join').at(-1);
  assert.ok(j2, 'joining again sends a join');
  ws2.receive({ type: 'joined', id: j2.id, conversation_id: 'c1', messages: [], active: null });
  assert.equal(await settled(again, 'the second join'), 'resolved');
  assert.equal(c.conversation('c1').joined, true);
});

const answerMsg = (turn, reply, content, status = 'complete') => ({ message_id: turn, conversation_id: 'c1', role: 'assistant', content, status, turn_id: turn, reply_to: reply, created_at: '2026-01-01T00:00:00.000Z' });

test('a send repeating a stored message id leaves no optimistic leftovers and points at the stored answer', async (t) => {
  const c = newClient(t);
  const ws = await joined(c, { messages: [userMsg('m1', 't1'), answerMsg('t1', 'm1', 'done')] });
  const retry = c.send('c1', 'hi', { messageId: 'm1' });
  assert.notEqual(retry.turnId, 't1');
  const s = ws.frames('send').at(-1);
  ws.receive({ type: 'ack', id: s.id, message_id: 'm1', turn_id: 't1' });
  assert.deepEqual(await retry.ack, { message_id: 'm1', turn_id: 't1' });
  const conv = c.conversation('c1');
  assert.deepEqual(conv.items.map((i) => [i.role, i.turn_id, i.status, i.pending ?? false]),
    [['user', 't1', 'complete', false], ['assistant', 't1', 'complete', false]]);
  assert.equal(conv.byMessage.get('m1').status, 'complete');
  assert.equal(conv.byTurn.get(retry.turnId), undefined);
  assert.equal(conv.active, null);
  assert.ok(c.events.some((e) => e.type === 'turn' && e.phase === 'removed' && e.turn.turn_id === retry.turnId));
  assert.equal(ws.frames('join').length, 1, 'what the ack names is in the model: no re-join');
});

test('a retry while the first answer runs makes that answer the active one again', async (t) => {
  const c = newClient(t);
  const ws = await joined(c);
  const first = c.send('c1', 'q', { messageId: 'm1' });
  ws.receive({ type: 'message', conversation_id: 'c1', message: userMsg('m1', first.turnId, 'q') });
  ws.receive({ type: 'turn.start', conversation_id: 'c1', turn_id: first.turnId, reply_to: 'm1', model: 'sim' });
  ws.receive({ type: 'ack', id: ws.frames('send')[0].id, message_id: 'm1', turn_id: first.turnId });
  ws.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: first.turnId, seq: 1, text: 'a' });
  const retry = c.send('c1', 'q', { messageId: 'm1' });
  ws.receive({ type: 'ack', id: ws.frames('send')[1].id, message_id: 'm1', turn_id: first.turnId });
  await retry.ack;
  const conv = c.conversation('c1');
  assert.equal(conv.active, first.turnId);
  assert.deepEqual(conv.items.map((i) => [i.role, i.pending ?? false]), [['user', false], ['assistant', false]]);
  ws.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: first.turnId, seq: 2, text: 'b' });
  ws.receive({ type: 'turn.end', conversation_id: 'c1', turn_id: first.turnId, seq: 2, status: 'complete' });
  assert.equal(conv.byTurn.get(first.turnId).content, 'ab');
  assert.equal(conv.active, null);
});

test('a retry of a message older than the loaded history re-joins to show it', async (t) => {
  const c = newClient(t);
  const ws = await joined(c);
  const retry = c.send('c1', 'old question', { messageId: 'm0' });
  ws.receive({ type: 'ack', id: ws.frames('send')[0].id, message_id: 'm0', turn_id: 't0' });
  await retry.ack;
  const j = ws.frames('join').at(-1);
  assert.equal(ws.frames('join').length, 2, 're-joined');
  ws.receive({ type: 'joined', id: j.id, conversation_id: 'c1', active: null,
    messages: [userMsg('m0', 't0', 'old question'), answerMsg('t0', 'm0', 'old answer')] });
  assert.deepEqual(c.conversation('c1').items.map((i) => [i.role, i.turn_id, i.pending ?? false]),
    [['user', 't0', false], ['assistant', 't0', false]]);
});

test('an answer that ended during a drop gets exactly one end event', async (t) => {
  const c = newClient(t);
  const ws = await joined(c, { messages: [userMsg('m1', 't1')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 2, text: 'ab', model: 'sim' } });
  ws.drop(1001);
  await until(() => FakeWS.all.length === 2, 'a reconnect');
  const ws2 = FakeWS.all[1];
  ws2.open();
  const j = ws2.frames('join')[0];
  ws2.receive({ type: 'joined', id: j.id, conversation_id: 'c1', active: null,
    messages: [userMsg('m1', 't1'), answerMsg('t1', 'm1', 'abcd')] });
  ws2.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', from: 3, seq: 4, text: 'cd' });
  ws2.receive({ type: 'turn.end', conversation_id: 'c1', turn_id: 't1', seq: 4, status: 'complete' });
  const ends = c.events.filter((e) => e.type === 'turn' && e.phase === 'end');
  assert.equal(ends.length, 1);
  assert.equal(ends[0].turn.status, 'complete');
  assert.equal(ends[0].turn.content, 'abcd');
  const joinedAt = c.events.findLastIndex((e) => e.type === 'joined');
  assert.ok(c.events.indexOf(ends[0]) > joinedAt, 'after the joined event that brought it');
  // A later snapshot does not end it again.
  ws2.drop(1006);
  await until(() => FakeWS.all.length === 3, 'another reconnect');
  FakeWS.all[2].open();
  FakeWS.all[2].receive({ type: 'joined', id: FakeWS.all[2].frames('join')[0].id, conversation_id: 'c1', active: null,
    messages: [userMsg('m1', 't1'), answerMsg('t1', 'm1', 'abcd')] });
  assert.equal(c.events.filter((e) => e.type === 'turn' && e.phase === 'end').length, 1);
});

test('without a page, the url option is required', () => {
  assert.throws(() => new TokenRelayClient({ WebSocket: FakeWS }), /url option is required outside a browser/);
});

test('api() rejects with a ClientError when the token function throws', async (t) => {
  const c = newClient(t, { token: () => { throw new Error('no session'); } });
  const err = await settled(c.api('GET', '/v1/conversations'), 'the call');
  assert.ok(err instanceof ClientError);
  assert.equal(err.code, 'unauthorized');
  assert.match(err.message, /no session/);
});

test('a notice that a joined conversation was deleted is reported and leaves the choice to the app', async (t) => {
  const c = newClient(t);
  const ws = await joined(c);
  ws.receive({ type: 'error', code: 'not_found', conversation_id: 'c1', message: 'conversation c1 was deleted' });
  assert.ok(c.events.some((e) => e.type === 'error' && e.code === 'not_found' && e.conversationId === 'c1' && !e.request));
  assert.ok(c.conversation('c1'), 'still joined: the server still follows the id');
  ws.receive({ type: 'error', code: 'forbidden', conversation_id: 'c1', message: 'taken by another user' });
  assert.equal(c.conversation('c1'), undefined, 'forgotten once the server no longer follows it');
});

test('a notice about a conversation the client has left is not news: no error event', async (t) => {
  // The page deletes a conversation over HTTP and leaves it; the server's
  // notice to the WebSocket that it was deleted can arrive after that.
  const c = newClient(t);
  const ws = await joined(c);
  c.leave('c1');
  assert.equal(ws.frames('leave').length, 1);
  ws.receive({ type: 'error', code: 'not_found', conversation_id: 'c1', message: 'conversation c1 was deleted' });
  ws.receive({ type: 'error', code: 'forbidden', conversation_id: 'c1', message: 'taken by another user' });
  assert.deepEqual(c.events.filter((e) => e.type === 'error'), []);
  // An error that names no conversation is still about the connection.
  ws.receive({ type: 'error', code: 'rate_limited', message: 'too many frames' });
  assert.equal(c.events.filter((e) => e.type === 'error').length, 1);
});

test("the notice of the client's own deleteConversation, come before the HTTP answer, is no news", async (t) => {
  const c = newClient(t);
  const ws = await joined(c);
  let answer;
  const realFetch = globalThis.fetch;
  globalThis.fetch = () => new Promise((resolve) => { answer = resolve; });
  t.after(() => { globalThis.fetch = realFetch; });
  const deleted = c.deleteConversation('c1');
  await until(() => answer, 'the DELETE');
  ws.receive({ type: 'error', code: 'not_found', conversation_id: 'c1', message: 'conversation c1 was deleted' });
  answer(new Response(null, { status: 204 }));
  assert.equal(await settled(deleted, 'the delete'), 'resolved');
  assert.deepEqual(c.events.filter((e) => e.type === 'error'), []);
  assert.equal(c.conversation('c1'), undefined, 'left');
  assert.equal(ws.frames('leave').length, 1);
});

test('a resumed answer that ended and slid out of the snapshot still gets its catch-up and one end', async (t) => {
  const c = newClient(t, { history: 2 });
  const ws = await joined(c, { messages: [userMsg('m1', 't1', 'first')] ,
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 2, text: 'ab', model: 'sim' } });
  ws.drop(1006);
  await until(() => FakeWS.all.length === 2, 'a new connection');
  const ws2 = FakeWS.all.at(-1);
  ws2.open();
  const j = ws2.frames('join').at(-1);
  assert.deepEqual(j.after, { turn_id: 't1', seq: 2 });
  // While away t1 ended and another turn ran: the last two messages are t2's.
  const m2 = { ...userMsg('m2', 't2', 'second') };
  const a2 = { message_id: 't2', conversation_id: 'c1', role: 'assistant', content: 'xyz', status: 'complete', created_at: m2.created_at, turn_id: 't2', reply_to: 'm2' };
  ws2.receive({ type: 'joined', id: j.id, conversation_id: 'c1', messages: [m2, a2], active: null });
  ws2.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', from: 3, seq: 5, text: 'cde' });
  ws2.receive({ type: 'turn.end', conversation_id: 'c1', turn_id: 't1', seq: 5, status: 'complete' });
  assert.deepEqual(c.events.filter((e) => e.type === 'gap'), []);
  const ends = c.events.filter((e) => e.type === 'turn' && e.phase === 'end');
  assert.equal(ends.length, 1);
  assert.equal(ends[0].turn.turn_id, 't1');
  assert.equal(ends[0].turn.content, 'abcde');
  assert.equal(ends[0].turn.status, 'complete');
  assert.equal(ws2.frames('join').length, 1, 'no second join');
  assert.equal(c.conversation('c1').active, null);
  assert.deepEqual(c.conversation('c1').items.map((i) => i.message_id), ['m2', 't2']);
});

test('an answer that slid out of the snapshot keeps its place across a second drop, and still gets its end', async (t) => {
  const c = newClient(t, { history: 2 });
  const ws = await joined(c, { messages: [userMsg('m1', 't1', 'first')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 2, text: 'ab', model: 'sim' } });
  ws.drop(1006);
  await until(() => FakeWS.all.length === 2, 'a new connection');
  const ws2 = FakeWS.all.at(-1);
  ws2.open();
  const j2 = ws2.frames('join').at(-1);
  assert.deepEqual(j2.after, { turn_id: 't1', seq: 2 });
  // While away t1 ended, tx ran and t2 started: the last two messages are
  // tx's answer and t2's question. Part of t1's catch-up arrives, then the
  // connection drops again.
  const ax = { message_id: 'tx', conversation_id: 'c1', role: 'assistant', content: 'w', status: 'complete', created_at: '2026-01-01T00:00:00.000Z', turn_id: 'tx', reply_to: 'mx' };
  const m2 = userMsg('m2', 't2', 'second');
  const a2 = { turn_id: 't2', reply_to: 'm2', status: 'streaming', seq: 1, text: 'x', model: 'sim' };
  ws2.receive({ type: 'joined', id: j2.id, conversation_id: 'c1', messages: [ax, m2], active: a2 });
  ws2.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', from: 3, seq: 4, text: 'cd' });
  ws2.drop(1006);
  await until(() => FakeWS.all.length === 3, 'a third connection');
  const ws3 = FakeWS.all.at(-1);
  ws3.open();
  const j3 = ws3.frames('join').at(-1);
  // The answer still missing its end is the one to resume, from what it has.
  assert.deepEqual(j3.after, { turn_id: 't1', seq: 4 });
  ws3.receive({ type: 'joined', id: j3.id, conversation_id: 'c1', messages: [ax, m2],
    active: { ...a2, seq: 2, text: 'xy' } });
  ws3.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', seq: 5, text: 'e' });
  ws3.receive({ type: 'turn.end', conversation_id: 'c1', turn_id: 't1', seq: 5, status: 'complete' });
  ws3.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't2', seq: 3, text: 'z' });
  assert.deepEqual(c.events.filter((e) => e.type === 'gap'), []);
  const ends = c.events.filter((e) => e.type === 'turn' && e.phase === 'end');
  assert.deepEqual(ends.map((e) => [e.turn.turn_id, e.turn.content, e.turn.status]), [['t1', 'abcde', 'complete']]);
  assert.equal(ws3.frames('join').length, 1, 'no further join');
  const conv = c.conversation('c1');
  assert.equal(conv.active, 't2');
  assert.equal(conv.byTurn.get('t2').content, 'xyz');
});

test('a resume snapshot of a turn id that now answers another question is taken whole, not added to the old text', async (t) => {
  const c = newClient(t);
  const ws = await joined(c, { messages: [userMsg('m1', 't1', 'first')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 2, text: 'ab', model: 'sim' } });
  ws.drop(1006);
  await until(() => FakeWS.all.length === 2, 'a new connection');
  const ws2 = FakeWS.all.at(-1);
  ws2.open();
  const j = ws2.frames('join').at(-1);
  assert.deepEqual(j.after, { turn_id: 't1', seq: 2 });
  // Meanwhile the conversation was deleted and made anew, and (past the
  // server's retention) an app that names its turns itself used t1 again.
  ws2.receive({ type: 'joined', id: j.id, conversation_id: 'c1', messages: [userMsg('m7', 't1', 'other')],
    active: { turn_id: 't1', reply_to: 'm7', status: 'streaming', seq: 3, from: 3, text: 'z', model: 'sim' } });
  const again = ws2.frames('join').at(-1);
  assert.notEqual(again.id, j.id, 'joined again');
  assert.equal(again.after, undefined, 'for the whole text');
  ws2.receive({ type: 'joined', id: again.id, conversation_id: 'c1', messages: [userMsg('m7', 't1', 'other')],
    active: { turn_id: 't1', reply_to: 'm7', status: 'streaming', seq: 3, text: 'xyz', model: 'sim' } });
  assert.equal(c.conversation('c1').byTurn.get('t1').content, 'xyz');
});

test('an answer of which nothing has come yet is resumed with after seq 0', async (t) => {
  const c = newClient(t);
  const ws = await joined(c, { messages: [userMsg('m1', 't1', 'first')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'queued', seq: 0, text: '', model: 'sim' } });
  ws.drop(1006);
  await until(() => FakeWS.all.length === 2, 'a new connection');
  FakeWS.all.at(-1).open();
  assert.deepEqual(FakeWS.all.at(-1).frames('join').at(-1).after, { turn_id: 't1', seq: 0 });
});

test('retries while the browser is offline keep the state offline', async (t) => {
  const win = fakeWindow(t);
  const nav = Object.getOwnPropertyDescriptor(globalThis, 'navigator');
  Object.defineProperty(globalThis, 'navigator', { value: { onLine: true }, configurable: true });
  t.after(() => { if (nav) Object.defineProperty(globalThis, 'navigator', nav); else delete globalThis.navigator; });
  const c = newClient(t);
  await joined(c);
  globalThis.navigator.onLine = false;
  win.dispatchEvent(new Event('offline'));
  FakeWS.all.at(-1).drop(1006);
  await until(() => FakeWS.all.length === 2, 'a retry');
  FakeWS.all.at(-1).drop(1006); // the network is still down
  await until(() => FakeWS.all.length === 3, 'another retry');
  const states = c.events.filter((e) => e.type === 'status').map((e) => e.state);
  const after = states.slice(states.indexOf('offline'));
  assert.ok(after.length >= 3 && after.every((s) => s === 'offline'), `states since offline: ${after}`);
});

test('a WebSocket that does not open within openTimeoutMs is given up and tried again', async (t) => {
  const c = newClient(t, { openTimeoutMs: 30 });
  c.connect();
  await until(() => FakeWS.all.length === 1, 'a connection');
  const stuck = FakeWS.all[0]; // accepted, never answered
  await until(() => FakeWS.all.length === 2, 'a second try');
  assert.equal(stuck.closedWith, 1000, 'the stuck one was closed');
  assert.ok(c.events.some((e) => e.type === 'status' && e.state === 'reconnecting' && e.code === 4000));
  FakeWS.all[1].open();
  assert.equal(c.state, 'connected');
  assert.equal(c._openTimer, null, 'an open socket is not timed out');
});

test('a join the server could not make just now is asked again, and its waiter resolves then', async (t) => {
  const c = newClient(t);
  const ws = await opened(c);
  const p = c.join('c1');
  const j = ws.frames('join').at(-1);
  ws.receive({ type: 'error', id: j.id, code: 'unavailable', message: 'the message broker is unavailable; try again' });
  assert.equal(c.events.find((e) => e.type === 'error')?.request, 'join');
  assert.ok(c.conversation('c1'), 'the conversation is kept');
  await until(() => ws.frames('join').length === 2, 'the join asked again');
  const j2 = ws.frames('join').at(-1);
  ws.receive({ type: 'joined', id: j2.id, conversation_id: 'c1', messages: [], active: null });
  assert.equal(await settled(p, 'the join'), 'resolved');
  assert.equal(c.conversation('c1').joined, true);

  // An internal error may be for good: refused, as any other.
  const q = c.join('c2');
  ws.receive({ type: 'error', id: ws.frames('join').at(-1).id, code: 'internal', message: 'internal error' });
  assert.equal((await settled(q, 'the join of c2')).code, 'internal');
  assert.equal(c.conversation('c2'), undefined);

  // A retry waiting when the client is closed is dropped with it.
  const r = c.join('c3');
  ws.receive({ type: 'error', id: ws.frames('join').at(-1).id, code: 'unavailable', message: 'try again' });
  assert.ok(c.conversation('c3').joinTimer, 'a retry waits');
  c.close();
  assert.equal((await settled(r, 'the join of c3')).code, 'closed');
  assert.equal(c.conversation('c3')?.joinTimer ?? null, null);
});

test('a join refused as a new conversation while a send to it waits is made again once the send is acknowledged', async (t) => {
  const c = newClient(t);
  const ws = await opened(c);
  const { ack } = c.send('c1', 'hello', { messageId: 'm1', turnId: 't1' });
  const j = ws.frames('join').at(-1);
  ws.receive({ type: 'error', id: j.id, code: 'rate_limited', retry_after_ms: 30000, message: 'too many new conversations (limit 1 per minute); join one you have, or wait' });
  assert.equal(c.events.filter((e) => e.type === 'error').length, 0, 'the send answers for it');
  const s = ws.frames('send').at(-1);
  ws.receive({ type: 'ack', id: s.id, message_id: 'm1', turn_id: 't1' });
  await ack;
  await until(() => ws.frames('join').length === 2, 'the join made again');
  const j2 = ws.frames('join').at(-1);
  ws.receive({ type: 'joined', id: j2.id, conversation_id: 'c1', messages: [userMsg('m1', 't1', 'hello')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 1, text: 'a', model: 'sim' } });
  assert.equal(c.conversation('c1').byTurn.get('t1').content, 'a');

  // Refused the same way, and the send refused too: forgotten, with the send's error only.
  const other = c.send('c2', 'again', { messageId: 'm2', turnId: 't2' });
  const j3 = ws.frames('join').at(-1);
  ws.receive({ type: 'error', id: j3.id, code: 'rate_limited', retry_after_ms: 30000, message: 'too many new conversations' });
  const s2 = ws.frames('send').at(-1);
  ws.receive({ type: 'error', id: s2.id, code: 'rate_limited', retry_after_ms: 1000, message: 'too many messages; slow down' });
  assert.equal((await settled(other.ack, 'the send')).code, 'rate_limited');
  assert.equal(c.conversation('c2'), undefined);
  assert.deepEqual(c.events.filter((e) => e.type === 'error').map((e) => e.request), ['send']);
});

test('a conversation that comes back empty after a drop was deleted meanwhile: reported as a deletion', async (t) => {
  const c = newClient(t);
  const ws = await joined(c, { messages: [userMsg('m1', 't1'), answerMsg('t1', 'm1', 'hello')] });
  ws.drop(1006);
  await until(() => FakeWS.all.length === 2, 'a reconnect');
  const ws2 = FakeWS.all[1];
  ws2.open();
  const j = ws2.frames('join').at(-1);
  ws2.receive({ type: 'joined', id: j.id, conversation_id: 'c1', messages: [], active: null });
  const err = c.events.find((e) => e.type === 'error');
  assert.equal(err?.code, 'not_found');
  assert.equal(err.conversationId, 'c1');
  assert.equal(err.request, undefined);

  // Nor is a snapshot of no messages asked for (history 0).
  const h0 = newClient(t, { history: 0 });
  h0.connect();
  await until(() => FakeWS.all.length === 1, 'a connection');
  FakeWS.all[0].open();
  const p0 = h0.join('c1');
  FakeWS.all[0].receive({ type: 'joined', id: FakeWS.all[0].frames('join').at(-1).id, conversation_id: 'c1', messages: [], active: null });
  await p0;
  FakeWS.all[0].receive({ type: 'message', conversation_id: 'c1', message: userMsg('m5', 't5') });
  FakeWS.all[0].drop(1006);
  await until(() => FakeWS.all.length === 2, 'a reconnect');
  FakeWS.all[1].open();
  FakeWS.all[1].receive({ type: 'joined', id: FakeWS.all[1].frames('join').at(-1).id, conversation_id: 'c1', messages: [], active: null });
  assert.equal(h0.events.filter((e) => e.type === 'error').length, 0, 'history 0: an empty snapshot is no deletion');

  // An empty conversation that stays empty is no deletion.
  const d = newClient(t);
  const ws3 = await joined(d);
  ws3.drop(1006);
  await until(() => FakeWS.all.length === 2, 'a reconnect');
  FakeWS.all[1].open();
  const j2 = FakeWS.all[1].frames('join').at(-1);
  FakeWS.all[1].receive({ type: 'joined', id: j2.id, conversation_id: 'c1', messages: [], active: null });
  assert.equal(d.events.filter((e) => e.type === 'error').length, 0);
});

test('frames still arriving keep a connection whose pong is queued behind them', async (t) => {
  // The server answers a ping after what it has queued for the connection
  // (up to --limit-outbound-bytes): on a slow link that can take longer
  // than pongTimeoutMs while the stream keeps arriving.
  const c = newClient(t, { pingIntervalMs: 10, pongTimeoutMs: 30 });
  const ws = await joined(c, { messages: [userMsg('m1', 't1')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 0, text: '', model: 'sim' } });
  for (let seq = 1; seq <= 8; seq++) {
    await until(() => ws.frames('ping').length >= seq || FakeWS.all.length > 1, `ping ${seq}`);
    ws.receive({ type: 'turn.delta', conversation_id: 'c1', turn_id: 't1', seq, text: 'x' });
  }
  assert.equal(FakeWS.all.length, 1, 'not given up while frames arrive');
  assert.equal(ws.closedWith, undefined);
  assert.equal(c.conversation('c1').byTurn.get('t1').content, 'xxxxxxxx');
  // Silence after a ping still gives it up.
  await until(() => FakeWS.all.length === 2, 'a reconnect once nothing comes');
  assert.equal(ws.closedWith, 4000);
});

test('pongTimeoutMs 0 waits for no pong, as 0 turns the other timeouts off', async (t) => {
  const c = newClient(t, { pingIntervalMs: 5, pongTimeoutMs: 0 });
  const ws = await opened(c);
  await until(() => ws.frames('ping').length >= 4 || FakeWS.all.length > 1, 'pings');
  assert.equal(FakeWS.all.length, 1, 'the connection is kept');
  assert.equal(ws.closedWith, undefined);
});

test('the answer to a join the client has left, or made again since, is no news', async (t) => {
  const c = newClient(t);
  const ws = await opened(c);
  const left = c.join('c1');
  const j = ws.frames('join').at(-1);
  c.leave('c1');
  assert.equal((await settled(left, 'the join')).code, 'cancelled');
  ws.receive({ type: 'error', id: j.id, code: 'rate_limited', retry_after_ms: 30000, message: 'too many new conversations' });
  assert.deepEqual(c.events.filter((e) => e.type === 'error'), [], 'its refusal was for a join nobody waits for');

  // Joined again while the first join was under way: the first one's
  // refusal does not stand for the second.
  const first = c.join('c2');
  const j1 = ws.frames('join').at(-1);
  c.leave('c2');
  const second = c.join('c2');
  const j2 = ws.frames('join').at(-1);
  ws.receive({ type: 'error', id: j1.id, code: 'unavailable', message: 'try again' });
  ws.receive({ type: 'joined', id: j2.id, conversation_id: 'c2', messages: [], active: null });
  assert.equal((await settled(first, 'the first join')).code, 'cancelled');
  assert.equal(await settled(second, 'the second join'), 'resolved');
  assert.deepEqual(c.events.filter((e) => e.type === 'error'), []);
  assert.equal(c.conversation('c2').joinTimer, null, 'no retry of the old join');
});

test('connect() after close() starts afresh: connecting, and the first backoff again', async (t) => {
  const c = newClient(t, { backoffInitialMs: 5, backoffMaxMs: 100000 });
  c.connect();
  for (let i = 1; i <= 4; i++) {
    await until(() => FakeWS.all.length === i, `attempt ${i}`);
    FakeWS.all.at(-1).drop(1006);
  }
  c.close();
  const seen = c.events.length;
  c.connect();
  await until(() => FakeWS.all.length === 5, 'a connection');
  FakeWS.all.at(-1).drop(1006);
  const statuses = c.events.slice(seen).filter((e) => e.type === 'status');
  assert.deepEqual(statuses.map((e) => [e.state, e.attempt]), [['connecting', 0], ['reconnecting', 1]]);
  assert.ok(statuses[1].retryInMs <= 5, `the first delay again, not ${statuses[1].retryInMs} ms`);
});

test('close 4001 with a token function asks it again and resumes', async (t) => {
  const tokens = ['old', 'new'];
  const c = newClient(t, { token: () => tokens.shift() });
  const refused = [];
  c.addEventListener('error', (e) => { if (e.detail.code === 'unauthorized') refused.push(tokens.length); });
  const ws = await joined(c, { messages: [userMsg('m1', 't1')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 2, text: 'ab', model: 'sim' } });
  const cancelled = c.cancel('t1');
  ws.drop(4001);
  assert.deepEqual(refused, [1], 'the error event comes before the token is asked again');
  await until(() => FakeWS.all.length === 2, 'a reconnect');
  const ws2 = FakeWS.all[1];
  assert.equal(new URL(ws2.url).searchParams.get('access_token'), 'new');
  ws2.open();
  assert.deepEqual(ws2.sent.map((f) => f.type), ['join', 'cancel']);
  assert.deepEqual(ws2.frames('join')[0].after, { turn_id: 't1', seq: 2 });
  ws2.receive({ type: 'ack', id: ws2.frames('cancel')[0].id, turn_id: 't1', status: 'cancelled', already: false });
  assert.equal(await settled(cancelled, 'the cancel'), 'resolved');
});

test('a send made while another answer streams does not stop that answer being resumed with after', async (t) => {
  // The server refuses such a send (turn_active), but the connection may
  // drop before it says so; the answer that runs is still the one to resume.
  const c = newClient(t);
  const ws = await joined(c, { messages: [userMsg('m1', 't1')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 2, text: 'ab', model: 'sim' } });
  const { ack } = c.send('c1', 'too eager');
  ws.drop(1006);
  await until(() => FakeWS.all.length === 2, 'a reconnect');
  const ws2 = FakeWS.all[1];
  ws2.open();
  const j = ws2.frames('join')[0];
  assert.deepEqual(j.after, { turn_id: 't1', seq: 2 });
  ws2.receive({ type: 'joined', id: j.id, conversation_id: 'c1', messages: [userMsg('m1', 't1')],
    active: { turn_id: 't1', reply_to: 'm1', status: 'streaming', seq: 4, from: 3, text: 'cd', model: 'sim' } });
  assert.equal(c.events.filter((e) => e.type === 'joined').at(-1).resumed, true);
  const s = ws2.frames('send')[0];
  ws2.receive({ type: 'error', id: s.id, code: 'turn_active', turn_id: 't1', message: 'an answer is still being written' });
  assert.equal((await settled(ack, 'the send')).code, 'turn_active');
  const conv = c.conversation('c1');
  assert.equal(conv.byTurn.get('t1').content, 'abcd');
  assert.equal(conv.active, 't1');
});

test('after any other close code every joined conversation is resumed, each from its own answer', async (t) => {
  for (const code of [4008, 1001, 1008, 1011, 1006]) {
    const c = newClient(t);
    c.connect();
    await until(() => FakeWS.all.length === 1, 'a connection');
    const ws = FakeWS.all[0];
    const joins = ['c1', 'c2', 'c3'].map((id) => c.join(id));
    ws.open();
    const [j1, j2, j3] = ws.frames('join');
    ws.receive({ type: 'joined', id: j1.id, conversation_id: 'c1', messages: [],
      active: { turn_id: 'a', reply_to: 'ma', status: 'streaming', seq: 3, text: 'abc', model: 'sim' } });
    ws.receive({ type: 'joined', id: j2.id, conversation_id: 'c2', messages: [], active: null });
    ws.receive({ type: 'joined', id: j3.id, conversation_id: 'c3', messages: [],
      active: { turn_id: 'b', reply_to: 'mb', status: 'streaming', seq: 1, text: 'x', model: 'sim' } });
    await Promise.all(joins);
    ws.drop(code);
    assert.equal(c.state, 'reconnecting', `close ${code}`);
    await until(() => FakeWS.all.length === 2, `a reconnect after ${code}`);
    const ws2 = FakeWS.all[1];
    ws2.open();
    assert.deepEqual(ws2.frames('join').map((f) => [f.conversation_id, f.after]),
      [['c1', { turn_id: 'a', seq: 3 }], ['c2', undefined], ['c3', { turn_id: 'b', seq: 1 }]], `close ${code}`);
    const [k1, , k3] = ws2.frames('join');
    ws2.receive({ type: 'joined', id: k1.id, conversation_id: 'c1', messages: [],
      active: { turn_id: 'a', reply_to: 'ma', status: 'streaming', seq: 5, from: 4, text: 'de', model: 'sim' } });
    ws2.receive({ type: 'joined', id: k3.id, conversation_id: 'c3', messages: [],
      active: { turn_id: 'b', reply_to: 'mb', status: 'streaming', seq: 1, from: 2, text: '', model: 'sim' } });
    assert.equal(c.conversation('c1').byTurn.get('a').content, 'abcde');
    assert.equal(c.conversation('c3').byTurn.get('b').content, 'x');
    c.close();
  }
});

test('close() leaves no timer running: no reconnect, ping or join retry afterwards', async (t) => {
  const c = newClient(t, { pingIntervalMs: 5, openTimeoutMs: 50 });
  const ws = await joined(c);
  c.join('c2').catch(() => {});
  ws.receive({ type: 'error', id: ws.frames('join').at(-1).id, code: 'unavailable', message: 'try again' });
  c.send('c1', 'pending').ack.catch(() => {});
  c.close();
  await flush();
  assert.deepEqual(process.getActiveResourcesInfo().filter((r) => r === 'Timeout'), []);
  assert.equal(FakeWS.all.length, 1);
});
