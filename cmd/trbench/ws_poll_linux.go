package main

import (
	"errors"
	"io"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
)

// A poll loop reads the plain TCP connections given to it. Its epoll set
// is level-triggered: a socket with data is reported until it has been
// read, so one read(2) per report is enough, and a wake-up reads every
// socket that has data. The epoll descriptor is itself pollable, and the
// loop waits for it in Go's poller like any socket, so it takes no thread
// while idle and runs as an ordinary goroutine when woken.
type pollLoop struct {
	epfd   int
	file   *os.File
	mu     sync.Mutex
	conns  map[int32]*wsConn // by descriptor; guarded by mu
	buf    []byte            // read buffer (loop-owned)
	events []syscall.EpollEvent
}

var (
	pollOnce  sync.Once
	pollLoops []*pollLoop // set once; then read only
	pollNext  atomic.Uint64
)

// startPolled has a poll loop read c and says whether one does.
func startPolled(c *wsConn) bool {
	pollOnce.Do(func() {
		for range runtime.GOMAXPROCS(0) {
			l, err := newPollLoop()
			if err != nil {
				break // the loops made so far serve; with none, goroutines read
			}
			pollLoops = append(pollLoops, l)
			go l.run()
		}
	})
	if len(pollLoops) == 0 {
		return false
	}
	l := pollLoops[pollNext.Add(1)%uint64(len(pollLoops))]
	return l.add(c) == nil
}

func newPollLoop() (*pollLoop, error) {
	fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, os.NewSyscallError("epoll_create1", err)
	}
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	// Non-blocking, so os registers it with Go's poller.
	return &pollLoop{
		epfd: fd, file: os.NewFile(uintptr(fd), "epoll"), conns: map[int32]*wsConn{},
		buf: make([]byte, 64<<10), events: make([]syscall.EpollEvent, 256),
	}, nil
}

func (l *pollLoop) add(c *wsConn) error {
	l.mu.Lock()
	l.conns[int32(c.fd)] = c
	l.mu.Unlock()
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP, Fd: int32(c.fd)}
	if err := syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_ADD, c.fd, &ev); err != nil {
		l.mu.Lock()
		delete(l.conns, int32(c.fd))
		l.mu.Unlock()
		return err
	}
	return nil
}

// run serves the loop's connections for the life of the process.
func (l *pollLoop) run() {
	rc, err := l.file.SyscallConn()
	if err == nil {
		err = rc.Read(func(uintptr) bool {
			// Until the set has nothing ready: then a socket that gets
			// data wakes the epoll descriptor in Go's poller again.
			for {
				n, err := syscall.EpollWait(l.epfd, l.events, 0)
				if errors.Is(err, syscall.EINTR) {
					continue
				}
				if n <= 0 {
					return false
				}
				for _, ev := range l.events[:n] {
					l.ready(ev.Fd)
				}
			}
		})
	}
	if err == nil {
		return
	}
	// Not pollable here: wait in epoll_wait on a thread of the loop's own.
	runtime.LockOSThread()
	for {
		n, err := syscall.EpollWait(l.epfd, l.events, -1)
		if err != nil && !errors.Is(err, syscall.EINTR) {
			panic("trbench: epoll_wait: " + err.Error())
		}
		for _, ev := range l.events[:max(n, 0)] {
			l.ready(ev.Fd)
		}
	}
}

// ready reads the socket fd once and hands its frames to its connection.
func (l *pollLoop) ready(fd int32) {
	l.mu.Lock()
	c := l.conns[fd]
	l.mu.Unlock()
	if c == nil {
		return // ended earlier in this batch
	}
	n, err := syscall.Read(int(fd), l.buf)
	switch {
	case errors.Is(err, syscall.EAGAIN), errors.Is(err, syscall.EINTR):
		return
	case err != nil:
		l.remove(c, readError(err))
	case n == 0:
		l.remove(c, io.EOF)
	default:
		if err := c.feed(l.buf[:n]); err != nil {
			l.remove(c, err)
		}
	}
}

// remove stops reading c; its descriptor may be closed from then on.
func (l *pollLoop) remove(c *wsConn, err error) {
	_ = syscall.EpollCtl(l.epfd, syscall.EPOLL_CTL_DEL, c.fd, nil)
	l.mu.Lock()
	delete(l.conns, int32(c.fd))
	l.mu.Unlock()
	go c.end(err) // may write the answer to a close frame
}

// shutdown ends both directions of a socket; its reader then reads EOF.
func shutdown(fd int) { _ = syscall.Shutdown(fd, syscall.SHUT_RDWR) }
