package gateway

// The compatibility protocol of COMPAT.md: the original system's WebSocket
// and HTTP paths, served as a translation at the edge over the same turns as
// the native protocol. A compat socket is a [sink] fed by a [view], so it
// inherits the view's gapless, duplicate-free delivery; only the shape of
// the frames differs.
//
// The original page replaces its bubble's text with each frame's content
// (the whole text so far). Building that per frame and per socket would cost
// O(text) per delta per socket, so every gateway keeps one [sharedText] per
// turn that compat sockets watch: the turn's text is appended once per
// delta, each frame is encoded once and the same bytes are queued on every
// socket.

import (
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

// What COMPAT.md prescribes for the text of replies that did not complete.
const (
	// compatCancelledSuffix ends the content of a cancelled reply.
	compatCancelledSuffix = "\n\n[Đã hủy]"
	// compatErrorContent is the whole content of a reply that failed.
	compatErrorContent = "Xin lỗi, đã có lỗi xảy ra khi xử lý yêu cầu của bạn."
)

// Defaults of the original system.
const (
	compatDefaultSession = "default"
	compatDefaultUser    = "default_user"
	// compatHistory is how many of a session's newest messages the history
	// frame and GET /api/history return.
	compatHistory = protocol.MaxHistory
)

// compatFinal is the content the original page shows for a reply that ended
// with status st after producing text: text itself when complete; with
// [compatCancelledSuffix] when cancelled; [compatErrorContent] on error.
// An interrupted reply (its producer died) keeps its text as if complete,
// since the text is good as far as it goes; one that produced nothing shows
// the error sentence rather than an empty bubble. It appends to dst.
func compatFinal(dst []byte, text []byte, st chat.TurnStatus) []byte {
	switch st {
	case chat.StatusCancelled:
		dst = append(dst, text...)
		return append(dst, compatCancelledSuffix...)
	case chat.StatusError:
		return append(dst, compatErrorContent...)
	case chat.StatusInterrupted:
		if len(text) == 0 {
			return append(dst, compatErrorContent...)
		}
	}
	return append(dst, text...)
}

// chatMessage is COMPAT.md's ChatMessage. Empty strings are written as null;
// every key is always present.
type chatMessage struct {
	MessageID string
	SessionID string
	UserID    string
	Role      chat.Role
	Content   []byte
	Chunk     []byte
	Timestamp int64 // Unix ms
	Complete  bool
}

// appendJSON appends m as a JSON object, keys in COMPAT.md's order.
func (m *chatMessage) appendJSON(dst []byte) []byte {
	dst = append(dst, `{"message_id":`...)
	dst = appendNullable(dst, m.MessageID)
	dst = append(dst, `,"session_id":`...)
	dst = appendNullable(dst, m.SessionID)
	dst = append(dst, `,"user_id":`...)
	dst = appendNullable(dst, m.UserID)
	dst = append(dst, `,"role":`...)
	dst = appendNullable(dst, string(m.Role))
	dst = append(dst, `,"content":`...)
	dst = appendNullableBytes(dst, m.Content)
	dst = append(dst, `,"chunk":`...)
	dst = appendNullableBytes(dst, m.Chunk)
	dst = append(dst, `,"timestamp":`...)
	dst = strconv.AppendInt(dst, m.Timestamp, 10)
	dst = append(dst, `,"is_complete":`...)
	dst = strconv.AppendBool(dst, m.Complete)
	return append(dst, '}')
}

// MarshalJSON implements json.Marshaler for the HTTP answers.
func (m chatMessage) MarshalJSON() ([]byte, error) { return m.appendJSON(nil), nil }

func appendNullable(dst []byte, s string) []byte {
	if s == "" {
		return append(dst, "null"...)
	}
	return protocol.AppendJSONString(dst, []byte(s))
}

func appendNullableBytes(dst []byte, b []byte) []byte {
	if len(b) == 0 {
		return append(dst, "null"...)
	}
	return protocol.AppendJSONString(dst, b)
}

// appendMessageFrame appends {"type":"message","data":m}.
func appendMessageFrame(dst []byte, m *chatMessage) []byte {
	dst = append(dst, `{"type":"message","data":`...)
	dst = m.appendJSON(dst)
	return append(dst, '}')
}

// compatStored translates a stored message for history. It reports false
// for a message that is not finished (the reply in flight), which history
// leaves out.
func compatStored(m protocol.Message, user string) (chatMessage, bool) {
	cm := chatMessage{MessageID: m.MessageID, SessionID: m.ConversationID, UserID: user, Role: m.Role, Complete: true}
	if t, err := parseWireTime(m.CreatedAt); err == nil {
		cm.Timestamp = t
	}
	if m.Role != chat.RoleAssistant {
		cm.Content = []byte(m.Content)
		return cm, true
	}
	if !m.Status.Terminal() {
		return chatMessage{}, false
	}
	cm.Content = compatFinal(nil, []byte(m.Content), m.Status)
	return cm, true
}

// parseWireTime reads a protocol.Message's created_at as Unix ms.
func parseWireTime(s string) (int64, error) {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return 0, err
	}
	return t.UnixMilli(), nil
}

