package flight

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// guard bounds every wait so that a broken Group fails the test instead of
// hanging it. It is never used to let something happen.
const guard = 10 * time.Second

type result[T any] struct {
	v      T
	err    error
	shared bool
}

// newGroup returns a Group that is closed (and its runs waited for) when the
// test ends, so no run goroutine outlives its test.
func newGroup[T any](t *testing.T) *Group[T] {
	t.Helper()
	g := New[T]()
	t.Cleanup(g.Close)
	return g
}

// goDo calls g.Do on a new goroutine and delivers its result on the returned
// channel.
func goDo[T any](g *Group[T], ctx context.Context, key string, timeout time.Duration, fn func(context.Context) (T, error)) <-chan result[T] {
	ch := make(chan result[T], 1)
	go func() {
		v, err, shared := g.Do(ctx, key, timeout, fn)
		ch <- result[T]{v, err, shared}
	}()
	return ch
}

// recv receives from ch, failing the test if nothing arrives within guard.
func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	timer := time.NewTimer(guard)
	defer timer.Stop()
	select {
	case v := <-ch:
		return v
	case <-timer.C:
		t.Fatalf("timed out after %v waiting for %s", guard, what)
		panic("unreachable")
	}
}

// waiters returns the number of waiters registered on key's current run
// (0 if there is none).
func waiters[T any](g *Group[T], key string) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	if c, ok := g.calls[key]; ok {
		return c.waiters
	}
	return 0
}

// waitWaiters blocks until key's current run has exactly n waiters. The
// waiter count is not exported and Do offers no "joined" signal, so this is
// the one place we poll (yielding, not sleeping); the deadline is only a
// failure guard.
func waitWaiters[T any](t *testing.T, g *Group[T], key string, n int) {
	t.Helper()
	deadline := time.Now().Add(guard)
	for {
		got := waiters(g, key)
		if got == n {
			return
		}
		if got > n || time.Now().After(deadline) {
			t.Fatalf("waiters(%q) = %d, want %d", key, got, n)
		}
		runtime.Gosched()
	}
}

