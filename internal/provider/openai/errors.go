package openai

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/provider"
)

const msgMalformed = "the model server sent a malformed stream"

// msgEventTooLarge ends a turn whose stream holds an event (or a line)
// over maxEventBytes.
const msgEventTooLarge = "the model server sent an event over 1 MiB"

// fail returns the *provider.Error with message msg and internal cause
// cause, both with every secret redacted. unavailable adds
// provider.ErrUnavailable to the chain.
func (p *Provider) fail(msg string, cause error, unavailable bool) *provider.Error {
	var err error
	if cause != nil {
		err = &redactedError{text: p.redact(cause.Error()), cause: cause}
	}
	if unavailable {
		if err != nil {
			err = fmt.Errorf("%w: %w", provider.ErrUnavailable, err)
		} else {
			err = provider.ErrUnavailable
		}
	}
	return &provider.Error{Message: chat.StorableText(p.redact(msg)), Err: err}
}

// redactedError is an internal cause whose text had secrets removed.
type redactedError struct {
	text  string
	cause error
}

func (e *redactedError) Error() string { return e.text }

// Unwrap returns the cause only when its text held no secret, so that no
// secret can be reached through the error chain.
func (e *redactedError) Unwrap() error {
	if e.text != e.cause.Error() {
		return nil
	}
	return e.cause
}

// statusFailure reads the error response resp and says what went wrong.
func (p *Provider) statusFailure(resp *http.Response, model string) *failure {
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBodyBytes))
	detail, code := p.errorDetail(raw)
	if detail == "" && strings.HasPrefix(resp.Header.Get("Content-Type"), "text/plain") && utf8.Valid(raw) {
		// Some servers and proxies explain a refusal in plain text.
		detail = p.cut(string(raw), 300)
	}
	st := resp.StatusCode
	cause := fmt.Errorf("status %d", st)
	switch {
	case detail != "":
		cause = fmt.Errorf("status %d: %s", st, detail)
	case len(raw) > 0 && (st < 300 || st >= 400):
		// A redirect's body repeats its Location, query and all.
		cause = fmt.Errorf("status %d: %s", st, p.cut(string(raw), 200))
	}
	f := &failure{}
	if st == http.StatusBadRequest || st == http.StatusUnprocessableEntity {
		f.streamOptions = refusesStreamOptions(raw, detail)
	}
	var msg string
	switch {
	case st == http.StatusUnauthorized:
		msg = "the model server rejected the API key (401)"
	case st == http.StatusForbidden:
		msg = "the model server refused access (403)"
	case st == http.StatusNotFound && (code == "model_not_found" || strings.Contains(strings.ToLower(detail), "model")):
		msg = fmt.Sprintf("model %q was not found on the model server", model)
	case st == http.StatusNotFound:
		msg = "the model server has no chat completions endpoint at the configured base URL (404)"
		if p.rootHint != "" {
			msg += ": try " + p.rootHint
		}
	case st == http.StatusTooManyRequests && code == "insufficient_quota":
		msg = "the model server account has run out of quota (429)"
	case st == http.StatusTooManyRequests:
		msg = "the model server is rate limiting requests (429)"
		f.retry = true
	case st == http.StatusRequestTimeout:
		msg = "the model server timed out (408)"
		f.retry = true
	case st >= 500:
		msg = fmt.Sprintf("the model server failed (%d)", st)
		f.retry = st != http.StatusNotImplemented && st != http.StatusHTTPVersionNotSupported
	case st >= 300 && st < 400 && resp.Header.Get("Location") != "":
		msg = p.redirectMessage(resp)
	case st >= 400:
		msg = fmt.Sprintf("the model server rejected the request (%d)", st)
		if detail != "" {
			// For a bad request (context too long, bad parameter) the
			// server's words are what the person needs.
			msg += ": " + detail
		}
	default:
		msg = fmt.Sprintf("the model server answered with unexpected status %d", st)
	}
	if f.retry {
		f.retryAfter = p.retryAfter(resp.Header.Get("Retry-After"))
	}
	unavailable := st == http.StatusBadGateway || st == http.StatusServiceUnavailable || st == http.StatusGatewayTimeout
	f.err = p.fail(msg, cause, unavailable)
	return f
}

// redirectMessage says where the redirect resp points to. A move of the
// chat completions endpoint is told as the base URL to use instead. The
// query is left out: it may hold a secret (an api-key, a signature).
func (p *Provider) redirectMessage(resp *http.Response) string {
	st := resp.StatusCode
	u, err := resp.Location()
	if err != nil {
		return fmt.Sprintf("the model server redirected to an invalid location (%d)", st)
	}
	to := url.URL{Scheme: u.Scheme, Host: u.Host, Path: u.Path}
	if base, ok := strings.CutSuffix(strings.TrimRight(u.Path, "/"), "/chat/completions"); ok {
		to.Path = base
		return fmt.Sprintf("the model server redirected to %s (%d): use it as --openai-base-url", to.String(), st)
	}
	return fmt.Sprintf("the model server redirected to %s (%d)", to.String(), st)
}

// refusesStreamOptions reports whether the error body of a refused request
// blames stream_options: OpenAI's "param", or the message naming it
// (Azure's "Unrecognized request argument supplied: stream_options").
func refusesStreamOptions(body []byte, detail string) bool {
	if strings.Contains(detail, "stream_options") {
		return true
	}
	var e struct {
		Param jsonString `json:"param"`
		Error struct {
			Param jsonString `json:"param"`
		} `json:"error"`
	}
	_ = json.Unmarshal(body, &e) // "error" may be a string: the fields that fit are still read
	return e.Param == "stream_options" || e.Error.Param == "stream_options"
}

