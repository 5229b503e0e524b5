package openai

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/tokenrelay/tokenrelay/internal/chat"
	"github.com/tokenrelay/tokenrelay/internal/provider"
)

// Stream implements [provider.Provider]. It posts req to
// {BaseURL}/chat/completions with model req.Model (or Config.Model), the
// system prompt and the latest messages that fit Config.ContextBudgetBytes,
// and calls emit, from the calling goroutine, with each non-empty piece of
// content the server streams. The Result carries the usage the server
// reported, if it did.
//
// Failures are *provider.Error; those that mean the server cannot be reached
// (connection failures, 502/503/504) wrap provider.ErrUnavailable. A failure
// before the first emit is retried up to Config.MaxRetries times when it may
// be transient; after the first emit it never is, so the caller keeps the
// text emitted so far. When emit returns an error Stream stops and returns
// it unchanged. When ctx is done Stream closes the upstream request at once
// and returns ctx.Err(). Stream is safe for concurrent use.
func (p *Provider) Stream(ctx context.Context, req provider.Request, emit func(text string) error) (provider.Result, error) {
	if !p.Allowed(req.Model) {
		return provider.Result{}, &provider.Error{Message: fmt.Sprintf("model %q is not available on this server", req.Model)}
	}
	model := req.Model
	if model == "" {
		model = p.cfg.Model
	}
	wreq := p.requestBody(model, req.Messages)
	body, err := json.Marshal(wreq)
	if err != nil {
		return provider.Result{}, p.fail("could not encode the request", err, false)
	}
	log := p.log.With("turn_id", req.TurnID, "model", model)
	emitted := false
	countEmit := func(text string) error {
		emitted = true
		return emit(chat.StorableText(text))
	}
	for attempt := 0; ; attempt++ {
		log.Debug("model request", "attempt", attempt+1, "bytes", len(body))
		res, f, err := p.attempt(ctx, body, model, countEmit)
		switch {
		case err != nil:
			return provider.Result{}, err
		case f == nil:
			if res.Usage != nil {
				log.Debug("model answer complete", "prompt_tokens", res.Usage.PromptTokens, "completion_tokens", res.Usage.CompletionTokens)
			}
			return res, nil
		case f.streamOptions && wreq.StreamOptions != nil:
			// Not a retry but the same request made right: at once, and
			// without stream_options for the provider's lifetime.
			if p.noStreamOptions.CompareAndSwap(false, true) {
				log.Warn("the model server refuses stream_options: asking without it from now on; token usage only if the server sends it anyway", "error", f.err.Error())
			}
			wreq.StreamOptions = nil
			if body, err = json.Marshal(wreq); err != nil {
				return provider.Result{}, p.fail("could not encode the request", err, false)
			}
			attempt--
			continue
		case emitted || !f.retry || attempt >= p.cfg.MaxRetries:
			return res, f.err // the usage of an answer that failed, if reported
		}
		delay := f.retryAfter
		if delay <= 0 {
			delay = backoff(attempt)
		}
		log.Warn("model request failed, retrying", "attempt", attempt+1, "delay", delay, "error", f.err.Error())
		if err := p.cfg.Sleep(ctx, delay); err != nil {
			return provider.Result{}, err
		}
	}
}

// failure is how one attempt failed.
type failure struct {
	err        *provider.Error
	retry      bool          // worth retrying if nothing was emitted yet
	retryAfter time.Duration // what the server asked for; 0: our backoff
	// The server refused stream_options (Azure OpenAI before api-version
	// 2024-09-01, some relays): worth asking again without it.
	streamOptions bool
}