// 1. Concurrent callers of one key run fn once and all get its value.
func TestDoCollapsesConcurrentCallers(t *testing.T) {
	const n = 16
	g := newGroup[int](t)
	var calls atomic.Int32
	release := make(chan struct{})
	fn := func(ctx context.Context) (int, error) {
		calls.Add(1)
		select {
		case <-release:
			return 42, nil
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}

	results := make([]<-chan result[int], n)
	for i := range results {
		results[i] = goDo(g, context.Background(), "k", 0, fn)
	}
	waitWaiters(t, g, "k", n)
	if got := g.InFlight(); got != 1 {
		t.Fatalf("InFlight() = %d, want 1", got)
	}
	close(release)

	for i, ch := range results {
		r := recv(t, ch, fmt.Sprintf("caller %d", i))
		if r.err != nil || r.v != 42 || !r.shared {
			t.Errorf("caller %d: Do() = %v, %v, %v, want 42, <nil>, true", i, r.v, r.err, r.shared)
		}
	}
	if got := calls.Load(); got != 1 {
		t.Errorf("fn called %d times, want 1", got)
	}
	if got := g.InFlight(); got != 0 {
		t.Errorf("InFlight() after run = %d, want 0", got)
	}
	if got := g.Joined(); got != n-1 {
		t.Errorf("Joined() = %d, want %d (every caller but the first)", got, n-1)
	}
}

func TestDoSingleCallerNotShared(t *testing.T) {
	g := newGroup[string](t)
	v, err, shared := g.Do(context.Background(), "k", 0, func(context.Context) (string, error) {
		return "v", nil
	})
	if v != "v" || err != nil || shared {
		t.Errorf("Do() = %q, %v, %v, want \"v\", <nil>, false", v, err, shared)
	}

	wantErr := errors.New("load failed")
	_, err, _ = g.Do(context.Background(), "k", 0, func(context.Context) (string, error) {
		return "", wantErr
	})
	if err != wantErr {
		t.Errorf("Do() err = %v, want %v", err, wantErr)
	}
}

// 2. The leader leaving does not cancel the run for the followers.
func TestLeaderCancelDoesNotCancelRun(t *testing.T) {
	const followers = 3
	g := newGroup[int](t)
	started := make(chan struct{})
	release := make(chan struct{})
	fnCtxErr := make(chan error, 1)
	var calls atomic.Int32
	fn := func(ctx context.Context) (int, error) {
		calls.Add(1)
		close(started)
		select {
		case <-release:
		case <-ctx.Done():
		}
		fnCtxErr <- ctx.Err()
		return 7, nil
	}

	leaderCtx, cancelLeader := context.WithCancel(context.Background())
	defer cancelLeader()
	leader := goDo(g, leaderCtx, "k", 0, fn)
	recv(t, started, "fn to start")

	fs := make([]<-chan result[int], followers)
	for i := range fs {
		fs[i] = goDo(g, context.Background(), "k", 0, fn)
	}
	waitWaiters(t, g, "k", followers+1)

	cancelLeader()
	// The leader must return while fn is still blocked on release.
	r := recv(t, leader, "leader to return after cancel")
	if r.err != context.Canceled || r.v != 0 || r.shared {
		t.Errorf("leader: Do() = %v, %v, %v, want 0, %v, false", r.v, r.err, r.shared, context.Canceled)
	}
	if got := waiters(g, "k"); got != followers {
		t.Errorf("waiters after leader left = %d, want %d", got, followers)
	}

	close(release)
	if err := recv(t, fnCtxErr, "fn to report its ctx"); err != nil {
		t.Errorf("fn ctx.Err() after leader left = %v, want <nil>", err)
	}
	for i, ch := range fs {
		r := recv(t, ch, fmt.Sprintf("follower %d", i))
		if r.err != nil || r.v != 7 || !r.shared {
			t.Errorf("follower %d: Do() = %v, %v, %v, want 7, <nil>, true", i, r.v, r.err, r.shared)
		}
	}
	if got := calls.Load(); got != 1 {
		t.Errorf("fn called %d times, want 1", got)
	}
}

// 3. When every waiter leaves, the run is cancelled and a later caller
// starts a new run instead of joining the cancelled one.
func TestAllWaitersCancelCancelsRun(t *testing.T) {
	g := newGroup[int](t)
	started := make(chan struct{})
	observed := make(chan error, 1)
	finishFirst := make(chan struct{})
	finish := sync.OnceFunc(func() { close(finishFirst) })
	t.Cleanup(finish) // runs before the group's Close, even on failure
	firstReturned := make(chan struct{})
	first := func(ctx context.Context) (int, error) {
		defer close(firstReturned)
		close(started)
		<-ctx.Done()
		observed <- ctx.Err()
		<-finishFirst // keep the cancelled run alive while a new caller arrives
		return 0, ctx.Err()
	}

	ctx1, cancel1 := context.WithCancel(context.Background())
	defer cancel1()
	ctx2, cancel2 := context.WithCancel(context.Background())
	defer cancel2()
	r1 := goDo(g, ctx1, "k", 0, first)
	recv(t, started, "first run to start")
	r2 := goDo(g, ctx2, "k", 0, first)
	waitWaiters(t, g, "k", 2)

	cancel1()
	if r := recv(t, r1, "waiter 1"); r.err != context.Canceled {
		t.Errorf("waiter 1: Do() err = %v, want %v", r.err, context.Canceled)
	}
	// One waiter is left: the run must still be alive.
	select {
	case err := <-observed:
		t.Fatalf("run cancelled (%v) while a waiter remained", err)
	default:
	}

	cancel2()
	if r := recv(t, r2, "waiter 2"); r.err != context.Canceled {
		t.Errorf("waiter 2: Do() err = %v, want %v", r.err, context.Canceled)
	}
	if err := recv(t, observed, "fn to observe ctx.Done()"); err != context.Canceled {
		t.Errorf("fn ctx.Err() = %v, want %v", err, context.Canceled)
	}
	if got := g.InFlight(); got != 0 {
		t.Errorf("InFlight() after all waiters left = %d, want 0", got)
	}

	// A new caller must get a fresh run, not join the cancelled one. Check
	// both orders deterministically: first while the cancelled run is
	// certainly still running (blocked on finishFirst), then after it has
	// returned.
	var secondCalls atomic.Int32
	second := func(context.Context) (int, error) {
		secondCalls.Add(1)
		return 99, nil
	}
	if r := recv(t, goDo(g, context.Background(), "k", 0, second), "Do after cancellation"); r.v != 99 || r.err != nil || r.shared {
		t.Errorf("Do() after cancellation = %v, %v, %v, want 99, <nil>, false", r.v, r.err, r.shared)
	}
	finish()
	recv(t, firstReturned, "cancelled run to return")
	if r := recv(t, goDo(g, context.Background(), "k", 0, second), "Do after cancelled run returned"); r.v != 99 || r.err != nil {
		t.Errorf("Do() after cancelled run returned = %v, %v, want 99, <nil>", r.v, r.err)
	}
	if got := secondCalls.Load(); got != 2 {
		t.Errorf("new fn called %d times, want 2", got)
	}
}

// 4. The timeout cancels fn's ctx with DeadlineExceeded and the caller gets
// fn's error.
func TestTimeout(t *testing.T) {
	const timeout = 20 * time.Millisecond
	g := newGroup[int](t)
	fnCtxErr := make(chan error, 1)
	hadDeadline := make(chan bool, 1)
	fn := func(ctx context.Context) (int, error) {
		_, ok := ctx.Deadline()
		hadDeadline <- ok
		<-ctx.Done()
		fnCtxErr <- ctx.Err()
		return 0, fmt.Errorf("load: %w", ctx.Err())
	}

	start := time.Now()
	r := recv(t, goDo(g, context.Background(), "k", timeout, fn), "Do with timeout")
	elapsed := time.Since(start)

	if !recv(t, hadDeadline, "fn deadline") {
		t.Errorf("fn ctx.Deadline() ok = false, want true")
	}
	if err := recv(t, fnCtxErr, "fn ctx error"); err != context.DeadlineExceeded {
		t.Errorf("fn ctx.Err() = %v, want %v", err, context.DeadlineExceeded)
	}
	if !errors.Is(r.err, context.DeadlineExceeded) || !strings.HasPrefix(r.err.Error(), "load: ") {
		t.Errorf("Do() err = %v, want fn's error wrapping %v", r.err, context.DeadlineExceeded)
	}
	if elapsed < timeout {
		t.Errorf("Do() returned after %v, want >= %v", elapsed, timeout)
	}
}

// The caller's own deadline must not reach the run (WithoutCancel drops it);
// only the group's timeout bounds the run.
func TestCallerDeadlineNotInherited(t *testing.T) {
	g := newGroup[int](t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Hour)
	defer cancel()
	_, _, _ = g.Do(ctx, "k", 0, func(ctx context.Context) (int, error) {
		if d, ok := ctx.Deadline(); ok {
			t.Errorf("fn ctx.Deadline() = %v, true, want no deadline", d)
		}
		return 0, nil
	})
}

// panicWith is a named function so that the PanicError stack can be checked
// for it.
func panicWith(v any) {
	panic(v)
}

// 5. A panic reaches every waiter as a *PanicError.
func TestPanic(t *testing.T) {
	sentinel := errors.New("sentinel")
	tests := []struct {
		name  string
		value any
		check func(t *testing.T, pe *PanicError, err error)
	}{
		{
			name:  "string",
			value: "boom",
			check: func(t *testing.T, pe *PanicError, err error) {
				if pe.Value != "boom" {
					t.Errorf("PanicError.Value = %v, want boom", pe.Value)
				}
				if pe.Unwrap() != nil {
					t.Errorf("PanicError.Unwrap() = %v, want <nil>", pe.Unwrap())
				}
				if !strings.Contains(err.Error(), "boom") {
					t.Errorf("Error() = %q, want it to contain boom", err.Error())
				}
			},
		},
		{
			name:  "error",
			value: sentinel,
			check: func(t *testing.T, pe *PanicError, err error) {
				if pe.Value != sentinel {
					t.Errorf("PanicError.Value = %v, want %v", pe.Value, sentinel)
				}
				if !errors.Is(err, sentinel) {
					t.Errorf("errors.Is(%v, sentinel) = false, want true", err)
				}
			},
		},
		{
			name:  "nil",
			value: nil,
			check: func(t *testing.T, pe *PanicError, err error) {
				var pne *runtime.PanicNilError
				if !errors.As(err, &pne) {
					t.Errorf("PanicError.Value = %T, want *runtime.PanicNilError", pe.Value)
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const n = 4
			g := newGroup[int](t)
			release := make(chan struct{})
			fn := func(ctx context.Context) (int, error) {
				select {
				case <-release:
				case <-ctx.Done():
					return 0, ctx.Err()
				}
				panicWith(tt.value)
				return 1, nil
			}
			rs := make([]<-chan result[int], n)
			for i := range rs {
				rs[i] = goDo(g, context.Background(), "k", 0, fn)
			}
			waitWaiters(t, g, "k", n)
			close(release)

			for i, ch := range rs {
				r := recv(t, ch, fmt.Sprintf("waiter %d", i))
				var pe *PanicError
				if !errors.As(r.err, &pe) {
					t.Fatalf("waiter %d: Do() err = %v (%T), want *PanicError", i, r.err, r.err)
				}
				if r.v != 0 {
					t.Errorf("waiter %d: Do() v = %v, want 0", i, r.v)
				}
				if !strings.Contains(string(pe.Stack), "flight.panicWith") {
					t.Errorf("waiter %d: PanicError.Stack does not mention panicWith:\n%s", i, pe.Stack)
				}
				tt.check(t, pe, r.err)
			}

			// The group survives the panic.
			if got := g.InFlight(); got != 0 {
				t.Errorf("InFlight() after panic = %d, want 0", got)
			}
			after := goDo(g, context.Background(), "k", 0, func(context.Context) (int, error) { return 5, nil })
			if r := recv(t, after, "Do after panic"); r.v != 5 || r.err != nil {
				t.Errorf("Do() after panic = %v, %v, want 5, <nil>", r.v, r.err)
			}
		})
	}
}

// 6. runtime.Goexit in fn releases every waiter with an error.
func TestGoexit(t *testing.T) {
	const n = 3
	g := newGroup[int](t)
	release := make(chan struct{})
	fn := func(ctx context.Context) (int, error) {
		select {
		case <-release:
		case <-ctx.Done():
			return 0, ctx.Err()
		}
		runtime.Goexit()
		return 1, nil
	}
	rs := make([]<-chan result[int], n)
	for i := range rs {
		rs[i] = goDo(g, context.Background(), "k", 0, fn)
	}
	waitWaiters(t, g, "k", n)
	close(release)
	for i, ch := range rs {
		r := recv(t, ch, fmt.Sprintf("waiter %d after Goexit", i))
		if r.err == nil {
			t.Errorf("waiter %d: Do() err = <nil>, want non-nil", i)
		}
		if !errors.Is(r.err, errGoexit) {
			t.Errorf("waiter %d: Do() err = %v, want %v", i, r.err, errGoexit)
		}
		var pe *PanicError
		if errors.As(r.err, &pe) {
			t.Errorf("waiter %d: Do() err is a *PanicError, want Goexit error", i)
		}
	}
	if got := g.InFlight(); got != 0 {
		t.Errorf("InFlight() after Goexit = %d, want 0", got)
	}
}

// 7. Forget during a run: later callers get a new run, earlier waiters the
// old result, and the old run finishing does not evict the new one.
func TestForget(t *testing.T) {
	g := newGroup[int](t)
	var calls atomic.Int32
	gates := []chan struct{}{make(chan struct{}), make(chan struct{})}
	started := []chan struct{}{make(chan struct{}), make(chan struct{})}
	fn := func(ctx context.Context) (int, error) {
		n := calls.Add(1)
		if n > 2 {
			return int(n), nil
		}
		close(started[n-1])
		select {
		case <-gates[n-1]:
			return int(n), nil
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}

	a := goDo(g, context.Background(), "k", 0, fn)
	recv(t, started[0], "first run to start")
	b := goDo(g, context.Background(), "k", 0, fn)
	waitWaiters(t, g, "k", 2)

	g.Forget(nil, "k")
	if got := g.InFlight(); got != 0 {
		t.Errorf("InFlight() after Forget = %d, want 0", got)
	}

	c := goDo(g, context.Background(), "k", 0, fn)
	recv(t, started[1], "second run to start")
	waitWaiters(t, g, "k", 1)

	// Finish the forgotten run; it must not remove the second run's entry.
	close(gates[0])
	for name, ch := range map[string]<-chan result[int]{"a": a, "b": b} {
		r := recv(t, ch, "first-run waiter "+name)
		if r.v != 1 || r.err != nil || !r.shared {
			t.Errorf("waiter %s: Do() = %v, %v, %v, want 1, <nil>, true", name, r.v, r.err, r.shared)
		}
	}
	if got := g.InFlight(); got != 1 {
		t.Errorf("InFlight() after forgotten run returned = %d, want 1", got)
	}

	d := goDo(g, context.Background(), "k", 0, fn)
	waitWaiters(t, g, "k", 2)
	close(gates[1])
	for name, ch := range map[string]<-chan result[int]{"c": c, "d": d} {
		r := recv(t, ch, "second-run waiter "+name)
		if r.v != 2 || r.err != nil || !r.shared {
			t.Errorf("waiter %s: Do() = %v, %v, %v, want 2, <nil>, true", name, r.v, r.err, r.shared)
		}
	}
	if got := calls.Load(); got != 2 {
		t.Errorf("fn called %d times, want 2", got)
	}

	// Forget of an absent key is a no-op.
	g.Forget(nil, "absent")
}

// Forgotten-run waiters leaving must cancel only the forgotten run.
func TestForgetThenCancelKeepsNewRun(t *testing.T) {
	g := newGroup[int](t)
	oldStarted := make(chan struct{})
	oldCtxErr := make(chan error, 1)
	oldFn := func(ctx context.Context) (int, error) {
		close(oldStarted)
		<-ctx.Done()
		oldCtxErr <- ctx.Err()
		return 0, ctx.Err()
	}
	newStarted := make(chan struct{})
	release := make(chan struct{})
	newCtxErr := make(chan error, 1)
	newFn := func(ctx context.Context) (int, error) {
		close(newStarted)
		select {
		case <-release:
		case <-ctx.Done():
		}
		newCtxErr <- ctx.Err()
		return 2, nil
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	old := goDo(g, ctx, "k", 0, oldFn)
	recv(t, oldStarted, "old run to start")
	g.Forget(nil, "k")
	nw := goDo(g, context.Background(), "k", 0, newFn)
	recv(t, newStarted, "new run to start")

	cancel()
	if r := recv(t, old, "old waiter"); r.err != context.Canceled {
		t.Errorf("old waiter: Do() err = %v, want %v", r.err, context.Canceled)
	}
	if err := recv(t, oldCtxErr, "old run cancelled"); err != context.Canceled {
		t.Errorf("old fn ctx.Err() = %v, want %v", err, context.Canceled)
	}
	if got := g.InFlight(); got != 1 {
		t.Errorf("InFlight() = %d, want 1 (new run must stay registered)", got)
	}
	close(release)
	if err := recv(t, newCtxErr, "new run ctx"); err != nil {
		t.Errorf("new fn ctx.Err() = %v, want <nil>", err)
	}
	if r := recv(t, nw, "new waiter"); r.v != 2 || r.err != nil {
		t.Errorf("new waiter: Do() = %v, %v, want 2, <nil>", r.v, r.err)
	}
}

type traceKey struct{}

// 8. Values of the caller's ctx are visible inside fn, even after the
// caller's ctx is cancelled.
func TestContextValuesPropagate(t *testing.T) {
	g := newGroup[string](t)
	parent, cancel := context.WithCancel(context.Background())
	defer cancel()
	ctx := context.WithValue(parent, traceKey{}, "trace-123")

	v, err, _ := g.Do(ctx, "k", time.Minute, func(ctx context.Context) (string, error) {
		s, _ := ctx.Value(traceKey{}).(string)
		return s, nil
	})
	if v != "trace-123" || err != nil {
		t.Errorf("Do() = %q, %v, want \"trace-123\", <nil>", v, err)
	}

	// Values stay visible to a run whose leader has already left.
	started := make(chan struct{})
	release := make(chan struct{})
	seen := make(chan any, 1)
	fn := func(ctx context.Context) (string, error) {
		close(started)
		select {
		case <-release:
		case <-ctx.Done():
		}
		seen <- ctx.Value(traceKey{})
		return "", nil
	}
	leaderCtx, cancelLeader := context.WithCancel(context.WithValue(context.Background(), traceKey{}, "trace-456"))
	defer cancelLeader()
	leader := goDo(g, leaderCtx, "k2", 0, fn)
	recv(t, started, "run to start")
	follower := goDo(g, context.Background(), "k2", 0, fn)
	waitWaiters(t, g, "k2", 2)
	cancelLeader()
	recv(t, leader, "leader")
	close(release)
	if got := recv(t, seen, "value seen by fn"); got != "trace-456" {
		t.Errorf("ctx.Value(traceKey) after leader left = %v, want trace-456", got)
	}
	recv(t, follower, "follower")
}

// 9. Close cancels runs, waits for them, and makes Do fail with ErrClosed.
func TestClose(t *testing.T) {
	g := New[int]()
	started := make(chan struct{})
	cancelled := make(chan error, 1)
	proceed := make(chan struct{})
	var fnReturned atomic.Bool
	fn := func(ctx context.Context) (int, error) {
		defer fnReturned.Store(true)
		close(started)
		<-ctx.Done()
		cancelled <- ctx.Err()
		<-proceed // still running after cancellation: Close must wait
		return 0, ctx.Err()
	}
	waiter := goDo(g, context.Background(), "k", 0, fn)
	recv(t, started, "run to start")

	closeDone := make(chan struct{})
	go func() {
		g.Close()
		close(closeDone)
	}()
	if err := recv(t, cancelled, "Close to cancel the run"); err != context.Canceled {
		t.Errorf("fn ctx.Err() after Close = %v, want %v", err, context.Canceled)
	}
	// fn is blocked on proceed, so Close cannot have returned.
	select {
	case <-closeDone:
		t.Fatalf("Close returned while fn was still running")
	default:
	}
	close(proceed)
	recv(t, closeDone, "Close to return")
	if !fnReturned.Load() {
		t.Errorf("Close returned before fn returned")
	}
	if r := recv(t, waiter, "waiter"); r.err != context.Canceled {
		t.Errorf("waiter: Do() err = %v, want %v", r.err, context.Canceled)
	}

	var called atomic.Bool
	v, err, shared := g.Do(context.Background(), "k", 0, func(context.Context) (int, error) {
		called.Store(true)
		return 1, nil
	})
	if v != 0 || err != ErrClosed || shared {
		t.Errorf("Do() after Close = %v, %v, %v, want 0, %v, false", v, err, shared, ErrClosed)
	}
	if called.Load() {
		t.Errorf("fn called after Close")
	}

	second := make(chan struct{})
	go func() {
		g.Close()
		close(second)
	}()
	recv(t, second, "second Close to return")
}

func TestCloseIdle(t *testing.T) {
	g := New[int]()
	g.Close()
	g.Close()
	if _, err, _ := g.Do(context.Background(), "k", 0, func(context.Context) (int, error) { return 1, nil }); err != ErrClosed {
		t.Errorf("Do() err = %v, want %v", err, ErrClosed)
	}
}

// 10. Stress under -race: many goroutines, few keys, random cancellations.
func TestStress(t *testing.T) {
	const (
		goroutines = 64
		iterations = 1000
		keys       = 8
	)
	g := newGroup[string](t)
	keyNames := make([]string, keys)
	for i := range keyNames {
		keyNames[i] = fmt.Sprintf("key-%d", i)
	}
	var runs atomic.Int64
	fn := func(key string) func(context.Context) (string, error) {
		return func(ctx context.Context) (string, error) {
			runs.Add(1)
			runtime.Gosched()
			if err := ctx.Err(); err != nil {
				// Only reachable when every waiter has left, so no waiter
				// may ever see this.
				return "", fmt.Errorf("run for %s cancelled: %w", key, err)
			}
			return "value-" + key, nil
		}
	}

	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		failures []string
		ok, canc atomic.Int64
	)
	fail := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		if len(failures) < 10 {
			failures = append(failures, fmt.Sprintf(format, args...))
		}
	}
	for w := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 0x5eed))
			for range iterations {
				key := keyNames[rng.IntN(keys)]
				ctx, cancel := context.WithCancel(context.Background())
				var cancelDone chan struct{}
				switch rng.IntN(4) {
				case 0: // cancelled before the call
					cancel()
				case 1: // cancelled concurrently with the call
					cancelDone = make(chan struct{})
					go func() {
						defer close(cancelDone)
						runtime.Gosched()
						cancel()
					}()
				}
				timeout := time.Duration(0)
				if rng.IntN(2) == 0 {
					timeout = time.Minute
				}
				v, err, _ := g.Do(ctx, key, timeout, fn(key))
				cancel()
				if cancelDone != nil {
					<-cancelDone
				}
				switch {
				case err == nil:
					ok.Add(1)
					if want := "value-" + key; v != want {
						fail("Do(%q) = %q, want %q", key, v, want)
					}
				case err == context.Canceled:
					canc.Add(1)
				default:
					fail("Do(%q) err = %v, want <nil> or %v", key, err, context.Canceled)
				}
			}
		}()
	}
	wg.Wait()
	for _, f := range failures {
		t.Error(f)
	}
	if got := g.InFlight(); got != 0 {
		t.Errorf("InFlight() after stress = %d, want 0", got)
	}
	if ok.Load() == 0 {
		t.Errorf("no successful Do calls in stress run")
	}
	t.Logf("ok=%d canceled=%d runs=%d", ok.Load(), canc.Load(), runs.Load())
}

