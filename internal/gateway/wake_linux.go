package gateway

import (
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// wakeSet lets a busy gateway notice a client's frame at once.
//
// A parked reader (rawSocket.park) waits in the runtime's network poller,
// and the runtime looks there only when a processor has nothing else to
// run, or every 10 ms from its monitor. When the processors are busy
// (deliveries, the collector's marking), a frame the client sent, a Stop
// among them, waits that long to be noticed, and then waits again in the
// global run queue behind every goroutine a timer made ready. Measured
// under the 20k tokens/s stream on two cores: from the client's write to
// the reader's wake-up, p50 0.3–0.6 ms but p99 21–36 ms, the largest part
// of cancel→end's tail.
//
// So every parked socket is also in an epoll set of the gateway's own
// (one-shot, armed when it parks), and the goroutines that deliver frames,
// the busiest there are, look at it without blocking at most every
// wakePollEvery (pollWakes). A socket found readable is woken through
// its read deadline (rawSocket.poke), which makes its reader the next
// goroutine to run on the deliverer's processor. When the gateway is idle
// nobody delivers, nobody polls, and the runtime's poller, with idle
// processors, wakes readers as before.
type wakeSet struct {
	epfd  int
	last  atomic.Int64 // clock() of the last poll, ns
	polls atomic.Int64 // polls that woke a reader (for tests)

	mu    sync.Mutex
	socks map[uint64]*rawSocket // guarded by mu
	next  uint64                // guarded by mu
	n     atomic.Int32          // len(socks)
}

// wakePollEvery is how often pollWakes looks at the set, at most: a few
// thousand non-blocking epoll_wait(2) calls a second under load.
const wakePollEvery = 250 * time.Microsecond

// wakes is the process's wake set; nil when epoll is out of reach, and
// then sockets are only woken by the runtime's poller.
var wakes = newWakeSet()

func newWakeSet() *wakeSet {
	fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil
	}
	return &wakeSet{epfd: fd, socks: make(map[uint64]*rawSocket)}
}

// armWake adds r's socket to the wake set, or arms it again, for one
// report of readability. A failure leaves r to the runtime's poller.
func (r *rawSocket) armWake() {
	ws := wakes
	if ws == nil || r.rc == nil {
		return
	}
	op := syscall.EPOLL_CTL_MOD
	if r.wakeID == 0 {
		ws.mu.Lock()
		ws.next++
		r.wakeID = ws.next
		ws.socks[r.wakeID] = r
		ws.n.Store(int32(len(ws.socks)))
		ws.mu.Unlock()
		op = syscall.EPOLL_CTL_ADD
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT, Fd: int32(r.wakeID), Pad: int32(r.wakeID >> 32)}
	// Under the descriptor's lock: it cannot be closed (and its number
	// reused) meanwhile. A closed socket leaves the epoll set by itself.
	_ = r.rc.Control(func(fd uintptr) {
		if err := syscall.EpollCtl(ws.epfd, op, int(fd), &ev); err == syscall.ENOENT && op == syscall.EPOLL_CTL_MOD {
			_ = syscall.EpollCtl(ws.epfd, syscall.EPOLL_CTL_ADD, int(fd), &ev)
		}
	})
}

// forgetWake drops r from the wake set once its connection has ended.
func (r *rawSocket) forgetWake() {
	ws := wakes
	if ws == nil || r.wakeID == 0 {
		return
	}
	ws.mu.Lock()
	delete(ws.socks, r.wakeID)
	ws.n.Store(int32(len(ws.socks)))
	ws.mu.Unlock()
}

// pollWakes wakes the parked readers whose sockets have become readable,
// unless the set was looked at less than wakePollEvery ago. It is called
// by goroutines that deliver frames, after their write.
func pollWakes() {
	ws := wakes
	if ws == nil || ws.n.Load() == 0 {
		return
	}
	now := int64(clock())
	last := ws.last.Load()
	if now-last < int64(wakePollEvery) || !ws.last.CompareAndSwap(last, now) {
		return
	}
	ws.poll()
}

// poll wakes the parked readers whose sockets are readable, now.
func (ws *wakeSet) poll() {
	var evs [32]syscall.EpollEvent
	n, err := syscall.EpollWait(ws.epfd, evs[:], 0)
	if err != nil || n <= 0 {
		return
	}
	var socks [len(evs)]*rawSocket
	ws.mu.Lock()
	for i, ev := range evs[:n] {
		socks[i] = ws.socks[uint64(uint32(ev.Fd))|uint64(uint32(ev.Pad))<<32]
	}
	ws.mu.Unlock()
	woke := false
	for _, r := range socks[:n] {
		if r != nil && r.poke() {
			woke = true
		}
	}
	if woke {
		ws.polls.Add(1)
	}
}

// poke wakes r's reader if it is parked, by setting the socket's read
// deadline in the past: the runtime makes the reader the next goroutine
// on this processor. park (or close, whichever takes mu first) clears the
// deadline before anyone reads. It reports whether it woke the reader.
func (r *rawSocket) poke() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.parked || r.poked || r.closing {
		return false
	}
	r.poked = true
	_ = r.nc.SetReadDeadline(pastDeadline)
	return true
}

// pastDeadline is a read deadline that has passed.
var pastDeadline = time.Unix(1, 0)
