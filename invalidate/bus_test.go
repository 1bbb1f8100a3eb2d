package invalidate

import (
	"go.uber.org/goleak"

	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/internal/redistest"
)

// busWait bounds every wait for an event that should happen promptly.
const busWait = 5 * time.Second

// foreignOrigin is the origin of messages the tests publish as "another
// process" (no Bus has it: origins are random).
var foreignOrigin = [16]byte{0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff}

// resyncCall is what the recording handler saw when the Bus called Resync.
type resyncCall struct {
	epoch       uint64 // bus.Epoch() during the call
	live        bool   // bus.Live() during the call
	hasDeadline bool
	budget      time.Duration // time left until the ctx deadline
	err         error         // what Resync returned
}

// recorder is a Handler that reports every call on a buffered channel.
// It never blocks the Bus: a full channel is recorded and fails the test.
type recorder struct {
	bus      atomic.Pointer[Bus]
	fail     atomic.Bool // Resync returns an error while set
	overflow atomic.Bool

	inv    chan []string
	flush  chan uint64
	resync chan resyncCall
}

var errResyncTest = errors.New("test: resync refused")

func newRecorder(t *testing.T, b *Bus) *recorder {
	t.Helper()
	r := &recorder{
		inv:    make(chan []string, 4096),
		flush:  make(chan uint64, 1024),
		resync: make(chan resyncCall, 1024),
	}
	r.bus.Store(b)
	t.Cleanup(func() {
		if r.overflow.Load() {
			t.Errorf("recorder: a channel overflowed; events were dropped")
		}
	})
	return r
}

func (r *recorder) Invalidate(keys []string) {
	select {
	case r.inv <- slices.Clone(keys):
	default:
		r.overflow.Store(true)
	}
}

func (r *recorder) Flush(gen uint64) {
	select {
	case r.flush <- gen:
	default:
		r.overflow.Store(true)
	}
}

func (r *recorder) Resync(ctx context.Context) error {
	c := resyncCall{}
	if b := r.bus.Load(); b != nil {
		c.epoch, c.live = b.Epoch(), b.Live()
	}
	if d, ok := ctx.Deadline(); ok {
		c.hasDeadline, c.budget = true, time.Until(d)
	}
	if r.fail.Load() {
		c.err = errResyncTest
	}
	select {
	case r.resync <- c:
	default:
		r.overflow.Store(true)
	}
	return c.err
}

// drainResync discards the Resync calls recorded so far.
func (r *recorder) drainResync() {
	for {
		select {
		case <-r.resync:
		default:
			return
		}
	}
}

// newTestBus starts a Bus on rdb with the server's prefix (so tests sharing a
// server never hear each other) and closes it when the test ends.
func newTestBus(t *testing.T, s *redistest.Server, rdb redis.UniversalClient, o Options) *Bus {
	t.Helper()
	o.Prefix = s.Prefix()
	b, err := New(rdb, o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = b.Close() })
	return b
}

// register registers a fresh recorder for ns on b.
func register(t *testing.T, b *Bus, ns string) *recorder {
	t.Helper()
	r := newRecorder(t, b)
	if _, err := b.Register(ns, r); err != nil {
		t.Fatalf("Register(%q): %v", ns, err)
	}
	return r
}

func waitLive(t *testing.T, b *Bus) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), busWait)
	defer cancel()
	if err := b.WaitLive(ctx); err != nil {
		t.Fatalf("WaitLive: %v (Stats %+v)", err, b.Stats())
	}
}

// recv returns the next value of ch or fails the test after busWait.
func recv[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	tm := time.NewTimer(busWait)
	defer tm.Stop()
	select {
	case v := <-ch:
		return v
	case <-tm.C:
		var zero T
		t.Fatalf("timed out after %v waiting for %s", busWait, what)
		return zero
	}
}

// noValue fails the test if ch holds a value right now.
func noValue[T any](t *testing.T, ch <-chan T, what string) {
	t.Helper()
	select {
	case v := <-ch:
		t.Errorf("unexpected %s: %v", what, v)
	default:
	}
}

// pollUntil polls cond every 2 ms until it holds or the deadline passes and
// returns how long it took. Only for Live() transitions, which have no event.
func pollUntil(t *testing.T, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	deadline := start.Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not observed within %v", what, within)
		}
		time.Sleep(2 * time.Millisecond)
	}
	return time.Since(start)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// publishForeign publishes a keys message of another process on b's channel.
