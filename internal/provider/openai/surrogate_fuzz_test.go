package openai

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// FuzzPairJoiner checks the decoding of streamed content, split into chunks
// however a server may split it: what the joiner makes of the chunks, one
// at a time and then flushed, is what decoding their text whole gives,
// whichever UTF-16 units (lone surrogate halves included) the text holds
// and wherever the chunks break it. Each byte pair of units is one UTF-16
// unit; a set bit of splits ends a chunk after that unit, and one of
// empties then adds a chunk whose content is "".
func FuzzPairJoiner(f *testing.F) {
	f.Add([]byte{0x3d, 0xd8, 0x00, 0xde}, uint64(1), uint64(0)) // 😀, split between its halves
	f.Add([]byte{0x3d, 0xd8, 0x41, 0x00}, uint64(1), uint64(0)) // a lone high half
	f.Add([]byte{0x5c, 0x00, 0x3d, 0xd8, 0x00, 0xde}, uint64(3), uint64(0))
	f.Add([]byte{0x3d, 0xd8, 0x00, 0xde, 0x22, 0x00}, uint64(0), uint64(0))
	f.Fuzz(func(t *testing.T, units []byte, splits, empties uint64) {
		if len(units)%2 == 1 {
			units = units[:len(units)-1]
		}
		n := len(units) / 2
		if n > 64 {
			n = 64
		}
		// Each unit is escaped, as a server that escapes everything but
		// ASCII letters does; a chunk boundary may fall anywhere.
		var whole strings.Builder
		var chunks []string
		var cur strings.Builder
		cur.WriteByte('"')
		for i := 0; i < n; i++ {
			u := uint16(units[2*i]) | uint16(units[2*i+1])<<8
			var esc string
			if 'a' <= u && u <= 'z' || 'A' <= u && u <= 'Z' {
				esc = string(rune(u))
			} else {
				esc = fmt.Sprintf(`\u%04x`, u)
			}
			whole.WriteString(esc)
			cur.WriteString(esc)
			if splits&(1<<i) != 0 {
				chunks = append(chunks, cur.String()+`"`)
				cur.Reset()
				cur.WriteByte('"')
				if empties&(1<<i) != 0 {
					chunks = append(chunks, `""`)
				}
			}
		}
		chunks = append(chunks, cur.String()+`"`)

		var want string
		if err := json.Unmarshal([]byte(`"`+whole.String()+`"`), &want); err != nil {
			t.Fatalf("whole %q: %v", whole.String(), err)
		}
		var j pairJoiner
		var got strings.Builder
		for _, c := range chunks {
			s, err := j.decode(json.RawMessage(c))
			if err != nil {
				t.Fatalf("chunk %s: %v", c, err)
			}
			got.WriteString(s)
			// A chunk without content in between changes nothing.
			if s, err := j.decode(nil); err != nil || s != "" {
				t.Fatalf("no content: %q, %v", s, err)
			}
		}
		got.WriteString(j.flush())
		if got.String() != want {
			t.Fatalf("chunks %q decode to %q, the whole to %q", chunks, got.String(), want)
		}
	})
}
