// Command tokenrelay streams AI model answers token by token to every tab of
// a conversation: `serve` runs everything in one process, `gateway` and
// `worker` scale out on a NATS cluster, `migrate` prepares the store.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"
)

// version is set at build time with -ldflags "-X main.version=…"; a build
// without it is "dev", followed by the commit it was built from when Go
// recorded one (see buildVersion), so that the processes of a cluster in
// the middle of an upgrade can be told apart.
var version = buildVersion("dev")

// buildVersion is v, or, when v is "dev", "dev+" and the first 12 digits
// of the commit the binary was built from, "-dirty" when the work tree
// had changes.
func buildVersion(v string) string {
	info, ok := debug.ReadBuildInfo()
	if v != "dev" || !ok {
		return v
	}
	var rev, modified string
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			modified = s.Value
		}
	}
	if rev == "" {
		return v
	}
	v += "+" + rev[:min(12, len(rev))]
	if modified == "true" {
		v += "-dirty"
	}
	return v
}

func main() {
	ctx, stop := notifyShutdown()
	err := run(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	switch {
	case errors.Is(err, flag.ErrHelp): // -h: the usage was asked for
	case err != nil:
		fmt.Fprintln(os.Stderr, "tokenrelay: "+oneLine(err.Error()))
		os.Exit(1)
	}
}

// oneLine joins the lines of an error message (a driver's may hold
// several, such as one per address it dialled) with "; ", or a space after
// a colon, so that the reason a command stops is one line.
func oneLine(msg string) string {
	var b strings.Builder
	for i, l := range strings.Split(strings.TrimSpace(msg), "\n") {
		switch l = strings.TrimSpace(l); {
		case i == 0:
		case strings.HasSuffix(b.String(), ":"):
			b.WriteString(" ")
		default:
			b.WriteString("; ")
		}
		b.WriteString(l)
	}
	return b.String()
}

const usage = `usage: tokenrelay <command> [flags]

commands:
  serve     everything in one process: gateway, worker, embedded NATS, SQLite
  gateway   WebSocket/HTTP gateway against an external NATS and store
  worker    model worker against the same NATS and store
  migrate   apply the store's migrations and exit
  version   print the version

Run "tokenrelay <command> -h" for its flags; every flag is also read from
TOKENRELAY_<NAME> (upper case, - becomes _).
`

// run is the whole program; main only maps its error to an exit code.
func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("a command is required")
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "serve":
		return runServe(ctx, rest, getenv, stdout, stderr)
	case "gateway":
		return runGateway(ctx, rest, getenv, stdout, stderr)
	case "worker":
		return runWorker(ctx, rest, getenv, stdout, stderr)
	case "migrate":
		return runMigrate(ctx, rest, getenv, stdout, stderr)
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, "tokenrelay", version)
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", cmd)
}
