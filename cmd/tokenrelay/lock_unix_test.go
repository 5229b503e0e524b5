//go:build unix

package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// lockHelperEnv names the lock file TestLockFileHelper holds, as a user
// that may not write it, in a process of its own (a process's own record
// locks never conflict with each other).
const lockHelperEnv = "TOKENRELAY_TEST_LOCK_HELPER"

// denyWrite opens files as another user would one of this one's with mode
// 0644: read-only, and not at all for writing (as root, modes do not
// stop this process).
func denyWrite(name string, flag int, perm fs.FileMode) (*os.File, error) {
	if flag&(os.O_WRONLY|os.O_RDWR) != 0 {
		return nil, &fs.PathError{Op: "open", Path: name, Err: syscall.EACCES}
	}
	return os.OpenFile(name, flag, perm)
}

// TestLockFileHelper is not a test: run by
// TestLockFileOfAnotherUserIsHeldShared, it holds the lock file named by
// lockHelperEnv as denyWrite lets it, reports what Alone says, and
// keeps the hold until its stdin closes.
func TestLockFileHelper(t *testing.T) {
	path := os.Getenv(lockHelperEnv)
	if path == "" {
		t.Skip("run by TestLockFileOfAnotherUserIsHeldShared")
	}
	h, err := holdLockFile(t.Context(), path, denyWrite, slog.New(slog.NewTextHandler(os.Stderr, nil)))
	if err != nil {
		fmt.Printf("hold: %v\n", err)
		return
	}
	defer h.Release()
	ok, err := h.Alone(t.Context())
	fmt.Printf("alone %v: %v\n", ok, err)
	io.Copy(io.Discard, os.Stdin)
}

// A process whose user may not write the store's lock file (another
// user's) still holds the store shared, so that a serve beside it is not
// alone, and is never alone itself.
func TestLockFileOfAnotherUserIsHeldShared(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db.lock")
	log := slog.New(slog.DiscardHandler)
	a, err := holdLockFile(t.Context(), path, os.OpenFile, log)
	if err != nil {
		t.Fatalf("hold: %v", err)
	}
	defer a.Release()

	cmd := exec.CommandContext(t.Context(), os.Args[0], "-test.run=^TestLockFileHelper$")
	cmd.Env = append(os.Environ(), lockHelperEnv+"="+path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start the helper: %v", err)
	}
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	if !strings.HasPrefix(line, "alone false: ") || !strings.Contains(line, "not writable by this user") {
		stdin.Close()
		cmd.Wait()
		t.Fatalf("the read-only holder says %q, want alone false for its lock file is not writable\n%s", line, stderr.String())
	}
	if ok, err := a.Alone(t.Context()); ok || err != nil {
		t.Errorf("alone beside a read-only holder: %v, %v; want false", ok, err)
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v\n%s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "the store's lock file is not writable by this user") {
		t.Errorf("the read-only holder's log does not say why it is never alone:\n%s", stderr.String())
	}
	if ok, err := a.Alone(t.Context()); !ok || err != nil {
		t.Fatalf("alone once the read-only holder is gone: %v, %v; want true", ok, err)
	}
	if err := a.EndAlone(t.Context()); err != nil {
		t.Fatalf("end alone: %v", err)
	}
}

// Only a lock file that neither exists nor can be made leaves the store
// unguarded; one that exists but cannot be opened at all stops the hold.
func TestLockFileThatCannotBeOpened(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db.lock")
	log := slog.New(slog.DiscardHandler)
	h, err := holdLockFile(t.Context(), path, denyWrite, log)
	if err != nil {
		t.Fatalf("hold with no lock file to be made: %v", err)
	}
	if _, ok := h.(alwaysAlone); !ok {
		t.Fatalf("hold with no lock file to be made is %T, want alwaysAlone", h)
	}
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	denyAll := func(name string, flag int, perm fs.FileMode) (*os.File, error) {
		return nil, &fs.PathError{Op: "open", Path: name, Err: syscall.EACCES}
	}
	if h, err := holdLockFile(t.Context(), path, denyAll, log); !errors.Is(err, fs.ErrPermission) {
		t.Fatalf("hold of an unreadable lock file: %T, %v; want a permission error", h, err)
	}
}
