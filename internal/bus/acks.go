package bus

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// Deltas are published asynchronously with a reply subject of the bus's
// own (prefix + a counter) and one wildcard subscription takes every
// acknowledgement: the stream's answer is parsed by hand and the delta is
// announced live right there. This is what jetstream's PublishAsync does,
// without its per-message timer, channel pair and JSON decoding, which cost
// more than the publish itself at tens of thousands of deltas a second.

// acks tracks the deltas of one Bus awaiting their acknowledgement.
type acks struct {
	b      *Bus
	nc     *nats.Conn
	prefix string        // reply subjects are prefix + base-36 id
	wait   time.Duration // how long an answer may take before the delta fails

	mu      sync.Mutex
	sub     *nats.Subscription       // guarded by mu; made on first use
	next    uint64                   // guarded by mu
	pending map[uint64]*PendingDelta // guarded by mu
	sweep   *time.Timer              // armed while pending is not empty; guarded by mu
}

// PendingDelta is a delta published without waiting for its
// acknowledgement.
type PendingDelta struct {
	Seq int64
	// ev is a copy of the caller's event: the delta is one allocation, and
	// the caller's Event need not escape.
	ev Event
	// Where it is stored and ev encoded, made by stored: a journaled
	// delta needs them only if it goes to the stream after all.
	subj string
	data []byte

	a    *acks
	sent time.Time
	done chan struct{} // closed once sseq or err is set (see settle)
	sseq uint64
	err  error

	// Under a Journal: whether the journal took the delta, and the
	// segment keeping it until it is released.
	journaled bool
	seg       *segment

	// beforeLive runs once, just before the delta is announced (see
	// PublishDeltaAsync).
	beforeLive func()
}

// Journaled reports whether the delta went live once journaled (see
// Journal) and is kept only there until Release; false when it went live
// once the stream stored it. Known once PublishDeltaAsync has returned.
func (p *PendingDelta) Journaled() bool { return p.journaled }

// Release tells the journal that a journaled delta is now kept elsewhere (a
// snapshot covers it, or the stream stored it), so that its segment may go.
// It is called once, after that write has succeeded; it does nothing once
// the delta's hold has moved to an Unsaved, which then releases it.
func (p *PendingDelta) Release() {
	if j := p.a.b.cfg.Journal; j != nil {
		j.saved(p)
	}
}

// announce makes the delta live, running beforeLive first.
func (p *PendingDelta) announce() error {
	if f := p.beforeLive; f != nil {
		p.beforeLive = nil
		f()
	}
	if p.a.b.cfg.Local != nil {
		p.a.b.cfg.Local.deliver(&p.ev)
		return nil
	}
	_, data := p.stored()
	return p.a.b.announce(&p.ev, data)
}

// stored returns the subject the delta is stored under and its encoding,
// making them on first use.
func (p *PendingDelta) stored() (subj string, data []byte) {
	if p.data == nil {
		p.subj, p.data = p.ev.StoredSubject(), p.ev.encodeDelta()
	}
	return p.subj, p.data
}

// settle records the stream's answer and wakes the publisher. A delta
// settled before PublishDeltaAsync returns (a journaled one, or one
// stored at once) has no channel yet and gets the shared closed one: the
// common case costs no channel per delta.
func (p *PendingDelta) settle(sseq uint64, err error) {
	p.sseq, p.err = sseq, err
	if p.done == nil {
		p.done = settled
		return
	}
	close(p.done)
}

// settled is the done of every delta settled before it was returned.
var settled = func() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}()

// errAckTimeout fails a delta whose acknowledgement did not come within
// acks.wait; the publisher then stores it again (see Republish).
var errAckTimeout = errors.New("publish delta: no acknowledgement in time")

func newAcks(b *Bus) *acks {
	a := &acks{b: b, nc: b.nc, prefix: b.nc.NewRespInbox() + ".", wait: publishAttempt, pending: make(map[uint64]*PendingDelta)}
	if b.cfg.Local != nil {
		// The stream is in this process and loses no answer; the answers
		// are taken one at a time by a goroutine that also hands each delta
		// to the gateway (see Local), so under a heavy load one can wait
		// its turn longer than an attempt, and failing it would only store
		// it again.
		a.wait = localAckWait
	}
	return a
}

// localAckWait is acks.wait under a Local.
const localAckWait = 10 * time.Second

// newPending makes the PendingDelta of delta e, copying e, reusing one
// that was recycled when there is one.
func (a *acks) newPending(e *Event) *PendingDelta {
	pd := pendingPool.Get().(*PendingDelta)
	*pd = PendingDelta{Seq: e.Seq, ev: *e, a: a}
	return pd
}

// pendingPool holds recycled deltas (see PendingDelta.Recycle).
var pendingPool = sync.Pool{New: func() any { return new(PendingDelta) }}

