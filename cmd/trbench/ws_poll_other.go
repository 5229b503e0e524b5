//go:build !linux

package main

// startPolled: there are no poll loops here; each connection is read by a
// goroutine of its own.
func startPolled(*wsConn) bool { return false }

func shutdown(int) {}