// TestForgetAlsoIsAtomicWithDo: what Forget runs under its lock (a cache's
// invalidation counter bump) cannot interleave with a Do starting or
// joining a run; a Do begun meanwhile waits and then starts a fresh run.
func TestForgetAlsoIsAtomicWithDo(t *testing.T) {
	g := New[int]()
	defer g.Close()
	var order []string
	var mu sync.Mutex
	note := func(s string) { mu.Lock(); order = append(order, s); mu.Unlock() }

	entered, release := make(chan struct{}), make(chan struct{})
	forgot := make(chan struct{})
	go func() {
		g.Forget(func() {
			close(entered)
			<-release
			note("bump")
		}, "k")
		close(forgot)
	}()
	<-entered
	done := make(chan int)
	go func() {
		v, _, _ := g.Do(context.Background(), "k", 0, func(context.Context) (int, error) {
			note("run")
			return 1, nil
		})
		done <- v
	}()
	close(release)
	<-forgot
	if v := <-done; v != 1 {
		t.Fatalf("Do() = %d, want 1", v)
	}
	if len(order) != 2 || order[0] != "bump" || order[1] != "run" {
		t.Fatalf("order = %v, want [bump run]: the run started inside Forget's critical section", order)
	}
}

// TestDoInline: the leader runs fn itself; joiners get its result; a panic
// reaches the leader and the joiners as an error; a caller whose deadline
// is sooner than the timeout is not held by fn.
func TestDoInline(t *testing.T) {
	g := New[int]()
	defer g.Close()

	release := make(chan struct{})
	leader := make(chan int)
	go func() {
		v, _, _ := g.DoInline(context.Background(), "k", time.Second, func(ctx context.Context) (int, error) {
			<-release
			return 7, ctx.Err()
		})
		leader <- v
	}()
	waitWaiters(t, g, "k", 1)
	joiner := make(chan int)
	go func() {
		v, _, shared := g.Do(context.Background(), "k", time.Second, func(context.Context) (int, error) { return -1, nil })
		if !shared {
			t.Error("joiner: shared = false")
		}
		joiner <- v
	}()
	waitWaiters(t, g, "k", 2)
	close(release)
	if v, w := <-leader, <-joiner; v != 7 || w != 7 {
		t.Fatalf("DoInline leader/joiner = %d/%d, want 7/7", v, w)
	}

	_, err, _ := g.DoInline(context.Background(), "p", time.Second, func(context.Context) (int, error) { panic("inline boom") })
	var pe *PanicError
	if !errors.As(err, &pe) || pe.Value != "inline boom" {
		t.Fatalf("DoInline(panic) err = %v, want a *PanicError", err)
	}

	// A deadline sooner than the run's timeout: the caller leaves on time.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	block := make(chan struct{})
	defer close(block)
	start := time.Now()
	_, err, _ = g.DoInline(ctx, "slow", time.Minute, func(context.Context) (int, error) { <-block; return 0, nil })
	if !errors.Is(err, context.DeadlineExceeded) || time.Since(start) > 5*time.Second {
		t.Fatalf("DoInline with a short deadline: err = %v after %v; want DeadlineExceeded on time", err, time.Since(start))
	}
}