// chunk is one streamed chat.completion.chunk (or an error object some
// servers send mid-stream).
type chunk struct {
	Choices []struct {
		Index int `json:"index"`
		Delta struct {
			// The content is decoded by a pairJoiner, which mends an
			// emoji whose escape a server split across two chunks.
			Content json.RawMessage `json:"content"`
			// Reasoning models stream their thinking first under one of
			// these names; it is not emitted but shows the model is working.
			ReasoningContent string `json:"reasoning_content"`
			Reasoning        string `json:"reasoning"`
		} `json:"delta"`
		FinishReason *string `json:"finish_reason"`
	} `json:"choices"`
	Usage *struct {
		PromptTokens     int `json:"prompt_tokens"`
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Error json.RawMessage `json:"error"`
	// "error" in the flat error object of older vLLM and FastChat,
	// {"object":"error","message":…}, sent in place of a chunk.
	Object string `json:"object"`
}

// errorEvent is the failure for an error the server reported inside the
// stream: an event of type "error", or a chunk that is an error object. It
// is not retried: the server may have answered in part, and would likely
// fail the same way again.
func (p *Provider) errorEvent(data []byte) *failure {
	detail, _ := p.errorDetail(data)
	if detail == "" && !json.Valid(data) && utf8.Valid(data) {
		detail = p.cut(string(data), 300) // "event: error" with a plain text reason
	}
	msg := "the model server reported an error"
	if detail != "" {
		msg += ": " + detail
	}
	return &failure{err: p.fail(msg, fmt.Errorf("error event: %s", p.cut(string(data), 300)), false)}
}

// attempt makes one request. It returns the result, or how the attempt
// failed, or (as err) emit's error or ctx's.
func (p *Provider) attempt(ctx context.Context, body []byte, model string, emit func(string) error) (provider.Result, *failure, error) {
	actx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	wd := &watchdog{cancel: cancel}
	defer wd.stop()
	wd.arm(&timeoutError{phase: phaseConnect, after: p.cfg.ConnectTimeout})
	actx = httptrace.WithClientTrace(actx, &httptrace.ClientTrace{
		GotConn: func(httptrace.GotConnInfo) {
			wd.arm(&timeoutError{phase: phaseFirstToken, after: p.cfg.FirstTokenTimeout})
		},
	})

	hreq, err := http.NewRequestWithContext(actx, http.MethodPost, p.endpoint, bytes.NewReader(body))
	if err != nil {
		return provider.Result{}, &failure{err: p.fail("could not build the request to the model server", err, false)}, nil
	}
	p.setHeaders(hreq.Header)
	hreq.Header.Set("Content-Type", "application/json")
	hreq.Header.Set("Accept", "text/event-stream")

	resp, err := p.client.Do(hreq)
	if err != nil {
		if ctx.Err() != nil {
			return provider.Result{}, nil, ctx.Err()
		}
		if f := p.timeoutFailure(actx, err); f != nil {
			return provider.Result{}, f, nil
		}
		return provider.Result{}, &failure{err: p.fail("could not connect to the model server", err, true), retry: true}, nil
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		f := p.statusFailure(resp, model)
		if ctx.Err() != nil {
			return provider.Result{}, nil, ctx.Err()
		}
		return provider.Result{}, f, nil
	}
	// A server (or a proxy) that ignored "stream": true, or that reports an
	// error with a 200, answers with JSON: told apart from an event stream
	// by its first byte, not its Content-Type, which some label
	// text/event-stream, and others label an event stream JSON.
	ctype := resp.Header.Get("Content-Type")
	stream := bufio.NewReader(resp.Body)
	if firstByte(stream) == '{' {
		res, f := p.wholeAnswer(stream)
		if f != nil {
			// A read cut by a cancel or by a timeout says so, not that
			// the connection was lost.
			if ctx.Err() != nil {
				return provider.Result{}, nil, ctx.Err()
			}
			if tf := p.timeoutFailure(actx, f.err); tf != nil {
				return provider.Result{}, tf, nil
			}
			return res.Result, f, nil // the usage, when the server counted it
		}
		if res.text != "" {
			if err := emit(res.text); err != nil {
				return provider.Result{}, nil, err
			}
		}
		return res.Result, nil, nil
	}

	var (
		res      provider.Result
		events   int  // events read
		started  bool // a token (content or reasoning) arrived
		emitted  bool // emit was called
		finished bool // a finish_reason arrived, and no token since
		// Some relays put a finish_reason on every chunk, text and all,
		// empty and role-only ones too. Only a finish_reason on a chunk
		// with no token, whose chunk before had none, leaves the server
		// just trailerWait to close: as OpenAI, vLLM and Ollama end an
		// answer, and an answer of no text (tool calls only, filtered);
		// but a "stop" before any token only once a token has come, since
		// such a relay's empty chunks look the same while the model is
		// slow to start. Otherwise the idle timeout applies, and [DONE]
		// or the body's end close the answer. A token after a
		// finish_reason (finishUnreliable) shows them meaningless: only
		// [DONE] and the body's end close it then.
		finishBare       bool
		prevFinish       = true // the chunk before had a finish_reason (none before the first)
		finishUnreliable bool
		lastFinish       string // the last finish_reason that came
		// A finish_reason that said the answer was broken off (see
		// brokenOff): the attempt's failure, returned once the stream
		// ends, so that the usage that may follow is kept (the tokens
		// were spent); nothing after it is emitted.
		broken *failure
		pairs  pairJoiner
		sse    = newSSEReader(stream, maxEventBytes)
	)
	// end emits what the joiner still holds, once the answer is complete.
	// An answer of no text that a limit or a filter cut is a failure: the
	// person would see an empty answer and not know why.
	end := func() (provider.Result, *failure, error) {
		if rest := pairs.flush(); rest != "" {
			return res, nil, emit(rest)
		}
		if !emitted {
			if f := p.emptyAnswerFailure(lastFinish); f != nil {
				return res, f, nil
			}
		}
		return res, nil, nil
	}
	for {
		event, data, err := sse.next()
		if err != nil {
			if ctx.Err() != nil {
				return provider.Result{}, nil, ctx.Err()
			}
			if broken != nil {
				return res, broken, nil // whether it closed or stayed open
			}
			if finished && (!finishUnreliable || err == io.EOF) {
				// The answer is complete: a server that omits [DONE] and
				// closes, or keeps the response open past trailerWait.
				return end()
			}
			if f := p.timeoutFailure(actx, err); f != nil {
				return provider.Result{}, f, nil
			}
			if errors.Is(err, errEventTooLarge) {
				return provider.Result{}, &failure{err: p.fail(msgEventTooLarge, err, false)}, nil
			}
			if err == io.EOF && events == 0 && sse.junk {
				// Not an event stream (a captive portal's or a web
				// app's HTML page): asking again would get it again.
				return provider.Result{}, &failure{err: p.fail(msgMalformed, fmt.Errorf("a 200 answer of type %q holding no server-sent event", ctype), false)}, nil
			}
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			msg := "the connection to the model server was lost before it answered"
			if emitted {
				msg = "the connection to the model server was lost mid-answer"
			}
			return provider.Result{}, &failure{err: p.fail(msg, err, false), retry: true}, nil
		}
		events++
		data = bytes.TrimSpace(data)
		if string(data) == "[DONE]" {
			// Let the connection be reused: the body ends right after
			// [DONE]. A server that keeps it open is given trailerWait,
			// then the connection is closed.
			wd.arm(&timeoutError{phase: phaseIdle, after: p.trailerWait})
			_, _ = io.CopyN(io.Discard, resp.Body, 4096)
			if broken != nil {
				return res, broken, nil
			}
			return end()
		}
		// An error the server reports keeps the usage it reported before
		// (vLLM's continuous usage stats), as a broken-off answer does.
		if event == "error" {
			return res, p.errorEvent(data), nil
		}
		if len(data) == 0 {
			// A keep-alive some proxies send ("data:" and a blank
			// line): like a comment, it is not the model answering.
			continue
		}
		var c chunk
		if err := json.Unmarshal(data, &c); err != nil {
			return provider.Result{}, &failure{err: p.fail(msgMalformed, err, false)}, nil
		}
		if (len(c.Error) > 0 && string(c.Error) != "null") || c.Object == "error" {
			return res, p.errorEvent(data), nil
		}
		if c.Usage != nil {
			res.Usage = &chat.Usage{PromptTokens: c.Usage.PromptTokens, CompletionTokens: c.Usage.CompletionTokens}
		}
		if broken != nil {
			continue // only the usage (or [DONE]) is wanted now
		}
		for _, ch := range c.Choices {
			if ch.Index != 0 {
				continue // we never ask for n > 1
			}
			d := ch.Delta
			text, thinking, err := deltaText(&pairs, d.Content)
			if err != nil {
				return provider.Result{}, &failure{err: p.fail(msgMalformed, err, false)}, nil
			}
			token := text != "" || pairs.held != "" || thinking || d.ReasoningContent != "" || d.Reasoning != ""
			if token {
				started = true
				if finished {
					finished, finishUnreliable = false, true
				}
			}
			if text != "" {
				// emit may block (a slow consumer); that is not the server's
				// silence, so the watchdog waits.
				wd.arm(nil)
				emitted = true
				if err := emit(text); err != nil {
					return provider.Result{}, nil, err
				}
			}
			finish := ch.FinishReason != nil && *ch.FinishReason != ""
			if finish && brokenOff(*ch.FinishReason) {
				broken = p.brokenOffFailure(*ch.FinishReason)
				break
			}
			if finish {
				lastFinish = *ch.FinishReason
				finished, finishBare = true, !token && !prevFinish && (started || *ch.FinishReason != "stop")
			}
			prevFinish = finish
		}
		switch {
		case broken != nil:
			// Only the usage (or [DONE]) may follow, at once.
			wd.arm(&timeoutError{phase: phaseIdle, after: p.trailerWait})
		case finished && finishBare && !finishUnreliable:
			// Only the usage (or [DONE]) may follow, at once.
			wd.arm(&timeoutError{phase: phaseIdle, after: p.trailerWait})
		case started:
			wd.arm(&timeoutError{phase: phaseIdle, after: p.cfg.IdleTimeout})
		}
	}
}

// brokenOff reports whether a finish_reason says the answer did not end
// but was cut short by a failure: vLLM's "abort" (its engine dropped the
// request: shutdown, sleep, an abort) and OpenRouter's "error". The server
// may still send [DONE] after it, as after a whole answer.
func brokenOff(reason string) bool {
	return reason == "abort" || reason == "error"
}

// brokenOffFailure is the failure of an answer whose finish_reason says it
// was broken off (see brokenOff).
func (p *Provider) brokenOffFailure(reason string) *failure {
	return &failure{err: p.fail(fmt.Sprintf("the model server broke off the answer (finish_reason %q)", reason), nil, false)}
}

// emptyAnswerFailure is the failure of an answer of no text that a limit
// or a filter cut (its finish_reason), or nil: the person would otherwise
// see an empty answer and not know why.
func (p *Provider) emptyAnswerFailure(reason string) *failure {
	switch reason {
	case "length":
		return &failure{err: p.fail(`the model reached its output limit before any answer text (finish_reason "length")`, nil, false)}
	case "content_filter":
		return &failure{err: p.fail(`the model server's content filter withheld the answer (finish_reason "content_filter")`, nil, false)}
	}
	return nil
}

// deltaText returns the text of a delta's content: a JSON string, decoded
// by pairs, or a list of parts, as Mistral's reasoning models send it
// ([{"type":"thinking",…}] then [{"type":"text","text":…}]). thinking
// reports parts that are not text: not emitted, they show the model at work.
func deltaText(pairs *pairJoiner, raw json.RawMessage) (text string, thinking bool, err error) {
	if len(raw) == 0 || raw[0] != '[' {
		text, err = pairs.decode(raw)
		return text, false, err
	}
	text, thinking, err = partsText(raw)
	// A high half held from the chunk before has no partner here.
	return pairs.flush() + text, thinking, err
}

// partsText returns the text of a content given as a list of parts: that
// of its "text" parts, joined; thinking reports a part of another type.
func partsText(raw json.RawMessage) (text string, thinking bool, err error) {
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", false, err
	}
	var b strings.Builder
	for _, part := range parts {
		switch part.Type {
		case "text":
			b.WriteString(part.Text)
		case "":
		default:
			thinking = true
		}
	}
	return b.String(), thinking, nil
}

