package openai

import (
	"bufio"
	"bytes"
	"errors"
	"io"
)

// errEventTooLarge is returned by [sseReader.next] when one line or one
// event's data exceeds the reader's limit: a server that never ends a line
// must not make us buffer without bound.
var errEventTooLarge = errors.New("server-sent event too large")

// sseReader decodes a text/event-stream body as the HTML Living Standard
// ("Interpreting an event stream") describes it, keeping only what the Chat
// Completions API uses: the type and data of each event. Lines end with LF,
// CRLF or a lone CR; lines starting with ':' are comments (keep-alives); id:,
// retry: and unknown fields are ignored; several data: lines of one event are
// joined with "\n"; a blank line dispatches the event.
//
// One field outside the standard is read: llama.cpp server reports a failure
// mid-stream as "error: {json}", which the standard would drop, leaving the
// turn to end as if complete. Its value is read as the data of an event of
// type "error", as if the server had sent "event: error" and "data: {json}".
//
// An sseReader is used by one goroutine. It never reads ahead of the line it
// needs, so an event is returned as soon as its blank line has arrived, even
// when the server split it across many writes.
type sseReader struct {
	br  *bufio.Reader
	max int // longest line and longest event data, in bytes

	started bool   // the first line (which may start with a BOM) was read
	skipLF  bool   // the previous line ended with CR: an LF right after it belongs to it
	line    []byte // the line being read; reused
	data    []byte // the data buffer of the event being read; reused
	event   string // the type of the event being read; "" until an event: field

	// junk is set once a line that is neither a comment nor a field the
	// stream may carry was read (a final one without its terminator too):
	// the body is something else, an HTML page say.
	junk bool
}

func newSSEReader(r io.Reader, max int) *sseReader {
	return &sseReader{br: bufio.NewReaderSize(r, 4096), max: max}
}

// next returns the type of the next event ("" when it has no event: field)
// and its data, without the final "\n". The slice is valid until the
// following call. At the end of the body, data lines not yet followed by a
// blank line are still returned as one event (some servers close right after
// "data: [DONE]\n"); a final line without its terminator is dropped. Then
// next returns io.EOF, or the read error that ended the body.
func (s *sseReader) next() (event string, data []byte, err error) {
	s.data = s.data[:0]
	s.event = ""
	hasData := false
	for {
		line, err := s.readLine()
		if err != nil {
			if err == io.EOF && len(s.line) > 0 && s.line[0] != ':' && !knownField(s.line) {
				s.junk = true
			}
			if err == io.EOF && hasData {
				return s.event, s.data[:len(s.data)-1], nil
			}
			return "", nil, err
		}
		if len(line) == 0 {
			if !hasData {
				s.event = "" // the spec: an event without data is not dispatched
				continue
			}
			return s.event, s.data[:len(s.data)-1], nil
		}
		if line[0] == ':' {
			continue
		}
		field, value := line, []byte(nil)
		if i := bytes.IndexByte(line, ':'); i >= 0 {
			field, value = line[:i], line[i+1:]
			if len(value) > 0 && value[0] == ' ' {
				value = value[1:]
			}
		}
		switch string(field) {
		case "event":
			s.event = string(value)
			continue
		case "error":
			s.event = "error"
		case "data":
		case "id", "retry":
			continue
		default:
			s.junk = true
			continue
		}
		if len(s.data)+len(value)+1 > s.max {
			return "", nil, errEventTooLarge
		}
		s.data = append(s.data, value...)
		s.data = append(s.data, '\n')
		hasData = true
	}
}

// knownField reports whether line starts with the name of a field the
// stream may carry, followed by a colon or nothing.
func knownField(line []byte) bool {
	field, _, _ := bytes.Cut(line, []byte(":"))
	switch string(field) {
	case "data", "event", "id", "retry", "error":
		return true
	}
	return false
}

// readLine returns the next line without its terminator. The slice is valid
// until the following call.
func (s *sseReader) readLine() ([]byte, error) {
	s.line = s.line[:0]
	for {
		c, err := s.br.ReadByte()
		if err != nil {
			return nil, err // a partial line is dropped
		}
		if s.skipLF {
			s.skipLF = false
			if c == '\n' {
				continue
			}
		}
		switch c {
		case '\r':
			s.skipLF = true
			return s.endLine(), nil
		case '\n':
			return s.endLine(), nil
		}
		if len(s.line) >= s.max {
			return nil, errEventTooLarge
		}
		s.line = append(s.line, c)
	}
}

// endLine strips the byte order mark the spec allows before the first line.
func (s *sseReader) endLine() []byte {
	if !s.started {
		s.started = true
		return bytes.TrimPrefix(s.line, []byte("\xEF\xBB\xBF"))
	}
	return s.line
}
