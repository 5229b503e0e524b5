// tokenrelay browser client: an ES module with no dependencies.
//
//   import { TokenRelayClient } from '/client.js';
//   const client = new TokenRelayClient();
//   client.addEventListener('turn', (e) => console.log(e.detail.turn.content));
//   client.connect();
//   await client.join('c-123');
//   const { turnId } = client.send('c-123', 'Hello');
//   client.cancel(turnId); // works before the server has answered
//
// It speaks protocol version 1 (PROTOCOL.md): it reconnects with backoff and
// jitter, re-joins every joined conversation with `after` so a running answer
// resumes where it was, re-sends unanswered `send`/`cancel` frames (safe: the
// ids are chosen here, and the server treats a repeated message_id as a
// retry), and re-joins with `after` when a delta does not follow the last one
// it applied. A `send` whose frame is larger than the server takes (64 KiB by
// default) is refused here with `too_large`, and a frame that got the socket
// closed with 1009 fails instead of being re-sent. See docs/js-client.md.

/** Statuses after which a turn never changes again. */
export const TERMINAL = Object.freeze(['complete', 'cancelled', 'error', 'interrupted']);

const isTerminal = (status) => TERMINAL.includes(status);

/** newId returns a fresh id for a conversation, message or turn: `prefix-uuid`. */
export function newId(prefix) {
  const uuid = globalThis.crypto?.randomUUID?.() ??
    Array.from(globalThis.crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, '0')).join('');
  return `${prefix}-${uuid}`;
}

/**
 * ClientError is what rejected promises of this module hold: `code` is one of
 * PROTOCOL.md's error codes, or the client's own `closed` (close() was
 * called) or `cancelled` (leave() while a join waited).
 */
export class ClientError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'ClientError';
    this.code = code;
    Object.assign(this, extra);
  }
}

const defaults = {
  history: 50,
  backoffInitialMs: 500,
  backoffMaxMs: 15000,
  pingIntervalMs: 25000,
  pongTimeoutMs: 10000,
  openTimeoutMs: 10000,
  stableAfterMs: 5000,
  maxFrameBytes: 65536,
};

/** How long a socket open across a network change has to answer a ping once the browser is online again. */
const ONLINE_PROBE_MS = 3000;

const utf8 = new TextEncoder();
const byteLength = (s) => utf8.encode(s).length;

/**
 * TokenRelayClient keeps one WebSocket to a tokenrelay gateway and a model of
 * every joined conversation: its messages in order, the assistant replies
 * with their text so far. It is an EventTarget; every event is a
 * CustomEvent whose `detail` is described in docs/js-client.md:
 *
 * - `status`  {state, previous, code?, reason?, retryInMs?, attempt}: state is
 *             'idle', 'connecting', 'connected', 'reconnecting', 'offline' or 'closed'.
 * - `joined`  {conversationId, conversation, resumed}: the conversation's model
 *             was (re)built from the server's snapshot.
 * - `message` {conversationId, message}: a user message was added or confirmed.
 * - `turn`    {conversationId, turn, phase}: phase 'pending' (sent here, not yet
 *             started), 'start', 'delta', 'cancelling', 'end' (once per answer, also
 *             for one that ended during a drop) or 'removed' (its send failed).
 * - `error`   {conversationId?, code, message, request?, turnId?, messageId?, retryAfterMs?}.
 * - `older`   {conversationId, added, hasMore}: loadOlder() added older messages at the front.
 * - `gap`     {conversationId, turnId, expected, got}: a delta did not follow; the
 *             client re-joins with `after` (a correct server never causes this).
 */
export class TokenRelayClient extends EventTarget {
  /**
   * @param {object} [opts]
   * @param {string} [opts.url] WebSocket URL; default `ws(s)://<page host>/v1/ws` (required
   *        outside a browser: the constructor throws a TypeError without it).
   * @param {string|(() => string|Promise<string>)} [opts.token] JWT, sent as `?access_token=`
   *        on the WebSocket and as `Authorization: Bearer` on HTTP calls.
   * @param {number} [opts.history] messages to load per join (default 50, max 500).
   * @param {number} [opts.backoffInitialMs] first reconnect delay (default 500).
   * @param {number} [opts.backoffMaxMs] longest reconnect delay (default 15000).
   * @param {number} [opts.pingIntervalMs] keep-alive interval (default 25000; 0 = none).
   * @param {number} [opts.pongTimeoutMs] how long the first unanswered ping waits for its pong
   *        (or any other frame) before the connection is given up (default 10000; 0 = no wait).
   * @param {number} [opts.stableAfterMs] how long a connection must stay open before the backoff
   *        starts again from backoffInitialMs (default 5000).
   * @param {number} [opts.openTimeoutMs] how long a WebSocket may take to open before it is given
   *        up and tried again (default 10000; 0 = as long as the browser waits).
   * @param {number} [opts.maxFrameBytes] largest frame the server takes (its --limit-frame-bytes,
   *        default 65536; 0 = no check): a larger `send` is refused here with `too_large`.
   * @param {typeof WebSocket} [opts.WebSocket] WebSocket implementation (default: the global one).
   */
  constructor(opts = {}) {
    super();
    this.opts = { ...defaults, ...opts };
    if (!this.opts.url) {
      const loc = globalThis.location;
      if (!loc?.host) throw new TypeError('TokenRelayClient: the url option is required outside a browser (there is no page to take the host from)');
      this.opts.url = `${loc.protocol === 'https:' ? 'wss' : 'ws'}://${loc.host}/v1/ws`;
    }
    const u = new URL(this.opts.url);
    u.protocol = u.protocol === 'wss:' ? 'https:' : 'http:';
    u.pathname = u.pathname.replace(/\/v1\/ws$/, '') || '/';
    u.search = '';
    /** httpBase is the gateway's HTTP root, without a trailing slash. */
    this.httpBase = u.toString().replace(/\/$/, '');

    this.state = 'idle';
    this._ws = null;
    this._attempt = 0;
    this._wanted = false; // connect() called and close() not
    this._stopped = null; // {code, message} once stopped for good, until connect()
    this._gen = 0; // bumped by every _open() and close(): an older open finding it changed gives up
    this._opening = false; // _open() is awaiting the token
    this._retryTimer = null;
    this._pingTimer = null;
    this._pongTimer = null;
    this._openTimer = null;
    this._stableTimer = null;
    this._reqSeq = 0;
    /** the frame limit in force: the option, lowered when a smaller frame got close 1009 */
    this._maxFrame = this.opts.maxFrameBytes;
    /** @type {Map<string, object>} conversation id → model */
    this._convs = new Map();
    /** @type {Map<string, object>} frame id → request awaiting its ack or error */
    this._requests = new Map();
    /** @type {Map<string, number>} conversation id → deleteConversation calls under way */
    this._deleting = new Map();
    this._onOnline = () => {
      if (!this._wanted || this._opening) return;
      if (!this._ws) this._retryNow();
      // A socket that outlived a network change may be dead without a
      // word (its peer's address is gone): ask it now, briefly, instead of
      // waiting for the next ping.
      else if (this._ws.readyState === 1) this._probe(Math.min(this.opts.pongTimeoutMs || Infinity, ONLINE_PROBE_MS));
    };
    this._onOffline = () => {
      // Shown as offline until the network is back; an open socket is kept
      // (it may survive) and says `connected` again when it next answers.
      if (this._wanted && !this._opening) this._setState('offline');
    };
  }

