package gateway

import "syscall"

// prepare reaches for the system's socket beneath a TCP connection: to
// write to it without blocking (writeNow), and to park on it when the
// library reads it through a buffer of ours.
func (r *rawSocket) prepare() {
	sc, ok := r.nc.(syscall.Conn)
	if !ok {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	r.rc = rc
	if r.br != nil {
		r.readable = r.peek
	}
}

// writeOnce writes b to the socket fd with one non-blocking write(2), and
// reports how many bytes the socket took: fewer than len(b) when its
// buffer is full, 0 on an error (which the blocking write that follows
// then reports).
func writeOnce(fd uintptr, b []byte) int {
	for {
		n, err := syscall.Write(int(fd), b)
		if err == syscall.EINTR {
			continue
		}
		return max(n, 0)
	}
}

// peek is park's test, run by the runtime's poller whenever the socket may
// be readable: false waits on. It looks at what has arrived without taking
// it, consumes it when it is nothing but whole pongs and pings, and
// otherwise leaves it all for the library.
func (r *rawSocket) peek(fd uintptr) bool {
	var b [64]byte
	for {
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return false
		case err != nil || n == 0:
			return true // the library reads the error or the end
		}
		k := controlFrames(b[:n])
		if k == 0 {
			return true
		}
		m, err := syscall.Read(int(fd), b[:k])
		for err == syscall.EINTR {
			m, err = syscall.Read(int(fd), b[:k])
		}
		if err != nil || m != k {
			// The stream no longer starts at a frame: end it.
			_ = r.nc.Close()
			return true
		}
		r.control(b[:k])
	}
}

// hasData is a wait's test, run by the runtime's poller whenever the
// socket may be readable: true once something has arrived (or the
// connection failed), which is left for the next read.
func hasData(fd uintptr) bool {
	var b [1]byte
	for {
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		if err != syscall.EINTR {
			return err != syscall.EAGAIN
		}
	}
}

// frameArrived reports whether the socket fd holds bytes that are not
// whole pings and pongs (which park consumes), without taking them or
// waiting.
func frameArrived(fd uintptr) bool {
	var b [64]byte
	for {
		n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		if err == syscall.EINTR {
			continue
		}
		return err == nil && n > 0 && controlFrames(b[:n]) != n
	}
}