func publishForeign(t *testing.T, rdb redis.UniversalClient, b *Bus, ns string, keys ...string) {
	t.Helper()
	m := Message{Origin: foreignOrigin, Seq: 1, Time: time.Now().UnixNano(), Namespace: ns, Kind: KindKeys, Keys: keys}
	p, err := m.MarshalBinary()
	if err != nil {
		t.Fatalf("MarshalBinary: %v", err)
	}
	if err := rdb.Publish(ctxT(t), b.Channel(), p).Err(); err != nil {
		t.Fatalf("PUBLISH: %v", err)
	}
}

func wantKeys(t *testing.T, got []string, want ...string) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("Invalidate(%q), want Invalidate(%q)", got, want)
	}
}

// checkReconnects checks Stats().Reconnects. The Bus counts a reconnect just
// after it goes live, so call it only once a message received on the new
// subscription has been observed (the count is then certainly updated).
func checkReconnects(t *testing.T, b *Bus, want uint64) {
	t.Helper()
	if st := b.Stats(); st.Reconnects != want {
		t.Errorf("Stats().Reconnects = %d, want %d", st.Reconnects, want)
	}
}

func checkLiveEpoch(t *testing.T, b *Bus) uint64 {
	t.Helper()
	e := b.Epoch()
	if !b.Live() {
		t.Errorf("Live() = false after WaitLive (Epoch() = %d)", e)
	}
	if e%2 != 0 {
		t.Errorf("Epoch() = %d while live, want an even value", e)
	}
	return e
}

// 1.
func TestBusNewGoesLive(t *testing.T) {
	s := redistest.Shared(t)
	b := newTestBus(t, s, s.Client(t), Options{})
	start := time.Now()
	waitLive(t, b)
	if d := time.Since(start); d > time.Second {
		t.Errorf("WaitLive took %v, want well under 1s", d)
	}
	t.Logf("live after %v", time.Since(start))
	checkLiveEpoch(t, b)
	if got, want := b.Channel(), s.Prefix()+"inv:1"; got != want {
		t.Errorf("Channel() = %q, want %q", got, want)
	}
	st := b.Stats()
	if !st.Live || st.Reconnects != 0 || st.LastHeard.IsZero() {
		t.Errorf("Stats() = %+v, want Live, Reconnects 0 and LastHeard set", st)
	}

	// The default prefix (no WaitLive: only the name is checked).
	d, err := New(s.Client(t), Options{})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	defer d.Close()
	if got, want := d.Channel(), DefaultPrefix+"inv:1"; got != want {
		t.Errorf("Channel() = %q, want %q", got, want)
	}
	if d.Origin() == b.Origin() {
		t.Errorf("two buses share Origin() %x", b.Origin())
	}
}

