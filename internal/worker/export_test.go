package worker

import "time"

// SetRetryFor makes workers try a turn's end for d instead of retryFor
// until the returned function restores it.
func SetRetryFor(d time.Duration) (restore func()) {
	old := retryFor
	retryFor = d
	return func() { retryFor = old }
}
