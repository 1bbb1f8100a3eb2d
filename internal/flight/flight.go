// Package flight collapses concurrent calls for the same key into one run,
// like golang.org/x/sync/singleflight, with the semantics a cache needs and
// singleflight lacks:
//
//   - the run never sees a caller's cancellation: it gets a context detached
//     from the first caller (its values kept), bounded by a timeout, and
//     cancelled only when every waiter has gone;
//   - each waiter waits on its own ctx and leaves alone;
//   - a panic in the run reaches every waiter as a *PanicError instead of
//     crashing the process (singleflight's DoChan re-panics on a fresh
//     goroutine) or re-panicking in each caller;
//   - Forget detaches a key's in-flight run so later callers start anew;
//   - Close cancels every run and waits for them.
//
// We keep our own map rather than wrapping singleflight because the waiter
// count that drives shared cancellation has to live under the same lock as
// the key's entry.
package flight

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"
)

// ErrClosed is returned by Do after Close.
var ErrClosed = errors.New("flight: group closed")

// errGoexit is what waiters see when the run called runtime.Goexit.
var errGoexit = errors.New("flight: run called runtime.Goexit")

// PanicError carries a run's panic value and the stack where it happened.
type PanicError struct {
	Value any
	Stack []byte
}

func (p *PanicError) Error() string {
	return fmt.Sprintf("panic in loader: %v\n\n%s", p.Value, p.Stack)
}

// Unwrap returns the panic value when it is an error.
func (p *PanicError) Unwrap() error {
	err, _ := p.Value.(error)
	return err
}

// call is one key's share of a run.
type call[T any] struct {
	key     string
	done    chan struct{}
	val     T
	err     error
	waiters int // callers waiting for this key
	run     *run
}

// run is one execution of fn, for one key (Do) or several (DoMany). It is
// cancelled when its last waiter, over all its keys, has gone, unless it is
// pinned (started by Go, which nobody waits for).
type run struct {
	waiters int
	pinned  bool
	cancel  context.CancelFunc
	keys    []string
	one     [1]string // keys' storage for a run of one key: no allocation of its own
}

// newRun returns a run of n keys, which the caller fills in.
func newRun(cancel context.CancelFunc, n int) *run {
	r := &run{cancel: cancel}
	if n == 1 {
		r.keys = r.one[:]
	} else {
		r.keys = make([]string, n)
	}
	return r
}

// Group runs at most one function per key at a time. The zero value is not
// usable; call New. All methods are safe for concurrent use.
type Group[T any] struct {
	mu     sync.Mutex
	calls  map[string]*call[T]
	runs   map[*run]struct{} // in progress, for Close
	closed bool
	wg     sync.WaitGroup
	joined atomic.Uint64
	// rival maps a key to the key whose runs must never overlap its own
	// (see NewRivals); nil: none.
	rival      func(key string) string
	rivalWaits atomic.Uint64
	// detached, if set, runs under g.mu with the keys of a run that leave
	// detaches because all its callers gave up (see OnDetach).
	detached func(keys []string)
	// held, if set, runs under g.mu for each key Go or GoMany would start a
	// run for (see Hold).
	held func(key string) bool
}

// RivalWaits is how many times a caller waited for a rival run to finish
// before starting its own (see NewRivals).
func (g *Group[T]) RivalWaits() uint64 { return g.rivalWaits.Load() }

// Joined is how many callers joined a run already in flight instead of
// starting their own.
func (g *Group[T]) Joined() uint64 { return g.joined.Load() }

// New returns an empty Group.
func New[T any]() *Group[T] {
	return &Group[T]{calls: make(map[string]*call[T]), runs: make(map[*run]struct{})}
}