// 2.
func TestBusDeliveryBetweenBuses(t *testing.T) {
	s := redistest.Shared(t)
	rdbA, rdbB := s.Client(t), s.Client(t)
	a := newTestBus(t, s, rdbA, Options{})
	b := newTestBus(t, s, rdbB, Options{})
	ha := register(t, a, "ns")
	hb := register(t, b, "ns")
	waitLive(t, a)
	waitLive(t, b)
	eb := checkLiveEpoch(t, b)
	ctx := ctxT(t)

	enc := func(p []byte, err error) []byte {
		t.Helper()
		if err != nil {
			t.Fatalf("encode: %v", err)
		}
		return p
	}
	publish := func(bus *Bus, p []byte) {
		t.Helper()
		if err := bus.Publish(ctx, p); err != nil {
			t.Fatalf("Publish: %v", err)
		}
	}

	// A -> B; A skips its own message.
	publish(a, enc(a.KeysMessage("ns", []string{"k1", "k2"})))
	wantKeys(t, recv(t, hb.inv, "B: Invalidate of A's message"), "k1", "k2")
	// B's reply reaches A after A's own message (one connection, in order),
	// so when it arrives A has already dispatched its own.
	publish(b, enc(b.KeysMessage("ns", []string{"fromB"})))
	wantKeys(t, recv(t, ha.inv, "A: Invalidate of B's message"), "fromB")
	if st := a.Stats(); st.Own != 1 || st.Received != 2 {
		t.Errorf("A: Stats() = %+v, want Own 1, Received 2", st)
	}

	// Flush with a one-byte and a multi-byte generation.
	for _, gen := range []uint64{7, 1<<40 + 3} {
		p := enc(a.FlushMessagePrefix("ns"))
		publish(a, binary.AppendUvarint(p, gen))
		if got := recv(t, hb.flush, "B: Flush"); got != gen {
			t.Errorf("B: Flush(%d), want Flush(%d)", got, gen)
		}
	}

	// A namespace B does not serve is ignored.
	publish(a, enc(a.KeysMessage("unregistered", []string{"x"})))
	publish(a, enc(a.KeysMessage("ns", []string{"after-ignored"})))
	wantKeys(t, recv(t, hb.inv, "B: Invalidate after an ignored message"), "after-ignored")
	if st := b.Stats(); st.Ignored != 1 {
		t.Errorf("B: Stats().Ignored = %d, want 1 (Stats %+v)", st.Ignored, st)
	}

	// Garbage is counted, never applied; the stream stays live, but each
	// unreadable message voids L1 (the epoch moves by 2, staying even), as it
	// may have been an invalidation this Bus cannot read.
	valid, err := a.KeysMessage("ns", []string{"v"})
	if err != nil {
		t.Fatal(err)
	}
	garbage := []string{"", "garbage", string(valid[:len(valid)-1]), string(valid) + "x", "T\x02\x01\x00"}
	for _, g := range garbage {
		if err := rdbA.Publish(ctx, a.Channel(), g).Err(); err != nil {
			t.Fatalf("PUBLISH: %v", err)
		}
	}
	publish(a, enc(a.KeysMessage("ns", []string{"after-garbage"})))
	wantKeys(t, recv(t, hb.inv, "B: Invalidate after garbage"), "after-garbage")
	st := b.Stats()
	if st.Malformed != uint64(len(garbage)) {
		t.Errorf("B: Stats().Malformed = %d, want %d (Stats %+v)", st.Malformed, len(garbage), st)
	}
	if want := eb + 2*uint64(len(garbage)); !b.Live() || b.Epoch() != want {
		t.Errorf("B: Live() = %v, Epoch() = %d after garbage, want true, %d", b.Live(), b.Epoch(), want)
	}
	// Received: k1k2, 2 flushes, ignored, after-ignored, garbage, after-garbage
	// (+ its own fromB).
	if want := uint64(1 + 2 + 2 + len(garbage) + 1 + 1); st.Received != want {
		t.Errorf("B: Stats().Received = %d, want %d", st.Received, want)
	}
	// Applied is counted after the handler returns: the message whose
	// handler call was just observed may not be counted yet.
	if want := uint64(1 + 2 + 1 + 1); st.Applied != want && st.Applied != want-1 {
		t.Errorf("B: Stats().Applied = %d, want %d (or %d)", st.Applied, want, want-1)
	}
	noValue(t, ha.inv, "A: Invalidate of its own message")
	noValue(t, ha.flush, "A: Flush of its own message")

	// Unregistering stops delivery: the message then counts as ignored.
	u, err := a.Register("ns2", ha)
	if err != nil {
		t.Fatal(err)
	}
	u()
	publish(b, enc(b.KeysMessage("ns2", []string{"gone"})))
	publish(b, enc(b.KeysMessage("ns", []string{"after-unregister"})))
	wantKeys(t, recv(t, ha.inv, "A: Invalidate after unregister"), "after-unregister")
	if st := a.Stats(); st.Ignored != 1 {
		t.Errorf("A: Stats().Ignored = %d after unregister, want 1", st.Ignored)
	}
}

// 3.
func TestBusKillPubSubResubscribes(t *testing.T) {
	s := redistest.Start(t)
	rdb := s.Client(t)
	b := newTestBus(t, s, rdb, Options{})
	h := register(t, b, "ns")
	waitLive(t, b)
	e0 := checkLiveEpoch(t, b)
	h.drainResync()

	if n := s.KillPubSub(t); n < 1 {
		t.Fatalf("KillPubSub killed %d clients, want >= 1", n)
	}
	c := recv(t, h.resync, "Resync after KillPubSub")
	if c.live || c.epoch%2 != 1 || c.epoch <= e0 {
		t.Errorf("during Resync: Live() = %v, Epoch() = %d, want false and an odd value > %d", c.live, c.epoch, e0)
	}
	if !c.hasDeadline || c.budget > time.Second {
		t.Errorf("Resync ctx: deadline %v, budget %v, want a deadline within HeartbeatTimeout (1s)", c.hasDeadline, c.budget)
	}
	waitLive(t, b)
	e1 := checkLiveEpoch(t, b)
	if e1 <= c.epoch {
		t.Errorf("Epoch() = %d after resubscribing, want a new even value > %d", e1, c.epoch)
	}
	publishForeign(t, rdb, b, "ns", "after-kill")
	wantKeys(t, recv(t, h.inv, "Invalidate after resubscription"), "after-kill")
	checkReconnects(t, b, 1)
	noValue(t, h.resync, "second Resync")
}

