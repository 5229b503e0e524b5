package bus

import (
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// EmbeddedConfig configures the in-process nats-server that `serve` runs.
type EmbeddedConfig struct {
	// StoreDir is where JetStream keeps its files.
	StoreDir string
	// Listen, when set ("127.0.0.1:4222"), also accepts NATS clients over
	// TCP; by default the server has no port and only the in-process
	// connection reaches it.
	Listen string
	// Options, when not nil, is used as is (tests build clusters with it);
	// StoreDir and Listen are then ignored.
	Options *server.Options
}

// Embedded is a running in-process nats-server.
type Embedded struct {
	Server *server.Server
}

// StartEmbedded starts a JetStream-enabled nats-server in this process and
// waits until it accepts connections.
func StartEmbedded(cfg EmbeddedConfig) (*Embedded, error) {
	opts := cfg.Options
	if opts == nil {
		opts = &server.Options{
			ServerName: "tokenrelay",
			JetStream:  true,
			StoreDir:   cfg.StoreDir,
			DontListen: cfg.Listen == "",
			NoSigs:     true,
			NoLog:      true,
			// Turn snapshots hold up to a chunk plus its head; a larger payload
			// limit than the 1 MiB default leaves room for long deltas.
			MaxPayload: 8 << 20,
		}
		if cfg.Listen != "" {
			host, port, err := splitHostPort(cfg.Listen)
			if err != nil {
				return nil, err
			}
			if port == 0 {
				port = server.RANDOM_PORT // as for --addr, :0 picks a free port
			} else {
				// The server would only log a port in use (and never get
				// ready): say it now.
				ln, err := net.Listen("tcp", cfg.Listen)
				if err != nil {
					return nil, fmt.Errorf("start nats: %w", err)
				}
				ln.Close()
			}
			opts.Host, opts.Port = host, port
		}
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("start nats: %w", err)
	}
	go ns.Start()
	if !ns.ReadyForConnections(30 * time.Second) {
		ns.Shutdown()
		return nil, errors.New("start nats: not ready after 30s")
	}
	return &Embedded{Server: ns}, nil
}

// Connect opens a client connection to the embedded server, in-process when
// the server does not listen.
func (e *Embedded) Connect(name string) (*nats.Conn, error) {
	opts := []nats.Option{nats.Name(name), nats.MaxReconnects(-1)}
	if e.Server.Addr() == nil {
		opts = append(opts, nats.InProcessServer(e.Server))
	}
	nc, err := nats.Connect(e.Server.ClientURL(), opts...)
	if err != nil {
		return nil, fmt.Errorf("connect embedded nats: %w", err)
	}
	return nc, nil
}

// Shutdown stops the server and waits for it.
func (e *Embedded) Shutdown() {
	e.Server.Shutdown()
	e.Server.WaitForShutdown()
}
