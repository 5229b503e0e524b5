package bus

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/tokenrelay/tokenrelay/internal/chat"
)

// The text of a turn is kept in the turns bucket as immutable chunks of
// ChunkSize bytes (key "<turn>.<i>") plus a head (key "<turn>") holding the
// rest of the text and the seq it reaches. Beside the text, an index gives
// the text's length after every delta: immutable chunks of IndexSize
// lengths (key "<turn>.x<k>") and the newest ones in the head. A snapshot
// write costs the text and lengths added since the last one; a resume after
// any seq costs the head, at most one index chunk, and the text chunks
// after that seq, however long the answer is.
const (
	ChunkSize = 64 << 10
	IndexSize = 1024
)

// ErrNoSnapshot is returned when a turn has no snapshot (it has not
// produced text yet, or its snapshot expired).
var ErrNoSnapshot = errors.New("no snapshot")

// Snapshot is a turn's text up to delta Seq.
type Snapshot struct {
	ConversationID string
	Seq            int64
	// StreamSeq is where the turn's stored events after the snapshot
	// begin: the stream sequence of the newest delta up to Seq that the
	// stream stored, or 0 when none did (Seq is 0, or the turn's deltas
	// were journaled, see Journal), and the turn is read from its start.
	StreamSeq uint64
	Text      string
	Status    chat.TurnStatus
}

// Head is a snapshot without its text: what a resume reads first.
type Head struct {
	ConversationID string
	Seq            int64
	StreamSeq      uint64
	Len            int64 // text length after delta Seq
	Status         chat.TurnStatus

	turnID    string
	chunks    int
	tail      []byte
	indexed   int64    // deltas whose length is known: 1..indexed
	idxChunks int      // full index chunks written
	ends      []uint32 // lengths after deltas idxChunks*IndexSize+1 .. indexed
}

type snapshotHead struct {
	Conv      string          `json:"c"`
	Seq       int64           `json:"q"`
	StreamSeq uint64          `json:"ss,omitempty"`
	Chunks    int             `json:"n,omitempty"`
	Tail      []byte          `json:"tl,omitempty"`
	Indexed   int64           `json:"ix,omitempty"`
	IdxChunks int             `json:"xn,omitempty"`
	Ends      []byte          `json:"xe,omitempty"` // little-endian uint32s
	Status    chat.TurnStatus `json:"st"`
}

func chunkKey(turnID string, i int) string {
	return Token(turnID) + "." + strconv.Itoa(i)
}

func indexKey(turnID string, k int) string {
	return Token(turnID) + ".x" + strconv.Itoa(k)
}

func packEnds(ends []uint32) []byte {
	b := make([]byte, 4*len(ends))
	for i, e := range ends {
		binary.LittleEndian.PutUint32(b[4*i:], e)
	}
	return b
}

func unpackEnds(b []byte) []uint32 {
	ends := make([]uint32, len(b)/4)
	for i := range ends {
		ends[i] = binary.LittleEndian.Uint32(b[4*i:])
	}
	return ends
}

// SnapshotWriter keeps one turn's snapshot current. It is used by the one
// worker producing the turn and is not safe for concurrent use.
type SnapshotWriter struct {
	b         *Bus
	turnID    string
	conv      string
	chunks    int      // text chunks already written
	idxChunks int      // index chunks already written
	ends      []uint32 // lengths after the deltas not in a written index chunk
	recorded  int64    // deltas recorded
}

// NewSnapshotWriter returns a writer for a turn starting with no text.
func (b *Bus) NewSnapshotWriter(conversationID, turnID string) *SnapshotWriter {
	return &SnapshotWriter{b: b, turnID: turnID, conv: conversationID}
}

// Record notes the text length after the next delta (seq 1, 2, …). Call it
// for every delta, in order, before a Write that covers it.
func (w *SnapshotWriter) Record(end int) {
	w.ends = append(w.ends, uint32(end))
	w.recorded++
}

// snapshotWriteTimeout bounds a Write whose ctx has no deadline. A snapshot
// is best effort (a missed one only lengthens a resume's tail) and its
// writer holds up the turn's next deltas: a write sent to a NATS node that
// stopped gets no answer, and must not wait out JetStream's 5s default.
const snapshotWriteTimeout = time.Second