// trailerWait is how long a stream may stay open after its answer is
// complete (a finish_reason, or [DONE]) before the connection is closed.
// Provider.trailerWait holds it; tests shorten it.
const trailerWait = time.Second

// firstByte returns the first byte of r that is not white space (or a
// byte order mark), left unread; 0 when there is none.
func firstByte(r *bufio.Reader) byte {
	for {
		b, err := r.Peek(1)
		if err != nil {
			return 0
		}
		switch b[0] {
		case ' ', '\t', '\r', '\n':
			_, _ = r.ReadByte()
		case 0xEF: // a UTF-8 byte order mark
			if bom, err := r.Peek(3); err == nil && string(bom) == "\xEF\xBB\xBF" {
				_, _ = r.Discard(3)
				continue
			}
			return b[0]
		default:
			return b[0]
		}
	}
}

// whole is an answer that came as one chat.completion.
type whole struct {
	provider.Result
	text string
}

// wholeAnswer reads a JSON response to a streaming request: a whole
// chat.completion, whose text is the answer, or an error object. It is not
// retried either way: a retry would only make the server answer again.
func (p *Provider) wholeAnswer(body io.Reader) (whole, *failure) {
	raw, err := io.ReadAll(io.LimitReader(body, maxEventBytes+1))
	if err != nil {
		return whole{}, &failure{err: p.fail("the connection to the model server was lost before it answered", err, false)}
	}
	if len(raw) > maxEventBytes {
		return whole{}, &failure{err: p.fail(msgMalformed, errEventTooLarge, false)}
	}
	if detail, _ := p.errorDetail(raw); detail != "" {
		msg := "the model server reported an error: " + detail
		if p.rootHint != "" && strings.Contains(strings.ToLower(detail), "endpoint") {
			// LM Studio answers 200 to a path it does not serve.
			msg += ": try " + p.rootHint
		}
		return whole{}, &failure{err: p.fail(msg, fmt.Errorf("status 200: %s", detail), false)}
	}
	var c struct {
		Choices []struct {
			Index   int `json:"index"`
			Message *struct {
				Content json.RawMessage `json:"content"` // a string, a list of parts or null
			} `json:"message"`
			FinishReason string `json:"finish_reason"`
		} `json:"choices"`
		Usage *struct {
			PromptTokens     int `json:"prompt_tokens"`
			CompletionTokens int `json:"completion_tokens"`
		} `json:"usage"`
	}
	if err := json.Unmarshal(raw, &c); err != nil {
		return whole{}, &failure{err: p.fail(msgMalformed, err, false)}
	}
	var w whole
	found := false
	finish := ""
	for _, ch := range c.Choices {
		if ch.Index == 0 && ch.Message != nil {
			if w.text, err = messageText(ch.Message.Content); err != nil {
				return whole{}, &failure{err: p.fail(msgMalformed, err, false)}
			}
			found, finish = true, ch.FinishReason
		}
	}
	if !found {
		return whole{}, &failure{err: p.fail(msgMalformed, fmt.Errorf("a JSON answer without choices[0].message: %s", p.cut(string(raw), 200)), false)}
	}
	if c.Usage != nil {
		w.Usage = &chat.Usage{PromptTokens: c.Usage.PromptTokens, CompletionTokens: c.Usage.CompletionTokens}
	}
	// Its finish_reason means what it means in a stream; the tokens of an
	// answer broken off were spent all the same.
	if brokenOff(finish) {
		return whole{Result: w.Result}, p.brokenOffFailure(finish)
	}
	if w.text == "" {
		if f := p.emptyAnswerFailure(finish); f != nil {
			return w, f
		}
	}
	return w, nil
}

