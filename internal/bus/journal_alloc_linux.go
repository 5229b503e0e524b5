package bus

import (
	"errors"
	"os"
	"syscall"
)

// allocate makes f size bytes long with its disk space reserved
// (fallocate), or, on a filesystem that cannot reserve, only long.
func allocate(f *os.File, size int64) error {
	err := syscall.Fallocate(int(f.Fd()), 0, 0, size)
	if errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOSYS) {
		return f.Truncate(size)
	}
	if err != nil {
		return &os.PathError{Op: "fallocate", Path: f.Name(), Err: err}
	}
	return nil
}