// NewRivals returns an empty Group in which a run for key is never in
// flight at the same time as a run for rival(key): a caller that would
// start one while the other is in flight waits for it to finish first, as
// long as its ctx allows, and Go does not start one. Joining a run of the
// same key is unaffected. rival must be symmetric (rival(rival(k)) == k),
// return "" for a key without a rival, and be fast: it is called with the
// group's lock held. A run detached from its key (by Forget, or by leave
// when all its callers gave up; see OnDetach) is no longer in flight: it
// is the caller's to make its late result harmless, as Forget's also does.
// A DoMany call must not hold a key and its rival together.
func NewRivals[T any](rival func(key string) string) *Group[T] {
	g := New[T]()
	g.rival = rival
	return g
}

// OnDetach sets f to run, under the group's lock, with the keys of a run
// that is detached because every caller waiting for it gave up (the run is
// cancelled, but may still be finishing, and a later caller starts a new
// one). A cache bumps its invalidation counters there, as with Forget's
// also. Call it before the group is used.
func (g *Group[T]) OnDetach(f func(keys []string)) { g.detached = f }

// Hold sets f, which Go and GoMany call under the group's lock for each key
// they would start a run for: a key f reports held gets none. Called there,
// it sees what a run of the key recorded before it finished (a cache's retry
// throttle after a failed background refresh), which a check before Go
// could miss: the run could fail and finish in between. f must be fast and
// must not call into the group. Do is unaffected. Call it before the group
// is used.
func (g *Group[T]) Hold(f func(key string) bool) { g.held = f }

// isHeld reports whether f (see Hold) holds key; g.mu is held.
func (g *Group[T]) isHeld(key string) bool { return g.held != nil && g.held(key) }

// rivalInFlight returns key's rival's call in flight, or nil; g.mu is held.
func (g *Group[T]) rivalInFlight(key string) *call[T] {
	if g.rival == nil {
		return nil
	}
	if r := g.rival(key); r != "" {
		return g.calls[r]
	}
	return nil
}

// awaitRivals waits until every call in cs has finished, or ctx is done.
func (g *Group[T]) awaitRivals(ctx context.Context, cs []*call[T]) error {
	g.rivalWaits.Add(1)
	for _, c := range cs {
		select {
		case <-c.done:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return ctx.Err()
}

// Do runs fn for key unless a run for key is already in flight, in which case
// it waits for that run's result. shared reports whether the result went to
// more than one caller.
//
// fn runs on its own goroutine with a context that keeps ctx's values but not
// its cancellation; that context is cancelled when timeout (if positive)
// elapses, when every waiter has returned early, or on Close. Do returns
// ctx.Err() as soon as ctx is done; the run goes on for the other waiters.
func (g *Group[T]) Do(ctx context.Context, key string, timeout time.Duration, fn func(context.Context) (T, error)) (v T, err error, shared bool) {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return v, ErrClosed, false
	}
	c, ok := g.calls[key]
	if !ok {
		if r := g.rivalInFlight(key); r != nil {
			g.mu.Unlock()
			if err := g.awaitRivals(ctx, []*call[T]{r}); err != nil {
				return v, err, false
			}
			return g.Do(ctx, key, timeout, fn)
		}
	}
	if ok {
		g.joinLocked(c)
	} else {
		c = &call[T]{key: key, done: make(chan struct{}), waiters: 1}
		g.calls[key] = c
		g.start(ctx, []*call[T]{c}, timeout, func(ctx context.Context) error {
			v, err := fn(ctx)
			c.val = v
			return err
		})
	}
	g.mu.Unlock()
	v, err, done := g.wait(ctx, c)
	if done {
		g.mu.Lock()
		shared = c.waiters > 1
		g.mu.Unlock()
	}
	return v, err, shared
}

// joinLocked adds a caller to c's run; g.mu is held.
func (g *Group[T]) joinLocked(c *call[T]) {
	c.waiters++
	c.run.waiters++
	g.joined.Add(1)
}

// wait returns c's result once it is done, or ctx.Err() once ctx is done,
// leaving c (a run all of whose callers left is cancelled). done reports
// that c finished before this caller left.
func (g *Group[T]) wait(ctx context.Context, c *call[T]) (v T, err error, done bool) {
	select {
	case <-c.done:
		return c.val, c.err, true
	case <-ctx.Done():
		if finished := g.leave([]*call[T]{c}); finished[c] {
			return c.val, c.err, false
		}
		return v, ctx.Err(), false
	}
}

// Join waits for key's run in flight, if any, and returns its result, as a
// caller of Do that joined it would; ok is false, at once, when there is
// none. It never starts a run, so no caller of Do can join what it does
// instead. Leaving early (ctx done) works as for Do.
func (g *Group[T]) Join(ctx context.Context, key string) (v T, err error, ok bool) {
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return v, ErrClosed, true
	}
	c, ok := g.calls[key]
	if !ok {
		g.mu.Unlock()
		return v, nil, false
	}
	g.joinLocked(c)
	g.mu.Unlock()
	v, err, _ = g.wait(ctx, c)
	return v, err, true
}

