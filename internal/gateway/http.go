package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/tokenrelay/tokenrelay/internal/auth"
	"github.com/tokenrelay/tokenrelay/internal/bus"
	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/protocol"
)

type userKey struct{}

func userOf(r *http.Request) string {
	u, _ := r.Context().Value(userKey{}).(string)
	return u
}

type expiresKey struct{}

// expiresOf is when the request's token stops being accepted; zero when it
// has no exp (or there is no token).
func expiresOf(r *http.Request) time.Time {
	t, _ := r.Context().Value(expiresKey{}).(time.Time)
	return t
}

// authed authenticates the request and passes the user on in its context.
func (s *Server) authed(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A browser on another site may POST or DELETE here without a
		// preflight (a dev-mode server needs no token): refuse requests
		// that change something when they come from an origin that may not
		// open /v1/ws either.
		if r.Method != http.MethodGet && r.Method != http.MethodHead && !auth.OriginAllowed(r, s.cfg.AllowedOrigins) {
			s.m.authFailures.WithLabelValues("origin").Inc()
			s.writeError(w, protocol.Errorf(protocol.CodeForbidden, "origin not allowed"))
			return
		}
		id, err := s.auth.Authenticate(r)
		if err != nil {
			s.m.authFailures.WithLabelValues("token").Inc()
			// HTTP requires a 401 to name the scheme it wants (RFC 9110
			// 11.6.1); RFC 6750 says how a bearer token failed.
			challenge := `Bearer realm="tokenrelay"`
			if r.Header.Get("Authorization") != "" || r.URL.Query().Get("access_token") != "" {
				challenge += `, error="invalid_token"`
			}
			w.Header().Set("WWW-Authenticate", challenge)
			s.writeError(w, protocol.Errorf(protocol.CodeUnauthorized, "a valid token is required"))
			return
		}
		if !s.limits.beginRequest(id.UserID) {
			s.writeError(w, s.tooManyRequests())
			return
		}
		defer s.limits.endRequest(id.UserID)
		ctx := context.WithValue(r.Context(), userKey{}, id.UserID)
		if !id.Expires.IsZero() {
			ctx = context.WithValue(ctx, expiresKey{}, id.Expires)
		}
		h.ServeHTTP(w, r.WithContext(ctx))
	})
}

// protoError is an HTTP error outside the protocol's code table.
type protoError struct {
	status int
	code   string
	msg    string
}

func (e *protoError) Error() string { return e.msg }

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// jsonField is a field of the object writeObject writes: v encoded whole,
// or, when list is not nil, the array of list's elements.
type jsonField struct {
	name string
	v    any
	list []any
}

// listOf is s as the list of a jsonField.
func listOf[T any](s []T) []any {
	l := make([]any, len(s))
	for i := range s {
		l[i] = s[i]
	}
	return l
}

// writeObject writes the object of fields, in their order, as writeJSON
// would write a map of them (whose keys it sorts), but an array one
// element at a time: a history of long answers is not encoded whole in
// memory besides the messages themselves, and encoding/json's pooled
// buffers, which it keeps whatever their size, grow only to the longest
// message.
func writeObject(w http.ResponseWriter, status int, fields ...jsonField) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	var err error
	put := func(v any) {
		if err != nil {
			return
		}
		var b []byte
		if b, err = json.Marshal(v); err == nil {
			_, err = w.Write(b)
		}
	}
	write := func(s string) {
		if err == nil {
			_, err = io.WriteString(w, s)
		}
	}
	write("{")
	for i, f := range fields {
		if i > 0 {
			write(",")
		}
		put(f.name)
		write(":")
		if f.list == nil {
			put(f.v)
			continue
		}
		write("[")
		for j, e := range f.list {
			if j > 0 {
				write(",")
			}
			put(e)
		}
		write("]")
	}
	write("}\n")
}

type errorBody struct {
	Error struct {
		Code         string `json:"code"`
		Message      string `json:"message"`
		TurnID       string `json:"turn_id,omitempty"`
		RetryAfterMS int64  `json:"retry_after_ms,omitempty"`
	} `json:"error"`
}

// writeError answers err as the API's JSON error. An internal error is
// logged, as a socket's is: the answer says nothing of its cause.
func (s *Server) writeError(w http.ResponseWriter, err error) {
	if asError(err).Code == protocol.CodeInternal {
		s.log.Error("request failed", "err", err)
	}
	var body errorBody
	var pe *protoError
	if errors.As(err, &pe) {
		body.Error.Code, body.Error.Message = pe.code, pe.msg
		writeJSON(w, pe.status, body)
		return
	}
	e := asError(err)
	body.Error.Code, body.Error.Message, body.Error.TurnID, body.Error.RetryAfterMS = string(e.Code), e.Message, e.TurnID, e.RetryAfterMS
	if e.RetryAfterMS > 0 {
		w.Header().Set("Retry-After", strconv.FormatInt((e.RetryAfterMS+999)/1000, 10))
	}
	writeJSON(w, e.Code.HTTPStatus(), body)
}

