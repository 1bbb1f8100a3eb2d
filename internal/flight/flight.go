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

type call[T any] struct {
	done    chan struct{}
	val     T
	err     error
	waiters int
	cancel  context.CancelFunc
}

// Group runs at most one function per key at a time. The zero value is not
// usable; call New. All methods are safe for concurrent use.
type Group[T any] struct {
	mu     sync.Mutex
	calls  map[string]*call[T]
	closed bool
	wg     sync.WaitGroup
	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
}

// New returns an empty Group.
func New[T any]() *Group[T] {
	ctx, cancel := context.WithCancel(context.Background())
	return &Group[T]{calls: make(map[string]*call[T]), ctx: ctx, cancel: cancel}
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
	if ok {
		c.waiters++
	} else {
		c = g.start(ctx, key, timeout, fn)
	}
	g.mu.Unlock()

	select {
	case <-c.done:
		g.mu.Lock()
		shared = c.waiters > 1
		g.mu.Unlock()
		return c.val, c.err, shared
	case <-ctx.Done():
		g.mu.Lock()
		c.waiters--
		if c.waiters == 0 {
			// Nobody wants the result any more: cancel the run and make sure
			// a later caller does not join a cancelled run.
			c.cancel()
			if g.calls[key] == c {
				delete(g.calls, key)
			}
		}
		g.mu.Unlock()
		return v, ctx.Err(), false
	}
}

// start begins a run; g.mu is held.
func (g *Group[T]) start(ctx context.Context, key string, timeout time.Duration, fn func(context.Context) (T, error)) *call[T] {
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	stopAfter := context.AfterFunc(g.ctx, cancel)
	if timeout > 0 {
		var cancelT context.CancelFunc
		runCtx, cancelT = context.WithTimeout(runCtx, timeout)
		prev := cancel
		cancel = func() { cancelT(); prev() }
	}
	c := &call[T]{done: make(chan struct{}), waiters: 1, cancel: cancel}
	g.calls[key] = c
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		normal := false
		defer func() {
			if !normal {
				if r := recover(); r != nil {
					c.err = &PanicError{Value: r, Stack: debug.Stack()}
				} else {
					c.err = errGoexit
				}
			}
			stopAfter()
			cancel()
			g.mu.Lock()
			if g.calls[key] == c {
				delete(g.calls, key)
			}
			g.mu.Unlock()
			close(c.done)
		}()
		c.val, c.err = fn(runCtx)
		normal = true
	}()
	return c
}

// Forget makes the next Do for key start a new run even if one is in
// flight; current waiters still get the old run's result.
func (g *Group[T]) Forget(key string) {
	g.mu.Lock()
	delete(g.calls, key)
	g.mu.Unlock()
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
	g.mu.Unlock()
	g.cancel()
	g.wg.Wait()
}
