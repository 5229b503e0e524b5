//go:build unix && !linux

package bus

import "os"

// allocate makes f size bytes long. Where fallocate is not at hand the file
// is sparse, and a full disk shows only when its pages are written.
func allocate(f *os.File, size int64) error { return f.Truncate(size) }
