//go:build !unix

package main

import (
	"context"
	"io/fs"
	"os"
)

// lockDataDir does nothing where flock is not available: keep one serve
// per data dir by hand there.
func lockDataDir(string) (func(), error) { return func() {}, nil }

// fileHold holds nothing where POSIX record locks are not available: every
// process takes itself for its store's only user there.
type fileHold struct{}

type openFunc func(name string, flag int, perm fs.FileMode) (*os.File, error)

func holdFile(context.Context, string, openFunc) (*fileHold, error) { return &fileHold{}, nil }
func (*fileHold) readOnly() error                                   { return nil }
func (*fileHold) Alone(context.Context) (bool, error)               { return true, nil }
func (*fileHold) EndAlone(context.Context) error                    { return nil }
func (*fileHold) Release()                                          {}
