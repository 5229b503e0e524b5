package bus_test

import (
	"os"
	"syscall"
	"testing"
)

// A journal segment has its disk space allocated when it is created: a
// sparse file mapped into memory finds the disk full only when a page is
// first written, and the kernel answers that with SIGBUS, which ends the
// process, where an allocation that fails sends deltas to the stream.
func TestJournalSegmentsHaveTheirSpace(t *testing.T) {
	dir := t.TempDir()
	startJournal(t, dir, 0, nil)
	files := segmentFiles(t, dir)
	if len(files) != 1 {
		t.Fatalf("segments %v, want one", files)
	}
	fi, err := os.Stat(files[0])
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if allocated := st.Blocks * 512; allocated < fi.Size() {
		t.Fatalf("segment of %d bytes has %d allocated, want all of it", fi.Size(), allocated)
	}
}
