// The chat page: a conversation list, the messages of one conversation with
// the streaming answer rendered as Markdown, and a composer. All protocol
// work is in client.js; this file only renders its model.
import { TokenRelayClient, TERMINAL, newId } from './client.js';
import { Marked } from './vendor/marked.esm.js';
import DOMPurify from './vendor/purify.es.js';

const $ = (id) => document.getElementById(id);
const ui = {
  sidebar: $('sidebar'), scrim: $('scrim'), openSidebar: $('open-sidebar'), closeSidebar: $('close-sidebar'),
  newChat: $('new-chat'), list: $('conversations'), title: $('title'),
  connection: $('connection'), connectionLabel: $('connection-label'),
  scroller: $('scroller'), older: $('older'), log: $('log'), empty: $('empty'),
  announcer: $('announcer'), alert: $('alert'), alertText: $('alert-text'), alertClose: $('alert-close'),
  form: $('composer'), input: $('input'), send: $('send'), stop: $('stop'),
};

const ID_RE = /^[A-Za-z0-9_.:-]{1,128}$/;
const STORAGE_KEY = 'tokenrelay.conversation';

// ---- Markdown, safely ----------------------------------------------------

const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);

// Raw HTML in an answer is shown as text, never interpreted; DOMPurify then
// removes anything unsafe that Markdown itself could produce (javascript:
// links and the like). A Markdown image becomes a link to it: an answer is
// steered by its prompt, and an image would be fetched at once, carrying
// whatever its URL's query holds to any host (the page's
// Content-Security-Policy blocks that too).
const markdown = new Marked({ gfm: true, breaks: true, renderer: {
  html: ({ text }) => escapeHtml(text),
  image: ({ href, title, text }) => `<a class="image-link" href="${escapeHtml(href)}"${title ? ` title="${escapeHtml(title)}"` : ''}>${escapeHtml(text || href)}</a>`,
} });

DOMPurify.addHook('afterSanitizeAttributes', (node) => {
  if (node.tagName === 'A' && node.hasAttribute('href')) {
    node.setAttribute('target', '_blank');
    node.setAttribute('rel', 'noopener noreferrer nofollow');
  }
});

/**
 * showMarkdown renders text into el as Markdown; should that fail (marked
 * throws "Maximum call stack size exceeded" on a few thousand nested block
 * quotes, say), the message is shown as plain text instead, and nothing
 * else on the page is affected.
 */
function showMarkdown(el, text) {
  try {
    renderMarkdown(el, text);
    el.classList.remove('plain');
  } catch {
    el.textContent = text;
    el.classList.add('plain');
  }
}

const sanitizeOptions = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ['style', 'form', 'button', 'textarea', 'select', 'iframe', 'img', 'picture', 'video', 'audio', 'source'],
  FORBID_ATTR: ['style'],
};
const blockHtml = (text) => DOMPurify.sanitize(markdown.parse(text), sanitizeOptions);
const inlineHtml = (text) => DOMPurify.sanitize(markdown.parseInline(text), sanitizeOptions);