// asError is protocol.AsError, with the message broker's failures (a
// connection closed or reconnecting, a stream without a leader) as
// unavailable rather than internal.
func asError(err error) *protocol.Error {
	var pe *protocol.Error
	if !errors.As(err, &pe) && bus.Unavailable(err) {
		return &protocol.Error{Code: protocol.CodeUnavailable, Message: msgBrokerUnavailable, Err: err}
	}
	return protocol.AsError(err)
}

// msgBrokerUnavailable is the message of an unavailable error whose cause
// is the message broker.
const msgBrokerUnavailable = "the message broker is unavailable"

func badRequest(msg string) error { return protocol.Errorf(protocol.CodeBadRequest, msg) }

// named is err, or when err is chat.ErrNotFound a not_found error that
// names what was not found (one answer may be about several things).
func named(err error, what string) error {
	if errors.Is(err, chat.ErrNotFound) {
		return &protocol.Error{Code: protocol.CodeNotFound, Message: what + " not found", Err: err}
	}
	return err
}

// bodyLimit is the largest request body that may hold a message's text:
// 6 times --limit-text-bytes (JSON escapes may grow text up to 6×) and 4
// KiB for the rest. An unlimited text (0) is an unlimited body, as a
// limit's 0 says; the body must still arrive within --read-timeout. A
// limit too large to multiply is no limit on the body either, rather than
// one that wraps around to refuse every body.
func (s *Server) bodyLimit() int64 {
	const rest = 4096
	n := int64(s.cfg.Limits.TextBytes)
	if n <= 0 || n > (math.MaxInt64-1-rest)/6 {
		return math.MaxInt64 - 1 // so that limit+1 does not wrap
	}
	return n*6 + rest
}

// bodyTooLarge is the error of a body over bodyLimit.
func (s *Server) bodyTooLarge() error {
	return protocol.Errorf(protocol.CodeTooLarge, "request body over "+strconv.FormatInt(s.bodyLimit(), 10)+
		" bytes: a message's text may have "+itoa(s.cfg.Limits.TextBytes)+" bytes at most (--limit-text-bytes)")
}

// decodeBody decodes data, a request's body, into v, the struct of a JSON
// object. Its error is a bad_request that says what is wrong, as a bad
// frame's does: the field of the wrong type, or where the JSON breaks.
func decodeBody(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	err := dec.Decode(v)
	var se *json.SyntaxError
	var te *json.UnmarshalTypeError
	switch {
	case errors.Is(err, io.EOF):
		return badRequest("the request body is empty: it must be a JSON object")
	case errors.Is(err, io.ErrUnexpectedEOF):
		return badRequest("invalid JSON body: it ends before its object does")
	case errors.As(err, &te) && te.Field == "":
		return badRequest("the request body must be a JSON object, not " + te.Value)
	case errors.As(err, &te):
		return badRequest("invalid JSON body: field " + te.Field + " has the wrong type (" + te.Value + ")")
	case errors.As(err, &se):
		return badRequest("invalid JSON body: syntax error at offset " + strconv.FormatInt(se.Offset, 10))
	case err != nil:
		return badRequest("invalid JSON body")
	}
	if rest := bytes.TrimLeft(data[dec.InputOffset():], " \t\r\n"); len(rest) > 0 {
		return badRequest("invalid JSON body: one JSON object per request, and nothing after it")
	}
	return nil
}

// bodyError says why a request's body could not be read.
func (s *Server) bodyError(err error) string {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return "the request body did not arrive within " + s.cfg.ReadTimeout.String() + " (--read-timeout)"
	}
	return "cannot read body"
}

func (s *Server) pathID(r *http.Request, name string) (string, error) {
	v := r.PathValue(name)
	if !chat.ValidID(v) {
		return "", badRequest(name + " id must match ^[A-Za-z0-9_.:-]{1,128}$")
	}
	return v, nil
}

// stillOwned checks, once msgs have been read from conversation id, that
// the conversation is still the user's. Its owner was checked before the
// read, but may have deleted it since, and another user taken its id and
// written to it: msgs would then be that user's. An empty read shows
// nothing, and needs no check.
func (s *Server) stillOwned(ctx context.Context, id, user string, msgs []chat.Message) error {
	if len(msgs) == 0 || user == "" {
		return nil
	}
	return s.ownConversation(ctx, id, user)
}

