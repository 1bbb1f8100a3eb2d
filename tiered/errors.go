package tiered

import (
	"errors"
	"fmt"
)

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
	// ModeMemory (Ping).
	ErrNoRedis = errors.New("tiered: no Redis in this mode")
)

// PanicError is the error every waiter of a Remember gets when the loader
// panicked: the panic is recovered (the process does not die) and carried
// here with the stack where it happened.
type PanicError struct {
	Value any
	Stack []byte
}

func (p *PanicError) Error() string {
	return fmt.Sprintf("tiered: loader panicked: %v\n\n%s", p.Value, p.Stack)
}

// Unwrap returns the panic value when it is an error.
func (p *PanicError) Unwrap() error {
	err, _ := p.Value.(error)
	return err
}