/** fragment turns sanitized HTML into nodes, code blocks dressed with their bar. */
function fragment(html) {
  const t = document.createElement('template');
  t.innerHTML = html;
  for (const code of t.content.querySelectorAll('pre > code')) {
    const pre = code.parentElement;
    const block = codeBlock(/language-([\w+#.-]+)/.exec(code.className)?.[1] ?? '');
    pre.replaceWith(block);
    block.append(pre);
  }
  return t.content;
}

// Code blocks get a bar with their language and a Copy button; the
// elements are made here, after sanitizing, from the class marked set.
function codeBlock(lang) {
  const block = document.createElement('div');
  block.className = 'codeblock';
  const bar = document.createElement('div');
  bar.className = 'codebar';
  const label = document.createElement('span');
  label.textContent = lang || 'code';
  const copy = document.createElement('button');
  copy.type = 'button';
  copy.className = 'copy';
  copy.textContent = 'Copy';
  copy.setAttribute('aria-label', lang ? `Copy ${lang} code` : 'Copy code');
  bar.append(label, copy);
  block.append(bar);
  return block;
}

/** showStreaming renders a growing answer incrementally, or as plain text once that failed. */
function showStreaming(el, body, text) {
  if (el._stream === false) {
    body.textContent = text;
    return;
  }
  try {
    el._stream ??= new Streamed(body);
    el._stream.update(text);
    body.classList.remove('plain');
  } catch {
    el._stream = false;
    body.textContent = text;
    body.classList.add('plain');
  }
}

function renderMarkdown(el, text) {
  el.replaceChildren(fragment(blockHtml(text)));
}

// ---- the answer being written ---------------------------------------------

const PART_CHARS = 2000;
const FENCE = /^ {0,3}(`{3,}|~{3,})(.*)$/;
// A line that may start something other than a paragraph.
const BLOCK_START = /^( {4}| {0,3}(#{1,6}(\s|$)|>|[-*+](\s|$)|\d{1,9}[.)](\s|$)|`{3}|~{3}|\||[-_*=]{3,}|<))/;

/**
 * Streamed renders an answer while it is written, in time proportional to
 * what arrived rather than to the whole text. The text only grows, and a
 * block that a blank line (outside a code fence) or a closing fence has
 * ended renders the same whatever follows, near enough (the one exact
 * render when the turn ends settles the rest: loose lists, references). So
 * finished blocks are rendered once and their DOM kept — a selection, a
 * link or a Copy button in them survives the next frame — and only the
 * last block is rendered again, cheaply when it is one long paragraph (its
 * finished sentences are kept) or an open code fence (its text is
 * appended).
 */
class Streamed {
  constructor(body) {
    this.body = body;
    this.reset();
  }

  reset() {
    this.text = '';
    this.done = 0; // text before this offset is in finished blocks
    this.scan = { pos: 0, fence: null, end: 0 }; // line scanner state
    this.tail = []; // nodes of the last block
    this.mode = null; // how the tail is rendered: {kind: 'para'|'fence', …}
    this.body.replaceChildren();
  }

  update(text) {
    if (!text.startsWith(this.text)) this.reset(); // not a continuation: start again
    this.text = text;
    this.scanLines();
    if (this.scan.end > this.done) {
      this.clearTail();
      this.body.append(fragment(blockHtml(text.slice(this.done, this.scan.end))));
      this.done = this.scan.end;
    }
    this.renderTail(text.slice(this.done));
  }

  /** scanLines reads the complete lines that arrived and moves scan.end past every finished block. */
  scanLines() {
    const sc = this.scan;
    const text = this.text;
    for (;;) {
      const nl = text.indexOf('\n', sc.pos);
      if (nl < 0) return;
      const line = text.slice(sc.pos, nl);
      sc.pos = nl + 1;
      if (sc.fence) {
        const m = FENCE.exec(line);
        if (m && m[1][0] === sc.fence[0] && m[1].length >= sc.fence.length && !m[2].trim()) {
          sc.fence = null;
          sc.end = sc.pos;
        }
      } else if (!line.trim()) {
        sc.end = sc.pos;
      } else {
        const m = FENCE.exec(line);
        if (m && !(m[1][0] === '`' && m[2].includes('`'))) sc.fence = m[1];
      }
    }
  }

  clearTail() {
    for (const n of this.tail) n.remove();
    this.tail = [];
    this.mode = null;
  }

  renderTail(tail) {
    const text = tail.replace(/^\n+/, '');
    if (!text) return this.clearTail();
    const nl = text.indexOf('\n');
    const fence = nl > 0 && this.scan.fence && FENCE.exec(text.slice(0, nl));
    if (fence) return this.renderFence(text, nl, fence);
    if (nl < 0 && !BLOCK_START.test(text)) return this.renderParagraph(text);
    this.clearTail();
    const nodes = fragment(blockHtml(text));
    this.tail = [...nodes.childNodes];
    this.body.append(nodes);
  }

  /** renderFence shows an open code fence, appending what arrived to its text. */
  renderFence(text, nl, fence) {
    let m = this.mode;
    if (m?.kind !== 'fence' || m.start !== this.done) {
      this.clearTail();
      const lang = fence[2].trim().split(/\s+/)[0];
      const block = codeBlock(lang);
      const pre = document.createElement('pre');
      const code = document.createElement('code');
      if (lang) code.className = `language-${lang}`;
      pre.append(code);
      block.append(pre);
      this.body.append(block);
      this.tail = [block];
      m = this.mode = { kind: 'fence', start: this.done, code, shown: '' };
    }
    const content = text.slice(nl + 1);
    if (content.startsWith(m.shown) && m.code.firstChild) m.code.firstChild.appendData(content.slice(m.shown.length));
    else m.code.textContent = content;
    m.shown = content;
  }

  /**
   * renderParagraph shows a paragraph that is still being written: its
   * text up to the last sentence end where no emphasis, code span or link
   * is open is rendered once; only the rest is rendered each frame.
   */
  renderParagraph(text) {
    let m = this.mode;
    if (m?.kind !== 'para' || m.start !== this.done) {
      this.clearTail();
      const p = document.createElement('p');
      this.body.append(p);
      this.tail = [p];
      m = this.mode = { kind: 'para', start: this.done, p, live: [], committed: 0, partStart: 0, safe: 0, pos: 0,
        ticks: 0, stars: 0, unders: 0, tildes: 0, brackets: 0, parens: 0, link: false };
    }
    // Look for safe ends among the characters that arrived (all but the
    // last, whose neighbour decides whether an underscore is inside a word).
    for (; m.pos < text.length - 1; m.pos++) {
      const c = text[m.pos];
      switch (c) {
        case '\\': m.pos++; break;
        case '`': m.ticks++; break;
        case '*': m.stars++; break;
        case '~': m.tildes++; break;
        case '_': if (!(/\w/.test(text[m.pos - 1] ?? '') && /\w/.test(text[m.pos + 1]))) m.unders++; break;
        case '[': m.brackets++; break;
        case ']': m.brackets--; m.link = true; break;
        case '(': m.parens++; break;
        case ')': m.parens--; break;
        case ' ':
          if (/[.!?;:,]/.test(text[m.pos - 1]) && !(m.ticks % 2) && !(m.stars % 2) && !(m.unders % 2) &&
              !(m.tildes % 2) && !m.brackets && (!m.link || !m.parens)) {
            m.safe = m.pos + 1;
            m.ticks = m.stars = m.unders = m.tildes = m.parens = 0;
            m.link = false;
          }
      }
    }
    for (const n of m.live) n.remove();
    if (m.safe > m.committed) {
      m.p.append(fragment(inlineHtml(text.slice(m.committed, m.safe))));
      m.committed = m.safe;
      if (m.committed - m.partStart > PART_CHARS) {
        // The browser lays a paragraph out again in full when it grows, so
        // a long one is shown in parts (sentence ends starting a line)
        // until the exact render at the end joins them.
        m.p.classList.add('part');
        m.p = document.createElement('p');
        this.body.append(m.p);
        this.tail.push(m.p);
        m.partStart = m.committed;
      }
    }
    const live = fragment(inlineHtml(text.slice(m.committed)));
    m.live = [...live.childNodes];
    m.p.append(live);
  }
}

// ---- state ---------------------------------------------------------------

const token = localStorage.getItem('tokenrelay.token') || undefined;
const client = new TokenRelayClient({ token });
let current = null; // the conversation on screen
let conversations = []; // from GET /v1/conversations
let joinedOnce = false;
const elements = new Map(); // item key → <article>
const isTerminal = (s) => TERMINAL.includes(s);
const keyOf = (item) => (item.role === 'assistant' ? `t:${item.turn_id}` : `m:${item.message_id}`);

// Exposed for debugging and the browser tests.
window.tokenrelay = { client, get conversationId() { return current; } };

// ---- rendering -----------------------------------------------------------

let frameRaf = 0;
let frameTimer = 0;
let forceScroll = false;
/** schedule re-renders on the next animation frame, so a burst of deltas costs one Markdown render. */
function schedule() {
  if (frameRaf || frameTimer) return;
  // Hidden tabs get no animation frames; a timer keeps them current.
  if (document.hidden) frameTimer = setTimeout(flush, 200);
  else frameRaf = requestAnimationFrame(flush);
}
function flush() {
  cancelAnimationFrame(frameRaf);
  clearTimeout(frameTimer);
  frameRaf = frameTimer = 0;
  render();
}

// Whether the view follows the end of the conversation as it grows. The
// person decides: any scroll up that the page did not make (wheel,
// touch, keys, the scroll bar) lets go; reaching the bottom again follows
// (or nearly: a smooth scroll to the end aims at where the end was when
// it started).
let following = true;
let lastScrollTop = 0;
ui.scroller.addEventListener('scroll', () => {
  const s = ui.scroller;
  const gap = s.scrollHeight - s.scrollTop - s.clientHeight;
  if (gap <= 2) following = true;
  else if (s.scrollTop < lastScrollTop - 1) following = false;
  else if (s.scrollTop > lastScrollTop && gap < 80) following = true;
  // Scrolled up to near the top: the messages before come next.
  if (s.scrollTop < lastScrollTop && s.scrollTop < 200) loadOlder();
  lastScrollTop = s.scrollTop;
}, { passive: true });

/** loadOlder adds the messages before the oldest one shown, keeping what is on screen in place. */
async function loadOlder() {
  const id = current;
  const conv = client.conversation(id);
  if (!conv?.joined || !conv.hasMore || conv.loadingOlder) return;
  ui.older.disabled = true;
  ui.older.textContent = 'Loading older messages…';
  try {
    await client.loadOlder(id);
  } catch (err) {
    showAlert(unreachable(err) ? `Could not load older messages. ${describe(err)}` : describe(err), 0, unreachable(err));
  }
  ui.older.disabled = false;
  ui.older.textContent = 'Load older messages';
  if (id !== current) return;
  const s = ui.scroller;
  const anchor = ui.log.firstElementChild;
  const before = anchor?.getBoundingClientRect().top;
  following = false;
  flush();
  if (anchor?.isConnected) s.scrollTop += anchor.getBoundingClientRect().top - before;
  lastScrollTop = s.scrollTop;
}
ui.older.addEventListener('click', loadOlder);
// A wheel turned up lets go at once, before the scroll it causes is seen.
ui.scroller.addEventListener('wheel', (e) => {
  if (e.deltaY < 0) following = false;
}, { passive: true });

function render() {
  const conv = current && client.conversation(current);
  const s = ui.scroller;
  if (forceScroll) following = true;
  const stick = following;
  if (conv) {
    const seen = new Set();
    let prev = null;
    for (const item of conv.items) {
      const key = keyOf(item);
      seen.add(key);
      let el = elements.get(key);
      if (!el) {
        el = createMessage(item);
        elements.set(key, el);
      }
      updateMessage(el, item);
      const next = prev ? prev.nextElementSibling : ui.log.firstElementChild;
      if (next !== el) ui.log.insertBefore(el, next);
      prev = el;
    }
    for (const [key, el] of elements) {
      if (!seen.has(key)) {
        el.remove();
        elements.delete(key);
      }
    }
    ui.empty.hidden = !(conv.joined || joinedOnce) || conv.items.length > 0;
  }
  ui.older.hidden = !(conv?.joined && conv.hasMore);
  if (stick && s.scrollHeight - s.scrollTop - s.clientHeight > 0) {
    s.scrollTop = s.scrollHeight;
    lastScrollTop = s.scrollTop;
  }
  forceScroll = false;
  updateComposer();
  updateTitle();
}

function createMessage(item) {
  const el = document.createElement('article');
  el.className = `msg ${item.role}`;
  if (item.role === 'assistant') {
    el.dataset.turnId = item.turn_id;
    el.setAttribute('aria-label', 'Answer');
    el.innerHTML = '<div class="avatar logo" aria-hidden="true"></div><div class="content"><div class="body"></div><div class="meta" hidden></div></div>';
  } else {
    el.dataset.messageId = item.message_id;
    el.setAttribute('aria-label', 'You said');
    el.innerHTML = '<div class="body"></div>';
  }
  return el;
}

function updateMessage(el, item) {
  const body = el.querySelector('.body');
  if (item.role !== 'assistant') {
    if (el._content !== item.content) body.textContent = item.content; // never HTML
    el._content = item.content;
    el.classList.toggle('pending', !!item.pending);
    return;
  }
  const running = !isTerminal(item.status);
  if (el._content === item.content && el._status === item.status && el._cancelling === !!item.cancelling) return;
  if (el._content !== item.content || el._status !== item.status) {
    if (item.content && running) showStreaming(el, body, item.content);
    else if (item.content) {
      // The one exact render, of the whole text, once the answer is done.
      el._stream = null;
      showMarkdown(body, item.content);
    } else if (running) body.innerHTML = '<span class="typing" role="img" aria-label="Writing…"><i></i><i></i><i></i></span>';
    else body.textContent = '';
  }
  el._content = item.content;
  el._status = item.status;
  el._cancelling = !!item.cancelling;
  el.dataset.status = item.status;
  el.classList.toggle('streaming', running);
  // The streaming answer, with its status note (Stopped, Interrupted, the
  // model's error), is a polite live region; aria-busy holds the
  // announcement until the answer has ended, since the last block is
  // rendered again on each frame.
  const live = el.querySelector('.content');
  if (running) {
    live.setAttribute('aria-live', 'polite');
    live.setAttribute('aria-busy', 'true');
  } else if (live.hasAttribute('aria-live')) {
    live.setAttribute('aria-busy', 'false');
  }
  const meta = el.querySelector('.meta');
  const note = statusNote(item);
  meta.hidden = !note;
  meta.textContent = note;
}

function statusNote(item) {
  if (item.cancelling && !isTerminal(item.status)) return 'Stopping…';
  switch (item.status) {
    case 'cancelled': return 'Stopped';
    case 'interrupted': return 'Interrupted: the answer was cut off because the server or its model worker went away.';
    case 'error': return `The model could not finish this answer${item.error ? `: ${item.error}` : '.'}`;
    default: return '';
  }
}

function activeTurn() {
  const conv = current && client.conversation(current);
  const t = conv?.active && conv.byTurn.get(conv.active);
  return t && !isTerminal(t.status) ? t : null;
}

function updateComposer() {
  const t = activeTurn();
  const hadFocus = document.activeElement === ui.stop || document.activeElement === ui.send;
  ui.stop.hidden = !t;
  ui.send.hidden = !!t;
  ui.send.disabled = !ui.input.value.trim();
  ui.stop.setAttribute('aria-disabled', t?.cancelling ? 'true' : 'false');
  if (hadFocus && document.activeElement === document.body) ui.input.focus();
}

function updateTitle() {
  const c = conversations.find((x) => x.conversation_id === current);
  let title = c?.title;
  if (!title) {
    const first = client.conversation(current)?.items.find((i) => i.role === 'user');
    title = first?.content;
  }
  title = (title || 'New chat').split('\n')[0].slice(0, 120);
  if (ui.title.textContent !== title) ui.title.textContent = title;
  const doc = title === 'New chat' ? 'tokenrelay' : `${title} · tokenrelay`;
  if (document.title !== doc) document.title = doc;
}

// ---- conversation list ---------------------------------------------------

const BUSY_POLL_MS = 2000;
const LIST_MAX = 1000; // the most conversations the server lists at once
let listTimer = 0;
let listLimit = 100; // raised by "Show more"
let listHasMore = false;
function refreshList(delay = 0) {
  clearTimeout(listTimer);
  listTimer = setTimeout(async () => {
    try {
      ({ conversations, hasMore: listHasMore } = await client.listConversationsPage({ limit: listLimit }));
    } catch {
      return; // offline: keep what we have
    }
    renderList();
    updateTitle();
    // A conversation not on screen sends no events here: while one shows
    // an answer running, look again, so its busy dot goes when it ends.
    if (conversations.some((c) => c.active_turn_id && c.conversation_id !== current)) refreshList(BUSY_POLL_MS);
  }, delay);
}

let armedDelete = null; // the conversation whose delete button awaits its second click
let armTimer = 0;
function arm(del) {
  del.classList.add('confirm');
  del.append('Delete?');
  del.setAttribute('aria-label', 'Press again to delete this conversation');
}

function renderList() {
  // A refresh replaces the rows: focus on one of them (a keyboard user
  // going through the list) moves to its new self instead of the page.
  const had = ui.list.contains(document.activeElement) ? document.activeElement : null;
  const focusId = had?.closest('li')?.dataset.id;
  const focusDelete = !!had?.classList.contains('delete');
  const shown = conversations.filter((c) => c.title || c.conversation_id === current);
  if (!shown.some((c) => c.conversation_id === current)) {
    shown.unshift({ conversation_id: current, title: '' });
  }
  ui.list.replaceChildren(...shown.map((c) => {
    const li = document.createElement('li');
    li.dataset.id = c.conversation_id;
    const title = c.title || 'New chat';
    if (c.conversation_id === current) li.classList.add('current');
    const a = document.createElement('a');
    a.href = `#${c.conversation_id}`;
    a.textContent = title;
    a.title = title;
    // The conversation on screen knows its answer's state first-hand.
    if (c.conversation_id === current ? activeTurn() : c.active_turn_id) {
      // The dot is drawn by CSS; its words are for screen readers.
      a.classList.add('busy');
      const note = document.createElement('span');
      note.className = 'visually-hidden';
      note.textContent = ', answer being written';
      a.append(note);
    }
    if (c.conversation_id === current) a.setAttribute('aria-current', 'page');
    const del = document.createElement('button');
    del.type = 'button';
    del.className = 'delete';
    del.setAttribute('aria-label', `Delete conversation: ${title}`);
    del.innerHTML = '<svg viewBox="0 0 24 24" aria-hidden="true"><path d="M4 7h16M10 11v6M14 11v6M6 7l1 12a2 2 0 002 2h6a2 2 0 002-2l1-12M9 7V4h6v3"/></svg>';
    if (c.conversation_id === armedDelete) arm(del);
    li.append(a, del);
    return li;
  }));
  if (!shown.length) ui.list.innerHTML = '<li class="none">No conversations yet</li>';
  if (listHasMore && listLimit < LIST_MAX) {
    const li = document.createElement('li');
    li.className = 'more';
    const more = document.createElement('button');
    more.type = 'button';
    more.textContent = 'Show more';
    more.addEventListener('click', () => {
      listLimit = Math.min(listLimit * 2, LIST_MAX);
      more.disabled = true;
      refreshList(0);
    });
    li.append(more);
    ui.list.append(li);
  }
  if (had && !ui.list.contains(document.activeElement)) {
    const li = [...ui.list.children].find((x) => x.dataset.id === focusId);
    (li?.querySelector(focusDelete ? '.delete' : 'a') ?? ui.newChat).focus();
  }
}

ui.list.addEventListener('click', async (e) => {
  const del = e.target.closest('.delete');
  if (del) {
    const id = del.closest('li').dataset.id;
    // Two clicks: the first arms the button (for 4 s, across refreshes of
    // the list), the second deletes.
    if (!del.classList.contains('confirm')) {
      armedDelete = id;
      clearTimeout(armTimer);
      armTimer = setTimeout(() => { armedDelete = null; renderList(); }, 4000);
      arm(del);
      return;
    }
    armedDelete = null;
    clearTimeout(armTimer);
    try {
      await client.deleteConversation(id);
    } catch (err) {
      if (err?.code !== 'not_found') {
        // Not deleted: stay where we are, and say why.
        showAlert(err?.code === 'unavailable'
          ? 'The conversation was not deleted: the server cannot be reached. Try again in a moment.'
          : `The conversation was not deleted. ${describe(err)}`);
        renderList();
        return;
      }
    }
    conversations = conversations.filter((c) => c.conversation_id !== id);
    if (id === current) {
      current = null;
      const next = conversations.find((c) => c.title);
      go(next ? next.conversation_id : newId('c'), true);
    }
    renderList();
    refreshList(200);
    return;
  }
  if (e.target.closest('a')) closeSidebar();
});

// ---- switching -----------------------------------------------------------

function idFromHash() {
  let h;
  try {
    h = decodeURIComponent(location.hash.slice(1));
  } catch {
    return null; // a stray % (#100%): no id, as an invalid one
  }
  return ID_RE.test(h) ? h : null;
}

/** go shows conversation id, joining it; replace updates the URL without a history entry. */
function go(id, replace = false) {
  if (location.hash.slice(1) !== id) {
    if (replace) history.replaceState(null, '', `#${id}`);
    else history.pushState(null, '', `#${id}`);
  }
  open(id);
}

function open(id) {
  if (id === current) return;
  if (current) client.leave(current);
  current = id;
  localStorage.setItem(STORAGE_KEY, id);
  elements.clear();
  ui.log.replaceChildren();
  ui.empty.hidden = true;
  // An alert about the connection (too many open, say) still holds in
  // the next conversation; it goes when the connection is back.
  if (!alertAboutConnection) hideAlert();
  forceScroll = true;
  client.join(id).then(() => {
    joinedOnce = true;
    forceScroll = true;
    schedule();
  }, () => {});
  renderList();
  refreshList(100); // the one left may still have an answer running
  render();
}

window.addEventListener('hashchange', () => {
  const id = idFromHash();
  if (id) open(id);
});

ui.newChat.addEventListener('click', () => {
  const conv = client.conversation(current);
  if (conv && conv.items.length === 0) {
    closeSidebar();
    ui.input.focus();
    return;
  }
  go(newId('c'));
  closeSidebar();
  ui.input.focus();
});

// ---- composer ------------------------------------------------------------

function autosize() {
  ui.input.style.height = 'auto';
  ui.input.style.height = `${ui.input.scrollHeight}px`;
}

function submit() {
  const text = ui.input.value;
  if (!text.trim()) return;
  const running = activeTurn();
  if (running) {
    // One answer at a time: the text stays in the composer, to be sent
    // once this answer ends, and the person is told why nothing went.
    showAlert(describe({ code: 'turn_active' }), 0, false, running.turn_id);
    return;
  }
  hideAlert();
  ui.input.value = '';
  autosize();
  forceScroll = true;
  const conv = current;
  const { ack } = client.send(conv, text);
  ack.catch((err) => {
    if (conv !== current) {
      // Refused after the page moved on (it waited for the connection):
      // its text does not belong in this conversation's composer.
      showAlert(`Your message "${clip(text, 60)}" in another conversation was not sent. ${describe(err)}`);
      return;
    }
    // Nothing was stored: give the text back so it can be fixed and re-sent.
    if (!ui.input.value) {
      ui.input.value = text;
      autosize();
      updateComposer();
    }
  });
  refreshList(300);
}

function stop() {
  const t = activeTurn();
  if (!t || t.cancelling) return;
  client.cancel(t.turn_id).catch(() => {});
}

ui.form.addEventListener('submit', (e) => {
  e.preventDefault();
  submit();
});
ui.input.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey && !e.isComposing && !e.altKey && !e.ctrlKey && !e.metaKey) {
    e.preventDefault();
    submit();
  }
});
ui.input.addEventListener('input', () => {
  autosize();
  updateComposer();
});
// Stop takes Send's place as soon as a message goes: the second click of a
// double-click on Send lands on Stop and must not stop the answer it just
// asked for. Only that click is let go: the second of a pair (click count
// 2) whose first one sent, on the same spot, soon after. The browser counts
// clicks up to the system's double-click time, which can be set to seconds;
// a Stop clicked after DOUBLE_CLICK_MS, or clicked again (count 3 and up),
// is meant.
const DOUBLE_CLICK_MS = 500;
let sendClick = null; // {x, y, at} of the last click on Send that was the first of its sequence
ui.send.addEventListener('click', (e) => {
  sendClick = e.detail === 1 ? { x: e.clientX, y: e.clientY, at: e.timeStamp } : null;
});
ui.stop.addEventListener('click', (e) => {
  const c = sendClick;
  sendClick = null;
  if (e.detail === 2 && c && e.timeStamp - c.at < DOUBLE_CLICK_MS &&
      Math.abs(e.clientX - c.x) <= 4 && Math.abs(e.clientY - c.y) <= 4) return;
  stop();
});
document.addEventListener('keydown', (e) => {
  if (e.key !== 'Escape' || e.isComposing) return;
  if (ui.sidebar.classList.contains('open')) {
    closeSidebar();
    ui.openSidebar.focus();
  } else if (activeTurn()) {
    e.preventDefault();
    stop();
  }
});
ui.log.addEventListener('click', (e) => {
  const btn = e.target.closest('.codeblock .copy');
  if (!btn) return;
  const code = btn.closest('.codeblock').querySelector('pre code');
  navigator.clipboard?.writeText(code.textContent).then(() => {
    btn.textContent = 'Copied';
    setTimeout(() => { btn.textContent = 'Copy'; }, 1500);
  }, () => {});
});