// DoInline is Do for short runs: when no run for key is in flight and
// ctx's deadline (if any) is no earlier than the timeout's, fn runs on the
// caller's goroutine, which saves a goroutine and two wake-ups per run.
// Other callers join as with Do. The price: the caller cannot leave before
// fn returns, so a cancellation of ctx without a deadline is noticed at most
// timeout late (deadlines are never overrun, since the run's own is
// sooner). Otherwise it is Do.
func (g *Group[T]) DoInline(ctx context.Context, key string, timeout time.Duration, fn func(context.Context) (T, error)) (v T, err error, shared bool) {
	if timeout <= 0 {
		return g.Do(ctx, key, timeout, fn)
	}
	if d, ok := ctx.Deadline(); ok && time.Until(d) < timeout {
		return g.Do(ctx, key, timeout, fn)
	}
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return v, ErrClosed, false
	}
	if _, inFlight := g.calls[key]; inFlight || g.rivalInFlight(key) != nil {
		g.mu.Unlock()
		return g.Do(ctx, key, timeout, fn)
	}
	c := &call[T]{key: key, done: make(chan struct{}), waiters: 1}
	g.calls[key] = c
	runCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout)
	r := newRun(cancel, 1)
	r.keys[0], r.waiters = key, 1
	c.run = r
	g.runs[r] = struct{}{}
	g.wg.Add(1)
	g.mu.Unlock()

	normal := false
	defer func() {
		if !normal {
			if p := recover(); p != nil {
				c.err = &PanicError{Value: p, Stack: debug.Stack()}
			} else {
				c.err = errGoexit
			}
		}
		cancel()
		g.mu.Lock()
		delete(g.runs, r)
		if g.calls[key] == c {
			delete(g.calls, key)
		}
		shared = c.waiters > 1
		close(c.done)
		g.mu.Unlock()
		g.wg.Done()
		v, err = c.val, c.err
	}()
	c.val, c.err = fn(runCtx)
	normal = true
	return
}

// Go starts fn for key in the background unless a run for key (or, in a
// group with rivals, for its rival) is in flight, or Hold's f holds key,
// and returns at once; it
// reports whether it started one. The run
// is pinned: callers that join it with Do and leave do not cancel it; only
// its timeout and Close do.
func (g *Group[T]) Go(ctx context.Context, key string, timeout time.Duration, fn func(context.Context) (T, error)) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	if _, inFlight := g.calls[key]; inFlight || g.rivalInFlight(key) != nil || g.isHeld(key) {
		return false
	}
	c := &call[T]{key: key, done: make(chan struct{})}
	g.calls[key] = c
	g.start(ctx, []*call[T]{c}, timeout, func(ctx context.Context) error {
		v, err := fn(ctx)
		c.val = v
		return err
	})
	c.run.pinned = true
	return true
}

