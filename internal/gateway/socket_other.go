//go:build !linux

package gateway

// prepare leaves the socket unparked and written by the connection's
// writer alone: park's peek at the socket and writeNow's non-blocking write
// are only written for Linux.
func (r *rawSocket) prepare() {}

// hasData is not reached where prepare leaves the socket unparked.
func hasData(uintptr) bool { return true }

// frameArrived is not reached where prepare leaves the socket unparked.
func frameArrived(uintptr) bool { return false }

// writeOnce is not reached where prepare leaves rc unset.
func writeOnce(uintptr, []byte) int { return 0 }

// The wake set (wake_linux.go) is Linux only.
func (r *rawSocket) armWake()    {}
func (r *rawSocket) forgetWake() {}
func pollWakes()                 {}
