package openai

import (
	"errors"
	"io"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
)

// readEvents returns the data of every event in r and the error that ended it.
func readEvents(r io.Reader, max int) ([]string, error) {
	s := newSSEReader(r, max)
	var got []string
	for {
		_, data, err := s.next()
		if err != nil {
			return got, err
		}
		got = append(got, string(data))
	}
}

func TestSSEReader(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []string
	}{
		{"one event", "data: a\n\n", []string{"a"}},
		{"two events", "data: a\n\ndata: b\n\n", []string{"a", "b"}},
		{"CRLF", "data: a\r\n\r\ndata: b\r\n\r\n", []string{"a", "b"}},
		{"lone CR", "data: a\r\rdata: b\r\r", []string{"a", "b"}},
		{"mixed endings", "data: a\r\n\ndata: b\r\rdata: c\n\r\n", []string{"a", "b", "c"}},
		{"multi-line data", "data: a\ndata: b\ndata:\n\n", []string{"a\nb\n"}},
		{"no space after colon", "data:a\n\n", []string{"a"}},
		{"only one space stripped", "data:  a \n\n", []string{" a "}},
		{"comments", ": hi\n:\ndata: a\n: mid\ndata: b\n\n", []string{"a\nb"}},
		{"ignored fields", "event: x\nid: 1\nretry: 5\nfoo: bar\ndata: a\n\n", []string{"a"}},
		{"field without colon", "data\n\n", []string{""}},
		{"event without data is not dispatched", "event: x\n\n\n\ndata: a\n\n", []string{"a"}},
		{"colon in value", "data: {\"a\":\"b:c\"}\n\n", []string{`{"a":"b:c"}`}},
		{"datax is not data", "datax: a\n\ndata: b\n\n", []string{"b"}},
		{"BOM", "\xEF\xBB\xBFdata: a\n\n", []string{"a"}},
		{"BOM only at the start", "data: a\n\n\xEF\xBB\xBFdata: b\n\n", []string{"a"}},
		{"pending data at EOF", "data: a\n\ndata: b\n", []string{"a", "b"}},
		{"partial line at EOF dropped", "data: a\n\ndata: b", []string{"a"}},
		{"empty", "", nil},
	}
	readers := []struct {
		name string
		wrap func(io.Reader) io.Reader
	}{
		{"whole", func(r io.Reader) io.Reader { return r }},
		{"one byte at a time", iotest.OneByteReader},
		{"EOF with data", iotest.DataErrReader},
	}
	for _, tt := range tests {
		for _, rd := range readers {
			t.Run(tt.name+"/"+rd.name, func(t *testing.T) {
				got, err := readEvents(rd.wrap(strings.NewReader(tt.in)), 1<<10)
				if err != io.EOF {
					t.Errorf("ended with %v, want io.EOF", err)
				}
				if !slices.Equal(got, tt.want) {
					t.Errorf("events %q, want %q", got, tt.want)
				}
			})
		}
	}
}

func TestSSEReaderEventType(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []string // type, then data
	}{
		{"none", "data: a\n\n", []string{"", "a"}},
		{"event field", "event: message\ndata: a\n\n", []string{"message", "a"}},
		{"after the data", "data: a\nevent: error\n\n", []string{"error", "a"}},
		{"last one counts", "event: a\nevent: b\ndata: x\n\n", []string{"b", "x"}},
		{"reset after each event", "event: error\ndata: a\n\ndata: b\n\n", []string{"error", "a", "", "b"}},
		{"reset by an event without data", "event: error\n\ndata: a\n\n", []string{"", "a"}},
		// llama.cpp server's error field.
		{"error field", "data: a\n\nerror: {\"code\":500}\n\ndata: [DONE]\n\n", []string{"", "a", "error", `{"code":500}`, "", "[DONE]"}},
		{"error field at EOF", "error: boom\n", []string{"error", "boom"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newSSEReader(strings.NewReader(tt.in), 1<<10)
			var got []string
			for {
				event, data, err := s.next()
				if err != nil {
					if err != io.EOF {
						t.Errorf("ended with %v, want io.EOF", err)
					}
					break
				}
				got = append(got, event, string(data))
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("events %q, want %q", got, tt.want)
			}
		})
	}
}

func TestSSEReaderJunk(t *testing.T) {
	tests := []struct {
		in   string
		want bool
	}{
		{"data: a\n\n", false},
		{": comment\n\nevent: x\nid: 1\nretry: 5\nerror: e\ndata\n\n", false},
		{"data: [DONE]", false}, // a final line without its terminator
		{"<html>\n", true},
		{"<html>", true},
		{"foo: bar\ndata: a\n\n", true},
	}
	for _, tt := range tests {
		s := newSSEReader(strings.NewReader(tt.in), 1<<10)
		for {
			if _, _, err := s.next(); err != nil {
				break
			}
		}
		if s.junk != tt.want {
			t.Errorf("%q: junk = %v, want %v", tt.in, s.junk, tt.want)
		}
	}
}

func TestSSEReaderTooLarge(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []string
	}{
		{"long line", "data: ok\n\ndata: " + strings.Repeat("x", 64) + "\n\n", []string{"ok"}},
		{"long comment", ":" + strings.Repeat("x", 64) + "\n", nil},
		{"many data lines", strings.Repeat("data: xxxxxxxx\n", 8) + "\n", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := readEvents(strings.NewReader(tt.in), 32)
			if !errors.Is(err, errEventTooLarge) {
				t.Errorf("ended with %v, want errEventTooLarge", err)
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("events %q, want %q", got, tt.want)
			}
		})
	}
}

func TestSSEReaderReadError(t *testing.T) {
	errBoom := errors.New("boom")
	r := io.MultiReader(strings.NewReader("data: a\n\ndata: b\n"), iotest.ErrReader(errBoom))
	got, err := readEvents(r, 1<<10)
	if err != errBoom {
		t.Errorf("ended with %v, want the read error", err)
	}
	if !slices.Equal(got, []string{"a"}) {
		t.Errorf("events %q, want [a]", got)
	}
}

// FuzzSSEReader checks that the reader never panics and that how the bytes
// are split across reads never changes the events.
func FuzzSSEReader(f *testing.F) {
	for _, seed := range []string{
		"data: a\n\n",
		"data: a\r\n\r\n: c\r\ndata: b\r\n\r\n",
		"data: a\r\rdata:b\ndata: c\n\n",
		"event: x\nid: 1\ndata: {\"choices\":[]}\n\ndata: [DONE]\n\n",
		"\xEF\xBB\xBFdata\n\n",
		"data: a\r",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, in string) {
		whole, errWhole := readEvents(strings.NewReader(in), 256)
		bytewise, errBytewise := readEvents(iotest.OneByteReader(strings.NewReader(in)), 256)
		if !slices.Equal(whole, bytewise) || errWhole != errBytewise {
			t.Errorf("whole: %q, %v; one byte at a time: %q, %v", whole, errWhole, bytewise, errBytewise)
		}
		for _, e := range whole {
			if len(e) > 256 {
				t.Errorf("event of %d bytes passed the 256-byte limit", len(e))
			}
		}
	})
}