// 4.
func TestBusFreezeDetected(t *testing.T) {
	const (
		interval = 50 * time.Millisecond
		timeout  = 300 * time.Millisecond
	)
	s := redistest.Start(t)
	rdb := s.Client(t)
	b := newTestBus(t, s, rdb, Options{HeartbeatInterval: interval, HeartbeatTimeout: timeout})
	h := register(t, b, "ns")
	waitLive(t, b)
	e0 := checkLiveEpoch(t, b)
	h.drainResync()

	// Idle but healthy: pongs keep arriving and nothing is re-established.
	for i := 0; i < 3; i++ {
		last := b.LastHeard()
		pollUntil(t, 2*timeout, "a heartbeat while idle", func() bool { return b.LastHeard().After(last) })
	}
	if st := b.Stats(); !st.Live || b.Epoch() != e0 || st.Reconnects != 0 {
		t.Fatalf("idle healthy bus: Stats() = %+v, Epoch() = %d, want live, epoch %d, no reconnects", st, b.Epoch(), e0)
	}
	noValue(t, h.resync, "Resync while idle and healthy")

	s.Freeze(t)
	t.Cleanup(func() { s.Thaw(t) })
	frozen := time.Now()
	detect := pollUntil(t, timeout+300*time.Millisecond, "Live() = false after Freeze", func() bool { return !b.Live() })
	t.Logf("Freeze detected after %v (HeartbeatInterval %v, HeartbeatTimeout %v); last heard %v before Freeze",
		detect, interval, timeout, frozen.Sub(b.LastHeard()).Round(time.Millisecond))
	if e := b.Epoch(); e != e0+1 {
		t.Errorf("Epoch() = %d while dead, want %d", e, e0+1)
	}

	s.Thaw(t)
	waitLive(t, b)
	if e := checkLiveEpoch(t, b); e <= e0+1 {
		t.Errorf("Epoch() = %d after Thaw, want a new even value > %d", e, e0+1)
	}
	c := recv(t, h.resync, "Resync after Thaw")
	if c.live || c.epoch%2 != 1 {
		t.Errorf("during Resync: Live() = %v, Epoch() = %d, want false and odd", c.live, c.epoch)
	}
	publishForeign(t, rdb, b, "ns", "after-thaw")
	wantKeys(t, recv(t, h.inv, "Invalidate after Thaw"), "after-thaw")
	checkReconnects(t, b, 1)
}

// 5.
func TestBusStopRestart(t *testing.T) {
	s := redistest.Start(t)
	rdb := s.Client(t)
	b := newTestBus(t, s, rdb, Options{})
	h := register(t, b, "ns")
	waitLive(t, b)
	e0 := checkLiveEpoch(t, b)
	h.drainResync()

	s.Stop(t)
	d := pollUntil(t, 2*time.Second, "Live() = false after Stop", func() bool { return !b.Live() })
	t.Logf("Stop detected after %v", d)
	if e := b.Epoch(); e != e0+1 {
		t.Errorf("Epoch() = %d while stopped, want %d", e, e0+1)
	}
	s.Restart(t)
	waitLive(t, b)
	if e := checkLiveEpoch(t, b); e <= e0+1 {
		t.Errorf("Epoch() = %d after Restart, want a new even value > %d", e, e0+1)
	}
	c := recv(t, h.resync, "Resync after Restart")
	if c.live || c.epoch%2 != 1 {
		t.Errorf("during Resync: Live() = %v, Epoch() = %d, want false and odd", c.live, c.epoch)
	}
	publishForeign(t, rdb, b, "ns", "after-restart")
	wantKeys(t, recv(t, h.inv, "Invalidate after Restart"), "after-restart")
	checkReconnects(t, b, 1)
}