// messageText returns the text of a whole message's content: a string, a
// list of parts (see deltaText) or null.
func messageText(raw json.RawMessage) (string, error) {
	if len(raw) == 0 {
		return "", nil
	}
	if raw[0] == '[' {
		text, _, err := partsText(raw)
		return text, err
	}
	var text *string
	if err := json.Unmarshal(raw, &text); err != nil || text == nil {
		return "", err
	}
	return *text, nil
}

// timeoutFailure returns the failure for err when the watchdog cancelled
// the attempt, else nil.
func (p *Provider) timeoutFailure(actx context.Context, err error) *failure {
	var te *timeoutError
	if !errors.As(context.Cause(actx), &te) {
		return nil
	}
	if errors.Is(err, te) {
		err = nil // it only repeats te
	}
	// Only a connection that never came up is worth another try: a server
	// that took a minute not to answer will likely do it again.
	return &failure{err: p.fail(te.Error(), err, te.phase == phaseConnect), retry: te.phase == phaseConnect}
}

type phase int

const (
	phaseConnect phase = iota
	phaseFirstToken
	phaseIdle
)

// timeoutError is the cause with which the watchdog cancels an attempt.
type timeoutError struct {
	phase phase
	after time.Duration
}

func (e *timeoutError) Error() string {
	switch e.phase {
	case phaseConnect:
		return "could not connect to the model server within " + formatDuration(e.after)
	case phaseFirstToken:
		return "the model server did not start answering within " + formatDuration(e.after)
	default:
		return "the model server stopped sending tokens for " + formatDuration(e.after)
	}
}