// TestGo: a background run starts once, callers can join it, and a joiner
// that leaves does not cancel it (it is pinned).
func TestGo(t *testing.T) {
	g := New[int]()
	defer g.Close()
	release := make(chan struct{})
	var cancelled atomic.Bool
	fn := func(ctx context.Context) (int, error) {
		<-release
		cancelled.Store(ctx.Err() != nil)
		return 5, nil
	}
	if !g.Go(context.Background(), "k", time.Minute, fn) {
		t.Fatal("Go did not start a run")
	}
	if g.Go(context.Background(), "k", time.Minute, fn) {
		t.Fatal("Go started a second run for a key in flight")
	}
	ctx, cancel := context.WithCancel(context.Background())
	left := make(chan error)
	go func() { _, err, _ := g.Do(ctx, "k", time.Minute, fn); left <- err }()
	waitWaiters(t, g, "k", 1)
	cancel()
	if err := <-left; !errors.Is(err, context.Canceled) {
		t.Fatalf("joiner err = %v", err)
	}
	close(release)
	if v, err, _ := g.Do(context.Background(), "k", time.Minute, fn); err != nil || v != 5 {
		t.Fatalf("Do after the joiner left = %d, %v", v, err)
	}
	if cancelled.Load() {
		t.Fatal("the pinned run was cancelled when its only joiner left")
	}
}