// compatHistoryFrame encodes {"type":"history","messages":[…]} with the
// newest of msgs that fit in budget bytes (0 = all): a history frame must
// not by itself trip the socket's outbound limit.
func compatHistoryFrame(msgs []chatMessage, budget int) []byte {
	enc := make([][]byte, len(msgs))
	first, size := len(msgs), 0
	for i := len(msgs) - 1; i >= 0; i-- {
		enc[i] = msgs[i].appendJSON(nil)
		if budget > 0 && size+len(enc[i])+1 > budget && first < len(msgs) {
			break
		}
		size += len(enc[i]) + 1
		first = i
	}
	dst := make([]byte, 0, size+32)
	dst = append(dst, `{"type":"history","messages":[`...)
	for i, m := range enc[first:] {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(dst, m...)
	}
	return append(dst, "]}"...)
}

// compat serves COMPAT.md for one gateway. It owns the turns' shared texts.
type compat struct {
	s *Server

	mu    sync.Mutex
	texts map[string]*sharedText // turn id → its text; guarded by mu
}

// compatRoutes adds COMPAT.md's paths to mux.
func (s *Server) compatRoutes(mux *http.ServeMux) {
	cp := &compat{s: s, texts: make(map[string]*sharedText)}
	mux.Handle("GET /ws/chat", cp.handleWS())
	mux.Handle("GET /ws/chat/v2", cp.handleWS())
	for _, p := range []string{"/api", ""} {
		cp.handle(mux, "POST", p+"/chat", cp.handleChat())
		cp.handle(mux, "POST", p+"/cancel", cp.handleCancel())
		cp.handle(mux, "GET", p+"/history/{sid}", cp.handleHistory())
		cp.handle(mux, "DELETE", p+"/history/{sid}", cp.handleClearHistory())
		cp.preflight(mux, p+"/chat")
		cp.preflight(mux, p+"/cancel")
		cp.preflight(mux, p+"/history/{sid}")
	}
	cp.handle(mux, "GET", "/api/ai-health", cp.handleAIHealth())
	cp.handle(mux, "GET", "/health", cp.handleHealth())
	cp.handle(mux, "GET", "/health/ready", cp.handleHealthReady())
	cp.handle(mux, "GET", "/health/live", cp.handleHealthLive())
	for _, p := range []string{"/api/ai-health", "/health", "/health/ready", "/health/live"} {
		cp.preflight(mux, p)
	}
}

// acquire returns the shared text of turn, creating it, and counts one more
// holder; every acquire is paired with a release.
func (cp *compat) acquire(turn, conv, user string) *sharedText {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	st := cp.texts[turn]
	if st == nil {
		st = &sharedText{turn: turn, conv: conv, user: user}
		cp.texts[turn] = st
	}
	st.refs++
	return st
}

// release drops a holder of st; the last one forgets the text.
func (cp *compat) release(st *sharedText) {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	st.refs--
	if st.refs <= 0 && cp.texts[st.turn] == st {
		delete(cp.texts, st.turn)
	}
}

// sharedTexts counts the turns whose text is kept (for tests).
func (cp *compat) sharedTexts() int {
	cp.mu.Lock()
	defer cp.mu.Unlock()
	return len(cp.texts)
}