// watchdog cancels an attempt when the phase it is armed for lasts too long.
// It is armed from the streaming goroutine and from the transport's
// GotConn callback.
type watchdog struct {
	cancel context.CancelCauseFunc

	mu      sync.Mutex
	timer   *time.Timer // guarded by mu; nil: disarmed
	stopped bool        // guarded by mu; the attempt is over
}

// arm replaces the pending deadline with te's, or disarms the watchdog when te
// is nil or has no limit.
func (w *watchdog) arm(te *timeoutError) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return
	}
	if w.timer != nil {
		w.timer.Stop()
		w.timer = nil
	}
	if te != nil && te.after > 0 {
		w.timer = time.AfterFunc(te.after, func() { w.cancel(te) })
	}
}

func (w *watchdog) stop() {
	w.arm(nil)
	w.mu.Lock()
	w.stopped = true
	w.mu.Unlock()
}

// backoff returns how long to wait before retry attempt+1: exponential,
// capped, with jitter in [d/2, d] so that many turns failing together do not
// come back together.
func backoff(attempt int) time.Duration {
	d := backoffMax
	if attempt < 8 {
		d = min(backoffBase<<attempt, backoffMax)
	}
	return d/2 + rand.N(d/2+1)
}

// formatDuration writes whole seconds as "60s" rather than time's "1m0s".
func formatDuration(d time.Duration) string {
	if d >= time.Second && d%time.Second == 0 {
		return fmt.Sprintf("%ds", d/time.Second)
	}
	return d.String()
}

