//go:build unix

package bus

import (
	"os"
	"syscall"
)

// mapSegment creates the segment file at path, size bytes long with its
// disk space allocated, and maps it shared into memory: what is copied into
// the mapping is in the page cache at once. A sparse file would be found
// short of space only when a page of the mapping is first written, and
// the kernel answers that with SIGBUS, which ends the process: allocated
// here, a full disk is an error the caller can take another way.
func mapSegment(path string, size int) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o640)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := allocate(f, int64(size)); err != nil {
		_ = os.Remove(path)
		return nil, err
	}
	mem, err := syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		_ = os.Remove(path)
		return nil, err
	}
	return mem, nil
}

func unmapSegment(mem []byte) error { return syscall.Munmap(mem) }
