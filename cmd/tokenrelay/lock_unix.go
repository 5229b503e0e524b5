//go:build unix

package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
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

// fileHold is a POSIX record lock on a whole file: shared, and exclusive
// as well while its process is alone (fcntl locks, unlike flock, convert
// atomically, and a process's own locks never conflict with it).
type fileHold struct {
	f    *os.File
	path string
	// ro is why f is open read-only (the file is another user's): its read
	// lock is shared like any, but it can never be exclusive.
	ro error
}

// openFunc opens a file as os.OpenFile does.
type openFunc func(name string, flag int, perm fs.FileMode) (*os.File, error)

// holdFile takes path's lock shared (creating the file with open), waiting
// while another process holds it exclusively, as long as ctx allows.
func holdFile(ctx context.Context, path string, open openFunc) (*fileHold, error) {
	// 0664: processes of several users in one group may share the store.
	f, err := open(path, os.O_RDWR|os.O_CREATE, 0o664)
	var ro error
	if errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS) {
		// fcntl takes a read lock through a read-only descriptor too.
		g, rerr := open(path, os.O_RDONLY, 0)
		switch {
		case rerr == nil:
			f, ro, err = g, err, nil
		case errors.Is(rerr, fs.ErrNotExist):
			err = fmt.Errorf("%w: %w", errNoLockFile, err)
		default:
			err = fmt.Errorf("this user can neither write nor read the lock file: %w", rerr)
		}
	}
	if err != nil {
		return nil, err
	}
	h := &fileHold{f: f, path: path, ro: ro}
	for {
		err := h.set(syscall.F_RDLCK)
		if err == nil {
			return h, nil
		}
		if !errors.Is(err, syscall.EAGAIN) && !errors.Is(err, syscall.EACCES) {
			f.Close()
			return nil, err
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("another process holds %s alone: %w", path, ctx.Err())
		case <-time.After(20 * time.Millisecond): // fcntl cannot wait on ctx
		}
	}
}

func (h *fileHold) set(typ int16) error {
	return syscall.FcntlFlock(h.f.Fd(), syscall.F_SETLK, &syscall.Flock_t{Type: typ, Whence: io.SeekStart})
}

// readOnly is why the hold can never be exclusive, or nil.
func (h *fileHold) readOnly() error { return h.ro }

// Alone takes the lock exclusively, if no other process holds it.
func (h *fileHold) Alone(context.Context) (bool, error) {
	if h.ro != nil {
		return false, fmt.Errorf("the store's lock file %s is not writable by this user, so this process cannot hold it alone: %w", h.path, h.ro)
	}
	err := h.set(syscall.F_WRLCK)
	if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.EACCES) {
		return false, nil
	}
	return err == nil, err
}

// EndAlone turns the exclusive lock back into a shared one.
func (h *fileHold) EndAlone(context.Context) error {
	if h.ro != nil {
		return nil
	}
	return h.set(syscall.F_RDLCK)
}

// Release ends the hold.
func (h *fileHold) Release() { h.f.Close() }

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