// TestGoMany: one background run for the keys not already in flight, which
// callers can join; a joiner that leaves does not cancel it; nothing starts
// when every key is taken.
func TestGoMany(t *testing.T) {
	g := New[int]()
	defer g.Close()
	holdA := make(chan struct{})
	go g.Do(context.Background(), "a", time.Minute, func(context.Context) (int, error) { <-holdA; return 1, nil })
	waitWaiters(t, g, "a", 1)
	release := make(chan struct{})
	var got []string
	var cancelled atomic.Bool
	fn := func(ctx context.Context, keys []string) (map[string]int, error) {
		got = append([]string(nil), keys...)
		<-release
		cancelled.Store(ctx.Err() != nil)
		return map[string]int{"b": 2, "c": 3}, nil
	}
	if started := g.GoMany(context.Background(), []string{"a", "b", "c", "b"}, time.Minute, fn); strings.Join(started, ",") != "b,c" {
		t.Fatalf("GoMany started %v; want [b c] (a is in flight, b once)", started)
	}
	if started := g.GoMany(context.Background(), []string{"a", "b"}, time.Minute, fn); started != nil {
		t.Fatalf("GoMany started %v for keys all in flight", started)
	}
	ctx, cancel := context.WithCancel(context.Background())
	left := make(chan error)
	go func() {
		_, err, _ := g.Do(ctx, "b", time.Minute, func(context.Context) (int, error) { return -1, nil })
		left <- err
	}()
	waitWaiters(t, g, "b", 1)
	cancel()
	if err := <-left; !errors.Is(err, context.Canceled) {
		t.Fatalf("joiner err = %v", err)
	}
	joined := make(chan int)
	go func() {
		v, _, _ := g.Do(context.Background(), "c", time.Minute, func(context.Context) (int, error) { return -1, nil })
		joined <- v
	}()
	waitWaiters(t, g, "c", 1)
	close(release)
	if v := <-joined; v != 3 {
		t.Fatalf("Do(c) joining the background run = %d; want 3", v)
	}
	if strings.Join(got, ",") != "b,c" || cancelled.Load() {
		t.Fatalf("the run got %v, cancelled %v; want [b c], not cancelled", got, cancelled.Load())
	}
	close(holdA)
	g.Close()
	if started := g.GoMany(context.Background(), []string{"x"}, time.Minute, fn); started != nil {
		t.Fatal("GoMany started a run on a closed group")
	}
}

