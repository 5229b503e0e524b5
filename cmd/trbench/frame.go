package main

import (
	"errors"
	"strconv"
)

// frame is the part of a server frame the load tool looks at. Byte slices
// alias the read buffer and are valid until the next read.
type frame struct {
	typ, conv, turn, status, code, id []byte
	seq, from, ts                     int64
	textLen                           int // length of "text" as encoded
	completion                        int64
	hasActive                         bool // joined.active is an object
	active                            activeTurn
	messages                          int // entries of joined.messages
}

type activeTurn struct {
	turn      []byte
	seq, from int64
	textLen   int
}

var errSyntax = errors.New("frame: bad JSON")

// parseFrame fills f from b without allocating: the tool reads every frame
// of every connection on the same two cores as the server, so a reflection
// decoder per delta would make it the bottleneck. It accepts fields in any
// order and skips those it does not know.
func parseFrame(b []byte, f *frame) error {
	*f = frame{}
	s := scanner{b: b}
	return s.object(func(key []byte) error {
		switch string(key) {
		case "type":
			return s.strInto(&f.typ)
		case "conversation_id":
			return s.strInto(&f.conv)
		case "turn_id":
			return s.strInto(&f.turn)
		case "status":
			return s.strInto(&f.status)
		case "code":
			return s.strInto(&f.code)
		case "id":
			return s.strInto(&f.id)
		case "seq":
			return s.intInto(&f.seq)
		case "from":
			return s.intInto(&f.from)
		case "ts":
			return s.intInto(&f.ts)
		case "text":
			start := s.i
			if err := s.skip(); err != nil {
				return err
			}
			f.textLen = s.i - start
			return nil
		case "usage":
			if s.peek() != '{' {
				return s.skip()
			}
			return s.object(func(k []byte) error {
				if string(k) == "completion_tokens" {
					return s.intInto(&f.completion)
				}
				return s.skip()
			})
		case "active":
			if s.peek() != '{' {
				return s.skip()
			}
			f.hasActive = true
			a := &f.active
			return s.object(func(k []byte) error {
				switch string(k) {
				case "turn_id":
					return s.strInto(&a.turn)
				case "seq":
					return s.intInto(&a.seq)
				case "from":
					return s.intInto(&a.from)
				case "text":
					start := s.i
					if err := s.skip(); err != nil {
						return err
					}
					a.textLen = s.i - start
					return nil
				}
				return s.skip()
			})
		case "messages":
			if s.peek() != '[' {
				return s.skip()
			}
			return s.array(func() error {
				f.messages++
				return s.skip()
			})
		}
		return s.skip()
	})
}

type scanner struct {
	b []byte
	i int
}

func (s *scanner) space() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

func (s *scanner) peek() byte {
	s.space()
	if s.i < len(s.b) {
		return s.b[s.i]
	}
	return 0
}

// object calls field for each key with the scanner on its value; field
// must consume the value.
func (s *scanner) object(field func(key []byte) error) error {
	if s.peek() != '{' {
		return errSyntax
	}
	s.i++
	if s.peek() == '}' {
		s.i++
		return nil
	}
	for {
		key, err := s.str()
		if err != nil {
			return err
		}
		if s.peek() != ':' {
			return errSyntax
		}
		s.i++
		s.space()
		if err := field(key); err != nil {
			return err
		}
		switch s.peek() {
		case ',':
			s.i++
		case '}':
			s.i++
			return nil
		default:
			return errSyntax
		}
	}
}

func (s *scanner) array(elem func() error) error {
	if s.peek() != '[' {
		return errSyntax
	}
	s.i++
	if s.peek() == ']' {
		s.i++
		return nil
	}
	for {
		s.space()
		if err := elem(); err != nil {
			return err
		}
		switch s.peek() {
		case ',':
			s.i++
		case ']':
			s.i++
			return nil
		default:
			return errSyntax
		}
	}
}

// str reads a string and returns its raw (still escaped) content.
func (s *scanner) str() ([]byte, error) {
	if s.peek() != '"' {
		return nil, errSyntax
	}
	s.i++
	start := s.i
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case '"':
			v := s.b[start:s.i]
			s.i++
			return v, nil
		case '\\':
			s.i += 2
		default:
			s.i++
		}
	}
	return nil, errSyntax
}

func (s *scanner) strInto(dst *[]byte) error {
	if s.peek() == 'n' {
		return s.skip() // null
	}
	v, err := s.str()
	*dst = v
	return err
}

func (s *scanner) intInto(dst *int64) error {
	s.space()
	start := s.i
	if err := s.skip(); err != nil {
		return err
	}
	raw := s.b[start:s.i]
	if string(raw) == "null" {
		return nil
	}
	n, err := strconv.ParseInt(string(raw), 10, 64)
	if err != nil {
		fl, ferr := strconv.ParseFloat(string(raw), 64)
		if ferr != nil {
			return errSyntax
		}
		n = int64(fl)
	}
	*dst = n
	return nil
}

// skip consumes one value of any kind.
func (s *scanner) skip() error {
	switch c := s.peek(); {
	case c == '"':
		_, err := s.str()
		return err
	case c == '{':
		return s.object(func([]byte) error { return s.skip() })
	case c == '[':
		return s.array(s.skip)
	case c == '-' || (c >= '0' && c <= '9'):
		s.i++
		for s.i < len(s.b) && isNumByte(s.b[s.i]) {
			s.i++
		}
		return nil
	case c == 't' || c == 'f' || c == 'n':
		for s.i < len(s.b) && s.b[s.i] >= 'a' && s.b[s.i] <= 'z' {
			s.i++
		}
		return nil
	}
	return errSyntax
}

func isNumByte(c byte) bool {
	return c >= '0' && c <= '9' || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-'
}