// Write records that the turn's text after delta seq is text, with sseq the
// Snapshot's StreamSeq. text only ever grows between calls.
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
	indexed := min(seq, w.recorded)
	for int64(w.idxChunks+1)*IndexSize <= indexed {
		if _, err := w.b.turns.Put(ctx, indexKey(w.turnID, w.idxChunks), packEnds(w.ends[:IndexSize])); err != nil {
			return fmt.Errorf("write snapshot index: %w", err)
		}
		w.ends = append(w.ends[:0], w.ends[IndexSize:]...)
		w.idxChunks++
	}
	h := snapshotHead{
		Conv: w.conv, Seq: seq, StreamSeq: sseq, Chunks: w.chunks, Tail: text[w.chunks*ChunkSize:],
		Indexed: indexed, IdxChunks: w.idxChunks,
		Ends: packEnds(w.ends[:indexed-int64(w.idxChunks)*IndexSize]), Status: status,
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

// ReadHead returns the head of the latest snapshot of turn turnID of
// conversation conv, or ErrNoSnapshot. A snapshot of another
// conversation's turn of the same id is none of this one's: a turn id of a
// deleted conversation may be taken again (see store.ForgetDeletedTurns),
// and the old turn's snapshot may outlive that, or a follower of the old
// turn read the new one's.
func (b *Bus) ReadHead(ctx context.Context, conv, turnID string) (Head, error) {
	e, err := b.turns.Get(ctx, Token(turnID))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Head{}, ErrNoSnapshot
	}
	if err != nil {
		return Head{}, fmt.Errorf("read snapshot: %w", err)
	}
	h, err := decodeHead(turnID, e.Value())
	if err == nil && h.ConversationID != "" && h.ConversationID != conv {
		return Head{}, ErrNoSnapshot
	}
	return h, err
}

// decodeHead decodes the head of turn turnID's snapshot. A head that does
// not add up (a negative count, or an index that is not the one its
// counts call for) is an error: EndOf and ReadText trust what it returns.
func decodeHead(turnID string, data []byte) (Head, error) {
	var h snapshotHead
	if err := json.Unmarshal(data, &h); err != nil {
		return Head{}, fmt.Errorf("read snapshot: %w", err)
	}
	if h.Seq < 0 || h.Chunks < 0 || h.Chunks > math.MaxInt32 || h.IdxChunks < 0 || h.Indexed < 0 || h.Indexed > h.Seq ||
		len(h.Ends)%4 != 0 || int64(len(h.Ends)/4) != h.Indexed-int64(h.IdxChunks)*IndexSize {
		return Head{}, fmt.Errorf("read snapshot: inconsistent head %.200s", data)
	}
	return Head{
		ConversationID: h.Conv, Seq: h.Seq, StreamSeq: h.StreamSeq,
		Len: int64(h.Chunks*ChunkSize + len(h.Tail)), Status: h.Status,
		turnID: turnID, chunks: h.Chunks, tail: h.Tail,
		indexed: h.Indexed, idxChunks: h.IdxChunks, ends: unpackEnds(h.Ends),
	}, nil
}

// EndOf returns the text length after delta seq, reading at most one
// index chunk; ok is false when the snapshot does not know it.
func (b *Bus) EndOf(ctx context.Context, h Head, seq int64) (end int64, ok bool, err error) {
	switch {
	case seq == 0:
		return 0, true, nil
	case seq == h.Seq:
		return h.Len, true, nil
	case seq < 0 || seq > h.indexed:
		return 0, false, nil
	}
	k := int((seq - 1) / IndexSize)
	i := int((seq - 1) % IndexSize)
	if k >= h.idxChunks {
		return int64(h.ends[seq-1-int64(h.idxChunks)*IndexSize]), true, nil
	}
	e, err := b.turns.Get(ctx, indexKey(h.turnID, k))
	if err != nil {
		return 0, false, fmt.Errorf("read snapshot index: %w", err)
	}
	ends := e.Value()
	if 4*(i+1) > len(ends) {
		return 0, false, nil
	}
	return int64(binary.LittleEndian.Uint32(ends[4*i:])), true, nil
}

// ReadText returns the snapshot's text from byte from on: the text chunks
// it needs and the head's tail.
func (b *Bus) ReadText(ctx context.Context, h Head, from int64) (string, error) {
	if from < 0 || from > h.Len {
		return "", fmt.Errorf("read snapshot text: offset %d outside 0..%d", from, h.Len)
	}
	var sb strings.Builder
	sb.Grow(int(h.Len - from))
	for i := int(from / ChunkSize); i < h.chunks; i++ {
		c, err := b.turns.Get(ctx, chunkKey(h.turnID, i))
		if err != nil {
			return "", fmt.Errorf("read snapshot chunk %d: %w", i, err)
		}
		// A chunk is immutable once written, so it is consistent with any
		// head that counts it.
		v := c.Value()
		if len(v) != ChunkSize {
			return "", fmt.Errorf("read snapshot chunk %d: %d bytes, want %d", i, len(v), ChunkSize)
		}
		if start := int64(i) * ChunkSize; from > start {
			v = v[from-start:]
		}
		sb.Write(v)
	}
	tail := h.tail
	if start := int64(h.chunks) * ChunkSize; from > start {
		tail = tail[from-start:]
	}
	sb.Write(tail)
	return sb.String(), nil
}

// ReadSnapshot returns the latest snapshot of turn turnID of conversation
// conv with its whole text, or ErrNoSnapshot (see ReadHead).
func (b *Bus) ReadSnapshot(ctx context.Context, conv, turnID string) (Snapshot, error) {
	h, err := b.ReadHead(ctx, conv, turnID)
	if err != nil {
		return Snapshot{}, err
	}
	text, err := b.ReadText(ctx, h, 0)
	if err != nil {
		return Snapshot{}, err
	}
	return Snapshot{ConversationID: h.ConversationID, Seq: h.Seq, StreamSeq: h.StreamSeq, Text: text, Status: h.Status}, nil
}
