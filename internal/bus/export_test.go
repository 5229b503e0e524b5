package bus

import (
	"testing"
	"time"
)

// SetSegmentBytes makes the journal start a new segment once one holds n
// bytes, so that tests see segments come and go.
func (j *Journal) SetSegmentBytes(n int64) { j.segmentBytes = n }

// SetOpenTimeouts sets how long one attempt of a step of Open may take and
// how long the step retries, until the end of the test.
func SetOpenTimeouts(t testing.TB, attempt, retryFor time.Duration) {
	a, r := openAttempt, openRetryFor
	openAttempt, openRetryFor = attempt, retryFor
	t.Cleanup(func() { openAttempt, openRetryFor = a, r })
}
