package invalidate

import (
	"context"
	"errors"
	"log/slog"
	"sort"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/metrics"
)

// DefaultOutboxLimit is the default for Options.OutboxLimit.
const DefaultOutboxLimit = 10000

// ErrOutboxDropped is returned (wrapped) by Close, and by a cache's Close or
// Shutdown, when invalidations kept in the outbox could not be replayed
// before it closed and were dropped: other instances may serve the values
// the failed writes meant to replace until those values expire. Test for it
// with errors.Is.
var ErrOutboxDropped = errors.New("invalidate: outbox entries dropped unreplayed")

// Replayer is implemented by handlers that can redo, on recovery, the
// invalidations the Bus kept in its outbox. A cache's Replay deletes the keys
// from Redis and publishes their invalidation (or, with flush, clears the
// whole namespace), in one atomic step per batch, without going through the
// circuit breaker. It is called from the Bus's outbox goroutine, from its
// receive goroutine as it resubscribes, and from ReplayNow's caller. A Replay that did nothing because its cache is closing
// returns ErrNotReplayed: the entries stay, and unregistering drops and
// reports them.
type Replayer interface {
	Replay(ctx context.Context, keys []string, flush bool) error
}

// ErrNotReplayed is what a Replayer returns when it replayed nothing and is
// not failing either (its cache is closing): the outbox keeps the entries,
// and the replay does not count as failed.
var ErrNotReplayed = errors.New("invalidate: not replayed")

// pendingNS is what the outbox holds for one namespace: keys to delete and
// invalidate, each with the sequence number of its latest Defer, or a whole
// namespace flush.
type pendingNS struct {
	keys  map[string]uint64
	flush uint64 // the Defer sequence that asked for it; 0: none
}

// Defer keeps, in the Bus's outbox, the invalidation of keys of namespace ns
// that could not reach Redis (a write that failed or was refused). The outbox
// keeps each key once, replays it with backoff until it succeeds, and always
// before the Bus trusts L1 again after a gap or an open circuit. A replay
// deletes the key from Redis and invalidates it everywhere: the value that
// failed to be written is not kept, only the fact that Redis may hold an
// older one.
//
// The outbox is bounded by Options.OutboxLimit keys; beyond that a namespace
// degrades to a whole-namespace flush, never to a silent drop.
func (b *Bus) Defer(ns string, keys ...string) {
	if len(keys) == 0 {
		return
	}
	b.obMu.Lock()
	p := b.pendingLocked(ns)
	if p.flush == 0 {
		for _, k := range keys {
			b.obSeq++
			if _, ok := p.keys[k]; !ok {
				b.obKeys++
			}
			p.keys[k] = b.obSeq
		}
		if b.obKeys > b.opts.OutboxLimit {
			b.overflowLocked(ns, p)
		}
	} else {
		// The pending flush covers these keys only if it reaches Redis
		// after their write failed: a replay of it already under way must
		// not settle it.
		b.obSeq++
		p.flush = b.obSeq
	}
	b.depth.Store(int64(b.obKeys + b.obFlushes))
	b.obMu.Unlock()
	b.deferred.Add(uint64(len(keys)))
	b.kick()
}

// DeferFlush keeps a namespace flush that could not reach Redis (a Clear).
func (b *Bus) DeferFlush(ns string) {
	b.obMu.Lock()
	p := b.pendingLocked(ns)
	b.flushLocked(p)
	b.depth.Store(int64(b.obKeys + b.obFlushes))
	b.obMu.Unlock()
	b.deferred.Add(1)
	b.kick()
}

func (b *Bus) pendingLocked(ns string) *pendingNS {
	p := b.outbox[ns]
	if p == nil {
		p = &pendingNS{keys: make(map[string]uint64)}
		b.outbox[ns] = p
	}
	return p
}

// flushLocked turns p into a flush, which covers every key.
func (b *Bus) flushLocked(p *pendingNS) {
	b.obKeys -= len(p.keys)
	clear(p.keys)
	if p.flush == 0 {
		b.obFlushes++
	}
	b.obSeq++
	p.flush = b.obSeq
}

func (b *Bus) overflowLocked(ns string, p *pendingNS) {
	b.flushLocked(p)
	b.overflows.Add(1)
	b.logf(slog.LevelWarn, "tiercache: invalidation outbox full; the namespace will be flushed on recovery", "namespace", ns, "limit", b.opts.OutboxLimit)
}