// ---- sidebar on narrow screens --------------------------------------------

// Open, the list is a modal: focus moves into it and stays there (the
// rest of the page is inert) until it is closed (Esc, the scrim, ×).
const behindSidebar = [document.querySelector('main'), document.querySelector('.skip')];
function openSidebar() {
  ui.sidebar.classList.add('open');
  ui.scrim.hidden = false;
  ui.openSidebar.setAttribute('aria-expanded', 'true');
  for (const el of behindSidebar) el.inert = true;
  ui.newChat.focus();
}
function closeSidebar() {
  const wasOpen = ui.sidebar.classList.contains('open');
  ui.sidebar.classList.remove('open');
  ui.scrim.hidden = true;
  ui.openSidebar.setAttribute('aria-expanded', 'false');
  for (const el of behindSidebar) el.inert = false;
  if (wasOpen && ui.sidebar.contains(document.activeElement)) ui.openSidebar.focus();
}
document.addEventListener('keydown', (e) => {
  if (e.key !== 'Tab' || !ui.sidebar.classList.contains('open')) return;
  const items = [...ui.sidebar.querySelectorAll('a[href], button:not([disabled])')].filter((el) => el.getClientRects().length);
  if (!items.length) return;
  const inside = ui.sidebar.contains(document.activeElement);
  const edge = e.shiftKey ? items[0] : items.at(-1);
  if (!inside || document.activeElement === edge) {
    e.preventDefault();
    (e.shiftKey ? items.at(-1) : items[0]).focus();
  }
});
matchMedia('(min-width: 761px)').addEventListener('change', (e) => { if (e.matches) closeSidebar(); });
ui.openSidebar.addEventListener('click', openSidebar);
ui.closeSidebar.addEventListener('click', closeSidebar);
ui.scrim.addEventListener('click', closeSidebar);

