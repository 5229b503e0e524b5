package bus

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Journal is serve's write-ahead log of deltas. Under a Local, a delta that
// must be stored in the events stream before it may be announced waits for
// the store loop of the embedded JetStream, which was where the tail of
// token-to-screen latency was, and storing every delta there was a third of
// serve's CPU. With a Journal the producer's deltas are instead copied into
// a local file and announced once there; the stream never stores them. The
// journal keeps a delta until its producer has saved it elsewhere: in the
// turn's snapshot, which it writes every few seconds (the worker's
// JournalSaveInterval) and at the end (before the end is stored), or in
// the stream when a snapshot cannot be written (see Unsaved and
// StoreJournaled). A delta a client has seen is thus always in the
// journal, a snapshot or the stream: what is in the file's pages survives
// the process being killed, as the stream's own in-place writes do
// (neither syncs to disk on every message).
//
// The journal is read only when serve starts: Replay stores in the stream
// whatever deltas of the journal the turn's snapshot and the stream lack
// (the ones written since the last snapshot when the previous run died),
// before recovery ends that run's turns. While running, a segment file is
// removed once it is no longer written to and every delta in it is saved
// elsewhere.
//
// Only serve with its in-process bus uses one: with NATS between gateways
// and workers, a delta announced before it is stored could be taken back by
// the loss of the worker's node along with its journal.
type Journal struct {
	dir string
	log *slog.Logger
	// segmentBytes is how large a segment grows before the next one is
	// started.
	segmentBytes int64

	// mu is held shared while a record is written into cur's mapping and
	// exclusively to replace cur, only for as long as that takes: a
	// producer waiting for it holds up every other producer, since a
	// pending exclusive lock blocks new shared ones.
	mu     sync.RWMutex
	closed bool     // guarded by mu
	cur    *segment // guarded by mu
	// rotMu keeps Start and a segment change apart. Producers that find a
	// segment full wait for its change (segment.rot), neither on mu nor
	// on rotMu one after another.
	rotMu  sync.Mutex
	nextID uint64 // guarded by rotMu (set by OpenJournal)
	// failing is set while segments cannot be started (the disk is
	// full), so that the failure is logged once, not once per delta.
	failing atomic.Bool
}

// segment is one journal file.
type segment struct {
	path string
	mem  []byte       // the file, mapped; nil once sealed
	next atomic.Int64 // where the next record goes (may pass len(mem))
	// unsaved counts the deltas written to it that are not yet saved
	// elsewhere, plus one while it is the current segment.
	unsaved atomic.Int64
	sealed  atomic.Bool // no longer written to
	// rot is the start of the next segment, once a producer has found
	// this one full.
	rot atomic.Pointer[rotation]
}

const (
	journalSuffix       = ".journal"
	journalSegmentBytes = 4 << 20
	// A record is: payload length (uint32), CRC-32C of the payload
	// (uint32), then the payload: the stored subject's length (uint16),
	// the subject, the event as stored.
	journalHeader = 8
	journalAlign  = 8
)

var journalCRC = crc32.MakeTable(crc32.Castagnoli)

// OpenJournal opens the journal in dir, creating dir if needed. Segments
// left by an earlier run stay until Replay; Start begins a new one.
func OpenJournal(dir string, log *slog.Logger) (*Journal, error) {
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("open journal: %w", err)
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	j := &Journal{dir: dir, log: log, segmentBytes: journalSegmentBytes}
	old, err := j.segments()
	if err != nil {
		return nil, err
	}
	for _, id := range old {
		j.nextID = max(j.nextID, id+1)
	}
	return j, nil
}

