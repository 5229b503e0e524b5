package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/auth"
	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

// compatProbeTimeout bounds the worker and broker checks of the compat
// HTTP paths: the original page waits on them.
const compatProbeTimeout = 2 * time.Second

// handle registers h for method and path with COMPAT.md's CORS (any
// origin).
func (cp *compat) handle(mux *http.ServeMux, method, path string, h http.Handler) {
	mux.Handle(method+" "+path, cp.cors(h))
}

// preflight answers CORS preflight requests for path.
func (cp *compat) preflight(mux *http.ServeMux, path string) {
	mux.Handle("OPTIONS "+path, cp.cors(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusNoContent)
	})))
}

// cors lets browsers of the allowed origins call h: any origin unless
// Config.CompatOrigins names some (as the original services did). A request
// from another origin is refused with 403.
func (cp *compat) cors(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hd := w.Header()
		allowed := cp.s.cfg.CompatOrigins
		switch origin := r.Header.Get("Origin"); {
		case len(allowed) == 0:
			hd.Set("Access-Control-Allow-Origin", "*")
		case origin == "":
		case auth.OriginAllowed(r, allowed):
			hd.Set("Access-Control-Allow-Origin", origin)
			hd.Add("Vary", "Origin")
		default:
			cp.s.m.authFailures.WithLabelValues("origin").Inc()
			cp.writeCompatError(w, &compatError{status: http.StatusForbidden, err: "Forbidden", detail: "origin not allowed"})
			return
		}
		if r.Method == http.MethodOptions {
			hd.Set("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
			hd.Set("Access-Control-Allow-Headers", "Content-Type, Authorization")
			hd.Set("Access-Control-Max-Age", "86400")
		}
		h.ServeHTTP(w, r)
	})
}

// compatError is an error answer of COMPAT.md: {"error","detail"}.
type compatError struct {
	status int
	err    string
	detail string
}

func (e *compatError) Error() string { return e.err + ": " + e.detail }

func compatBadRequest(detail string) *compatError {
	return &compatError{status: http.StatusBadRequest, err: "Bad request", detail: detail}
}

// writeCompatError maps err to COMPAT.md's error shape and status. Internal
// causes are logged, not shown.
func (cp *compat) writeCompatError(w http.ResponseWriter, err error) {
	var ce *compatError
	if !errors.As(err, &ce) {
		pe := asError(err)
		ce = &compatError{status: pe.Code.HTTPStatus(), detail: pe.Message}
		switch pe.Code {
		case protocol.CodeBadRequest:
			ce.err = "Bad request"
		case protocol.CodeUnauthorized:
			ce.err = "Unauthorized"
		case protocol.CodeForbidden:
			ce.err, ce.detail = "Forbidden", "This session belongs to another user"
		case protocol.CodeNotFound:
			ce.err = "Not found"
		case protocol.CodeTurnActive:
			ce.err, ce.detail = "Conflict", "A response is already being generated for this session"
		case protocol.CodeTooLarge:
			ce.err = "Payload too large"
		case protocol.CodeRateLimited:
			ce.err = "Too many requests"
			if pe.RetryAfterMS > 0 {
				w.Header().Set("Retry-After", strconv.FormatInt((pe.RetryAfterMS+999)/1000, 10))
			}
		case protocol.CodeUnavailable:
			ce.status, ce.err = http.StatusBadGateway, "Communication error with AI service"
		default:
			ce.err = "Internal server error"
			cp.s.log.Error("compat request failed", "err", err)
		}
	}
	writeJSON(w, ce.status, map[string]string{"error": ce.err, "detail": ce.detail})
}

// compatCaller is who a compat HTTP request acts for. The original services
// took the user from the body (or nobody at all), so: a token (Authorization
// header or ?token=) names the user, checked against a user_id when one is
// given; in dev mode a user_id alone is taken at its word, and a request
// that names nobody acts for the session's owner.
type compatCaller struct {
	user string // "" = dev mode, nobody named: the session's owner
}

var errCompatAuth = &compatError{status: http.StatusUnauthorized, err: "Unauthorized", detail: "Authentication failed"}

func (cp *compat) caller(r *http.Request, userID string) (compatCaller, error) {
	c, err := cp.identify(r, userID)
	if err != nil {
		return c, err
	}
	// The request counts against the user's requests in flight, as a
	// native one does (see authed), until its handler returns and net/http
	// ends its context.
	if !cp.s.limits.beginRequest(c.user) {
		return compatCaller{}, cp.s.tooManyRequests()
	}
	context.AfterFunc(r.Context(), func() { cp.s.limits.endRequest(c.user) })
	return c, nil
}