func (s *Server) reqCtx(r *http.Request) (context.Context, context.CancelFunc) {
	return context.WithTimeout(r.Context(), s.cfg.RequestTimeout)
}

// ownConversation checks that the user may see conversation id.
func (s *Server) ownConversation(ctx context.Context, id, user string) error {
	c, err := s.store.Conversation(ctx, id)
	if err != nil {
		return named(err, "conversation "+quote(id))
	}
	if c.Owner != user {
		return chat.ErrForbidden
	}
	return nil
}

func (s *Server) handleListConversations() http.Handler {
	type item struct {
		ConversationID string `json:"conversation_id"`
		Title          string `json:"title"`
		UpdatedAt      string `json:"updated_at"`
		ActiveTurnID   string `json:"active_turn_id,omitempty"`
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := s.reqCtx(r)
		defer cancel()
		limit := 100
		if v := r.URL.Query().Get("limit"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > 1000 {
				s.writeError(w, badRequest("limit must be between 1 and 1000"))
				return
			}
			limit = n
		}
		// One more than asked says whether there are others.
		convs, err := s.store.Conversations(ctx, userOf(r), limit+1)
		if err != nil {
			s.writeError(w, err)
			return
		}
		more := len(convs) > limit
		convs = convs[:min(len(convs), limit)]
		out := make([]item, 0, len(convs))
		for _, c := range convs {
			out = append(out, item{c.ID, c.Title, protocol.FormatTime(c.UpdatedAt), c.ActiveTurnID})
		}
		writeJSON(w, http.StatusOK, map[string]any{"conversations": out, "has_more": more})
	})
}

func (s *Server) handleListMessages() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := s.reqCtx(r)
		defer cancel()
		conv, err := s.pathID(r, "conversation")
		if err != nil {
			s.writeError(w, err)
			return
		}
		q := r.URL.Query()
		limit := protocol.DefaultHistory
		if v := q.Get("limit"); v != "" {
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > protocol.MaxHistory {
				s.writeError(w, badRequest("limit must be between 1 and 500"))
				return
			}
			limit = n
		}
		before := q.Get("before")
		if before != "" && !chat.ValidID(before) {
			s.writeError(w, badRequest("before must be a message id"))
			return
		}
		if err := s.ownConversation(ctx, conv, userOf(r)); err != nil {
			s.writeError(w, err)
			return
		}
		// One more than asked says whether older ones exist.
		msgs, err := s.store.Messages(ctx, conv, limit+1, before)
		if err != nil {
			s.writeError(w, named(err, "message "+quote(before)+" (before) in conversation "+quote(conv)))
			return
		}
		if err := s.stillOwned(ctx, conv, userOf(r), msgs); err != nil {
			s.writeError(w, err)
			return
		}
		more := len(msgs) > limit
		if more {
			msgs = msgs[len(msgs)-limit:] // the newest limit, oldest first
		}
		out := make([]any, 0, len(msgs))
		for _, m := range msgs {
			out = append(out, protocol.WireMessage(m))
		}
		writeObject(w, http.StatusOK, jsonField{name: "has_more", v: more}, jsonField{name: "messages", list: out})
	})
}

func (s *Server) handlePostMessage() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// A client that goes away once its message is stored does not stop
		// the turn's publish (see send); nor does a shutdown, which lets
		// the requests under way finish.
		ctx, cancel := s.reqCtx(r)
		defer cancel()
		conv, err := s.pathID(r, "conversation")
		if err != nil {
			s.writeError(w, err)
			return
		}
		var body struct {
			Text      string  `json:"text"`
			MessageID *string `json:"message_id"`
			TurnID    *string `json:"turn_id"`
			Model     string  `json:"model"`
		}
		limit := s.bodyLimit()
		data, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
		if err != nil {
			s.writeError(w, badRequest(s.bodyError(err)))
			return
		}
		bodyRead(w)
		if int64(len(data)) > limit {
			s.writeError(w, s.bodyTooLarge())
			return
		}
		if err := decodeBody(data, &body); err != nil {
			s.writeError(w, err)
			return
		}
		// An id left out (or null) is made by the server; one given,
		// even empty, must be valid.
		var messageID, turnID string
		for _, id := range []struct {
			name string
			v    *string
			to   *string
		}{{"message_id", body.MessageID, &messageID}, {"turn_id", body.TurnID, &turnID}} {
			if id.v == nil {
				continue
			}
			if !chat.ValidID(*id.v) {
				s.writeError(w, badRequest(id.name+" must match ^[A-Za-z0-9_.:-]{1,128}$"))
				return
			}
			*id.to = *id.v
		}
		if body.Text == "" {
			s.writeError(w, badRequest("text is required"))
			return
		}
		res, err := s.send(ctx, sendRequest{User: userOf(r), ConversationID: conv, MessageID: messageID, TurnID: turnID, Text: body.Text, Model: body.Model})
		if err != nil {
			s.writeError(w, err)
			return
		}
		writeJSON(w, http.StatusAccepted, map[string]any{"message": protocol.WireMessage(res.Message), "turn_id": res.Turn.ID})
	})
}