// segments lists the segment ids in dir, oldest first.
func (j *Journal) segments() ([]uint64, error) {
	ents, err := os.ReadDir(j.dir)
	if err != nil {
		return nil, fmt.Errorf("read journal: %w", err)
	}
	var ids []uint64
	for _, e := range ents {
		name, ok := strings.CutSuffix(e.Name(), journalSuffix)
		if !ok {
			continue
		}
		id, err := strconv.ParseUint(name, 10, 64)
		if err != nil {
			continue
		}
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids, nil
}

func (j *Journal) segmentPath(id uint64) string {
	return filepath.Join(j.dir, fmt.Sprintf("%016d%s", id, journalSuffix))
}

// Replay stores in the stream, through b, every delta of the journal's
// segments that neither the turn's snapshot nor the stream holds, each
// turn's in order, and then removes the segments. It returns how many
// deltas it stored. It runs before Start, while nothing else publishes the
// turns it reads.
func (j *Journal) Replay(ctx context.Context, b *Bus) (int, error) {
	ids, err := j.segments()
	if err != nil {
		return 0, err
	}
	type turnLog struct {
		first  Event // identifies the turn
		deltas []Event
	}
	var order []string
	turns := make(map[string]*turnLog)
	for _, id := range ids {
		err := readSegment(j.segmentPath(id), func(e Event) {
			t := turns[e.TurnID]
			if t == nil {
				t = &turnLog{first: e}
				turns[e.TurnID] = t
				order = append(order, e.TurnID)
			}
			t.deltas = append(t.deltas, e)
		})
		if err != nil {
			return 0, err
		}
	}
	stored := 0
	for _, id := range order {
		t := turns[id]
		have, err := b.savedDeltas(ctx, t.first.ConversationID, t.first.TurnID)
		if err != nil {
			return stored, fmt.Errorf("replay journal: turn %s: %w", id, err)
		}
		for i := range t.deltas {
			e := &t.deltas[i]
			if e.Seq != have+1 {
				continue // saved already, or a repeat
			}
			data, err := e.encode()
			if err != nil {
				return stored, fmt.Errorf("replay journal: %w", err)
			}
			if _, err := b.publish(ctx, e.StoredSubject(), data, ""); err != nil {
				return stored, fmt.Errorf("replay journal: store delta %d of turn %s: %w", e.Seq, id, err)
			}
			have = e.Seq
			stored++
		}
	}
	for _, id := range ids {
		if err := os.Remove(j.segmentPath(id)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return stored, fmt.Errorf("replay journal: %w", err)
		}
	}
	return stored, nil
}

// savedDeltas returns the last seq of a turn's deltas its snapshot and the
// stream after it hold without a gap.
func (b *Bus) savedDeltas(ctx context.Context, conversationID, turnID string) (int64, error) {
	head, err := b.ReadHead(ctx, conversationID, turnID)
	if err != nil && !errors.Is(err, ErrNoSnapshot) {
		return 0, err
	}
	have := head.Seq
	err = b.ReadTurn(ctx, conversationID, turnID, head.StreamSeq+1, func(e Event) bool {
		if e.Kind == KindDelta && e.Seq == have+1 {
			have = e.Seq
		}
		return true
	})
	return have, err
}

// readSegment calls fn with the deltas of one segment, in file order.
// Records start at multiples of journalAlign. Producers write their
// records side by side, so a run that died may have left one cut short (or
// only reserved, all zeros) before others that are whole: such a record
// was never announced, and the reader steps over it to the next whole one.
func readSegment(path string, fn func(Event)) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("read journal: %w", err)
	}
	decodeSegment(data, fn)
	return nil
}

// decodeSegment calls fn with the deltas of segment data, as readSegment
// does.
func decodeSegment(data []byte, fn func(Event)) {
	for pos := 0; pos+journalHeader <= len(data); {
		n := int(binary.LittleEndian.Uint32(data[pos:]))
		sum := binary.LittleEndian.Uint32(data[pos+4:])
		if n < 2 || len(data)-pos-journalHeader < n {
			pos += journalAlign
			continue
		}
		p := data[pos+journalHeader : pos+journalHeader+n]
		if crc32.Checksum(p, journalCRC) != sum {
			pos += journalAlign
			continue
		}
		sl := int(binary.LittleEndian.Uint16(p))
		if 2+sl <= len(p) {
			if e, err := DecodeEvent(string(p[2:2+sl]), p[2+sl:]); err == nil && e.Kind == KindDelta {
				fn(e)
			}
		}
		pos += recordSize(n)
	}
}

// recordSize is the space a record with an n-byte payload takes.
func recordSize(n int) int {
	return (journalHeader + n + journalAlign - 1) &^ (journalAlign - 1)
}

// scratchPool holds the buffers deltas are encoded into for the journal.
var scratchPool = sync.Pool{New: func() any { return new([]byte) }}

// storedSubjectLen is len(e.StoredSubject()): Token keeps an id's length.
func storedSubjectLen(e *Event) int {
	return len(storedPrefix) + len(e.ConversationID) + 1 + len(e.TurnID) + 1 + len(e.Kind)
}