// ---- errors and connection -----------------------------------------------

let alertTimer = 0;
let alertAboutConnection = false; // the alert shown is about the connection, and ends with it
let alertTurn = null; // the running answer a turn_active or failed-Stop alert is about, which ends it
let alertJoin = null; // the conversation whose failed join the alert is about, which joining ends
function showAlert(text, ms = 0, connection = false, turn = null, join = null) {
  clearTimeout(alertTimer);
  alertAboutConnection = connection;
  alertTurn = turn;
  alertJoin = join;
  ui.alertText.textContent = text;
  ui.alert.hidden = false;
  if (ms) alertTimer = setTimeout(hideAlert, ms);
}
function hideAlert() {
  clearTimeout(alertTimer);
  ui.alert.hidden = true;
}
ui.alertClose.addEventListener('click', () => {
  hideAlert();
  ui.input.focus();
});

/** describe turns an error (a ClientError or an `error` event's detail) into words for a person. */
function describe(e) {
  if (e.request === 'join' && e.code === 'unavailable') {
    return 'This conversation could not be loaded just now. Trying again…'; // the client does
  }
  if (e.request === 'cancel' && (e.code === 'unavailable' || e.code === 'internal')) {
    // The answer goes on, and Stop is offered again (the client clears its mark).
    return 'The answer could not be stopped just now. Press Stop to try again.';
  }
  switch (e.code) {
    case 'rate_limited': {
      const s = retryDelay(e) ? Math.max(1, Math.ceil(e.retryAfterMs / 1000)) : 0;
      const retry = s ? ` Try again in ${s} second${s === 1 ? '' : 's'}.` : '';
      // The send-rate limit is said in the page's words; any other limit
      // (answers running at once, conversations joined) in the server's.
      if (/too many messages|slow down/i.test(e.message ?? '')) return `You are sending messages too quickly.${retry}`;
      const reason = (e.message || 'too many requests').replace(/[.\s]+$/, '');
      return `${reason[0].toUpperCase()}${reason.slice(1)}.${retry}`;
    }
    case 'too_large': return 'That message is too long to send. Shorten it and try again.';
    case 'turn_active': return 'An answer is still being written in this conversation. Wait for it to finish, or press Stop.';
    case 'unavailable':
      // The client's own words when the request never reached the server.
      if (unreachable(e)) return 'The server cannot be reached. Check your connection; the page reconnects by itself.';
      return 'The model is not available right now. Try again in a moment.';
    case 'unauthorized': return 'You are not signed in, or your session expired. Reload the page to sign in again.';
    case 'forbidden': return 'This conversation belongs to someone else.';
    case 'not_found': return 'That conversation or answer no longer exists.';
    case 'bad_request': return `The server could not accept that: ${e.message}.`;
    default: return `Something went wrong on the server${e.message ? `: ${e.message}` : ''}. Try again.`;
  }
}

