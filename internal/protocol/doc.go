// Package protocol encodes and decodes the wire frames of PROTOCOL.md (the
// native protocol) and maps domain errors to its error codes.
package protocol