// 6.
func TestBusResyncErrorKeepsDead(t *testing.T) {
	s := redistest.Start(t)
	rdb := s.Client(t)
	b := newTestBus(t, s, rdb, Options{})
	ok := register(t, b, "ok") // a healthy handler next to the failing one
	h := register(t, b, "ns")
	waitLive(t, b)
	e0 := checkLiveEpoch(t, b)
	h.drainResync()
	ok.drainResync()

	h.fail.Store(true)
	s.KillPubSub(t)
	const failures = 3
	for i := 1; i <= failures; i++ {
		c := recv(t, h.resync, fmt.Sprintf("failing Resync #%d", i))
		if c.err == nil || c.live || c.epoch != e0+1 {
			t.Errorf("failing Resync #%d: err %v, Live() = %v, Epoch() = %d, want an error, false, %d", i, c.err, c.live, c.epoch, e0+1)
		}
		// h refuses every Resync so far, so the bus cannot be live.
		if b.Live() {
			t.Fatalf("Live() = true after failing Resync #%d (Epoch() = %d)", i, b.Epoch())
		}
	}
	h.fail.Store(false)
	waitLive(t, b)
	e1 := checkLiveEpoch(t, b)
	if e1 != e0+2 {
		t.Errorf("Epoch() = %d after Resync succeeded, want %d", e1, e0+2)
	}
	// The last call before going live succeeded.
	var last resyncCall
	for {
		select {
		case last = <-h.resync:
			continue
		default:
		}
		break
	}
	if last.err != nil || last.epoch != e0+1 {
		t.Errorf("last Resync before going live: err %v, Epoch() = %d, want nil, %d", last.err, last.epoch, e0+1)
	}
	publishForeign(t, rdb, b, "ns", "after-resync")
	wantKeys(t, recv(t, h.inv, "Invalidate after a successful Resync"), "after-resync")
	checkReconnects(t, b, 1) // failed resyncs are not reconnects
}

// 7.
func TestBusRegister(t *testing.T) {
	s := redistest.Shared(t)
	b := newTestBus(t, s, s.Client(t), Options{})
	h1, h2, h3 := newRecorder(t, b), newRecorder(t, b), newRecorder(t, b)

	u1, err := b.Register("ns", h1)
	if err != nil {
		t.Fatalf("Register: %v", err)
	}
	if _, err := b.Register("ns", h2); !errors.Is(err, ErrDuplicateNamespace) {
		t.Errorf("Register(duplicate) = %v, want ErrDuplicateNamespace", err)
	}
	u1()
	u2, err := b.Register("ns", h2)
	if err != nil {
		t.Fatalf("Register after unregister: %v", err)
	}
	u1() // idempotent: must not remove h2
	if _, err := b.Register("ns", h3); !errors.Is(err, ErrDuplicateNamespace) {
		t.Errorf("Register after a stale unregister = %v, want ErrDuplicateNamespace (h2 must stay)", err)
	}
	u2()

	for _, ns := range []string{"", strings.Repeat("n", namespaceLimit+1)} {
		if u, err := b.Register(ns, h1); err == nil {
			u()
			t.Errorf("Register(namespace of %d bytes) = nil error, want an error", len(ns))
		}
	}
	if u, err := b.Register(strings.Repeat("n", namespaceLimit), h1); err != nil {
		t.Errorf("Register(namespace of %d bytes) = %v, want nil", namespaceLimit, err)
	} else {
		u()
	}

	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if _, err := b.Register("late", h1); !errors.Is(err, ErrClosed) {
		t.Errorf("Register after Close = %v, want ErrClosed", err)
	}
}

// uncomparableHandler is a Handler value whose dynamic type is not
// comparable (it holds a map), as a handler passed by value may be.
type uncomparableHandler struct{ seen map[string]int }

func (uncomparableHandler) Invalidate([]string)          {}
func (uncomparableHandler) Flush(uint64)                 {}
func (uncomparableHandler) Resync(context.Context) error { return nil }

// BUG (bus.go, Register): the unregister func compares b.handlers[ns] == h,
// two interface values; when the handler's dynamic type is not comparable
// that comparison panics ("comparing uncomparable type") while b.mu is held
// without a defer, so even a recovered panic leaves b.mu locked forever and
// wedges the Bus (Register, Close, dispatch and resync all block).
func TestBusUnregisterUncomparableHandler(t *testing.T) {
	s := redistest.Shared(t)
	b := newTestBus(t, s, s.Client(t), Options{})
	u, err := b.Register("ns", uncomparableHandler{seen: map[string]int{}})
	if err != nil {
		t.Fatalf("Register: %v", err)
	}
	func() {
		defer func() {
			if r := recover(); r != nil {
				t.Errorf("unregister panicked: %v", r)
			}
		}()
		u()
	}()
	if !b.mu.TryLock() {
		t.Errorf("unregister left Bus.mu locked: every later Register, Close, dispatch and resync would block forever")
		b.mu.Unlock() // release it so that the test can clean up
		return
	}
	b.mu.Unlock()
	if u, err := b.Register("ns", uncomparableHandler{}); err != nil {
		t.Errorf("Register after unregister = %v, want nil", err)
	} else {
		u()
	}
	waitLive(t, b)
}

// closeConcurrently calls Close from 4 goroutines and returns how long the
// slowest took.
func closeConcurrently(t *testing.T, b *Bus) time.Duration {
	t.Helper()
	start := time.Now()
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			if err := b.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
	}
	wg.Wait()
	return time.Since(start)
}

