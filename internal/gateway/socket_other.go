//go:build !linux

package gateway

// preparePark leaves the socket unparked: park needs a peek at the socket
// that is only written for Linux.
func (r *rawSocket) preparePark() {}
