package invalidate

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

// ErrCircuitOpen is returned (wrapped) for a Redis call refused because the
// Bus's circuit breaker is open: recent calls failed, and the Bus is probing
// Redis in the background. Test for it with errors.Is.
var ErrCircuitOpen = errors.New("invalidate: Redis unavailable (circuit open)")

// Defaults for the circuit breaker.
const (
	DefaultBreakerThreshold = 3
	DefaultBreakerCooldown  = time.Second
)

// Allow reports whether a Redis call may go ahead: nil while the circuit is
// closed, an error wrapping ErrCircuitOpen while it is open. It is one
// atomic load. A call that goes ahead should report its outcome with
// [Bus.Report].
func (b *Bus) Allow() error {
	if b.open.Load() {
		return ErrCircuitOpen
	}
	return nil
}

// CircuitOpen reports whether the circuit breaker is open.
func (b *Bus) CircuitOpen() bool { return b.open.Load() }

// Report records the outcome of a Redis call that [Bus.Allow] admitted: nil
// for success. Only failures that say Redis is unavailable count (see
// [Unavailable]); pass nil or nothing else. After Options.BreakerThreshold
// failures in a row the circuit opens: calls fail fast with
// ErrCircuitOpen, every cache on the Bus stops trusting its L1 as if the
// stream were dead (other instances cannot publish either), and a background
// probe tries Redis every Options.BreakerCooldown. When a probe succeeds and
// the outbox has been replayed, the circuit closes and L1 is trusted again
// under a new epoch.
func (b *Bus) Report(err error) {
	if err == nil {
		if b.fails.Load() != 0 {
			b.fails.Store(0)
		}
		return
	}
	if b.opts.BreakerThreshold < 0 {
		return
	}
	if n := b.fails.Add(1); int(n) >= b.opts.BreakerThreshold && !b.open.Load() {
		b.trip(err)
	}
}

// trip opens the circuit unless it is open already.
func (b *Bus) trip(cause error) {
	b.stateMu.Lock()
	if b.open.Load() {
		b.stateMu.Unlock()
		return
	}
	b.open.Store(true)
	b.openedAt.Store(time.Now().UnixNano())
	b.opens.Add(1)
	b.updateEpochLocked()
	b.stateMu.Unlock()
	b.logf(slog.LevelWarn, "tiercache: Redis unavailable; circuit open, L1 bypassed, writes kept in the outbox", "err", cause)
	b.kick()
}

// Unavailable reports whether err says Redis could not be reached or did not
// answer in time: network errors, timeouts, a closed pool, and the server
// replies that mean "not now" (LOADING, BUSY, MASTERDOWN, CLUSTERDOWN,
// TRYAGAIN, READONLY). A redis.Nil, a context cancellation and ordinary
// error replies (WRONGTYPE, NOSCRIPT, NOPERM) are not: Redis answered. Nor
// is ErrMalformed: a message that could not be encoded never reached Redis.
func Unavailable(err error) bool {
	switch {
	case err == nil, errors.Is(err, redis.Nil), errors.Is(err, context.Canceled):
		return false
	case errors.Is(err, ErrCircuitOpen), errors.Is(err, ErrMalformed):
		return false // refused here; Redis was not asked
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, redis.ErrClosed),
		errors.Is(err, redis.ErrPoolTimeout), errors.Is(err, syscall.ECONNREFUSED),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	var re redis.Error
	if errors.As(err, &re) {
		msg := re.Error()
		for _, p := range []string{"LOADING", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "READONLY"} {
			if strings.HasPrefix(msg, p) {
				return true
			}
		}
		return false
	}
	// io.EOF, "connection closed" and the like: the connection went away.
	return true
}

// probe runs on the outbox goroutine while the circuit is open: one PING,
// then the outbox replay; it closes the circuit when both succeed.
func (b *Bus) probe(ctx context.Context) bool {
	pctx, cancel := context.WithTimeout(ctx, b.opts.HeartbeatTimeout)
	err := b.rdb.Ping(pctx).Err()
	cancel()
	if err == nil {
		err = b.replay(ctx, "")
	}
	if err != nil {
		b.openedAt.Store(time.Now().UnixNano())
		return false
	}
	b.stateMu.Lock()
	b.fails.Store(0)
	b.open.Store(false)
	b.closes.Add(1)
	b.updateEpochLocked()
	b.stateMu.Unlock()
	b.logf(slog.LevelInfo, "tiercache: Redis reachable again; circuit closed, outbox replayed")
	return true
}
