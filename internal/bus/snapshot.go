package bus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// The text of a turn is kept in the turns bucket as immutable chunks of
// ChunkSize bytes (key "<turn>.<i>") plus a head (key "<turn>") holding the
// rest of the text, the seq it reaches and sparse marks. A snapshot write
// therefore costs the new text since the last write, not the whole answer,
// and reading one costs one head and len/ChunkSize chunk reads however many
// deltas the turn had.
const (
	ChunkSize = 64 << 10
	// MarkEvery is the spacing, in deltas, of the marks that map a seq to a
	// byte offset; locating an arbitrary seq replays at most about this many
	// events from the stream.
	MarkEvery = 256
)

// ErrNoSnapshot is returned by ReadSnapshot when a turn has none (it has not
// produced text yet, or its snapshot expired).
var ErrNoSnapshot = errors.New("no snapshot")

// Mark says that after delta Seq the turn's text was Len bytes long, and that
// delta Seq's event has stream sequence StreamSeq.
type Mark struct {
	Seq       int64
	Len       int64
	StreamSeq uint64
}

// MarshalJSON encodes a mark compactly as [seq,len,sseq].
func (m Mark) MarshalJSON() ([]byte, error) {
	return json.Marshal([3]uint64{uint64(m.Seq), uint64(m.Len), m.StreamSeq})
}

// UnmarshalJSON decodes [seq,len,sseq].
func (m *Mark) UnmarshalJSON(b []byte) error {
	var a [3]uint64
	if err := json.Unmarshal(b, &a); err != nil {
		return err
	}
	m.Seq, m.Len, m.StreamSeq = int64(a[0]), int64(a[1]), a[2]
	return nil
}

// Snapshot is a turn's text up to delta Seq.
type Snapshot struct {
	ConversationID string
	Seq            int64
	StreamSeq      uint64 // stream sequence of delta Seq; 0 when Seq is 0
	Text           string
	Marks          []Mark // ascending; the snapshot point itself is not included
	Status         chat.TurnStatus
}

// Locate returns the best known mark at or before seq: the text length after
// a delta ≤ seq and that delta's stream sequence (zeros mean "from the start").
func (s *Snapshot) Locate(seq int64) Mark {
	if seq >= s.Seq && s.Seq > 0 {
		return Mark{Seq: s.Seq, Len: int64(len(s.Text)), StreamSeq: s.StreamSeq}
	}
	i := sort.Search(len(s.Marks), func(i int) bool { return s.Marks[i].Seq > seq })
	if i == 0 {
		return Mark{}
	}
	return s.Marks[i-1]
}

type snapshotHead struct {
	Conv      string          `json:"c"`
	Seq       int64           `json:"q"`
	StreamSeq uint64          `json:"ss,omitempty"`
	Chunks    int             `json:"n,omitempty"`
	Tail      []byte          `json:"tl,omitempty"`
	Marks     []Mark          `json:"mk,omitempty"`
	Status    chat.TurnStatus `json:"st"`
}

func chunkKey(turnID string, i int) string {
	return Token(turnID) + "." + strconv.Itoa(i)
}

// SnapshotWriter keeps one turn's snapshot current. It is used by the one
// worker producing the turn and is not safe for concurrent use.
type SnapshotWriter struct {
	b        *Bus
	turnID   string
	conv     string
	chunks   int // chunks already written
	marks    []Mark
	lastMark int64
}

// NewSnapshotWriter returns a writer for a turn starting with no text.
func (b *Bus) NewSnapshotWriter(conversationID, turnID string) *SnapshotWriter {
	return &SnapshotWriter{b: b, turnID: turnID, conv: conversationID}
}

// snapshotWriteTimeout bounds a Write whose ctx has no deadline. A snapshot
// is best effort (a missed one only lengthens a resume's tail) and its
// writer holds up the turn's next deltas: a write sent to a NATS node that
// stopped gets no answer, and must not wait out JetStream's 5s default.
const snapshotWriteTimeout = time.Second

// Write records that the turn's text after delta seq (stream sequence sseq)
// is text. text only ever grows between calls.
func (w *SnapshotWriter) Write(ctx context.Context, text []byte, seq int64, sseq uint64, status chat.TurnStatus) error {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, snapshotWriteTimeout)
		defer cancel()
	}
	for (w.chunks+1)*ChunkSize <= len(text) {
		c := text[w.chunks*ChunkSize : (w.chunks+1)*ChunkSize]
		if _, err := w.b.turns.Put(ctx, chunkKey(w.turnID, w.chunks), c); err != nil {
			return fmt.Errorf("write snapshot chunk: %w", err)
		}
		w.chunks++
	}
	if seq-w.lastMark >= MarkEvery && sseq != 0 {
		w.marks = append(w.marks, Mark{Seq: seq, Len: int64(len(text)), StreamSeq: sseq})
		w.lastMark = seq
	}
	h := snapshotHead{
		Conv: w.conv, Seq: seq, StreamSeq: sseq, Chunks: w.chunks,
		Tail: text[w.chunks*ChunkSize:], Marks: w.marks, Status: status,
	}
	data, err := json.Marshal(h)
	if err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	if _, err := w.b.turns.Put(ctx, Token(w.turnID), data); err != nil {
		return fmt.Errorf("write snapshot: %w", err)
	}
	return nil
}

// ReadSnapshot returns the latest snapshot of a turn, or ErrNoSnapshot.
func (b *Bus) ReadSnapshot(ctx context.Context, turnID string) (Snapshot, error) {
	e, err := b.turns.Get(ctx, Token(turnID))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Snapshot{}, ErrNoSnapshot
	}
	if err != nil {
		return Snapshot{}, fmt.Errorf("read snapshot: %w", err)
	}
	var h snapshotHead
	if err := json.Unmarshal(e.Value(), &h); err != nil {
		return Snapshot{}, fmt.Errorf("read snapshot: %w", err)
	}
	var sb strings.Builder
	sb.Grow(h.Chunks*ChunkSize + len(h.Tail))
	for i := 0; i < h.Chunks; i++ {
		c, err := b.turns.Get(ctx, chunkKey(turnID, i))
		if err != nil {
			return Snapshot{}, fmt.Errorf("read snapshot chunk %d: %w", i, err)
		}
		// A chunk is immutable once written, so it is consistent with any
		// head that counts it.
		sb.Write(c.Value())
	}
	sb.Write(h.Tail)
	return Snapshot{
		ConversationID: h.Conv, Seq: h.Seq, StreamSeq: h.StreamSeq,
		Text: sb.String(), Marks: h.Marks, Status: h.Status,
	}, nil
}