// retryAfter parses a Retry-After value (seconds or an HTTP date), capped at
// MaxRetryAfter; 0 when absent, invalid or past.
func (p *Provider) retryAfter(v string) time.Duration {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0
	}
	if secs, err := strconv.ParseInt(v, 10, 64); err == nil {
		if secs <= 0 {
			return 0
		}
		if secs >= int64(MaxRetryAfter/time.Second) {
			return MaxRetryAfter
		}
		return time.Duration(secs) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil {
		return min(max(t.Sub(p.cfg.Now()), 0), MaxRetryAfter)
	}
	return 0
}

// errorDetail is the package's errorDetail, made fit to show: secrets
// redacted, then cut to 300 bytes (in that order, so that no part of a
// secret that the cut would split is left).
func (p *Provider) errorDetail(body []byte) (detail, code string) {
	detail, code = errorDetail(body)
	return p.cut(detail, 300), code
}

// cut makes s one line with its secrets redacted, at most n bytes long.
func (p *Provider) cut(s string, n int) string {
	return truncate(p.redact(oneLine(s)), n)
}

// errorDetail extracts the message and code of an error body in any of the
// shapes OpenAI-compatible servers use: {"error":{"message","code"}}
// (OpenAI, Ollama /v1, llama.cpp), {"error":"..."} (Ollama native),
// {"object":"error","message","code"} (older vLLM), FastAPI's
// {"detail":"..."} or {"detail":[{"loc","msg"}]} (proxies, routers), and
// Mistral's, whose "message" holds FastAPI's validation errors: as an
// object, a list, or the JSON text of either. It returns "" when body is
// not one of them.
func errorDetail(body []byte) (detail, code string) {
	detail, code, _, _ = errorFields(body, 0)
	return oneLine(detail), code
}

// maxErrorDepth bounds how deeply errorFields looks into error objects
// nested in error objects.
const maxErrorDepth = 3

// errorFields reads the error object raw: its message (or its "detail"),
// code and type; those of an object in its "error" replace them. ok is
// false when raw is not a JSON object.
func errorFields(raw []byte, depth int) (detail, code, typ string, ok bool) {
	var e struct {
		Error   json.RawMessage `json:"error"`
		Message json.RawMessage `json:"message"`
		Detail  json.RawMessage `json:"detail"`
		Code    jsonString      `json:"code"`
		Type    jsonString      `json:"type"`
	}
	if json.Unmarshal(raw, &e) != nil {
		return "", "", "", false
	}
	detail, code, typ = errorText(e.Message, depth), string(e.Code), string(e.Type)
	if detail == "" {
		detail = errorText(e.Detail, depth)
	}
	if len(e.Error) == 0 || string(e.Error) == "null" || depth >= maxErrorDepth {
		return detail, code, typ, true
	}
	if d, c, t, ok := errorFields(e.Error, depth+1); ok {
		detail, code = d, c
		if code == "" {
			code = t
		}
		return detail, code, typ, true
	}
	var flat string
	if json.Unmarshal(e.Error, &flat) == nil {
		detail = flat
	}
	return detail, code, typ, true
}

// errorText returns the text of an error's "message" or "detail": a
// string, FastAPI's list of validation errors, or an error object; a
// string that is the JSON text of a list or an object is read as such.
func errorText(raw json.RawMessage, depth int) string {
	if len(raw) == 0 || depth >= maxErrorDepth {
		return ""
	}
	switch raw[0] {
	case '"':
		var s string
		if json.Unmarshal(raw, &s) != nil {
			return ""
		}
		if t := strings.TrimSpace(s); t != "" && (t[0] == '{' || t[0] == '[') && json.Valid([]byte(t)) {
			if text := errorText(json.RawMessage(t), depth+1); text != "" {
				return text
			}
		}
		return s
	case '[':
		return validationErrors(raw)
	case '{':
		detail, _, _, _ := errorFields(raw, depth+1)
		return detail
	}
	return ""
}

// validationErrors returns the text of FastAPI's list of validation
// errors, each told as "field: msg", the field being the path of "loc"
// in the request body ("messages.0.name").
func validationErrors(raw json.RawMessage) string {
	var list []struct {
		Loc []any  `json:"loc"` // e.g. ["body", "max_tokens"]
		Msg string `json:"msg"`
	}
	if json.Unmarshal(raw, &list) != nil {
		return ""
	}
	msgs := make([]string, 0, len(list))
	for _, v := range list {
		if v.Msg == "" {
			continue
		}
		if len(v.Loc) > 1 && v.Loc[0] == "body" {
			path := make([]string, 0, len(v.Loc)-1)
			for _, l := range v.Loc[1:] {
				switch l := l.(type) {
				case string:
					path = append(path, l)
				case float64:
					path = append(path, strconv.FormatFloat(l, 'f', -1, 64))
				}
			}
			msgs = append(msgs, strings.Join(path, ".")+": "+v.Msg)
			continue
		}
		msgs = append(msgs, v.Msg)
	}
	return strings.Join(msgs, "; ")
}

// oneLine collapses runs of white space, so that a detail fits a log line
// and a turn.end error.
func oneLine(s string) string {
	return strings.Join(strings.Fields(s), " ")
}

// truncate cuts s to at most n bytes without splitting a character.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}
