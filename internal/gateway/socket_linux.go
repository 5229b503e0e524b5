package gateway

import "syscall"

// preparePark makes the socket parkable when it is a socket of this
// system's (a TCP connection) and the library reads it through a buffer of
// ours.
func (r *rawSocket) preparePark() {
	sc, ok := r.nc.(syscall.Conn)
	if !ok || r.br == nil {
		return
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return
	}
	r.rc, r.readable = rc, r.peek
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