/**
 * retryDelay says whether a rate_limited error's retry_after_ms is worth
 * saying: a join refused for the conversations already joined waits on a
 * leave, not on time; one refused as a new conversation waits on time.
 */
function retryDelay(e) {
  return e.code === 'rate_limited' && !!e.retryAfterMs && (e.request !== 'join' || /new conversations/i.test(e.message ?? ''));
}

/** clip shortens text to its first line, at most n characters. */
function clip(text, n) {
  const line = text.trim().split('\n')[0];
  return line.length > n ? `${line.slice(0, n - 1)}…` : line;
}

/** unreachable says whether an `unavailable` error is the client's: no answer came from the server. */
function unreachable(e) {
  return e.code === 'unavailable' && e.status == null && /^(could not reach the server|connection lost|not connected)/.test(e.message ?? '');
}

client.addEventListener('error', (e) => {
  const d = e.detail;
  if (d.request === 'cancel' && d.code === 'not_found') return; // its send failed; already reported
  if (!d.request && d.code === 'not_found' && d.conversationId) {
    // A conversation this page follows was deleted: leave it.
    client.leave(d.conversationId);
    if (d.conversationId !== current) {
      refreshList(0);
      return;
    }
    current = null; // another tab or window deleted the one on screen
    go(newId('c'), true);
    showAlert('This conversation was deleted in another tab or window.');
    refreshList(0);
    return;
  }
  if (d.conversationId && d.conversationId !== current) return;
  // An error that answers no request is about the connection (closed
  // 4009 for too many connections, 4001 for the token).
  showAlert(describe(d), retryDelay(d) ? d.retryAfterMs + 1000 : 0, !d.request, d.code === 'turn_active' || d.request === 'cancel' ? d.turnId ?? null : null,
    d.request === 'join' ? d.conversationId : null);
});