  // ---- connection ---------------------------------------------------------

  /** connect opens the connection and keeps it open (reconnecting) until close(). */
  connect() {
    if (this._wanted) return;
    this._wanted = true;
    this._stopped = null;
    this._attempt = 0; // a new start: the drops before close() do not lengthen its backoff
    globalThis.addEventListener?.('online', this._onOnline);
    globalThis.addEventListener?.('offline', this._onOffline);
    this._open();
  }

  /**
   * close closes the connection and stops reconnecting. Joined conversations
   * stay in the model; every request still waiting (join, send, cancel)
   * rejects with a ClientError `closed`, and optimistic messages are removed.
   */
  close() {
    this._stop();
    const ws = this._ws;
    this._dropSocket();
    try { ws?.close(1000, 'client closed'); } catch { /* already closing */ }
    this._setState('closed');
    this._failPending('closed', 'the client was closed');
  }

  /** _stop ends reconnecting: no retry timer, no window listeners, and an open under way gives up. */
  _stop() {
    this._wanted = false;
    this._gen++;
    this._opening = false;
    globalThis.removeEventListener?.('online', this._onOnline);
    globalThis.removeEventListener?.('offline', this._onOffline);
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  /**
   * _failPending rejects every request and join still waiting with a
   * ClientError `code` (the client stopped: nothing will answer them). A
   * send's rejection takes its optimistic message and answer away.
   */
  _failPending(code, message) {
    // Until connect() is called again, a new request fails the same way
    // at once: nothing would ever send it.
    this._stopped = { code, message };
    const reqs = [...this._requests.values()];
    this._requests.clear();
    for (const req of reqs) {
      const detail = { request: req.frame.type };
      if (req.frame.conversation_id) detail.conversationId = req.frame.conversation_id;
      if (req.frame.type === 'send') detail.messageId = req.frame.message_id;
      if (req.frame.turn_id) detail.turnId = req.frame.turn_id;
      req.reject(new ClientError(code, message, detail));
    }
    for (const conv of this._convs.values()) {
      conv.joining = false;
      clearTimeout(conv.joinTimer);
      conv.joinTimer = null;
      conv.joinRetries = 0;
      for (const w of conv.waiters.splice(0)) {
        w.reject(new ClientError(code, message, { request: 'join', conversationId: conv.id }));
      }
    }
  }

  async _open() {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const gen = ++this._gen;
    this._opening = true;
    // While the browser reports offline a retry does not say `reconnecting`:
    // the state stays `offline` until the network is back or a socket opens.
    const offline = this.state === 'offline' && globalThis.navigator?.onLine === false;
    this._setState(offline ? 'offline' : this._attempt === 0 && this.state !== 'reconnecting' ? 'connecting' : 'reconnecting');
    let url = this.opts.url;
    try {
      const token = await this._token();
      if (token) url += (url.includes('?') ? '&' : '?') + 'access_token=' + encodeURIComponent(token);
    } catch (err) {
      if (gen !== this._gen) return;
      this._opening = false;
      this._emit('error', { code: 'unauthorized', message: `could not get a token: ${err.message}` });
      this._scheduleRetry({ code: 4001 });
      return;
    }
    // close() or a newer _open() (connect() after close(), the window's
    // `online` event) came while the token was awaited: that one owns the
    // connection, so this one must not open a second WebSocket.
    if (gen !== this._gen || !this._wanted) return;
    this._opening = false;
    const ws = new (this.opts.WebSocket ?? globalThis.WebSocket)(url);
    this._ws = ws;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (ev) => this._onFrame(ws, ev.data);
    ws.onclose = (ev) => this._onClose(ws, ev);
    ws.onerror = () => {}; // onclose follows with the code
    // A server that accepts the TCP connection and never answers the
    // upgrade (hung, overloaded, a half-open proxy) would otherwise hold
    // the client in `reconnecting` for as long as the browser waits.
    if (this.opts.openTimeoutMs > 0) {
      this._openTimer = setTimeout(() => {
        this._openTimer = null;
        if (ws !== this._ws || ws.readyState !== 0) return;
        this._onClose(ws, { code: 4000, reason: 'open timed out' });
        try { ws.close(); } catch { /* already closing */ }
      }, this.opts.openTimeoutMs);
    }
  }

  async _token() {
    const t = this.opts.token;
    return typeof t === 'function' ? await t() : t;
  }

  _onOpen(ws) {
    if (ws !== this._ws) {
      ws.close(1000, 'superseded'); // not the client's socket (any more)
      return;
    }
    clearTimeout(this._openTimer);
    this._openTimer = null;
    this._setState('connected');
    // The attempt counter resets only once the connection has proven
    // itself, so a server that accepts and at once closes (4009, a
    // restart loop) still gets a growing delay.
    this._stableTimer = setTimeout(() => { this._attempt = 0; }, this.opts.stableAfterMs);
    if (this.opts.pingIntervalMs > 0) {
      this._pingTimer = setInterval(() => this._ping(), this.opts.pingIntervalMs);
    }
    for (const conv of this._convs.values()) this._sendJoin(conv);
    for (const req of this._requests.values()) {
      if (req.resend) this._writeRequest(req);
    }
  }

  _ping() {
    if (!this._write({ type: 'ping' })) return;
    // The timeout runs from the first ping left unanswered: a later ping
    // must not push it back, or a ping interval shorter than the timeout
    // would never notice a dead connection. 0 waits for no pong.
    if (this._pongTimer || !(this.opts.pongTimeoutMs > 0)) return;
    this._pongTimer = setTimeout(() => this._noPong(), this.opts.pongTimeoutMs);
  }

  /** _probe pings now and gives the connection up if no pong comes within ms. */
  _probe(ms) {
    if (!this._write({ type: 'ping' })) return;
    clearTimeout(this._pongTimer);
    this._pongTimer = setTimeout(() => this._noPong(), ms);
  }

  /**
   * _noPong gives up on a connection that stopped answering (laptop lid,
   * lost Wi-Fi). Its onclose may come only once the closing handshake has
   * timed out (a minute in Chromium), so the socket is let go of at once and
   * the reconnect goes the way of a close.
   */
  _noPong() {
    this._pongTimer = null;
    const ws = this._ws;
    if (!ws) return;
    this._onClose(ws, { code: 4000, reason: 'no pong' });
    try { ws.close(4000, 'no pong'); } catch { /* already closing */ }
  }

  _onClose(ws, ev) {
    if (ws !== this._ws) return;
    this._dropSocket();
    if (ev.code === 1009) this._failOversized(ws);
    for (const [id, req] of this._requests) {
      if (!req.resend) {
        this._requests.delete(id);
        req.reject(new ClientError('unavailable', 'connection lost'));
      }
    }
    if (!this._wanted) return;
    if (ev.code === 4001) {
      this._emit('error', { code: 'unauthorized', message: 'the server refused the token' });
      if (typeof this.opts.token !== 'function') {
        // A fixed token will not get better: stop for good (the window's
        // `online` does not retry; connect() starts over), and let nothing
        // wait for a connection that will not come.
        this._stop();
        this._setState('offline', { code: ev.code, reason: ev.reason });
        this._failPending('unauthorized', 'the server refused the token');
        return;
      }
    }
    if (ev.code === 4009) {
      this._emit('error', { code: 'rate_limited', message: 'too many connections are open for this user' });
    }
    this._scheduleRetry(ev);
  }

  /**
   * _failOversized handles close 1009 (a frame was larger than the server
   * takes): the largest unanswered request written on that socket is the
   * one, so it fails with `too_large` instead of being re-sent on every
   * reconnect, and frames of its size are refused from now on.
   */
  _failOversized(ws) {
    let worst = null;
    for (const req of this._requests.values()) {
      if (req.ws === ws && (!worst || req.bytes > worst.bytes)) worst = req;
    }
    if (!worst) return;
    if (worst.bytes > 1) this._maxFrame = Math.min(this._maxFrame || Infinity, worst.bytes - 1);
    this._requests.delete(worst.frame.id);
    this._fail(worst, 'too_large', 'the message is larger than the server accepts');
  }

  /** _fail rejects a request and reports it through the `error` event, as an `error` frame would. */
  _fail(req, code, message) {
    const detail = { code, message, request: req.frame.type };
    if (req.frame.conversation_id) detail.conversationId = req.frame.conversation_id;
    if (req.frame.type === 'send') detail.messageId = req.frame.message_id;
    if (req.frame.turn_id) detail.turnId = req.frame.turn_id;
    req.reject(new ClientError(code, message, detail));
    this._emit('error', detail);
  }

  _dropSocket() {
    const ws = this._ws;
    if (ws) ws.onopen = ws.onmessage = ws.onclose = null;
    this._ws = null;
    clearTimeout(this._openTimer);
    this._openTimer = null;
    clearInterval(this._pingTimer);
    clearTimeout(this._pongTimer);
    this._pongTimer = null;
    clearTimeout(this._stableTimer);
    for (const conv of this._convs.values()) conv.joined = false;
  }

  _scheduleRetry(ev = {}) {
    // Exponential backoff with "equal jitter": half the delay fixed, half
    // random, so a server restart does not bring every tab back at once and
    // no tab retries in a tight loop.
    const base = Math.min(this.opts.backoffMaxMs, this.opts.backoffInitialMs * 2 ** this._attempt);
    let delay = base / 2 + Math.random() * base / 2;
    if (ev.code === 4009) delay = Math.max(delay, 5000 + Math.random() * 5000);
    this._attempt++;
    const offline = globalThis.navigator?.onLine === false;
    this._setState(offline ? 'offline' : 'reconnecting', { code: ev.code, reason: ev.reason, retryInMs: Math.round(delay) });
    this._retryTimer = setTimeout(() => this._open(), delay);
  }

  /** _retryNow reconnects at once (the browser came back online). */
  _retryNow() {
    clearTimeout(this._retryTimer);
    this._open();
  }

  _setState(state, extra = {}) {
    const previous = this.state;
    this.state = state;
    if (previous !== state || extra.retryInMs !== undefined) {
      this._emit('status', { state, previous, attempt: this._attempt, ...extra });
    }
  }

  _write(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  _request(frame, { resend }) {
    const id = `r${++this._reqSeq}`;
    frame.id = id;
    const json = JSON.stringify(frame);
    return new Promise((resolve, reject) => {
      const req = { frame, json, bytes: byteLength(json), resend, resolve, reject, ws: null };
      if (this._stopped && !this._wanted) {
        // Stopped for good (close(), a refused fixed token): fail now
        // rather than wait for a connection that will not come.
        this._fail(req, this._stopped.code, this._stopped.message);
        return;
      }
      if (this._maxFrame > 0 && req.bytes > this._maxFrame) {
        // The server would close the connection on it (1009): never send it.
        this._fail(req, 'too_large', `the message is too large to send (${req.bytes} bytes; the limit is ${this._maxFrame})`);
        return;
      }
      this._requests.set(id, req);
      if (!this._writeRequest(req) && !resend) {
        this._requests.delete(id);
        reject(new ClientError('unavailable', 'not connected'));
      }
    });
  }

  /** _writeRequest sends a request's frame and remembers the socket it went out on. */
  _writeRequest(req) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(req.json);
    req.ws = ws;
    return true;
  }

  // ---- conversations ------------------------------------------------------

  /**
   * join starts following a conversation (the server creates it if it is new)
   * and resolves with its model once the server's snapshot arrived. The
   * conversation stays joined across reconnects until leave().
   */
  join(conversationId, { history } = {}) {
    let conv = this._convs.get(conversationId);
    if (!conv?.joined && this._stopped && !this._wanted) {
      // Stopped for good (close(), a refused fixed token): fail now rather
      // than wait for a connection that will not come. A conversation not
      // followed yet is not followed.
      const { code, message } = this._stopped;
      const detail = { code, message, request: 'join', conversationId };
      this._emit('error', detail);
      return Promise.reject(new ClientError(code, message, detail));
    }
    if (!conv) {
      conv = newConversation(conversationId, history ?? this.opts.history);
      this._convs.set(conversationId, conv);
      this._sendJoin(conv);
    } else if (conv.joined) {
      return Promise.resolve(conv);
    }
    return new Promise((resolve, reject) => conv.waiters.push({ resolve, reject }));
  }

  /** leave stops following a conversation and forgets its model. */
  leave(conversationId) {
    const conv = this._convs.get(conversationId);
    if (!conv) return;
    this._convs.delete(conversationId);
    clearTimeout(conv.joinTimer);
    for (const w of conv.waiters) w.reject(new ClientError('cancelled', 'left the conversation'));
    this._write({ type: 'leave', conversation_id: conversationId });
  }

  /** conversation returns the model of a joined conversation, or undefined. Treat it as read-only. */
  conversation(conversationId) {
    return this._convs.get(conversationId);
  }

  /** _sendJoin (re)joins conv; `after` defaults to the running turn's progress, false forces a plain join. */
  _sendJoin(conv, after) {
    conv.joining = true;
    const frame = { type: 'join', conversation_id: conv.id, history: conv.history };
    if (after === undefined) {
      let t = conv.active && conv.byTurn.get(conv.active);
      if (t?.pending) {
        // A send made here stands as the active answer until the server
        // answers it; an answer that was already streaming (which the
        // server will refuse that send for) is the one to resume.
        t = null;
        for (let i = conv.items.length - 1; i >= 0 && !t; i--) {
          const it = conv.items[i];
          if (it.role === 'assistant' && !it.pending && !isTerminal(it.status) && it.seq > 0) t = it;
        }
      }
      // Also an answer of which nothing has come yet (seq 0), once the
      // server knows it: should it end while we are away and slide out of
      // the snapshot, the catch-up that follows `after` still ends it here.
      if (t && !isTerminal(t.status) && t.seq != null && (t.seq > 0 || !t.pending)) after = { turn_id: t.turn_id, seq: t.seq };
      // An answer that slid out of the last snapshot and still waits for
      // its catch-up goes first: it has ended (the server runs one answer
      // of a conversation at a time), and without `after` its end would
      // never come; the running answer then comes whole in the snapshot.
      const d = conv.detached;
      if (d && !isTerminal(d.status) && d.seq != null) after = { turn_id: d.turn_id, seq: d.seq };
    }
    if (after) frame.after = after;
    const id = `j${++this._reqSeq}`;
    frame.id = id;
    conv.joinId = id;
    conv.joinAfter = after ? after.turn_id : null;
    this._write(frame);
  }

  // ---- send and cancel ----------------------------------------------------

  /**
   * send stores a user message and starts a turn replying to it. It returns at
   * once with the ids (chosen here unless given) so the caller can render the
   * message and cancel the turn before the server answers; `ack` resolves
   * with the server's `{message_id, turn_id}` or rejects with a ClientError
   * (`rate_limited`, `too_large`, `turn_active`, …). Offline, the frame waits
   * and goes out on reconnect.
   */
  send(conversationId, text, { model, messageId, turnId } = {}) {
    messageId ??= newId('m');
    turnId ??= newId('t');
    const stopped = this._stopped && !this._wanted; // the send fails at once, and says so itself
    if (!stopped && !this._convs.has(conversationId)) this.join(conversationId).catch(() => {});
    const conv = this._convs.get(conversationId) ?? newConversation(conversationId, this.opts.history);
    const user = { message_id: messageId, conversation_id: conversationId, role: 'user', content: text,
      status: 'pending', turn_id: turnId, pending: true, created_at: new Date().toISOString() };
    const turn = { message_id: turnId, conversation_id: conversationId, role: 'assistant', content: '',
      status: 'queued', turn_id: turnId, reply_to: messageId, seq: 0, pending: true, model };
    addItem(conv, user);
    addItem(conv, turn);
    const previous = conv.active; // an answer still running, whose Stop must keep working
    conv.active = turnId;
    this._emit('message', { conversationId, message: user });
    this._emit('turn', { conversationId, turn, phase: 'pending' });

    const frame = { type: 'send', conversation_id: conversationId, text, message_id: messageId, turn_id: turnId };
    if (model) frame.model = model;
    // dropOptimistic takes this send's optimistic message and answer away
    // again (these very items: a retry shares its message id with the
    // stored message).
    const dropOptimistic = () => {
      if (user.pending && conv.items.includes(user)) removeItem(conv, user);
      if (turn.pending && conv.items.includes(turn)) {
        removeItem(conv, turn);
        if (conv.active === turnId) {
          // A refused send (turn_active, say) leaves the answer it met the
          // active one.
          const p = previous && conv.byTurn.get(previous);
          conv.active = p && !isTerminal(p.status) ? previous : null;
        }
        this._emit('turn', { conversationId, turn, phase: 'removed' });
      }
    };
    const ack = this._request(frame, { resend: true }).then((a) => {
      if (a.turn_id && a.turn_id !== turnId) {
        // The server took this as a retry of a message it already had (same
        // message_id) and names the turn answering it: nothing new was
        // stored or started, so the model points at what exists.
        dropOptimistic();
        const existing = conv.byTurn.get(a.turn_id);
        if (existing && !isTerminal(existing.status)) conv.active = a.turn_id;
        if ((!existing || !conv.byMessage.has(a.message_id ?? messageId)) && this._convs.get(conversationId) === conv) {
          this._sendJoin(conv); // older than the history loaded: fetch it
        }
      }
      if (conv.refusedJoin && !conv.joining && this._convs.get(conversationId) === conv) {
        // The join refused as a new conversation: the send has made it.
        conv.refusedJoin = null;
        this._sendJoin(conv);
      }
      return a;
    }, (err) => {
      dropOptimistic(); // nothing was stored
      if (conv.refusedJoin && !this._sending(conversationId)) this._forget(conv, conv.refusedJoin);
      throw err;
    });
    ack.catch(() => {}); // reported through the `error` event too
    return { messageId, turnId, ack };
  }

  /**
   * cancel stops a turn (idempotent; works before the send's ack) and
   * resolves with `{turn_id, status, already}`. Offline, it waits and goes
   * out on reconnect.
   */
  cancel(turnId) {
    for (const conv of this._convs.values()) {
      const t = conv.byTurn.get(turnId);
      if (t && !isTerminal(t.status)) {
        t.cancelling = true;
        this._emit('turn', { conversationId: conv.id, turn: t, phase: 'cancelling' });
      }
    }
    const p = this._request({ type: 'cancel', turn_id: turnId }, { resend: true });
    // A refused cancel (the broker unavailable, say) has not stopped the
    // answer: it is no longer being stopped, unless another cancel of it
    // still waits, so that an app can offer Stop again.
    p.catch(() => {
      if ([...this._requests.values()].some((r) => r.frame.type === 'cancel' && r.frame.turn_id === turnId)) return;
      for (const conv of this._convs.values()) {
        const t = conv.byTurn.get(turnId);
        if (t?.cancelling && !isTerminal(t.status)) {
          delete t.cancelling;
          this._emit('turn', { conversationId: conv.id, turn: t, phase: 'cancelling' });
        }
      }
    });
    return p;
  }

  // ---- HTTP helpers -------------------------------------------------------

  /** api calls the gateway's HTTP API and returns the parsed JSON (null for 204); errors reject with ClientError. */
  async api(method, path, body) {
    const headers = {};
    let token;
    try {
      token = await this._token();
    } catch (err) {
      throw new ClientError('unauthorized', `could not get a token: ${err.message}`);
    }
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let res;
    try {
      res = await fetch(this.httpBase + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (err) {
      throw new ClientError('unavailable', `could not reach the server: ${err.message}`);
    }
    if (res.status === 204) return null;
    const data = await res.json().catch(() => ({}));
    if (!res.ok) {
      const e = data.error ?? {};
      throw new ClientError(e.code ?? 'internal', e.message ?? `HTTP ${res.status}`, { status: res.status });
    }
    return data;
  }

  /** listConversations returns the user's conversations, most recent first (the server's first 100). */
  async listConversations() {
    return (await this.listConversationsPage()).conversations;
  }

  /**
   * listConversationsPage returns the user's `limit` (1–1000, default 100)
   * most recent conversations, and whether there are more:
   * `{conversations, hasMore}`.
   */
  async listConversationsPage({ limit } = {}) {
    const r = await this.api('GET', `/v1/conversations${limit ? `?limit=${limit}` : ''}`);
    return { conversations: r.conversations ?? [], hasMore: !!r.has_more };
  }

  /**
   * loadOlder fetches the stored messages before the oldest one the model
   * holds (`GET /v1/conversations/{C}/messages?before=`), adds them at the
   * front of its items and resolves with `{added, hasMore}`; `hasMore` is
   * also kept on the model. It emits `older`. One call at a time per
   * conversation: a second one while the first runs gets the same promise.
   */
  loadOlder(conversationId, { limit } = {}) {
    const conv = this._convs.get(conversationId);
    if (!conv) return Promise.reject(new ClientError('not_found', 'the conversation is not joined'));
    if (conv.loadingOlder) return conv.loadingOlder;
    const first = conv.items.find((i) => !i.pending);
    if (!first) return Promise.resolve({ added: 0, hasMore: false });
    const q = new URLSearchParams({ limit: String(limit ?? conv.history), before: first.message_id });
    conv.loadingOlder = this.api('GET', `/v1/conversations/${encodeURIComponent(conv.id)}/messages?${q}`).then((r) => {
      const added = [];
      for (const m of r.messages ?? []) {
        if (m.role === 'assistant' ? conv.byTurn.has(m.turn_id) : conv.byMessage.has(m.message_id)) continue;
        const item = { ...m };
        if (m.role === 'assistant') {
          item.seq = isTerminal(m.status) ? null : 0;
          conv.byTurn.set(item.turn_id, item);
        } else {
          conv.byMessage.set(item.message_id, item);
        }
        added.push(item);
      }
      conv.items = added.concat(conv.items);
      conv.hasMore = !!r.has_more;
      this._emit('older', { conversationId: conv.id, added: added.length, hasMore: conv.hasMore });
      return { added: added.length, hasMore: conv.hasMore };
    }).finally(() => { conv.loadingOlder = null; });
    return conv.loadingOlder;
  }

  /**
   * deleteConversation deletes a conversation (cancelling its running turn)
   * and leaves it; when the delete fails (but for not_found: it is gone)
   * the conversation stays joined.
   */
  async deleteConversation(conversationId) {
    // The server's notice to the socket that the conversation is gone can
    // come before the HTTP answer: it is this delete's, and no news.
    this._deleting.set(conversationId, (this._deleting.get(conversationId) ?? 0) + 1);
    try {
      await this.api('DELETE', `/v1/conversations/${encodeURIComponent(conversationId)}`);
    } catch (err) {
      if (err?.code === 'not_found') this.leave(conversationId); // gone all the same
      throw err;
    } finally {
      const n = this._deleting.get(conversationId) - 1;
      if (n > 0) this._deleting.set(conversationId, n);
      else this._deleting.delete(conversationId);
    }
    this.leave(conversationId);
  }

  // ---- frames from the server ---------------------------------------------

  _onFrame(ws, data) {
    if (ws !== this._ws) return;
    if (this.state === 'offline') this._setState('connected'); // it answers: the network is back
    // Any frame shows the connection alive, not only the pong: the server
    // queues its pong behind what it has still to send, which on a slow
    // link can take longer than pongTimeoutMs while the answer streams.
    clearTimeout(this._pongTimer);
    this._pongTimer = null;
    let f;
    try { f = JSON.parse(data); } catch { return; }
    switch (f.type) {
      case 'pong': return;
      case 'ack': return this._onAck(f);
      case 'error': return this._onError(f);
      case 'joined': return this._onJoined(f);
    }
    const conv = this._convs.get(f.conversation_id);
    // While a join is under way, frames of the old view may still be in
    // flight; the snapshot in `joined` supersedes them.
    if (!conv || conv.joining) return;
    switch (f.type) {
      case 'message': return this._onMessage(conv, f.message);
      case 'turn.start': return this._onStart(conv, f);
      case 'turn.delta': return this._onDelta(conv, f);
      case 'turn.end': return this._onEnd(conv, f);
    }
  }

  _onAck(f) {
    const req = this._requests.get(f.id);
    if (!req) return;
    this._requests.delete(f.id);
    const { type, id, ...rest } = f;
    req.resolve(rest);
  }

  _onError(f) {
    const detail = { code: f.code, message: f.message };
    if (f.turn_id) detail.turnId = f.turn_id;
    if (f.retry_after_ms != null) detail.retryAfterMs = f.retry_after_ms;
    const req = f.id && this._requests.get(f.id);
    if (req) {
      this._requests.delete(f.id);
      detail.request = req.frame.type;
      if (req.frame.conversation_id) detail.conversationId = req.frame.conversation_id;
      if (req.frame.type === 'send') detail.messageId = req.frame.message_id;
      if (req.frame.type === 'cancel') detail.turnId = req.frame.turn_id;
      req.reject(new ClientError(f.code, f.message, detail));
    } else if (f.id) {
      const conv = [...this._convs.values()].find((c) => c.joinId === f.id);
      if (!conv) {
        // The answer to a join of a conversation left since, or joined
        // again since (that newer join gets its own answer): nobody waits
        // for it. Request ids start with `r`, join ids with `j`.
        if (f.id.startsWith('j')) return;
      } else {
        detail.request = 'join';
        detail.conversationId = conv.id;
        conv.joining = false;
        conv.joined = false;
        if (f.code === 'unavailable') {
          // The server could not join us just now (its broker or store
          // failed for a moment): ask again later, as a reconnect would,
          // rather than forget a conversation the app still shows. (An
          // `internal` error may be for good: it is refused as any other.)
          this._retryJoin(conv);
          this._emit('error', detail);
          return;
        }
        if (f.code === 'rate_limited' && this._sending(conv.id)) {
          // Refused as a new conversation (--limit-new-conversations)
          // while a send to it is on its way: the send creates the
          // conversation, and the join after its ack is then no new one.
          // The send's answer is this join's answer.
          conv.refusedJoin = new ClientError(f.code, f.message, detail);
          return;
        }
        // The server has not joined us: forget the conversation, as leave()
        // does, so that it is not re-joined on every reconnect and a later
        // join() asks the server again.
        this._forget(conv, new ClientError(f.code, f.message, detail));
      }
    } else if (f.conversation_id && this._convs.has(f.conversation_id) && f.code === 'not_found') {
      // A joined conversation was deleted (in another tab, say). The
      // server still follows its id; what to do is the app's choice (the
      // page leaves it). Its own deleteConversation is no news.
      if (this._deleting.has(f.conversation_id)) return;
      detail.conversationId = f.conversation_id;
    } else if (f.conversation_id && this._convs.has(f.conversation_id)) {
      // The server stopped following a joined conversation (it was
      // deleted and another user took its id): forget it, as leave() does.
      const conv = this._convs.get(f.conversation_id);
      detail.conversationId = conv.id;
      conv.joining = false;
      conv.joined = false;
      this._forget(conv, new ClientError(f.code, f.message, detail));
    } else if (f.conversation_id) {
      // About a conversation this client has left: the notice crossed the
      // leave (a delete answered over HTTP, say), and is no news.
      return;
    }
    this._emit('error', detail);
  }

  /** _retryJoin joins conv again after a backoff, if it is still followed and not joined by then. */
  _retryJoin(conv) {
    const base = Math.min(this.opts.backoffMaxMs, this.opts.backoffInitialMs * 2 ** conv.joinRetries++);
    clearTimeout(conv.joinTimer);
    conv.joinTimer = setTimeout(() => {
      conv.joinTimer = null;
      // Not connected: the reconnect joins it.
      if (this._convs.get(conv.id) === conv && !conv.joined && !conv.joining && this.state === 'connected') this._sendJoin(conv);
    }, base / 2 + Math.random() * base / 2);
  }

  /** _forget drops conv from the followed conversations, failing its joins still waiting with err. */
  _forget(conv, err) {
    if (this._convs.get(conv.id) === conv) this._convs.delete(conv.id);
    clearTimeout(conv.joinTimer);
    conv.refusedJoin = null;
    for (const w of conv.waiters.splice(0)) w.reject(err);
  }

  /** _sending says whether a send to conversation id waits for its answer. */
  _sending(id) {
    for (const r of this._requests.values()) if (r.frame.type === 'send' && r.frame.conversation_id === id) return true;
    return false;
  }

  _onJoined(f) {
    const conv = this._convs.get(f.conversation_id);
    if (!conv || (f.id && f.id !== conv.joinId)) return;
    const old = conv;
    // A conversation deleted while this client was away comes back empty:
    // the re-join made it anew. Said as a deletion seen live is (below).
    // (With history 0 every snapshot is empty.)
    const deleted = conv.everJoined && conv.history > 0 && !(f.messages ?? []).length && !f.active &&
      old.items.some((i) => !i.pending) && !this._deleting.has(conv.id);
    const fresh = newConversation(conv.id, conv.history);
    for (const m of f.messages ?? []) {
      const item = { ...m };
      if (m.role === 'assistant') item.seq = isTerminal(m.status) ? null : 0;
      addItem(fresh, item);
    }
    const a = f.active;
    let resumed = false;
    if (a) {
      const prev = old.byTurn.get(a.turn_id);
      let content = a.text ?? '';
      if (a.from != null) {
        // A turn that answers another question than the one we hold is
        // another turn under a reused id (the conversation was deleted and
        // made anew, past the server's retention): its text is not ours to
        // continue.
        if (!prev || prev.seq !== a.from - 1 || (prev.reply_to && a.reply_to && prev.reply_to !== a.reply_to)) {
          // A snapshot relative to text we do not have: ask for all of it.
          this._sendJoin(conv, false);
          return;
        }
        content = prev.content + content;
        resumed = true;
      }
      const listed = fresh.byTurn.get(a.turn_id);
      if (listed) removeItem(fresh, listed);
      addItem(fresh, { message_id: a.turn_id, conversation_id: conv.id, role: 'assistant', content,
        status: a.status, turn_id: a.turn_id, reply_to: a.reply_to, model: a.model, seq: a.seq,
        cancelling: prev?.cancelling });
      fresh.active = a.turn_id;
    }
    // Sends the server has not seen yet (they go out after this join) keep
    // their optimistic messages.
    for (const item of old.items) {
      if (item.pending && !fresh.byMessage.has(item.message_id) && !fresh.byTurn.has(item.turn_id) &&
          [...this._requests.values()].some((r) => r.frame.type === 'send' && r.frame.turn_id === item.turn_id)) {
        addItem(fresh, item);
        if (item.role === 'assistant') fresh.active = item.turn_id;
      }
    }
    // Answers that ended while we were not listening (a drop, a gap) get
    // their one `end` here: the snapshot's final message replaces them, and
    // the catch-up deltas and `turn.end` that may follow are ignored.
    const ended = [];
    for (const t of [...old.byTurn.values(), old.detached].filter(Boolean)) {
      const now = fresh.byTurn.get(t.turn_id);
      if (!isTerminal(t.status) && now && isTerminal(now.status)) ended.push(now);
    }
    // The snapshot holds the last `history` messages; what the model held
    // before them (older pages loaded with loadOlder, messages that have
    // slid out of the window) is kept when it joins up with the snapshot.
    const firstFresh = fresh.items[0];
    const at = firstFresh ? old.items.findIndex((i) => sameItem(i, firstFresh)) : -1;
    const kept = at > 0 ? old.items.slice(0, at).filter((i) => !i.pending && !fresh.byMessage.has(i.message_id) && !fresh.byTurn.has(i.turn_id)) : [];
    for (const item of kept) {
      if (item.role === 'assistant') fresh.byTurn.set(item.turn_id, item);
      else fresh.byMessage.set(item.message_id, item);
    }
    fresh.items = kept.concat(fresh.items);
    conv.hasMore = kept.length > 0 ? old.hasMore : (f.messages ?? []).length >= conv.history;
    // The answer this join resumed with `after` may have ended and slid out
    // of the snapshot's `history` messages (newer turns ended while we were
    // away). The server sends its catch-up deltas and `turn.end` next: they
    // finish it as `detached`, outside `items`, for its one `end`.
    const followed = conv.joinAfter && this._turn(old, conv.joinAfter);
    conv.detached = followed && !isTerminal(followed.status) && followed.seq != null && !fresh.byTurn.has(followed.turn_id)
      ? followed : null;
    conv.items = fresh.items;
    conv.byMessage = fresh.byMessage;
    conv.byTurn = fresh.byTurn;
    conv.active = fresh.active;
    conv.joining = false;
    conv.joined = true;
    conv.everJoined = true;
    conv.joinRetries = 0;
    conv.refusedJoin = null;
    this._emit('joined', { conversationId: conv.id, conversation: conv, resumed });
    for (const t of ended) this._emit('turn', { conversationId: conv.id, turn: t, phase: 'end' });
    for (const w of conv.waiters.splice(0)) w.resolve(conv);
    if (deleted) this._emit('error', { code: 'not_found', message: `conversation ${conv.id} was deleted`, conversationId: conv.id });
  }

  _onMessage(conv, m) {
    let item = conv.byMessage.get(m.message_id);
    if (item) {
      Object.assign(item, m);
      delete item.pending;
    } else {
      item = { ...m };
      addItem(conv, item);
    }
    this._emit('message', { conversationId: conv.id, message: item });
  }

  _turnItem(conv, turnId, replyTo, model) {
    let t = conv.byTurn.get(turnId);
    if (!t) {
      t = { message_id: turnId, conversation_id: conv.id, role: 'assistant', content: '', status: 'queued',
        turn_id: turnId, reply_to: replyTo, model, seq: 0 };
      addItem(conv, t);
    }
    return t;
  }

  _onStart(conv, f) {
    const t = this._turnItem(conv, f.turn_id, f.reply_to, f.model);
    delete t.pending;
    if (!isTerminal(t.status)) {
      t.status = 'streaming';
      conv.active = t.turn_id;
    }
    t.reply_to = f.reply_to;
    t.model = f.model;
    this._emit('turn', { conversationId: conv.id, turn: t, phase: 'start' });
  }

  /** _turn is the model of turn id in conv: listed, or the detached one a resume finishes. */
  _turn(conv, id) {
    return conv.byTurn.get(id) ?? (conv.detached?.turn_id === id ? conv.detached : undefined);
  }

  _onDelta(conv, f) {
    const from = f.from ?? f.seq;
    let t = this._turn(conv, f.turn_id);
    if (!t && from === 1) t = this._turnItem(conv, f.turn_id);
    if (t && (isTerminal(t.status) || t.seq == null)) return; // already have all of it
    const last = t ? t.seq : 0;
    if (t && from === last + 1) {
      t.content += f.text;
      t.seq = f.seq;
      t.status = 'streaming';
      delete t.pending;
      if (t !== conv.detached) conv.active = t.turn_id;
      this._emit('turn', { conversationId: conv.id, turn: t, phase: 'delta' });
      return;
    }
    if (t && f.seq <= last) return; // a repeat of what we applied
    this._gap(conv, f.turn_id, last + 1, from);
  }

  _onEnd(conv, f) {
    const t = this._turn(conv, f.turn_id);
    if (t && (isTerminal(t.status) || t.seq == null)) return;
    if (t === conv.detached) {
      // Its deltas may have expired (past the server's retention): then
      // only the end comes, and the whole text is in the history.
      conv.detached = null;
    } else if (!t || f.seq > t.seq) {
      this._gap(conv, f.turn_id, (t?.seq ?? 0) + 1, f.seq);
      return;
    }
    t.status = f.status;
    if (f.error) t.error = f.error;
    if (f.usage) t.usage = f.usage;
    delete t.pending;
    delete t.cancelling;
    if (conv.active === t.turn_id) conv.active = null;
    this._emit('turn', { conversationId: conv.id, turn: t, phase: 'end' });
  }

  _gap(conv, turnId, expected, got) {
    this._emit('gap', { conversationId: conv.id, turnId, expected, got });
    const t = this._turn(conv, turnId);
    this._sendJoin(conv, t && t.seq > 0 ? { turn_id: turnId, seq: t.seq } : false);
  }
}

function newConversation(id, history) {
  return { id, history, items: [], byMessage: new Map(), byTurn: new Map(), active: null, hasMore: false, loadingOlder: null,
    joined: false, joining: false, joinId: null, joinAfter: null, detached: null, waiters: [], refusedJoin: null, everJoined: false,
    joinRetries: 0, joinTimer: null };
}

function sameItem(a, b) {
  return a.role === b.role && (a.role === 'assistant' ? a.turn_id === b.turn_id : a.message_id === b.message_id);
}

function addItem(conv, item) {
  conv.items.push(item);
  if (item.role === 'assistant') conv.byTurn.set(item.turn_id, item);
  else conv.byMessage.set(item.message_id, item);
}

function removeItem(conv, item) {
  conv.items = conv.items.filter((i) => i !== item);
  const assistant = item.role === 'assistant';
  const [index, key] = assistant ? [conv.byTurn, item.turn_id] : [conv.byMessage, item.message_id];
  if (index.get(key) !== item) return;
  index.delete(key);
  // Another item with the same id (the stored message a retry repeated)
  // takes its place in the index.
  const other = conv.items.find((i) => (i.role === 'assistant') === assistant && (assistant ? i.turn_id : i.message_id) === key);
  if (other) index.set(key, other);
}
