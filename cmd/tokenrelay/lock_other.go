//go:build !unix

package main

import "context"

// lockDataDir does nothing where flock is not available: keep one serve
// per data dir by hand there.
func lockDataDir(string) (func(), error) { return func() {}, nil }

// fileHold holds nothing where POSIX record locks are not available: every
// process takes itself for its store's only user there.
type fileHold struct{}

func holdFile(context.Context, string) (*fileHold, error) { return &fileHold{}, nil }
func (*fileHold) Alone(context.Context) (bool, error)     { return true, nil }
func (*fileHold) EndAlone(context.Context) error          { return nil }
func (*fileHold) Release()                                {}
