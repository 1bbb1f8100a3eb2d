package invalidate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/internal/redistest"
)

func TestUnavailable(t *testing.T) {
	cases := []struct {
		err  error
		want bool
	}{
		{nil, false},
		{redis.Nil, false},
		{fmt.Errorf("get: %w", redis.Nil), false},
		{context.Canceled, false},
		{fmt.Errorf("tiered: %w", ErrCircuitOpen), false},
		{fmt.Errorf("tiered: %w", ErrMalformed), false},
		{redis.ErrClosed, true},
		{redis.ErrPoolTimeout, true},
		{context.DeadlineExceeded, true},
		{fmt.Errorf("get: %w", context.DeadlineExceeded), true},
		{&net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}, true},
		{syscall.ECONNRESET, true},
		{io.EOF, true},
		{proto("LOADING Redis is loading the dataset in memory"), true},
		{proto("READONLY You can't write against a read only replica."), true},
		{proto("MASTERDOWN Link with MASTER is down"), true},
		{proto("WRONGTYPE Operation against a key holding the wrong kind of value"), false},
		{proto("NOSCRIPT No matching script"), false},
		{proto("NOPERM this user has no permissions"), false},
	}
	for _, c := range cases {
		if got := Unavailable(c.err); got != c.want {
			t.Errorf("Unavailable(%v) = %v, want %v", c.err, got, c.want)
		}
	}
}

// proto is a Redis error reply, as go-redis returns it.
type proto string

func (p proto) Error() string { return string(p) }
func (proto) RedisError()     {}

// TestBreakerOpensAndProbesClosed: BreakerThreshold failures in a row open
// the circuit, which makes the stream untrusted (a new odd epoch) and Allow
// refuse; a success in between resets the count; the background probe closes
// the circuit once Redis answers, under a new even epoch.
func TestBreakerOpensAndProbesClosed(t *testing.T) {
	s := redistest.Shared(t)
	b := newTestBus(t, s, s.Client(t), Options{BreakerThreshold: 3, BreakerCooldown: 50 * time.Millisecond})
	waitLive(t, b)
	e0 := checkLiveEpoch(t, b)
	fail := &net.OpError{Op: "read", Err: syscall.ECONNRESET}

	b.Report(fail)
	b.Report(fail)
	b.Report(nil) // resets the count
	b.Report(fail)
	b.Report(fail)
	if b.CircuitOpen() || b.Allow() != nil {
		t.Fatal("circuit opened before BreakerThreshold failures in a row")
	}
	b.Report(fail)
	if !b.CircuitOpen() {
		t.Fatal("circuit still closed after BreakerThreshold failures in a row")
	}
	if err := b.Allow(); !errors.Is(err, ErrCircuitOpen) {
		t.Fatalf("Allow() = %v, want ErrCircuitOpen", err)
	}
	if b.Live() || b.Epoch()%2 != 1 || b.Epoch() <= e0 {
		t.Fatalf("open circuit: Live %v, Epoch %d (was %d); want untrusted under a new odd epoch", b.Live(), b.Epoch(), e0)
	}
	// Redis is fine, so the probe closes it after the cooldown.
	waitLive(t, b)
	if b.CircuitOpen() || b.Allow() != nil {
		t.Fatal("live again with the circuit open")
	}
	if e := b.Epoch(); e%2 != 0 || e <= e0+1 {
		t.Fatalf("Epoch() = %d after the circuit closed, want a new even epoch after %d", e, e0)
	}
	st := b.Stats()
	if st.CircuitOpens != 1 || st.CircuitCloses != 1 || st.CircuitOpen {
		t.Fatalf("Stats: opens %d closes %d open %v, want 1 1 false", st.CircuitOpens, st.CircuitCloses, st.CircuitOpen)
	}
}

// TestBreakerStaysOpenWhileRedisDown: with Redis stopped, probes fail and
// the circuit stays open; once Redis is back, one probe closes it.
func TestBreakerStaysOpenWhileRedisDown(t *testing.T) {
	s := redistest.Start(t)
	b := newTestBus(t, s, s.Client(t), Options{BreakerThreshold: 1, BreakerCooldown: 30 * time.Millisecond,
		HeartbeatInterval: 50 * time.Millisecond, HeartbeatTimeout: 200 * time.Millisecond})
	waitLive(t, b)
	s.Stop(t)
	b.Report(syscall.ECONNREFUSED)
	if !b.CircuitOpen() {
		t.Fatal("circuit closed after a failure at threshold 1")
	}
	// Several cooldowns pass with every probe failing.
	time.Sleep(200 * time.Millisecond) // nothing to await: the point is that nothing happens
	if !b.CircuitOpen() || b.Live() {
		t.Fatalf("with Redis down: open %v live %v, want open and not live", b.CircuitOpen(), b.Live())
	}
	s.Restart(t)
	waitLive(t, b)
	if st := b.Stats(); st.CircuitCloses != 1 {
		t.Fatalf("CircuitCloses = %d, want 1", st.CircuitCloses)
	}
}

