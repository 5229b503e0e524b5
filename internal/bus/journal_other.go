//go:build !unix

package bus

import "errors"

// The delta journal maps its segments into memory, which needs a unix
// system; elsewhere Start fails with errors.ErrUnsupported and serve goes
// on without one.
func mapSegment(string, int) ([]byte, error) { return nil, errors.ErrUnsupported }

func unmapSegment([]byte) error { return nil }