func checkClosed(t *testing.T, b *Bus) {
	t.Helper()
	if err := b.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := b.WaitLive(ctx); !errors.Is(err, ErrClosed) {
		t.Errorf("WaitLive after Close = %v, want ErrClosed", err)
	}
	if b.Live() {
		t.Errorf("Live() = true after Close (Epoch() = %d)", b.Epoch())
	}
}

// 8.
func TestBusClose(t *testing.T) {
	t.Run("healthy", func(t *testing.T) {
		s := redistest.Shared(t)
		b := newTestBus(t, s, s.Client(t), Options{})
		register(t, b, "ns")
		waitLive(t, b)
		if d := closeConcurrently(t, b); d > 200*time.Millisecond {
			t.Errorf("Close took %v, want < 200ms", d)
		}
		checkClosed(t, b)
	})
	t.Run("frozen", func(t *testing.T) {
		s := redistest.Start(t)
		b := newTestBus(t, s, s.Client(t), Options{})
		register(t, b, "ns")
		waitLive(t, b)
		s.Freeze(t)
		t.Cleanup(func() { s.Thaw(t) })
		d := closeConcurrently(t, b)
		t.Logf("Close on a frozen server took %v", d)
		if d > 200*time.Millisecond {
			t.Errorf("Close took %v, want < 200ms", d)
		}
		checkClosed(t, b)
	})
	t.Run("before live", func(t *testing.T) {
		s := redistest.Shared(t)
		b := newTestBus(t, s, s.Client(t), Options{})
		if d := closeConcurrently(t, b); d > 200*time.Millisecond {
			t.Errorf("Close took %v, want < 200ms", d)
		}
		checkClosed(t, b)
	})
}

// BUG (bus.go, session/Close): while Redis hangs, the Bus's resubscribe
// attempt blocks in ps.Subscribe (dial + HELLO handshake, which go-redis
// bounds only by deadlines: min(HeartbeatTimeout, ReadTimeout), not by
// cancellation), holding the PubSub's lock; Close's ps.Close waits for that
// lock, so Close takes up to HeartbeatTimeout instead of returning promptly.
func TestBusCloseWhileFrozenResubscribing(t *testing.T) {
	s := redistest.Start(t)
	b := newTestBus(t, s, s.Client(t), Options{}) // defaults: 250ms / 1s
	register(t, b, "ns")
	waitLive(t, b)
	s.Freeze(t)
	t.Cleanup(func() { s.Thaw(t) })
	pollUntil(t, 2*time.Second, "Live() = false after Freeze", func() bool { return !b.Live() })
	// The bus now backs off (25..37.5ms) and resubscribes; the new
	// connection's handshake can never be answered. No event marks that
	// point, so give it a fixed head start well inside the 1s attempt.
	time.Sleep(100 * time.Millisecond)
	d := closeConcurrently(t, b)
	t.Logf("Close while resubscribing to a frozen server took %v", d)
	// go-redis cannot abandon a handshake in progress, so Close waits for
	// the subscribe attempt's deadline (HeartbeatTimeout), as documented.
	if d > DefaultHeartbeatTimeout+200*time.Millisecond {
		t.Errorf("Close took %v, want ≤ HeartbeatTimeout + 200ms", d)
	}
	checkClosed(t, b)
}

// 9.
func TestBusOptionsValidation(t *testing.T) {
	s := redistest.Shared(t)
	rdb := s.Client(t)
	bad := []Options{
		{HeartbeatInterval: time.Second, HeartbeatTimeout: time.Second},
		{HeartbeatInterval: time.Second, HeartbeatTimeout: 500 * time.Millisecond},
		{HeartbeatInterval: 2 * time.Second}, // default timeout (1s) <= interval
		{HeartbeatTimeout: DefaultHeartbeatInterval},
		{HeartbeatInterval: -time.Millisecond},
		{HeartbeatTimeout: -time.Millisecond},
		{HeartbeatInterval: -2 * time.Second, HeartbeatTimeout: -time.Second},
	}
	for _, o := range bad {
		if b, err := New(rdb, o); err == nil {
			b.Close()
			t.Errorf("New(%+v) = nil error, want an error", o)
		}
	}
	if b, err := New(nil, Options{}); err == nil {
		b.Close()
		t.Errorf("New(nil client) = nil error, want an error")
	}
	b, err := New(rdb, Options{Prefix: s.Prefix(), HeartbeatInterval: time.Millisecond, HeartbeatTimeout: 2 * time.Millisecond})
	if err != nil {
		t.Errorf("New(valid tight heartbeats) = %v, want nil", err)
	} else {
		b.Close()
	}
}