// putDeltaRecord writes the record of delta e, encoded as data, into dst,
// which is recordSize(2+storedSubjectLen(e)+len(data)) long: the same bytes
// as e.StoredSubject() and data would give, without making the subject.
// The checksum goes last, so a record cut short by a crash never reads as
// whole.
func putDeltaRecord(dst []byte, e *Event, data []byte) {
	sl := storedSubjectLen(e)
	n := 2 + sl + len(data)
	binary.LittleEndian.PutUint32(dst, uint32(n))
	binary.LittleEndian.PutUint16(dst[journalHeader:], uint16(sl))
	subj := dst[journalHeader+2 : journalHeader+2+sl]
	i := copy(subj, storedPrefix)
	i += copyToken(subj[i:], e.ConversationID)
	subj[i] = '.'
	i += 1 + copyToken(subj[i+1:], e.TurnID)
	subj[i] = '.'
	copy(subj[i+1:], e.Kind)
	copy(dst[journalHeader+2+sl:], data)
	binary.LittleEndian.PutUint32(dst[4:], crc32.Checksum(dst[journalHeader:journalHeader+n], journalCRC))
}

// copyToken copies Token(id) into dst and returns its length.
func copyToken(dst []byte, id string) int {
	for i := 0; i < len(id); i++ {
		c := id[i]
		switch c {
		case '.':
			c = '/'
		case ':':
			c = '='
		}
		dst[i] = c
	}
	return len(id)
}

// Start opens a new segment; deltas may be appended from then on.
func (j *Journal) Start() error {
	j.rotMu.Lock()
	defer j.rotMu.Unlock()
	return j.rotateLocked(nil, j.segmentBytes)
}

// Close seals the segment once the writes in progress are done. Deltas
// appended after Close fail.
func (j *Journal) Close() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.closed {
		return nil
	}
	j.closed = true
	if j.cur != nil {
		j.seal(j.cur)
		j.cur = nil
	}
	return nil
}

// errJournalClosed fails a delta appended after Close.
var errJournalClosed = errors.New("publish delta: journal closed")

// append journals pd and announces it. Every delta is written by its own
// producer, with no system call: the segment is mapped into memory
// (MAP_SHARED), a record's space is reserved with one atomic add, and the
// record is copied in. The page cache holds it from then on, so it survives
// the process being killed, as a write(2) would. Producers of different
// turns never wait for each other, and a producer's deltas are written and
// announced in its order. (Measured against the alternatives at 20k
// deltas/s: one write(2) per delta cost 0.15 cores more; a writer grouping
// deltas made every delta wait for it, which on a busy machine doubled the
// latency tail.) pd is settled on return.
func (j *Journal) append(pd *PendingDelta) error {
	// The record is written from a scratch encoding: the delta's own
	// subject and encoding are made only if it must go to the stream.
	scratch := scratchPool.Get().(*[]byte)
	defer scratchPool.Put(scratch)
	data := appendDelta((*scratch)[:0], &pd.ev)
	*scratch = data
	size := recordSize(2 + storedSubjectLen(&pd.ev) + len(data))
	for {
		j.mu.RLock()
		if j.closed {
			j.mu.RUnlock()
			return errJournalClosed
		}
		seg := j.cur
		end := seg.next.Add(int64(size))
		if end <= int64(len(seg.mem)) {
			seg.unsaved.Add(1)
			putDeltaRecord(seg.mem[end-int64(size):end], &pd.ev, data)
			j.mu.RUnlock()
			pd.seg = seg
			pd.journaled = true
			_ = pd.announce()
			pd.settle(0, nil)
			return nil
		}
		j.mu.RUnlock()
		// Full: the first producer to get here starts the next segment;
		// the others wait for that together, not one after another, and
		// then go round again.
		if err := j.rotate(seg, max(j.segmentBytes, int64(size))); err != nil {
			// Not journaled (the disk is full, say): the delta is
			// stored and then announced, as without a journal, but
			// before returning, so that the producer's deltas stay in
			// order.
			if !j.failing.Swap(true) {
				j.log.Error("start delta journal segment; deltas are stored in the stream until one starts", "err", err)
			}
			return pd.a.b.storeNow(pd)
		}
		if j.failing.Swap(false) {
			j.log.Info("delta journal segment started again")
		}
	}
}

// rotation is the start of the segment after a full one.
type rotation struct {
	done chan struct{} // closed when it is over
	err  error         // set before done is closed
}

// rotate returns once the full segment full is no longer current: the
// first caller for it starts the next one, and the others wait for that
// and get its error. A failed rotation is forgotten once its waiters are
// told, so that the next delta tries again.
func (j *Journal) rotate(full *segment, size int64) error {
	r := &rotation{done: make(chan struct{})}
	if !full.rot.CompareAndSwap(nil, r) {
		if cur := full.rot.Load(); cur != nil {
			<-cur.done
			return cur.err
		}
		return nil // failed and forgotten meanwhile: go round again
	}
	j.rotMu.Lock()
	r.err = j.rotateLocked(full, size)
	j.rotMu.Unlock()
	if r.err != nil {
		full.rot.Store(nil)
	}
	close(r.done)
	return r.err
}

