package tiered

import "errors"

var (
	// ErrClosed is returned by every method called after Close.
	ErrClosed = errors.New("tiered: cache closed")
	// ErrInvalidKey is returned for an empty key or one longer than
	// Options.MaxKeyLen. Nothing is read or written.
	ErrInvalidKey = errors.New("tiered: invalid key")
	// ErrValueTooLarge is returned by writes whose encoded value exceeds
	// Options.MaxValueSize. Nothing is written.
	ErrValueTooLarge = errors.New("tiered: value too large")
	// ErrInvalidTTL is returned for a negative TTL.
	ErrInvalidTTL = errors.New("tiered: invalid ttl")
	// ErrNoRedis is returned by operations that need Redis on a cache in
	// ModeMemory (Ping) .
	ErrNoRedis = errors.New("tiered: no Redis in this mode")
)