// replayRecorder is a recorder that also replays, failing while told to.
type replayRecorder struct {
	*recorder
	mu      sync.Mutex
	fail    bool
	decline bool       // answer ErrNotReplayed, as a closing cache does
	replays [][]string // keys of each successful replay; nil entry: a flush
	calls   chan struct{}
}

func (r *replayRecorder) Replay(_ context.Context, keys []string, flush bool) error {
	r.mu.Lock()
	defer func() {
		r.mu.Unlock()
		select {
		case r.calls <- struct{}{}:
		default:
		}
	}()
	if r.decline {
		return ErrNotReplayed
	}
	if r.fail {
		return syscall.ECONNREFUSED
	}
	if flush {
		r.replays = append(r.replays, nil)
	} else {
		r.replays = append(r.replays, slices.Clone(keys))
	}
	return nil
}

func (r *replayRecorder) declined(v bool) {
	r.mu.Lock()
	r.decline = v
	r.mu.Unlock()
}

func (r *replayRecorder) setFail(v bool) {
	r.mu.Lock()
	r.fail = v
	r.mu.Unlock()
}

func (r *replayRecorder) got() [][]string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.replays)
}

// TestOutboxDedupBackoffAndReplay: deferred keys are kept once each,
// retried while the replay fails, removed once it succeeds; Pending tells
// which keys are held.
func TestOutboxDedupBackoffAndReplay(t *testing.T) {
	s := redistest.Shared(t)
	b := newTestBus(t, s, s.Client(t), Options{BreakerThreshold: -1})
	waitLive(t, b)
	r := &replayRecorder{recorder: newRecorder(t, b), fail: true, calls: make(chan struct{}, 64)}
	if _, err := b.Register("ns", r); err != nil {
		t.Fatal(err)
	}
	b.Defer("ns", "a", "b")
	b.Defer("ns", "b", "c")
	if d := b.OutboxDepth(); d != 3 {
		t.Fatalf("OutboxDepth = %d, want 3 (a, b, c once each)", d)
	}
	if !b.Pending("ns", "b") || b.Pending("ns", "z") || b.Pending("other", "a") {
		t.Fatal("Pending disagrees with what was deferred")
	}
	// It retries while the replay fails.
	recv(t, r.calls, "a first replay attempt")
	recv(t, r.calls, "a retry")
	if b.OutboxDepth() != 3 {
		t.Fatalf("a failed replay removed keys: depth %d", b.OutboxDepth())
	}
	r.setFail(false)
	pollUntil(t, busWait, "outbox drained", func() bool { return b.OutboxDepth() == 0 })
	got := r.got()
	if len(got) != 1 || !slices.Equal(got[0], []string{"a", "b", "c"}) {
		t.Fatalf("replays %q, want one of [a b c]", got)
	}
	if b.Pending("ns", "a") {
		t.Fatal("Pending after the replay")
	}
	if st := b.Stats(); st.Deferred != 4 || st.Replayed != 3 {
		t.Fatalf("Stats Deferred %d Replayed %d, want 4 and 3", st.Deferred, st.Replayed)
	}
}