// Pending reports whether the outbox holds an invalidation that covers key of
// namespace ns: Redis may then hold a value older than a write this process
// made, so caches read such keys from their loader instead. It is one atomic
// load while the outbox is empty.
func (b *Bus) Pending(ns, key string) bool {
	if b.depth.Load() == 0 {
		return false
	}
	b.obMu.Lock()
	defer b.obMu.Unlock()
	p := b.outbox[ns]
	if p == nil {
		return false
	}
	if p.flush != 0 {
		return true
	}
	_, ok := p.keys[key]
	return ok
}

// OutboxDepth is the number of keys and namespace flushes waiting in the
// outbox.
func (b *Bus) OutboxDepth() int { return int(b.depth.Load()) }

// kick wakes the outbox goroutine.
func (b *Bus) kick() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}

// replay hands every pending namespace (only ns, if ns is not "") to its
// handler and removes what was replayed, unless a newer Defer for it arrived
// meanwhile. Entries of a namespace with no handler (a cache closed, or
// never opened, on this Bus) cannot be replayed, since only the cache can
// name its keys in Redis: they are dropped, counted and logged. A closing
// cache replays its own as it closes (ReplayNow) and its unregistering
// drops what is left, so this is for a namespace that never had a handler
// here. One replay runs at a time.
func (b *Bus) replay(ctx context.Context, ns string) error {
	select {
	case b.replaying <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	defer func() { <-b.replaying }()
	type job struct {
		ns    string
		keys  []string
		seqs  []uint64
		flush uint64
	}
	b.obMu.Lock()
	jobs := make([]job, 0, len(b.outbox))
	for name, p := range b.outbox {
		if ns != "" && name != ns {
			continue
		}
		j := job{ns: name, flush: p.flush}
		if p.flush == 0 {
			j.keys = make([]string, 0, len(p.keys))
			for k := range p.keys {
				j.keys = append(j.keys, k)
			}
			sort.Strings(j.keys)
			j.seqs = make([]uint64, len(j.keys))
			for i, k := range j.keys {
				j.seqs[i] = p.keys[k]
			}
		}
		jobs = append(jobs, j)
	}
	b.obMu.Unlock()
	if len(jobs) == 0 {
		return nil
	}
	ctx, span := b.tel.Span(ctx, "tiercache.outbox.replay")
	var firstErr error
	defer func() { metrics.End(span, firstErr) }()
	for _, j := range jobs {
		b.mu.RLock()
		r := b.handlers[j.ns]
		b.mu.RUnlock()
		dropped := r == nil
		if !dropped {
			rp, ok := r.h.(Replayer)
			if ok {
				rctx, cancel := context.WithTimeout(ctx, max(b.opts.HeartbeatTimeout, 5*time.Second))
				err := rp.Replay(rctx, j.keys, j.flush != 0)
				cancel()
				if errors.Is(err, ErrNotReplayed) {
					continue
				}
				if err != nil {
					if firstErr == nil {
						firstErr = err
					}
					if j.flush == 0 && refusedForGood(err) {
						b.keysToFlush(j.ns, err)
					}
					continue
				}
			}
		}
		b.obMu.Lock()
		removed := 0 // what this job settled: newer Defers of its keys stay
		if p := b.outbox[j.ns]; p != nil {
			if j.flush != 0 {
				if p.flush == j.flush {
					p.flush = 0
					b.obFlushes--
					removed = 1
				}
			} else {
				for i, k := range j.keys {
					if p.keys[k] == j.seqs[i] {
						delete(p.keys, k)
						b.obKeys--
						removed++
					}
				}
			}
			if p.flush == 0 && len(p.keys) == 0 {
				delete(b.outbox, j.ns)
			}
		}
		b.depth.Store(int64(b.obKeys + b.obFlushes))
		b.obMu.Unlock()
		switch {
		case dropped && removed > 0:
			b.dropped.Add(uint64(removed))
			// Said once, when it happens: the namespace's writes that did
			// not reach Redis will not be invalidated by this process.
			b.logf(slog.LevelWarn, "tiercache: outbox entries dropped: their namespace has no cache on this Bus",
				"namespace", j.ns, "invalidations", removed, "flush", j.flush != 0)
		case !dropped:
			b.replayed.Add(uint64(removed))
		}
	}
	return firstErr
}

// refusedForGood reports whether a replay's error would come back on every
// retry: a message the encoder rejects, or an error reply from Redis that
// does not mean "not now" (NOPERM, a script error).
func refusedForGood(err error) bool {
	if errors.Is(err, ErrMalformed) {
		return true
	}
	var re redis.Error
	return errors.As(err, &re) && !errors.Is(err, redis.Nil) && !Unavailable(err)
}

// keysToFlush turns ns's pending keys into a namespace flush after their
// replay failed for a reason other than Redis being unavailable (a refused
// command, a message the encoder rejects): retrying the same keys would
// fail forever, and the Bus, which replays before it trusts L1 again,
// would never be live. A flush is one small message, and covers them.
func (b *Bus) keysToFlush(ns string, err error) {
	b.obMu.Lock()
	p := b.outbox[ns]
	if p == nil || p.flush != 0 {
		b.obMu.Unlock()
		return
	}
	b.flushLocked(p)
	b.depth.Store(int64(b.obKeys + b.obFlushes))
	b.obMu.Unlock()
	b.logf(slog.LevelWarn, "tiercache: replaying invalidations failed, not for an outage; the namespace will be flushed instead",
		"namespace", ns, "err", err)
	b.kick()
}

// ReplayNow replays what the outbox holds for namespace ns at once, on the
// caller's goroutine, through ns's handler, past the circuit breaker and
// the backoff. It waits for a replay already running (of any namespace),
// and all of it is bounded by ctx: when ctx ends first it returns ctx's
// error, which is not counted against Redis. It returns nil when the
// outbox holds nothing of ns afterwards, and otherwise the replay's error
// (ErrNotReplayed if the handler declined, or a newer Defer came in the
// meantime). A cache calls it as it closes (Shutdown), while it can still
// name its keys.
func (b *Bus) ReplayNow(ctx context.Context, ns string) error {
	if b.depth.Load() == 0 {
		return nil
	}
	b.obMu.Lock()
	_, pending := b.outbox[ns]
	b.obMu.Unlock()
	if !pending {
		return nil
	}
	err := b.replay(ctx, ns)
	if Unavailable(err) && ctx.Err() == nil { // the caller's deadline says nothing of Redis
		b.Report(err)
	}
	b.obMu.Lock()
	_, left := b.outbox[ns]
	b.obMu.Unlock()
	if err == nil && left {
		err = ErrNotReplayed
	}
	return err
}

// dropLocked removes ns's entries, which nothing in this process can
// replay any more, and counts them (a flush counts as one); obMu must be
// held.
func (b *Bus) dropLocked(ns string) int {
	p := b.outbox[ns]
	if p == nil {
		return 0
	}
	n := len(p.keys)
	b.obKeys -= n
	if p.flush != 0 {
		n = 1 // the flush covers the keys
		b.obFlushes--
	}
	delete(b.outbox, ns)
	b.depth.Store(int64(b.obKeys + b.obFlushes))
	b.dropped.Add(uint64(n))
	return n
}

// outboxLoop owns the outbox replays and the circuit breaker's probes. It
// replays whenever something is deferred, with exponential backoff while
// replays fail, and probes Redis every BreakerCooldown while the circuit is
// open.
func (b *Bus) outboxLoop() {
	defer close(b.obDone)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-b.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	backoff := time.Duration(0)
	for {
		select {
		case <-b.stop:
			return
		case <-b.wake:
		case <-timer.C:
		}
		var next time.Duration
		switch {
		case b.open.Load():
			wait := b.opts.BreakerCooldown - time.Since(time.Unix(0, b.openedAt.Load()))
			if wait > 0 {
				next = wait
				break
			}
			if !b.probe(ctx) {
				next = b.opts.BreakerCooldown
			}
		case b.depth.Load() > 0:
			if err := b.replay(ctx, ""); err != nil {
				if Unavailable(err) {
					b.Report(err)
				}
				backoff = min(max(2*backoff, 50*time.Millisecond), 5*time.Second)
				next = backoff
			} else {
				backoff = 0
			}
		}
		if next > 0 {
			if !timer.Stop() {
				select {
				case <-timer.C:
				default:
				}
			}
			timer.Reset(next)
		}
	}
}