func rivalOf(k string) string {
	switch k[0] {
	case 'a':
		return "b" + k[1:]
	case 'b':
		return "a" + k[1:]
	}
	return ""
}

// holdRival starts a run for "a1" the way start says and keeps it running
// until the returned release is called; running reports whether it is.
func holdRival(t *testing.T, g *Group[int], start func(fn func(context.Context) (int, error))) (running *atomic.Bool, release func()) {
	t.Helper()
	running = new(atomic.Bool)
	begun, gate := make(chan struct{}), make(chan struct{})
	var once sync.Once
	go start(func(context.Context) (int, error) {
		running.Store(true)
		close(begun)
		<-gate
		running.Store(false)
		return 1, nil
	})
	<-begun
	return running, func() { once.Do(func() { close(gate) }) }
}

// TestRivalsNeverOverlap holds a run for "a1", started each way the group
// offers, and asks for "b1" each way: Do, DoInline and DoMany wait until
// the "a1" run has finished before starting their own, Go declines, a key
// with no rival in flight ("b2") is not held up, and a caller whose ctx
// ends while it waits gets ctx's error and starts nothing.
func TestRivalsNeverOverlap(t *testing.T) {
	ctx := context.Background()
	starts := map[string]func(g *Group[int]) func(fn func(context.Context) (int, error)){
		"Do": func(g *Group[int]) func(fn func(context.Context) (int, error)) {
			return func(fn func(context.Context) (int, error)) { g.Do(ctx, "a1", 0, fn) }
		},
		"DoInline": func(g *Group[int]) func(fn func(context.Context) (int, error)) {
			return func(fn func(context.Context) (int, error)) { g.DoInline(ctx, "a1", time.Minute, fn) }
		},
		"Go": func(g *Group[int]) func(fn func(context.Context) (int, error)) {
			return func(fn func(context.Context) (int, error)) { g.Go(ctx, "a1", 0, fn) }
		},
		"DoMany": func(g *Group[int]) func(fn func(context.Context) (int, error)) {
			return func(fn func(context.Context) (int, error)) {
				g.DoMany(ctx, []string{"a1", "a9"}, 0, func(ctx context.Context, _ []string) (map[string]int, error) {
					_, err := fn(ctx)
					return nil, err
				})
			}
		},
	}
	for name, start := range starts {
		t.Run("rival started by "+name, func(t *testing.T) {
			g := NewRivals[int](rivalOf)
			defer g.Close()
			running, release := holdRival(t, g, start(g))
			defer release() // before Close, also when the test fails early

			if g.Go(ctx, "b1", 0, func(context.Context) (int, error) { return 0, nil }) {
				t.Fatal("Go started a run while its rival was in flight")
			}
			if v, err, _ := g.Do(ctx, "b2", 0, func(context.Context) (int, error) { return 2, nil }); err != nil || v != 2 {
				t.Fatalf("Do(b2) = %d, %v: a key without a rival in flight was held up", v, err)
			}
			short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
			defer cancel()
			if _, err, _ := g.Do(short, "b1", 0, func(context.Context) (int, error) {
				t.Error("a run started while its rival was in flight")
				return 0, nil
			}); !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("Do(b1) with a short ctx = %v, want its deadline", err)
			}

			overlapped := make(chan string, 3)
			body := func(name string) func(context.Context) (int, error) {
				return func(context.Context) (int, error) {
					if running.Load() {
						overlapped <- name
					}
					return 3, nil
				}
			}
			waits := g.RivalWaits()
			var wg sync.WaitGroup
			wg.Go(func() { g.Do(ctx, "b1", 0, body("Do")) })
			wg.Go(func() { g.DoInline(ctx, "b1", time.Second, body("DoInline")) })
			wg.Go(func() {
				g.DoMany(ctx, []string{"b1", "b3"}, 0, func(ctx context.Context, keys []string) (map[string]int, error) {
					if running.Load() {
						overlapped <- "DoMany"
					}
					return map[string]int{}, nil
				})
			})
			deadline := time.Now().Add(5 * time.Second)
			for g.RivalWaits() < waits+3 { // every caller is waiting for "a1"
				if time.Now().After(deadline) {
					t.Fatalf("%d of 3 callers waited for the rival run", g.RivalWaits()-waits)
				}
				runtime.Gosched()
			}
			release()
			wg.Wait()
			close(overlapped)
			for name := range overlapped {
				t.Errorf("%s ran while its rival was in flight", name)
			}
		})
	}
}