// GoMany is Go for several keys: it starts one background run of fn for
// those of keys that have no run (and, in a group with rivals, no rival) in
// flight, and returns them; fn gets exactly those, and returns a value per
// key as for DoMany. The run is pinned, as Go's is. It starts nothing and
// returns nil when every key is taken or the group is closed.
func (g *Group[T]) GoMany(ctx context.Context, keys []string, timeout time.Duration, fn func(ctx context.Context, keys []string) (map[string]T, error)) []string {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return nil
	}
	var fresh []*call[T]
	var started []string
	for _, k := range keys {
		if _, inFlight := g.calls[k]; inFlight || g.rivalInFlight(k) != nil || g.isHeld(k) {
			continue
		}
		c := &call[T]{key: k, done: make(chan struct{})}
		g.calls[k] = c
		fresh = append(fresh, c)
		started = append(started, k)
	}
	if len(fresh) == 0 {
		return nil
	}
	g.start(ctx, fresh, timeout, func(ctx context.Context) error {
		vals, err := fn(ctx, started)
		for _, c := range fresh {
			c.val = vals[c.key]
		}
		return err
	})
	fresh[0].run.pinned = true
	return started
}

// Result is one key's outcome of DoMany.
type Result[T any] struct {
	Val    T
	Err    error
	Shared bool // the value went to more than one caller
}

// DoMany is Do for several keys: keys already in flight (from Do or DoMany)
// are joined, and all the others run together in one call of fn, which
// returns a value per key (keys it leaves out get the zero T; its error goes
// to every key it ran). Results come in the order of keys, duplicates
// included. Cancellation works as for Do, counted over all the keys of a
// run: the run is cancelled when no caller waits for any of its keys.
func (g *Group[T]) DoMany(ctx context.Context, keys []string, timeout time.Duration, fn func(ctx context.Context, keys []string) (map[string]T, error)) []Result[T] {
	out := make([]Result[T], len(keys))
	mine := make(map[string]*call[T], len(keys))
	var waiting []*call[T]
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		for i := range out {
			out[i].Err = ErrClosed
		}
		return out
	}
	// Rivals first, before anything is joined or started: if a key this
	// call would start has an unfinished rival, wait for them all and
	// begin again.
	var rivals []*call[T]
	for _, k := range keys {
		if _, ok := g.calls[k]; !ok {
			if r := g.rivalInFlight(k); r != nil {
				rivals = append(rivals, r)
			}
		}
	}
	if len(rivals) > 0 {
		g.mu.Unlock()
		if err := g.awaitRivals(ctx, rivals); err != nil {
			for i := range out {
				out[i].Err = err
			}
			return out
		}
		return g.DoMany(ctx, keys, timeout, fn)
	}
	var fresh []*call[T]
	for _, k := range keys {
		if _, dup := mine[k]; dup {
			continue
		}
		c, ok := g.calls[k]
		if ok {
			g.joinLocked(c)
		} else {
			c = &call[T]{key: k, done: make(chan struct{}), waiters: 1}
			g.calls[k] = c
			fresh = append(fresh, c)
		}
		mine[k] = c
		waiting = append(waiting, c)
	}
	if len(fresh) > 0 {
		g.start(ctx, fresh, timeout, func(ctx context.Context) error {
			ks := make([]string, len(fresh))
			for i, c := range fresh {
				ks[i] = c.key
			}
			vals, err := fn(ctx, ks)
			for _, c := range fresh {
				c.val = vals[c.key]
			}
			return err
		})
	}
	g.mu.Unlock()

	for i, k := range keys {
		c := mine[k]
		select {
		case <-c.done:
		case <-ctx.Done():
			// Keys whose runs finished before we left get their results;
			// the rest get ctx's error, never the error of a run that our
			// leaving cancelled.
			finished := g.leave(waiting)
			for j := i; j < len(keys); j++ {
				if c := mine[keys[j]]; finished[c] {
					out[j] = Result[T]{Val: c.val, Err: c.err}
				} else {
					out[j].Err = ctx.Err()
				}
			}
			return out
		}
		out[i] = Result[T]{Val: c.val, Err: c.err}
	}
	g.mu.Lock()
	for i, k := range keys {
		out[i].Shared = mine[k].waiters > 1
	}
	g.mu.Unlock()
	return out
}