// identify is caller without the count of requests in flight.
func (cp *compat) identify(r *http.Request, userID string) (compatCaller, error) {
	token := r.URL.Query().Get("token")
	if h := r.Header.Get("Authorization"); h != "" {
		token = h
	}
	if userID == "" {
		userID = r.URL.Query().Get("user_id")
	}
	a := cp.s.auth
	if userID != "" {
		id, err := a.AuthenticateCompat(userID, token)
		if err != nil {
			if errors.Is(err, auth.ErrUserMismatch) {
				return compatCaller{}, &compatError{status: http.StatusForbidden, err: "Forbidden", detail: "The token does not belong to user_id"}
			}
			return compatCaller{}, errCompatAuth
		}
		return compatCaller{user: id.UserID}, nil
	}
	token = auth.StripBearer(token)
	if token == "" || token == auth.DevToken {
		if a.Dev() {
			return compatCaller{}, nil
		}
		return compatCaller{}, errCompatAuth
	}
	id, err := a.Verify(token)
	if err != nil {
		return compatCaller{}, errCompatAuth
	}
	return compatCaller{user: id.UserID}, nil
}

// owner returns the user the caller acts as in session conv: the session's
// owner, which must be the caller when it is named. exists is false when
// the session has no conversation yet; owner is then the caller, or
// "default_user".
func (cp *compat) owner(ctx context.Context, c compatCaller, conv string) (owner string, exists bool, err error) {
	cv, err := cp.s.store.Conversation(ctx, conv)
	switch {
	case errors.Is(err, chat.ErrNotFound):
		if c.user == "" {
			return compatDefaultUser, false, nil
		}
		return c.user, false, nil
	case err != nil:
		return "", false, err
	case c.user != "" && cv.Owner != c.user:
		return "", true, chat.ErrForbidden
	}
	return cv.Owner, true, nil
}

// resolveTurn finds the turn id names in conversation conv: id is the
// turn's (the reply's) id or the id of the user message it answers. It
// returns chat.ErrNotFound otherwise.
func (cp *compat) resolveTurn(ctx context.Context, conv, id string) (chat.Turn, error) {
	st := cp.s.store
	t, err := st.Turn(ctx, id)
	if err == nil && t.ConversationID == conv {
		return t, nil
	}
	// A turn of another conversation with this id (ids are chosen by
	// clients, and other users' are not secrets) must not hide the user
	// message id of this one.
	if err != nil && !errors.Is(err, chat.ErrNotFound) {
		return chat.Turn{}, err
	}
	m, err := st.Message(ctx, conv, id)
	if err != nil {
		return chat.Turn{}, err
	}
	if m.Role != chat.RoleUser || m.TurnID == "" {
		return chat.Turn{}, chat.ErrNotFound
	}
	t, err = st.Turn(ctx, m.TurnID)
	if err == nil && t.ConversationID != conv {
		return chat.Turn{}, chat.ErrNotFound
	}
	return t, err
}

// readCompatBody decodes a JSON object body into fields (name → raw value).
func (cp *compat) readCompatBody(w http.ResponseWriter, r *http.Request) (map[string]json.RawMessage, error) {
	limit := cp.s.bodyLimit()
	data, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return nil, compatBadRequest("The request body did not arrive within " + cp.s.cfg.ReadTimeout.String())
		}
		return nil, compatBadRequest("Cannot read the request body")
	}
	bodyRead(w)
	if int64(len(data)) > limit {
		return nil, &compatError{status: http.StatusRequestEntityTooLarge, err: "Payload too large", detail: "The request body is too large"}
	}
	var body map[string]json.RawMessage
	if err := json.Unmarshal(data, &body); err != nil || body == nil {
		return nil, compatBadRequest("The body must be a JSON object")
	}
	return body, nil
}

// compatField reads a string field of body: present reports whether the
// key is there (null counts as absent).
func compatField(body map[string]json.RawMessage, name string) (v string, present bool, err error) {
	raw, ok := body[name]
	if !ok || string(raw) == "null" {
		return "", false, nil
	}
	if err := json.Unmarshal(raw, &v); err != nil {
		return "", true, compatBadRequest(name + " must be a string")
	}
	return v, true, nil
}