// 10.
func TestBusKeysMessage(t *testing.T) {
	s := redistest.Shared(t)
	b := newTestBus(t, s, s.Client(t), Options{})
	var prevSeq uint64
	before := time.Now().UnixNano()
	for i, keys := range [][]string{{"a"}, {"b", "c"}, {"d\x00e", strings.Repeat("k", MaxKeyLen)}} {
		p, err := b.KeysMessage("ns", keys)
		if err != nil {
			t.Fatalf("KeysMessage: %v", err)
		}
		var m Message
		if err := m.UnmarshalBinary(p); err != nil {
			t.Fatalf("UnmarshalBinary(KeysMessage): %v", err)
		}
		if m.Origin != b.Origin() || m.Namespace != "ns" || m.Kind != KindKeys || !slices.Equal(m.Keys, keys) || m.Gen != 0 {
			t.Errorf("decoded %+v, want origin %x, namespace ns, kind keys, keys %q", m, b.Origin(), keys)
		}
		if i > 0 && m.Seq <= prevSeq {
			t.Errorf("Seq = %d after %d, want it to increase", m.Seq, prevSeq)
		}
		if m.Time < before || m.Time > time.Now().UnixNano() {
			t.Errorf("Time = %d, want between %d and now", m.Time, before)
		}
		prevSeq = m.Seq
	}

	p, err := b.FlushMessagePrefix("ns")
	if err != nil {
		t.Fatalf("FlushMessagePrefix: %v", err)
	}
	var m Message
	if err := m.UnmarshalBinary(binary.AppendUvarint(p, 300)); err != nil {
		t.Fatalf("UnmarshalBinary(flush): %v", err)
	}
	if m.Origin != b.Origin() || m.Kind != KindFlush || m.Gen != 300 || m.Namespace != "ns" || m.Seq <= prevSeq {
		t.Errorf("decoded flush %+v, want origin %x, kind flush, gen 300, namespace ns, seq > %d", m, b.Origin(), prevSeq)
	}

	for _, c := range []struct {
		ns   string
		keys []string
	}{{"", []string{"k"}}, {"ns", nil}, {"ns", []string{""}}, {strings.Repeat("n", 256), []string{"k"}}} {
		if _, err := b.KeysMessage(c.ns, c.keys); !errors.Is(err, ErrMalformed) {
			t.Errorf("KeysMessage(%d-byte namespace, %q) = %v, want ErrMalformed", len(c.ns), c.keys, err)
		}
	}
}

// stressHandler counts the keys of one bus.
type stressHandler struct {
	mu   sync.Mutex
	keys map[string]int
}

func (h *stressHandler) Invalidate(keys []string) {
	h.mu.Lock()
	for _, k := range keys {
		h.keys[k]++
	}
	h.mu.Unlock()
}
func (h *stressHandler) Flush(uint64)                 {}
func (h *stressHandler) Resync(context.Context) error { return nil }