const connectionWords = {
  idle: 'Connecting…', connecting: 'Connecting…', connected: 'Connected',
  reconnecting: 'Reconnecting…', offline: 'Offline', closed: 'Offline',
};
client.addEventListener('status', (e) => {
  const { state } = e.detail;
  ui.connection.dataset.state = state;
  ui.connectionLabel.textContent = connectionWords[state] ?? state;
  ui.connection.title = state === 'reconnecting' && e.detail.retryInMs
    ? `Connection lost; retrying in ${Math.ceil(e.detail.retryInMs / 1000)} s` : '';
  if (state === 'connected') {
    if (alertAboutConnection && !ui.alert.hidden) hideAlert();
    refreshList(100);
  }
});

// A screen reader hears that an answer of the conversation on screen
// started and how it ended: once each per answer, never per delta (the
// answer's own live region is busy until it ends).
const announced = new Set(); // answers whose start was said and whose end is still to say
const endWords = { complete: 'Answer finished.', cancelled: 'Answer stopped.', interrupted: 'Answer interrupted.', error: 'The answer failed.' };
function announceTurn(conversationId, turn, phase) {
  const conv = conversationId === current && client.conversation(conversationId);
  if (!conv || conv.byTurn.get(turn.turn_id) !== turn) return; // not shown
  if (phase === 'end') {
    if (!announced.delete(turn.turn_id)) return;
    ui.announcer.textContent = endWords[turn.status] ?? '';
  } else if (phase !== 'removed' && !isTerminal(turn.status) && !announced.has(turn.turn_id)) {
    announced.add(turn.turn_id);
    ui.announcer.textContent = 'Writing an answer…';
  }
}

