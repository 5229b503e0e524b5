//go:build unix

package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// lockDataDir takes the data dir for this process alone: two serve
// processes on one data dir would run two NATS servers on one JetStream
// store. The lock is an flock on tokenrelay.lock, which holds the holder's
// pid; the system releases it when the process ends, however it ends.
func lockDataDir(dir string) (release func(), err error) {
	release, holder, err := flockFile(filepath.Join(dir, "tokenrelay.lock"), true)
	switch {
	case errors.Is(err, syscall.EWOULDBLOCK):
		return nil, fmt.Errorf("data dir %s is in use by another tokenrelay (pid %s)", dir, holder)
	case err != nil:
		return nil, fmt.Errorf("lock data dir: %w", err)
	}
	return release, nil
}

// lockFile takes the flock of path, exclusive or shared, and reports
// errHeld when another process holds it the other way (or exclusively).
func lockFile(path string, exclusive bool) (release func(), err error) {
	release, _, err = flockFile(path, exclusive)
	if errors.Is(err, syscall.EWOULDBLOCK) {
		return nil, errHeld
	}
	return release, err
}

// flockFile takes the flock of path (created when missing), exclusive or
// shared, without waiting; an exclusive holder writes its pid in the file.
// When it is held otherwise, the error is EWOULDBLOCK and holder is what
// the file holds.
func flockFile(path string, exclusive bool) (release func(), holder string, err error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, "", err
	}
	how := syscall.LOCK_SH
	if exclusive {
		how = syscall.LOCK_EX
	}
	if err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			b, _ := os.ReadFile(path)
			holder = strings.TrimSpace(string(b))
		}
		return nil, holder, err
	}
	if exclusive {
		if err := f.Truncate(0); err == nil {
			_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		}
	}
	return func() { f.Close() }, "", nil
}