// 11.
func TestBusStress(t *testing.T) {
	const (
		buses = 4
		each  = 500
	)
	s := redistest.Shared(t)
	bs := make([]*Bus, buses)
	hs := make([]*stressHandler, buses)
	done := make([]*recorder, buses)
	epochs := make([]uint64, buses)
	for i := range bs {
		bs[i] = newTestBus(t, s, s.Client(t), Options{})
		hs[i] = &stressHandler{keys: make(map[string]int)}
		if _, err := bs[i].Register("stress", hs[i]); err != nil {
			t.Fatal(err)
		}
		done[i] = register(t, bs[i], "done")
	}
	for i, b := range bs {
		waitLive(t, b)
		epochs[i] = b.Epoch()
	}

	ctx := ctxT(t)
	var wg sync.WaitGroup
	for i, b := range bs {
		wg.Go(func() {
			for j := range each {
				p, err := b.KeysMessage("stress", []string{fmt.Sprintf("k%d-%d", i, j)})
				if err != nil {
					t.Errorf("KeysMessage: %v", err)
					return
				}
				if err := b.Publish(ctx, p); err != nil {
					t.Errorf("Publish: %v", err)
					return
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	// A sentinel published after every message: when a bus sees it, it has
	// dispatched everything published before (one connection, in order).
	publishForeign(t, s.Client(t), bs[0], "done", "sentinel")
	for i, b := range bs {
		wantKeys(t, recv(t, done[i].inv, fmt.Sprintf("bus %d: sentinel", i)), "sentinel")
		hs[i].mu.Lock()
		if got, want := len(hs[i].keys), (buses-1)*each; got != want {
			t.Errorf("bus %d: received %d distinct keys, want %d", i, got, want)
		}
		for k, n := range hs[i].keys {
			if n != 1 {
				t.Errorf("bus %d: key %q delivered %d times, want 1", i, k, n)
			}
			if strings.HasPrefix(k, fmt.Sprintf("k%d-", i)) {
				t.Errorf("bus %d: its own key %q was delivered", i, k)
			}
		}
		for o := range buses {
			for j := range each {
				if k := fmt.Sprintf("k%d-%d", o, j); o != i && hs[i].keys[k] != 1 {
					t.Errorf("bus %d: key %q lost", i, k)
				}
			}
		}
		hs[i].mu.Unlock()
		st := b.Stats()
		// Applied: every stress message, plus the sentinel once its handler
		// call has returned (it may not have yet).
		if st.Own != each || st.Applied < (buses-1)*each || st.Applied > (buses-1)*each+1 || st.Malformed != 0 || st.Ignored != 0 || st.Reconnects != 0 {
			t.Errorf("bus %d: Stats() = %+v, want Own %d, Applied %d (+1), no malformed/ignored/reconnects", i, st, each, (buses-1)*each)
		}
		if e := b.Epoch(); e != epochs[i] {
			t.Errorf("bus %d: Epoch() = %d after the stress, want %d (no fault)", i, e, epochs[i])
		}
	}
}

// TestMain fails the package when a test leaves a goroutine behind: every
// Bus must stop its receive goroutine (and its subscription) in Close.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// slowResync takes longer than HeartbeatTimeout to resync once asked to.
type slowResync struct {
	*recorder
	slow  atomic.Bool
	delay time.Duration
}

func (h *slowResync) Resync(ctx context.Context) error {
	if h.slow.Load() {
		time.Sleep(h.delay) // past ctx's deadline, as a slow handler might
	}
	return nil
}

// TestBusSlowResyncStaysLive: a resubscription whose resync takes longer
// than HeartbeatTimeout still ends live. L1 holds nothing from before the
// new epoch, so the stream needs confirming only from then on; counted from
// the SUBSCRIBE, the Bus would time out right after going live, and again
// after every resubscription, never staying live.
func TestBusSlowResyncStaysLive(t *testing.T) {
	const timeout = 300 * time.Millisecond
	s := redistest.Start(t)
	b := newTestBus(t, s, s.Client(t), Options{HeartbeatInterval: 50 * time.Millisecond, HeartbeatTimeout: timeout, BreakerThreshold: -1})
	h := &slowResync{recorder: newRecorder(t, b), delay: timeout + 100*time.Millisecond}
	if _, err := b.Register("ns", h); err != nil {
		t.Fatal(err)
	}
	waitLive(t, b)
	h.slow.Store(true)
	if n := s.KillPubSub(t); n < 1 {
		t.Fatalf("KillPubSub killed %d clients, want >= 1", n)
	}
	pollUntil(t, busWait, "the Bus back live after its slow resync", func() bool { return b.Stats().Reconnects >= 1 && b.Live() })
	epoch := b.Epoch()
	// Three timeouts without a reset: the Bus stays live.
	deadline := time.Now().Add(3 * timeout)
	for time.Now().Before(deadline) {
		if e := b.Epoch(); e != epoch {
			t.Fatalf("epoch %d -> %d within %v of going live: the stream was declared dead again (Stats %+v)", epoch, e, 3*timeout, b.Stats())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestNewRefusesShardedReplicaSubscription: a ClusterClient with ReadOnly
// (RouteByLatency and RouteRandomly set it) subscribes on replicas, and a
// replica answers pings ahead of the master's messages it has yet to
// receive, so New refuses sharded channels on one. Refused before any
// round trip: the client's nodes need not exist.
func TestNewRefusesShardedReplicaSubscription(t *testing.T) {
	for _, o := range []*redis.ClusterOptions{
		{Addrs: []string{"127.0.0.1:1"}, ReadOnly: true},
		{Addrs: []string{"127.0.0.1:1"}, RouteByLatency: true},
		{Addrs: []string{"127.0.0.1:1"}, RouteRandomly: true},
	} {
		cc := redis.NewClusterClient(o)
		b, err := New(cc, Options{ShardChannels: 2})
		if !errors.Is(err, ErrReplicaSubscription) {
			if b != nil {
				_ = b.Close()
			}
			t.Errorf("New(sharded) on a ClusterClient with ReadOnly %v, RouteByLatency %v, RouteRandomly %v: %v, want ErrReplicaSubscription",
				o.ReadOnly, o.RouteByLatency, o.RouteRandomly, err)
		}
		_ = cc.Close()
	}
}
