// Package bus is tokenrelay's only channel between gateways and workers:
// NATS JetStream streams for jobs and turn events, KV buckets for turn
// snapshots and cancel tombstones, and the embedded nats-server that `serve`
// runs in-process. Nothing outside this package imports nats.
package bus