func isDone[T any](c *call[T]) bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// leave withdraws a caller that gave up from every call it waited on that
// has not finished; a run nobody waits for any more is cancelled and its
// keys detached, so a later caller never joins a cancelled run. It reports
// which calls had already finished.
func (g *Group[T]) leave(calls []*call[T]) (finished map[*call[T]]bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	finished = make(map[*call[T]]bool)
	for _, c := range calls {
		if isDone(c) {
			finished[c] = true
			continue
		}
		c.waiters--
		c.run.waiters--
		if c.run.waiters == 0 && !c.run.pinned {
			c.run.cancel()
			var detached []string
			for _, k := range c.run.keys {
				if other := g.calls[k]; other != nil && other.run == c.run {
					delete(g.calls, k)
					detached = append(detached, k)
				}
			}
			if g.detached != nil && len(detached) > 0 {
				g.detached(detached)
			}
		}
	}
	return finished
}

// start begins a run for calls, whose body stores each call's value; g.mu
// is held.
func (g *Group[T]) start(ctx context.Context, calls []*call[T], timeout time.Duration, body func(context.Context) error) {
	var runCtx context.Context
	var cancel context.CancelFunc
	if timeout > 0 {
		runCtx, cancel = context.WithTimeout(context.WithoutCancel(ctx), timeout)
	} else {
		runCtx, cancel = context.WithCancel(context.WithoutCancel(ctx))
	}
	r := newRun(cancel, len(calls))
	for i, c := range calls {
		c.run = r
		r.waiters += c.waiters
		r.keys[i] = c.key
	}
	g.runs[r] = struct{}{}
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		var err error
		normal := false
		defer func() {
			if !normal {
				if p := recover(); p != nil {
					err = &PanicError{Value: p, Stack: debug.Stack()}
				} else {
					err = errGoexit
				}
			}
			cancel()
			g.mu.Lock()
			delete(g.runs, r)
			for _, c := range calls {
				if g.calls[c.key] == c {
					delete(g.calls, c.key)
				}
				c.err = err
				close(c.done)
			}
			g.mu.Unlock()
		}()
		err = body(runCtx)
		normal = true
	}()
}

// Forget makes the next Do for each key start a new run even if one is in
// flight; current waiters still get the old run's result. If also is not
// nil it runs under the same lock, so no Do can start or join a run between
// it and the forgetting: a cache bumps its invalidation counter there.
func (g *Group[T]) Forget(also func(), keys ...string) {
	g.mu.Lock()
	if also != nil {
		also()
	}
	for _, k := range keys {
		delete(g.calls, k)
	}
	g.mu.Unlock()
}

// ForgetAll is Forget for every key in flight.
func (g *Group[T]) ForgetAll(also func()) {
	g.mu.Lock()
	if also != nil {
		also()
	}
	clear(g.calls)
	g.mu.Unlock()
}

// Waiters reports how many callers wait for key's current run (0 if none).
func (g *Group[T]) Waiters(key string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	if c := g.calls[key]; c != nil {
		return c.waiters
	}
	return 0
}

// InFlight reports how many runs are in flight (for tests and metrics).
func (g *Group[T]) InFlight() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.calls)
}

// Close cancels every run, waits for them to return, and makes later Do
// calls fail with ErrClosed. It is idempotent.
func (g *Group[T]) Close() {
	g.mu.Lock()
	g.closed = true
	for r := range g.runs {
		r.cancel()
	}
	g.mu.Unlock()
	g.wg.Wait()
}