// sharedText is one turn's text as far as any compat socket of this gateway
// has been given it, with the last frame encoded from it. It is a prefix of
// the turn's text: every socket holding it has been given at most len(buf)
// bytes, so a delta a socket receives always starts within buf.
type sharedText struct {
	turn, conv, user string
	refs             int // holders; guarded by compat.mu

	mu  sync.Mutex
	buf []byte // the text; guarded by mu
	// The newest frame encoded, reused by every socket that needs the same
	// one (in the common case all of them, one after the other, from the
	// conversation's subscription). Guarded by mu.
	frame      []byte
	frameOff   int64 // chunk start; -1 for a final frame
	frameN     int64 // content length
	frameState chat.TurnStatus
}

// textGapError reports a delta that starts past the shared text: a socket
// was given text the gateway never kept. It does not happen while the
// invariant of sharedText holds; the socket then resumes.
type textGapError struct{ off, have int64 }

func (e *textGapError) Error() string {
	return "compat text gap: delta at byte " + strconv.FormatInt(e.off, 10) + ", text has " + strconv.FormatInt(e.have, 10)
}

// extendLocked makes text (starting at byte off of the turn's text) part of the
// shared text and returns the length covered after it.
func (st *sharedText) extendLocked(off int64, text string) (int64, error) {
	have := int64(len(st.buf))
	if off > have {
		return 0, &textGapError{off: off, have: have}
	}
	end := off + int64(len(text))
	if end > have {
		st.buf = append(st.buf, text[have-off:]...)
	}
	return end, nil
}

// seed makes a snapshot of the turn's text (its first len(text) bytes) part
// of the shared text.
func (st *sharedText) seed(text string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	_, _ = st.extendLocked(0, text)
}

// delta adds a delta at byte off and returns its frame: content = the text
// up to the delta's end, chunk = the delta. ms stamps a newly encoded frame.
func (st *sharedText) delta(off int64, text string, ms int64) ([]byte, int64, error) {
	st.mu.Lock()
	defer st.mu.Unlock()
	n, err := st.extendLocked(off, text)
	if err != nil {
		return nil, 0, err
	}
	return st.streamFrameLocked(off, n, ms), n, nil
}

// streamFrame returns the frame with content = the first n bytes (n must be
// covered) and chunk = bytes off..n.
func (st *sharedText) streamFrame(off, n int64, ms int64) []byte {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.streamFrameLocked(off, n, ms)
}

func (st *sharedText) streamFrameLocked(off, n int64, ms int64) []byte {
	if st.frame != nil && st.frameOff == off && st.frameN == n {
		return st.frame
	}
	m := chatMessage{MessageID: st.turn, SessionID: st.conv, UserID: st.user, Role: chat.RoleAssistant,
		Content: st.buf[:n], Chunk: st.buf[off:n], Timestamp: ms}
	st.frame = appendMessageFrame(make([]byte, 0, 2*n+256), &m)
	st.frameOff, st.frameN, st.frameState = off, n, ""
	return st.frame
}

// finalFrame returns the last frame of a reply that ended with status
// after n bytes of text.
func (st *sharedText) finalFrame(n int64, status chat.TurnStatus, ms int64) []byte {
	st.mu.Lock()
	defer st.mu.Unlock()
	if n > int64(len(st.buf)) {
		n = int64(len(st.buf))
	}
	if st.frame != nil && st.frameOff == -1 && st.frameN == n && st.frameState == status {
		return st.frame
	}
	st.frame = compatFinalFrame(st.turn, st.conv, st.user, st.buf[:n], status, ms)
	st.frameOff, st.frameN, st.frameState = -1, n, status
	return st.frame
}

// compatFinalFrame encodes the is_complete frame of a reply.
func compatFinalFrame(turn, conv, user string, text []byte, status chat.TurnStatus, ms int64) []byte {
	content := compatFinal(make([]byte, 0, len(text)+len(compatCancelledSuffix)), text, status)
	m := chatMessage{MessageID: turn, SessionID: conv, UserID: user, Role: chat.RoleAssistant,
		Content: content, Timestamp: ms, Complete: true}
	return appendMessageFrame(make([]byte, 0, 2*len(content)+256), &m)
}
