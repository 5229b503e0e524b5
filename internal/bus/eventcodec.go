package bus

import (
	"strconv"

	"github.com/tokenrelay/tokenrelay/internal/jsonstr"
)

// Deltas are most of the bus's traffic; they are encoded and decoded here
// without reflection. The format is the same JSON that encoding/json writes
// for an Event with only Seq, Off, Text and TS set, so either side may use
// either codec.

// appendDelta appends the JSON of delta event e.
func appendDelta(dst []byte, e *Event) []byte {
	dst = append(dst, `{"q":`...)
	dst = strconv.AppendInt(dst, e.Seq, 10)
	if e.Off != 0 {
		dst = append(dst, `,"o":`...)
		dst = strconv.AppendInt(dst, e.Off, 10)
	}
	if e.Text != "" {
		dst = append(dst, `,"x":`...)
		dst = jsonstr.Append(dst, []byte(e.Text))
	}
	if e.TS != 0 {
		dst = append(dst, `,"ts":`...)
		dst = strconv.AppendInt(dst, e.TS, 10)
	}
	return append(dst, '}')
}

// decodeDelta parses what appendDelta writes (in any key order, with any
// JSON whitespace). It reports false for anything else, which the caller
// then hands to encoding/json.
func decodeDelta(data []byte, e *Event) bool {
	i := skipSpace(data, 0)
	if i >= len(data) || data[i] != '{' {
		return false
	}
	i = skipSpace(data, i+1)
	if i < len(data) && data[i] == '}' {
		return skipSpace(data, i+1) == len(data)
	}
	for {
		// key: one of ours, never escaped
		if i >= len(data) || data[i] != '"' {
			return false
		}
		end := i + 1
		for end < len(data) && data[end] != '"' && data[end] != '\\' {
			end++
		}
		if end >= len(data) || data[end] != '"' {
			return false
		}
		key := string(data[i+1 : end])
		i = skipSpace(data, end+1)
		if i >= len(data) || data[i] != ':' {
			return false
		}
		i = skipSpace(data, i+1)
		switch key {
		case "q", "o", "ts":
			j := i
			for j < len(data) && (data[j] == '-' || data[j] >= '0' && data[j] <= '9') {
				j++
			}
			digits := data[i:j]
			if len(digits) > 0 && digits[0] == '-' {
				digits = digits[1:]
			}
			if len(digits) > 1 && digits[0] == '0' {
				return false // JSON has no leading zeros
			}
			n, err := strconv.ParseInt(string(data[i:j]), 10, 64)
			if err != nil {
				return false
			}
			switch key {
			case "q":
				e.Seq = n
			case "o":
				e.Off = n
			default:
				e.TS = n
			}
			i = j
		case "x":
			if i >= len(data) || data[i] != '"' {
				return false
			}
			j := i + 1
			for j < len(data) && data[j] != '"' {
				if data[j] == '\\' {
					j++
				}
				j++
			}
			if j >= len(data) {
				return false
			}
			s, err := jsonstr.Decode(data[i : j+1])
			if err != nil {
				return false
			}
			e.Text = s
			i = j + 1
		default:
			return false
		}
		i = skipSpace(data, i)
		if i >= len(data) {
			return false
		}
		if data[i] == '}' {
			return skipSpace(data, i+1) == len(data)
		}
		if data[i] != ',' {
			return false
		}
		i = skipSpace(data, i+1)
	}
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}