// TestRivalsDetached: a run detached from its key no longer holds its
// rival back, whether by Forget or because every caller left; the latter
// is reported to OnDetach with the run's keys.
func TestRivalsDetached(t *testing.T) {
	ctx := context.Background()
	t.Run("Forget", func(t *testing.T) {
		g := NewRivals[int](rivalOf)
		defer g.Close()
		_, release := holdRival(t, g, func(fn func(context.Context) (int, error)) { g.Do(ctx, "a1", 0, fn) })
		defer release()
		g.Forget(nil, "a1")
		if v, err, _ := g.Do(ctx, "b1", 0, func(context.Context) (int, error) { return 7, nil }); err != nil || v != 7 {
			t.Fatalf("Do(b1) after its rival was forgotten = %d, %v", v, err)
		}
	})
	t.Run("every caller left", func(t *testing.T) {
		g := NewRivals[int](rivalOf)
		defer g.Close()
		var detached []string
		g.OnDetach(func(keys []string) { detached = append(detached, keys...) })
		leaving, leave := context.WithCancel(ctx)
		_, release := holdRival(t, g, func(fn func(context.Context) (int, error)) { g.Do(leaving, "a1", 0, fn) })
		defer release()
		leave()
		deadline := time.Now().Add(5 * time.Second)
		for g.Waiters("a1") != 0 {
			if time.Now().After(deadline) {
				t.Fatal("the caller did not leave")
			}
			runtime.Gosched()
		}
		g.mu.Lock()
		got := slices.Clone(detached)
		g.mu.Unlock()
		if !slices.Equal(got, []string{"a1"}) {
			t.Fatalf("OnDetach got %q, want [a1]", got)
		}
		if v, err, _ := g.Do(ctx, "b1", 0, func(context.Context) (int, error) { return 8, nil }); err != nil || v != 8 {
			t.Fatalf("Do(b1) after its rival was detached = %d, %v", v, err)
		}
	})
}