// compatSessionField reads and validates the session_id of body.
func compatSessionField(body map[string]json.RawMessage) (string, error) {
	sid, ok, err := compatField(body, "session_id")
	if err != nil {
		return "", err
	}
	if !ok || sid == "" {
		return "", compatBadRequest("Field required: session_id")
	}
	if !chat.ValidID(sid) {
		return "", compatBadRequest("session_id must match ^[A-Za-z0-9_.:-]{1,128}$")
	}
	return sid, nil
}

// handleChat serves POST /api/chat: store the message, start the reply, and
// answer with the user message's id.
func (cp *compat) handleChat() http.Handler {
	s := cp.s
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := s.reqCtx(r)
		defer cancel()
		body, err := cp.readCompatBody(w, r)
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		msg, present, err := compatField(body, "message")
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		if !present {
			cp.writeCompatError(w, compatBadRequest("Field required: message"))
			return
		}
		sid, err := compatSessionField(body)
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		if strings.TrimSpace(msg) == "" {
			cp.writeCompatError(w, compatBadRequest("Message cannot be empty"))
			return
		}
		userID, _, err := compatField(body, "user_id")
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		c, err := cp.caller(r, userID)
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		owner, _, err := cp.owner(ctx, c, sid)
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		// A turn no worker will take would sit queued: say so now, as the
		// original gateway did when the AI service was down.
		pctx, pcancel := context.WithTimeout(ctx, compatProbeTimeout)
		_, err = s.bus.PingWorkers(pctx)
		pcancel()
		if err != nil {
			cp.writeCompatError(w, &compatError{status: http.StatusBadGateway, err: "Communication error with AI service", detail: workerDown(err)})
			return
		}
		res, err := s.send(ctx, sendRequest{User: owner, ConversationID: sid, Text: msg})
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{
			"status": "streaming", "message_id": res.Message.ID, "session_id": sid, "message": "AI is generating response...",
		})
	})
}

// handleCancel serves POST /api/cancel. Every well-formed request gets 200:
// "cancelled" when the reply is stopped by this or an earlier cancel (so a
// repeated cancel answers the same), "completed" when it ended otherwise or
// is unknown.
func (cp *compat) handleCancel() http.Handler {
	s := cp.s
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), s.cfg.RequestTimeout+s.cfg.CancelWait)
		defer cancel()
		body, err := cp.readCompatBody(w, r)
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		sid, err := compatSessionField(body)
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		mid, ok, err := compatField(body, "message_id")
		if err == nil && (!ok || mid == "") {
			err = compatBadRequest("Field required: message_id")
		} else if err == nil && !chat.ValidID(mid) {
			err = compatBadRequest("message_id must match ^[A-Za-z0-9_.:-]{1,128}$")
		}
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		userID, _, err := compatField(body, "user_id")
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		c, err := cp.caller(r, userID)
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		answer := func(status string) {
			msg := "Streaming cancelled successfully"
			if status == "completed" {
				msg = "Message already completed or not found"
			}
			writeJSON(w, http.StatusOK, map[string]string{"status": status, "message": msg, "session_id": sid, "message_id": mid})
		}
		owner, exists, err := cp.owner(ctx, c, sid)
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		if !exists {
			answer("completed")
			return
		}
		t, err := cp.resolveTurn(ctx, sid, mid)
		if errors.Is(err, chat.ErrNotFound) {
			answer("completed")
			return
		}
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		res, err := s.cancel(ctx, owner, t.ID)
		if errors.Is(err, chat.ErrNotFound) {
			answer("completed")
			return
		}
		if err != nil {
			cp.writeCompatError(w, err)
			return
		}
		if res.Status == chat.StatusCancelled || !res.Status.Terminal() {
			answer("cancelled")
			return
		}
		answer("completed")
	})
}

// session reads the {sid} of a history request and the session's owner as
// the caller may see it; on failure it has answered the request and
// reports false.
func (cp *compat) session(ctx context.Context, w http.ResponseWriter, r *http.Request) (sid, owner string, exists, ok bool) {
	sid = r.PathValue("sid")
	if !chat.ValidID(sid) {
		cp.writeCompatError(w, compatBadRequest("session_id must match ^[A-Za-z0-9_.:-]{1,128}$"))
		return "", "", false, false
	}
	c, err := cp.caller(r, "")
	if err != nil {
		cp.writeCompatError(w, err)
		return "", "", false, false
	}
	owner, exists, err = cp.owner(ctx, c, sid)
	if err != nil {
		cp.writeCompatError(w, err)
		return "", "", false, false
	}
	return sid, owner, exists, true
}