client.addEventListener('joined', (e) => {
  schedule();
  const conv = e.detail.conversation;
  const a = conv.active && conv.byTurn.get(conv.active);
  if (a && !isTerminal(a.status)) announceTurn(e.detail.conversationId, a, 'start');
  if (alertJoin && e.detail.conversationId === alertJoin && !ui.alert.hidden) hideAlert();
});
client.addEventListener('message', (e) => {
  schedule();
  if (e.detail.conversationId === current && !e.detail.message.pending) refreshList(100);
});
client.addEventListener('turn', (e) => {
  schedule();
  announceTurn(e.detail.conversationId, e.detail.turn, e.detail.phase);
  if (e.detail.phase === 'end' || e.detail.phase === 'start') refreshList(100);
  // "An answer is still being written" holds until that answer ends.
  if (e.detail.phase === 'end' && alertTurn && e.detail.turn.turn_id === alertTurn && !ui.alert.hidden) hideAlert();
});
document.addEventListener('visibilitychange', () => {
  if (frameTimer && !document.hidden) flush();
});
window.addEventListener('focus', () => refreshList());

// ---- start ---------------------------------------------------------------

client.connect();
const first = idFromHash() ?? (ID_RE.test(localStorage.getItem(STORAGE_KEY) ?? '') ? localStorage.getItem(STORAGE_KEY) : newId('c'));
go(first, true);
refreshList();
autosize();
if (matchMedia('(min-width: 761px)').matches) ui.input.focus();