// TestOutboxOverflowBecomesFlush: past OutboxLimit keys a namespace degrades
// to one flush, replayed as such; nothing is dropped silently.
func TestOutboxOverflowBecomesFlush(t *testing.T) {
	s := redistest.Shared(t)
	b := newTestBus(t, s, s.Client(t), Options{BreakerThreshold: -1, OutboxLimit: 4})
	waitLive(t, b)
	r := &replayRecorder{recorder: newRecorder(t, b), fail: true, calls: make(chan struct{}, 64)}
	if _, err := b.Register("ns", r); err != nil {
		t.Fatal(err)
	}
	b.Defer("ns", "1", "2", "3", "4")
	if st := b.Stats(); st.Overflows != 0 || st.OutboxDepth != 4 {
		t.Fatalf("at the limit: %+v", st)
	}
	b.Defer("ns", "5")
	if st := b.Stats(); st.Overflows != 1 || st.OutboxDepth != 1 {
		t.Fatalf("past the limit: Overflows %d depth %d, want 1 and 1 (one flush)", st.Overflows, st.OutboxDepth)
	}
	if !b.Pending("ns", "anything") {
		t.Fatal("a pending flush must cover every key of the namespace")
	}
	b.Defer("ns", "6") // absorbed by the flush
	r.setFail(false)
	pollUntil(t, busWait, "outbox drained", func() bool { return b.OutboxDepth() == 0 })
	// A replay that took keys 1-4 before the overflow may still land, once
	// the handler stops failing (a CI run saw it): harmless, an extra
	// invalidation. What the overflow must give is one flush, and no key
	// deferred after it replayed on its own.
	flushes := 0
	for _, keys := range r.got() {
		if keys == nil {
			flushes++
		}
		for _, k := range keys {
			if k != "1" && k != "2" && k != "3" && k != "4" {
				t.Errorf("key %q replayed on its own; the flush covers it", k)
			}
		}
	}
	if flushes != 1 {
		t.Fatalf("replays %q, want exactly one flush", r.got())
	}
}

// TestOutboxReplayedBeforeLive: after a gap, the Bus replays the outbox
// before it trusts the stream again; while the replay fails it stays dead.
func TestOutboxReplayedBeforeLive(t *testing.T) {
	s := redistest.Start(t)
	b := newTestBus(t, s, s.Client(t), Options{BreakerThreshold: -1,
		HeartbeatInterval: 50 * time.Millisecond, HeartbeatTimeout: 200 * time.Millisecond})
	waitLive(t, b)
	r := &replayRecorder{recorder: newRecorder(t, b), fail: true, calls: make(chan struct{}, 64)}
	if _, err := b.Register("ns", r); err != nil {
		t.Fatal(err)
	}
	b.Defer("ns", "k")
	recv(t, r.calls, "a failing replay")
	s.KillPubSub(t)
	// The Bus resubscribes, but the failing replay keeps it dead.
	recv(t, r.resync, "the resync after the kill")
	recv(t, r.calls, "the replay before going live")
	if b.Live() {
		t.Fatal("live with the outbox not replayed")
	}
	r.setFail(false)
	waitLive(t, b)
	if b.OutboxDepth() != 0 {
		t.Fatalf("live with %d entries still in the outbox", b.OutboxDepth())
	}
}