func (s *Server) handleDeleteConversation() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := s.reqCtx(r)
		defer cancel()
		conv, err := s.pathID(r, "conversation")
		if err != nil {
			s.writeError(w, err)
			return
		}
		if err := s.deleteConversation(ctx, conv, userOf(r)); err != nil {
			s.writeError(w, err)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
}

// deleteConversation cancels the conversation's running turn, then deletes
// it with its messages.
func (s *Server) deleteConversation(ctx context.Context, conv, user string) error {
	if err := s.ownConversation(ctx, conv, user); err != nil {
		return err
	}
	if t, err := s.store.ActiveTurn(ctx, conv); err == nil {
		cctx, cancel := context.WithTimeout(ctx, s.cfg.CancelWait)
		_, _ = s.cancel(cctx, user, t.ID)
		cancel()
	}
	if err := s.store.DeleteConversation(ctx, conv, user); err != nil {
		return err
	}
	// The connections that follow it, on every gateway, are told (the
	// other tabs of its user drop what they show of it). Best effort: the
	// notice is not stored, and a view follows the id either way.
	if err := s.bus.AnnounceGone(conv); err != nil {
		s.log.Warn("could not announce a deleted conversation", "conversation", conv, "err", err)
	}
	return nil
}

func (s *Server) handleCancel() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), s.cfg.RequestTimeout+s.cfg.CancelWait)
		defer cancel()
		turn, err := s.pathID(r, "turn")
		if err != nil {
			s.writeError(w, err)
			return
		}
		res, err := s.cancel(ctx, userOf(r), turn)
		if err != nil {
			s.writeError(w, named(err, "turn "+quote(turn)))
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"turn_id": res.TurnID, "status": res.Status, "already": res.Already})
	})
}

func (s *Server) handleHealthz() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
}

// ready runs the readiness checks and returns each one's result.
func (s *Server) ready(ctx context.Context) (map[string]string, bool) {
	// One ping of the workers answers both whether one runs and, where
	// no probe of the provider's own is given (a gateway apart from its
	// workers), whether one can reach its model server.
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	ping := sync.OnceValue(func() error { _, err := s.bus.PingWorkers(pctx); return err })
	checks := map[string]func(context.Context) error{
		"broker": s.bus.Ping,
		"store":  s.store.Ping,
		"worker": func(context.Context) error {
			if err := ping(); !errors.Is(err, bus.ErrProviderUnreachable) {
				return err
			}
			return nil
		},
		"provider": func(context.Context) error {
			if err := ping(); errors.Is(err, bus.ErrProviderUnreachable) {
				return err
			}
			return nil
		},
	}
	for name, f := range s.cfg.ReadyProbes {
		checks[name] = f
	}
	type result struct {
		name string
		err  error
	}
	ch := make(chan result, len(checks))
	for name, f := range checks {
		go func() {
			cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			ch <- result{name, f(cctx)}
		}()
	}
	out := make(map[string]string, len(checks))
	ok := true
	for range checks {
		r := <-ch
		out[r.name] = s.checked(r.name, r.err)
		ok = ok && r.err == nil
	}
	return out, ok
}

// checked returns what a health answer says of check name, given its
// error: "ok" or "failing". The answer goes to whoever asks (a load
// balancer, without a token), so it says no more; the cause, which names
// addresses, databases and the model server, goes to the log, when it
// changes.
func (s *Server) checked(name string, err error) string {
	cause := ""
	if err != nil {
		cause = err.Error()
	}
	last, _ := s.readyCauses.Swap(name, cause)
	switch prev, _ := last.(string); {
	case cause == prev:
	case cause != "":
		s.log.Warn("readiness check failing", "check", name, "err", cause)
	default:
		s.log.Info("readiness check passing again", "check", name)
	}
	if err != nil {
		return "failing"
	}
	return "ok"
}

func (s *Server) handleReadyz() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.draining.Load() {
			// Shutting down: nothing else matters to whoever asks, and
			// the answer must come at once, not after the other checks.
			writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "unavailable", "failing": "shutdown", "checks": map[string]string{"shutdown": "failing"}})
			return
		}
		checks, ok := s.ready(r.Context())
		if !ok {
			failing := ""
			for name, v := range checks {
				if v != "ok" && (failing == "" || name < failing) {
					failing = name
				}
			}
			writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "unavailable", "failing": failing, "checks": checks})
			return
		}
		writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "checks": checks})
	})
}