// handleHistory serves GET /api/history/{sid}: the session's finished
// messages, oldest first (the newest compatHistory of them).
func (cp *compat) handleHistory() http.Handler {
	s := cp.s
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := s.reqCtx(r)
		defer cancel()
		sid, owner, exists, ok := cp.session(ctx, w, r)
		if !ok {
			return
		}
		out := []chatMessage{}
		if exists {
			// One more than kept: the reply in flight, if any, is the
			// newest message and is left out, as the socket's history
			// frame leaves it out (see view.join).
			msgs, err := s.store.Messages(ctx, sid, compatHistory+1, "")
			if err == nil {
				err = s.stillOwned(ctx, sid, owner, msgs)
			}
			switch {
			case errors.Is(err, chat.ErrNotFound):
				msgs = nil // deleted meanwhile
			case err != nil:
				cp.writeCompatError(w, err)
				return
			}
			for _, m := range msgs {
				if cm, ok := compatStored(protocol.WireMessage(m), owner); ok {
					out = append(out, cm)
				}
			}
			out = out[max(0, len(out)-compatHistory):]
		}
		writeObject(w, http.StatusOK, jsonField{name: "count", v: len(out)}, jsonField{name: "messages", list: listOf(out)}, jsonField{name: "session_id", v: sid})
	})
}

// handleClearHistory serves DELETE /api/history/{sid}: the session's
// running reply is cancelled and its messages deleted. Clearing a session
// that does not exist succeeds.
func (cp *compat) handleClearHistory() http.Handler {
	s := cp.s
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), s.cfg.RequestTimeout+s.cfg.CancelWait)
		defer cancel()
		sid, owner, exists, ok := cp.session(ctx, w, r)
		if !ok {
			return
		}
		if exists {
			if err := s.deleteConversation(ctx, sid, owner); err != nil && !errors.Is(err, chat.ErrNotFound) {
				cp.writeCompatError(w, err)
				return
			}
		}
		writeJSON(w, http.StatusOK, map[string]string{"status": "success", "message": "History cleared for session " + sid})
	})
}

// handleAIHealth serves GET /api/ai-health: whether a model worker answers.
// url names the worker that did (tokenrelay has no single AI service URL).
func (cp *compat) handleAIHealth() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), compatProbeTimeout)
		defer cancel()
		id, err := cp.s.bus.PingWorkers(ctx)
		if err != nil {
			writeJSON(w, http.StatusServiceUnavailable, map[string]string{"ai_service": "unreachable", "error": workerDown(err)})
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"ai_service": "reachable", "status": "healthy", "url": "worker:" + id})
	})
}

// workerDown says in a compat answer why PingWorkers failed with err.
func workerDown(err error) string {
	if errors.Is(err, bus.ErrProviderUnreachable) {
		return "The model server cannot be reached"
	}
	return "No model worker is reachable"
}

// handleHealth serves GET /health: UP while the broker and the store answer.
func (cp *compat) handleHealth() http.Handler {
	s := cp.s
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), compatProbeTimeout)
		defer cancel()
		for _, c := range []struct {
			name string
			ping func(context.Context) error
		}{{"broker", s.bus.Ping}, {"store", s.store.Ping}} {
			if st := s.checked(c.name, c.ping(ctx)); st != "ok" {
				writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "DOWN", "error": c.name + " " + st})
				return
			}
		}
		port := 0
		if a, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
			if ta, ok := a.(*net.TCPAddr); ok {
				port = ta.Port
			}
		}
		writeJSON(w, http.StatusOK, map[string]any{"status": "UP", "timestamp": protocol.FormatTime(s.now()), "nodeId": s.cfg.NodeID, "port": port})
	})
}

// handleHealthReady serves GET /health/ready: the checks of /readyz.
func (cp *compat) handleHealthReady() http.Handler {
	s := cp.s
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		checks, ok := s.ready(r.Context())
		if ok {
			writeJSON(w, http.StatusOK, map[string]string{"status": "READY", "nodeId": s.cfg.NodeID})
			return
		}
		failing := ""
		for name, v := range checks {
			if v != "ok" && (failing == "" || name < failing) {
				failing = name
			}
		}
		writeJSON(w, http.StatusServiceUnavailable, map[string]string{"status": "NOT_READY", "reason": failing + " " + checks[failing]})
	})
}

// handleHealthLive serves GET /health/live: ALIVE while the process runs.
func (cp *compat) handleHealthLive() http.Handler {
	s := cp.s
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ALIVE", "nodeId": s.cfg.NodeID})
	})
}