// TestOutboxDropAndClose: what nothing can replay any more is dropped,
// counted and reported, never removed as if replayed. ReplayNow replays on
// the caller's goroutine and says when entries are left; a handler that
// declines (ErrNotReplayed) keeps them without failing the replay.
func TestOutboxDropAndClose(t *testing.T) {
	s := redistest.Shared(t)
	logs := &lockedBuffer{}
	b, err := New(s.Client(t), Options{Prefix: s.Prefix(), BreakerThreshold: -1, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	waitLive(t, b)
	r := &replayRecorder{recorder: newRecorder(t, b), fail: true, calls: make(chan struct{}, 64)}
	unregister, err := b.Register("ns", r)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	b.Defer("ns", "a", "b")
	if err := b.ReplayNow(ctx, "ns"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("ReplayNow with a failing handler: %v; want its error", err)
	}
	r.setFail(false)
	r.declined(true)
	if err := b.ReplayNow(ctx, "ns"); !errors.Is(err, ErrNotReplayed) {
		t.Fatalf("ReplayNow with a declining handler: %v; want ErrNotReplayed", err)
	}
	if d := b.OutboxDepth(); d != 2 {
		t.Fatalf("a declined replay removed entries: depth %d, want 2", d)
	}
	// Unregistering drops them, in the same step, and says how many.
	if n := unregister(); n != 2 {
		t.Fatalf("unregister dropped %d, want 2", n)
	}
	if st := b.Stats(); st.OutboxDropped != 2 || st.OutboxDepth != 0 || st.Replayed != 0 {
		t.Fatalf("after unregister: %+v; want 2 dropped, depth 0, none replayed", st)
	}
	if n := unregister(); n != 0 {
		t.Fatalf("second unregister dropped %d, want 0", n)
	}

	// A namespace with no handler: the outbox goroutine drops and counts.
	b.Defer("gone", "x", "y", "z")
	pollUntil(t, busWait, "the handler-less entries dropped", func() bool { return b.OutboxDepth() == 0 })
	if st := b.Stats(); st.OutboxDropped != 5 || st.Replayed != 0 {
		t.Fatalf("after the handler-less drop: dropped %d replayed %d; want 5 and 0", st.OutboxDropped, st.Replayed)
	}

	// What is left when the Bus closes: a flush counts once.
	r2 := &replayRecorder{recorder: newRecorder(t, b), fail: true, calls: make(chan struct{}, 64)}
	if _, err := b.Register("ns2", r2); err != nil {
		t.Fatal(err)
	}
	b.Defer("ns2", "p", "q")
	b.DeferFlush("ns2")
	recv(t, r2.calls, "a failing replay of the flush")
	if err := b.Close(); !errors.Is(err, ErrOutboxDropped) || !strings.Contains(err.Error(), "1 invalidations") {
		t.Fatalf("Close with a flush pending: %v; want ErrOutboxDropped for 1", err)
	}
	if st := b.Stats(); st.OutboxDropped != 6 || st.OutboxDepth != 0 {
		t.Fatalf("after Close: dropped %d depth %d; want 6 and 0", st.OutboxDropped, st.OutboxDepth)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if got := strings.Count(logs.String(), "dropped"); got != 3 {
		t.Fatalf("%d drop warnings logged, want one per drop (3):\n%s", got, logs.String())
	}
}

// flushThenDefer records replays and, once a flush's replay has reached
// Redis but before the outbox settles it, defers a key of the namespace, as
// a write failing at that moment would.
type flushThenDefer struct {
	*recorder
	b       *Bus
	once    sync.Once
	mu      sync.Mutex
	flushes int
	keys    []string
}

func (d *flushThenDefer) Replay(_ context.Context, keys []string, flush bool) error {
	d.mu.Lock()
	if flush {
		d.flushes++
	} else {
		d.keys = append(d.keys, keys...)
	}
	d.mu.Unlock()
	if flush {
		d.once.Do(func() { d.b.Defer("ns", "k") })
	}
	return nil
}

// TestOutboxDeferDuringFlushReplay: a key deferred while a pending flush
// of its namespace is being replayed is covered by that flush only if the
// flush reaches Redis after the key's write failed. The replay under way
// went out before, so it must not settle the flush: the key's
// invalidation (a second flush, or the key) still goes out. Before, the
// deferred key was absorbed into the flush and the replay then removed it.
func TestOutboxDeferDuringFlushReplay(t *testing.T) {
	s := redistest.Shared(t)
	b := newTestBus(t, s, s.Client(t), Options{BreakerThreshold: -1})
	waitLive(t, b)
	d := &flushThenDefer{recorder: newRecorder(t, b), b: b}
	if _, err := b.Register("ns", d); err != nil {
		t.Fatal(err)
	}
	b.DeferFlush("ns")
	pollUntil(t, busWait, "outbox drained", func() bool { return b.OutboxDepth() == 0 })
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.flushes < 2 && !slices.Contains(d.keys, "k") {
		t.Fatalf("the invalidation of k, deferred while the flush was being replayed, was lost: %d flush replays, keys replayed %q; Stats %+v",
			d.flushes, d.keys, b.Stats())
	}
}

// refusal is an error reply from Redis.
type refusal string

func (e refusal) Error() string { return string(e) }
func (refusal) RedisError()     {}

// refuseKeys fails every replay of keys with an error reply that is not an
// outage, as Redis refusing a command would, and accepts flushes.
type refuseKeys struct {
	*recorder
	mu      sync.Mutex
	keys    int
	flushes int
}

func (r *refuseKeys) Replay(_ context.Context, keys []string, flush bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !flush {
		r.keys++
		return refusal("NOPERM this user has no permissions to run the 'publish' command")
	}
	r.flushes++
	return nil
}

// TestOutboxRefusedKeysBecomeFlush: keys whose replay fails for a reason
// other than Redis being unavailable would fail the same way forever, and
// the Bus replays before trusting L1 again, so it would never be live.
// They become a namespace flush, which goes out.
func TestOutboxRefusedKeysBecomeFlush(t *testing.T) {
	s := redistest.Shared(t)
	b := newTestBus(t, s, s.Client(t), Options{BreakerThreshold: -1})
	waitLive(t, b)
	r := &refuseKeys{recorder: newRecorder(t, b)}
	if _, err := b.Register("ns", r); err != nil {
		t.Fatal(err)
	}
	b.Defer("ns", "a", "b")
	pollUntil(t, busWait, "outbox drained", func() bool { return b.OutboxDepth() == 0 })
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.keys != 1 || r.flushes != 1 {
		t.Fatalf("replays: %d of keys (refused), %d flushes; want 1 and 1", r.keys, r.flushes)
	}
	if b.Pending("ns", "a") {
		t.Fatal("a still pending after the flush was replayed")
	}
}