// Recycle hands a finished delta back, to be reused by a later
// PublishDeltaAsync: at one per token, deltas were a quarter of the bytes
// serve allocates. The caller must hold no other reference to p and must
// not use it again. It does nothing unless p is settled and, if it was
// journaled, released: nothing else refers to such a delta (the journal and
// the acknowledgement tracker have let go of it, and every announcement of
// it carried a copy of its event).
func (p *PendingDelta) Recycle() {
	select {
	case <-p.done:
	default:
		return // unsettled: an answer may still come for it
	}
	if p.seg != nil {
		return // its segment still counts it
	}
	*p = PendingDelta{}
	pendingPool.Put(p)
}

// trySend publishes pd to the stream and tracks its answer, which settles
// it on another goroutine.
func (a *acks) trySend(pd *PendingDelta) error {
	subj, data := pd.stored() // before the answer's goroutine can see pd
	pd.done = make(chan struct{})
	a.mu.Lock()
	if a.sub == nil {
		sub, err := a.nc.Subscribe(a.prefix+"*", a.answer)
		if err != nil {
			a.mu.Unlock()
			return fmt.Errorf("publish delta: subscribe to acknowledgements: %w", err)
		}
		// Acknowledgements are tiny and must not be dropped.
		_ = sub.SetPendingLimits(-1, -1)
		a.sub = sub
	}
	a.next++
	id := a.next
	pd.sent = time.Now()
	a.pending[id] = pd
	if a.sweep == nil {
		a.sweep = time.AfterFunc(a.wait/4, a.expire)
	}
	a.mu.Unlock()
	var reply [64]byte
	r := strconv.AppendUint(append(reply[:0], a.prefix...), id, 36)
	if err := a.nc.PublishRequest(subj, string(r), data); err != nil {
		a.mu.Lock()
		delete(a.pending, id)
		a.mu.Unlock()
		return fmt.Errorf("publish delta: %w", err)
	}
	return nil
}

// answer handles one acknowledgement: it settles the delta and, when the
// stream stored it, announces it live unless the journal has already.
func (a *acks) answer(m *nats.Msg) {
	id, err := strconv.ParseUint(m.Subject[len(a.prefix):], 36, 64)
	if err != nil {
		return
	}
	a.mu.Lock()
	pd := a.pending[id]
	delete(a.pending, id)
	a.mu.Unlock()
	if pd == nil {
		return // expired already
	}
	sseq, err := parseAck(m)
	// Announce before settling: the publisher publishes the turn's end once
	// every delta is settled, so the end is never announced ahead of the
	// last delta.
	if err == nil {
		_ = pd.announce()
	}
	pd.settle(sseq, err)
}

// expire fails the deltas that have waited a.wait for an answer
// (the stream's leader was lost, the message dropped).
func (a *acks) expire() {
	now := time.Now()
	var late []*PendingDelta
	a.mu.Lock()
	for id, pd := range a.pending {
		if now.Sub(pd.sent) >= a.wait {
			late = append(late, pd)
			delete(a.pending, id)
		}
	}
	if len(a.pending) > 0 {
		a.sweep.Reset(a.wait / 4)
	} else {
		a.sweep = nil
	}
	a.mu.Unlock()
	for _, pd := range late {
		pd.settle(0, errAckTimeout)
	}
}

// parseAck reads the stream sequence from a JetStream publish answer,
// {"stream":"…","seq":N[,…]}, or the error it reports.
func parseAck(m *nats.Msg) (uint64, error) {
	if len(m.Data) == 0 {
		if m.Header.Get("Status") == "503" {
			return 0, nats.ErrNoResponders
		}
		return 0, errors.New("publish delta: empty acknowledgement")
	}
	if bytes.Contains(m.Data, []byte(`"error"`)) {
		return 0, fmt.Errorf("publish delta: stream refused it: %s", m.Data)
	}
	i := bytes.Index(m.Data, []byte(`"seq":`))
	if i < 0 {
		return 0, fmt.Errorf("publish delta: unexpected acknowledgement %q", m.Data)
	}
	i += len(`"seq":`)
	j := i
	for j < len(m.Data) && m.Data[j] >= '0' && m.Data[j] <= '9' {
		j++
	}
	seq, err := strconv.ParseUint(string(m.Data[i:j]), 10, 64)
	if err != nil || seq == 0 {
		return 0, fmt.Errorf("publish delta: unexpected acknowledgement %q", m.Data)
	}
	return seq, nil
}

// Result reports the delta's stream sequence once acknowledged (done and
// err == nil), or its failure; done is false while the answer is pending.
// With wait it blocks until the answer comes or ctx is done.
func (p *PendingDelta) Result(ctx context.Context, wait bool) (sseq uint64, done bool, err error) {
	if !wait {
		select {
		case <-p.done:
			return p.sseq, true, p.err
		default:
			return 0, false, nil
		}
	}
	select {
	case <-p.done:
		return p.sseq, true, p.err
	case <-ctx.Done():
		return 0, false, ctx.Err()
	}
}