// TestHold: Go and GoMany start no run for a key Hold's f holds; Do does.
func TestHold(t *testing.T) {
	g := New[int]()
	defer g.Close()
	g.Hold(func(k string) bool { return k == "held" })
	fn := func(context.Context) (int, error) { return 1, nil }
	if g.Go(context.Background(), "held", time.Minute, fn) {
		t.Fatal("Go started a run for a held key")
	}
	many := func(_ context.Context, keys []string) (map[string]int, error) { return nil, nil }
	if started := g.GoMany(context.Background(), []string{"held", "free"}, time.Minute, many); strings.Join(started, ",") != "free" {
		t.Fatalf("GoMany started %v; want [free]", started)
	}
	if v, err, _ := g.Do(context.Background(), "held", time.Minute, fn); v != 1 || err != nil {
		t.Fatalf("Do(held) = %d, %v; want 1 (Hold is for Go and GoMany)", v, err)
	}
}

// TestJoin: Join returns at once, with ok false, when no run is in flight,
// and starts none; otherwise it waits for the run's result.
func TestJoin(t *testing.T) {
	g := New[int]()
	defer g.Close()
	if _, _, ok := g.Join(context.Background(), "k"); ok {
		t.Fatal("Join with nothing in flight reported a run")
	}
	if n := g.InFlight(); n != 0 {
		t.Fatalf("Join started something: %d in flight", n)
	}
	release := make(chan struct{})
	g.Go(context.Background(), "k", time.Minute, func(context.Context) (int, error) { <-release; return 7, nil })
	got := make(chan int)
	go func() {
		v, _, ok := g.Join(context.Background(), "k")
		if !ok {
			v = -1
		}
		got <- v
	}()
	waitWaiters(t, g, "k", 1)
	close(release)
	if v := <-got; v != 7 {
		t.Fatalf("Join = %d; want the run's 7", v)
	}
}