// rotateLocked starts the next segment, of size bytes, and seals the
// current one, unless that is no longer full (another producer rotated it)
// or the journal has closed; the caller holds rotMu. The file is created
// and mapped, and the old one unmapped, outside mu: under it only the
// current segment changes. No record is being written to the old mapping
// once it is not current, since records are written under mu, to the
// segment current then.
func (j *Journal) rotateLocked(full *segment, size int64) error {
	j.mu.RLock()
	stale := j.closed || j.cur != full
	j.mu.RUnlock()
	if stale {
		return nil
	}
	path := j.segmentPath(j.nextID)
	mem, err := mapSegment(path, int(size))
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	j.nextID++
	next := &segment{path: path, mem: mem}
	next.unsaved.Store(1)
	j.mu.Lock()
	if j.closed {
		j.mu.Unlock()
		j.seal(next) // unused: nothing was written to it
		return nil
	}
	old := j.cur
	j.cur = next
	j.mu.Unlock()
	if old != nil {
		j.seal(old)
	}
	return nil
}

// seal unmaps s, whose records are all written and which is no longer
// current, and drops the reference it held as the current segment.
func (j *Journal) seal(s *segment) {
	if err := unmapSegment(s.mem); err != nil {
		j.log.Warn("unmap delta journal segment", "path", s.path, "err", err)
	}
	s.mem = nil
	s.sealed.Store(true)
	j.release(s)
}

// saved notes that pd is kept elsewhere: its segment may go.
func (j *Journal) saved(pd *PendingDelta) {
	if s := pd.seg; s != nil {
		pd.seg = nil
		j.release(s)
	}
}

// release drops one reference to s, removing its file when it was the last
// one of a sealed segment. The current segment holds one reference of its
// own until it is sealed, so a segment goes once it is sealed and every
// delta in it is saved elsewhere.
func (j *Journal) release(s *segment) { j.releaseN(s, 1) }

// releaseN drops n references to s, as release does.
func (j *Journal) releaseN(s *segment, n int64) {
	if s.unsaved.Add(-n) == 0 && s.sealed.Load() {
		if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			j.log.Warn("remove delta journal segment", "path", s.path, "err", err)
		}
	}
}

// Unsaved is what a publisher keeps of its journaled deltas until it has
// saved them elsewhere: the segments that hold them, as runs of consecutive
// deltas, rather than the deltas themselves. A delta is then garbage (or
// recycled) as soon as it is live, instead of staying on the heap for the
// JournalSaveInterval that the collector walks it at every cycle. The zero
// value is empty; it is not safe for concurrent use.
type Unsaved struct {
	j    *Journal
	runs []unsavedRun
}

// unsavedRun is deltas first..last, all in segment seg.
type unsavedRun struct {
	seg         *segment
	first, last int64
}

// Add takes over journaled delta p's hold on its segment: p keeps none and
// may be recycled. Deltas are added in the order of their seqs.
func (u *Unsaved) Add(p *PendingDelta) {
	seg := p.seg
	if seg == nil {
		return
	}
	p.seg = nil
	u.j = p.a.b.cfg.Journal
	if n := len(u.runs); n > 0 && u.runs[n-1].seg == seg && u.runs[n-1].last+1 == p.Seq {
		u.runs[n-1].last = p.Seq
		return
	}
	u.runs = append(u.runs, unsavedRun{seg: seg, first: p.Seq, last: p.Seq})
}

// Empty reports whether no delta is held.
func (u *Unsaved) Empty() bool { return len(u.runs) == 0 }

// Seqs returns the seqs of the deltas held, in order.
func (u *Unsaved) Seqs() []int64 {
	var seqs []int64
	for _, r := range u.runs {
		for s := r.first; s <= r.last; s++ {
			seqs = append(seqs, s)
		}
	}
	return seqs
}

// Release tells the journal that the deltas up to seq are saved elsewhere,
// so that their segments may go.
func (u *Unsaved) Release(seq int64) {
	n := 0
	for ; n < len(u.runs); n++ {
		r := &u.runs[n]
		if r.first > seq {
			break
		}
		if r.last > seq {
			u.j.releaseN(r.seg, seq-r.first+1)
			r.first = seq + 1
			break
		}
		u.j.releaseN(r.seg, r.last-r.first+1)
	}
	k := copy(u.runs, u.runs[n:])
	clear(u.runs[k:])
	u.runs = u.runs[:k]
}
