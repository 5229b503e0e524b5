//go:build !unix

package main

// lockDataDir does nothing where flock is not available: keep one serve
// per data dir by hand there.
func lockDataDir(string) (func(), error) { return func() {}, nil }

// lockFile does nothing where flock is not available.
func lockFile(string, bool) (func(), error) { return func() {}, nil }