type wireMessage struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type wireRequest struct {
	Model         string         `json:"model,omitempty"`
	Messages      []wireMessage  `json:"messages"`
	Stream        bool           `json:"stream"`
	StreamOptions *streamOptions `json:"stream_options,omitempty"`
}

type streamOptions struct {
	IncludeUsage bool `json:"include_usage"`
}

// requestBody builds the JSON request for model and msgs: the system prompt,
// then the latest messages that fit the budget.
func (p *Provider) requestBody(model string, msgs []provider.Message) wireRequest {
	budget := p.cfg.ContextBudgetBytes
	if budget > 0 {
		budget = max(budget-len(p.cfg.SystemPrompt), 0)
	}
	kept := trim(msgs, budget)
	r := wireRequest{Model: model, Stream: true, Messages: make([]wireMessage, 0, len(kept)+1)}
	if !p.noStreamOptions.Load() {
		r.StreamOptions = &streamOptions{IncludeUsage: true}
	}
	if p.cfg.SystemPrompt != "" {
		r.Messages = append(r.Messages, wireMessage{Role: "system", Content: p.cfg.SystemPrompt})
	}
	// Many chat templates (Mistral's, Gemma's) refuse two messages in a
	// row from one role, and a question whose turn failed or was cancelled
	// before any text has no answer stored: it is joined to the message
	// after it, so the model still sees it.
	for i, m := range kept {
		if n := len(r.Messages); i > 0 && n > 0 && r.Messages[n-1].Role == m.Role {
			r.Messages[n-1].Content += "\n\n" + m.Content
			continue
		}
		r.Messages = append(r.Messages, wireMessage{Role: m.Role, Content: m.Content})
	}
	return r
}

// trim returns the latest messages whose content totals at most budget bytes
// (negative: no limit). It always keeps the last user message and what
// follows it, however large. It also drops assistant messages at the front,
// whose question was dropped here or was not loaded (the worker offers the
// latest messages only): some chat templates require the conversation to
// start with a user turn.
func trim(msgs []provider.Message, budget int) []provider.Message {
	if len(msgs) == 0 {
		return msgs
	}
	keep := len(msgs) - 1
	for i := len(msgs) - 1; i >= 0; i-- {
		if msgs[i].Role == string(chat.RoleUser) {
			keep = i
			break
		}
	}
	total := 0
	for _, m := range msgs[keep:] {
		total += len(m.Content)
	}
	start := keep
	for start > 0 && (budget < 0 || total+len(msgs[start-1].Content) <= budget) {
		start--
		total += len(msgs[start].Content)
	}
	for start < keep && msgs[start].Role == string(chat.RoleAssistant) {
		start++
	}
	return msgs[start:]
}
