package tiered

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/invalidate"
)

// commandHook calls on(cmd) before each command a client sends on its own
// (pipelines are not seen).
type commandHook struct {
	on func(ctx context.Context, cmd redis.Cmder)
}

func (commandHook) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h commandHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.on(ctx, cmd)
		return next(ctx, cmd)
	}
}
func (commandHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestClear_DeletePatternFlushKeepsNewerGeneration: a DeletePattern that
// matches more than batchLimit keys publishes a namespace flush carrying
// the generation it read when it started. A Clear that ran meanwhile has
// already moved every instance to the next generation, and the late flush
// must not move them back: before, handler.Flush stored it, and every
// instance but the DeletePattern's own served the values Clear had removed,
// and wrote where the others never read, with the stream live, until it
// next resubscribed.
func TestClear_DeletePatternFlushKeepsNewerGeneration(t *testing.T) {
	ns := namespace(t)
	a, pa := proxied[string](t, srv, ns, Options{}, invalidate.Options{})
	b := direct[string](t, srv, ns, Options{}, invalidate.Options{})
	c := direct[string](t, srv, ns, Options{}, invalidate.Options{})
	ctx := ctxT(t)
	if err := b.c.Set(ctx, "old", "before-clear", 0); err != nil {
		t.Fatal(err)
	}
	items := make(map[string]string, batchLimit+1)
	for i := range batchLimit + 1 {
		items[fmt.Sprintf("p%04d", i)] = "x"
	}
	if err := a.c.SetMany(ctx, items, 0); err != nil {
		t.Fatal(err)
	}
	got := applied(b.c)
	// A's DeletePattern reads the generation first, then scans through a
	// slow link; C's Clear runs once the first SCAN is on its way.
	scanning := make(chan struct{})
	var once sync.Once
	a.rdb.AddHook(commandHook{on: func(_ context.Context, cmd redis.Cmder) {
		if cmd.Name() == "scan" {
			once.Do(func() { close(scanning) })
		}
	}})
	pa.SetLatency(40 * time.Millisecond)
	done := make(chan error, 1)
	go func() { _, err := a.c.DeletePattern(ctx, "p*"); done <- err }()
	await(t, scanning, "A's DeletePattern scanning")
	if err := c.c.Clear(ctx); err != nil {
		t.Fatal(err)
	}
	await(t, got, "C's flush on B")
	if err := <-done; err != nil {
		t.Fatalf("DeletePattern: %v", err)
	}
	pa.SetLatency(0)
	await(t, got, "A's DeletePattern flush on B")
	for name, in := range map[string]*instance[string]{"A": a, "B": b, "C": c} {
		if v, ok, err := in.c.Get(ctx, "old"); ok || err != nil {
			t.Errorf("%s after Clear returned: Get(old) = %q, %v, %v; want a miss (its generation %d, Redis's %s)",
				name, v, ok, err, in.c.nsGen.Load(), srv.Client(t).Get(ctx, in.c.genKey).Val())
		}
	}
	if err := b.c.Set(ctx, "new", "from-b", 0); err != nil {
		t.Fatal(err)
	}
	if v, ok, err := a.c.Get(ctx, "new"); !ok || err != nil || v != "from-b" {
		t.Errorf("A: Get(new) = %q, %v, %v after B's Set returned; want from-b", v, ok, err)
	}
}

// genGate holds a read of the namespace generation, made with a ctx that
// carries gateKey, between its reply and its return.
type genGate struct {
	genKey  atomic.Pointer[string]
	entered chan struct{}
	release chan struct{}
}

type gateKey struct{}

func (*genGate) DialHook(next redis.DialHook) redis.DialHook { return next }
func (g *genGate) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if k := g.genKey.Load(); k != nil && ctx.Value(gateKey{}) != nil && cmd.Name() == "get" && len(cmd.Args()) == 2 && cmd.Args()[1] == *k {
			g.entered <- struct{}{}
			<-g.release
		}
		return err
	}
}
func (*genGate) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestDegraded_GenerationReadLeavesResync: while the stream is dead, a read
// takes the namespace generation from Redis, for itself only. Before, it
// stored it as the cache's: a reply read before a Clear, stored after the
// Bus had resubscribed and its Resync had stored the Clear's generation,
// left the instance live on the retired generation, serving what the
// Clear removed and writing where no other instance reads.
func TestDegraded_GenerationReadLeavesResync(t *testing.T) {
	ns := namespace(t)
	busRdb, p := proxyClient(t, srv)
	bus := newBus(t, standalone{srv}, busRdb, invalidate.Options{HeartbeatInterval: 50 * time.Millisecond, HeartbeatTimeout: 300 * time.Millisecond, BreakerThreshold: -1})
	gate := &genGate{entered: make(chan struct{}, 1), release: make(chan struct{})}
	cacheRdb := srv.Client(t)
	cacheRdb.AddHook(gate)
	a, err := New[string](ns, cacheRdb, bus, Options{KeyPrefix: srv.Prefix()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	gk := a.genKey
	gate.genKey.Store(&gk)
	b := direct[string](t, srv, ns, Options{}, invalidate.Options{})
	ctx := ctxT(t)
	if err := b.c.Set(ctx, "k", "before-clear", 0); err != nil {
		t.Fatal(err)
	}
	p.Refuse(true)
	p.Cut()
	eventually(t, 5*time.Second, "A's Bus dead", func() bool { return !bus.Live() })
	done := make(chan struct{})
	go func() { defer close(done); _, _, _ = a.Get(context.WithValue(ctx, gateKey{}, true), "k") }()
	await(t, gate.entered, "the degraded read's generation GET")
	if err := b.c.Clear(ctx); err != nil {
		t.Fatal(err)
	}
	p.Refuse(false)
	waitLiveT(t, bus, 5*time.Second)
	if g := a.nsGen.Load(); g != 1 {
		t.Fatalf("after Resync, A's generation = %d, want 1", g)
	}
	close(gate.release)
	<-done
	if !bus.Live() {
		t.Fatal("A's Bus is no longer live")
	}
	if v, ok, err := a.Get(ctx, "k"); ok || err != nil {
		t.Errorf("A, live, after Clear returned: Get(k) = %q, %v, %v; want a miss (A's generation %d, Redis's 1)", v, ok, err, a.nsGen.Load())
	}
	if err := a.Set(ctx, "n", "from-a", 0); err != nil {
		t.Fatal(err)
	}
	if v, ok, err := b.c.Get(ctx, "n"); !ok || err != nil || v != "from-a" {
		t.Errorf("B: Get(n) = %q, %v, %v after A's Set returned; want from-a", v, ok, err)
	}
}

// TestGeneration_ResyncOrderedWithFlush: a sharded Bus calls Resync from
// the goroutine of whichever channel resubscribed, while a flush can
// arrive on channel 0's. A Resync whose read of the generation predates a
// Clear must not store it after that Clear's flush was applied: the
// instance would be live on the retired generation. Resync holds the
// cache's generation lock across its read, so the flush applies after it.
func TestGeneration_ResyncOrderedWithFlush(t *testing.T) {
	ns := namespace(t)
	gate := &genGate{entered: make(chan struct{}, 1), release: make(chan struct{})}
	rdb := srv.Client(t)
	rdb.AddHook(gate)
	bus := newBus(t, standalone{srv}, srv.Client(t), invalidate.Options{})
	a, err := New[string](ns, rdb, bus, Options{KeyPrefix: srv.Prefix()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	gk := a.genKey
	gate.genKey.Store(&gk)
	ctx := ctxT(t)
	h := handler[string]{a}
	resynced := make(chan error, 1)
	go func() { resynced <- h.Resync(context.WithValue(ctx, gateKey{}, true)) }()
	await(t, gate.entered, "Resync's read of the generation") // it read 0
	g, err := srv.Client(t).Incr(ctx, a.genKey).Uint64()      // a Clear elsewhere
	if err != nil {
		t.Fatal(err)
	}
	flushed := make(chan struct{})
	go func() { h.Flush(g); close(flushed) }() // its flush, on another channel's goroutine
	select {
	case <-flushed: // without the lock, the flush lands while Resync holds its read
	case <-time.After(50 * time.Millisecond): // with it, the flush waits for Resync
	}
	close(gate.release)
	if err := <-resynced; err != nil {
		t.Fatal(err)
	}
	<-flushed
	if got := a.nsGen.Load(); got != g {
		t.Fatalf("generation after a Resync that read 0 and the flush of Clear's %d = %d, want %d", g, got, g)
	}
}

// TestClear_KeepsNewerGenerationFromFlush: a Clear stores the generation
// its script returned, but another instance's later Clear can be applied
// here (its flush) before that reply arrives. The older generation must
// not replace the newer one. A's commands go through a slow link, its Bus
// does not: B's flush overtakes A's reply.
func TestClear_KeepsNewerGenerationFromFlush(t *testing.T) {
	ns := namespace(t)
	rdb, p := proxyClient(t, srv)
	bus := newBus(t, standalone{srv}, srv.Client(t), invalidate.Options{})
	a, err := New[string](ns, rdb, bus, Options{KeyPrefix: srv.Prefix(), CommandTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	b := direct[string](t, srv, ns, Options{}, invalidate.Options{})
	ctx := ctxT(t)
	got := applied(a)
	server := srv.Client(t)
	p.SetLatency(300 * time.Millisecond)
	cleared := make(chan error, 1)
	go func() { cleared <- a.Clear(ctx) }()
	eventually(t, 5*time.Second, "A's Clear to reach Redis (generation 1)", func() bool {
		return server.Get(ctx, a.genKey).Val() == "1"
	})
	if err := b.c.Clear(ctx); err != nil { // generation 2
		t.Fatal(err)
	}
	await(t, got, "B's flush applied on A")
	if err := <-cleared; err != nil {
		t.Fatal(err)
	}
	if g := a.nsGen.Load(); g != 2 {
		t.Fatalf("A's generation after its Clear (1) and B's later one (2, applied first) = %d, want 2", g)
	}
}

// TestNew_RedisDownAtStart: a cache opened while Redis does not answer
// starts anyway (before, New failed on reading the namespace generation,
// and an instance restarted during an outage could not come up), serves
// Remember from its loader meanwhile, and once Redis answers uses the
// namespace's real generation: it reads what the others wrote, and they
// read what it writes.
func TestNew_RedisDownAtStart(t *testing.T) {
	ns := namespace(t)
	b := direct[string](t, srv, ns, Options{}, invalidate.Options{})
	ctx := ctxT(t)
	for range 2 {
		if err := b.c.Clear(ctx); err != nil { // generation 2
			t.Fatal(err)
		}
	}
	if err := b.c.Set(ctx, "k", "from-b", 0); err != nil {
		t.Fatal(err)
	}
	rdb, p := proxyClient(t, srv)
	p.Refuse(true)
	bus, err := invalidate.New(rdb, invalidate.Options{Prefix: srv.Prefix(), HeartbeatInterval: 50 * time.Millisecond, HeartbeatTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { bus.Close() })
	a, err := New[string](ns, rdb, bus, Options{KeyPrefix: srv.Prefix()})
	if err != nil {
		t.Fatalf("New while Redis does not answer: %v", err)
	}
	t.Cleanup(func() { a.Close() })
	v, err := a.Remember(ctx, "k", func(context.Context, string) (string, error) { return "from-loader", nil })
	if err != nil || v != "from-loader" {
		t.Fatalf("Remember while Redis is down = %q, %v; want the loader's value", v, err)
	}
	p.Refuse(false)
	waitLiveT(t, bus, 5*time.Second)
	mustGet(t, a, "k", "from-b", "A once Redis answers")
	if err := a.Set(ctx, "n", "from-a", 0); err != nil {
		t.Fatal(err)
	}
	mustGet(t, b.c, "n", "from-a", "B after A's Set")
}

// TestGeneration_UnknownIgnoresStaleFlush: a cache that could not read the
// namespace generation at New (its client could not reach Redis) while its
// Bus is live takes the generation from Redis on its next call, not from a
// flush it hears first. A large DeletePattern's flush carries the
// generation it read when it started, which a Clear may have retired since;
// before, the cache adopted it as known and stayed, live, on the retired
// generation: it served what the Clear removed and wrote where no other
// instance reads.
func TestGeneration_UnknownIgnoresStaleFlush(t *testing.T) {
	ns := namespace(t)
	b := direct[string](t, srv, ns, Options{}, invalidate.Options{})
	c := direct[string](t, srv, ns, Options{}, invalidate.Options{})
	ctx := ctxT(t)
	if err := b.c.Set(ctx, "old", "before-clear", 0); err != nil {
		t.Fatal(err)
	}
	items := make(map[string]string, batchLimit+1)
	for i := range batchLimit + 1 {
		items[fmt.Sprintf("p%04d", i)] = "x"
	}
	if err := b.c.SetMany(ctx, items, 0); err != nil {
		t.Fatal(err)
	}
	// B's DeletePattern reads generation 0, then waits at its first SCAN
	// while C's Clear moves the namespace to 1.
	scanning, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	b.rdb.AddHook(commandHook{on: func(_ context.Context, cmd redis.Cmder) {
		if cmd.Name() == "scan" {
			once.Do(func() { close(scanning); <-release })
		}
	}})
	done := make(chan error, 1)
	go func() { _, err := b.c.DeletePattern(ctx, "p*"); done <- err }()
	await(t, scanning, "B's DeletePattern scanning")
	if err := c.c.Clear(ctx); err != nil {
		t.Fatal(err)
	}
	// A starts now: its Bus is live, its cache's client cannot reach Redis.
	rdb, p := proxyClient(t, srv)
	p.Refuse(true)
	bus := newBus(t, standalone{srv}, srv.Client(t), invalidate.Options{})
	a, err := New[string](ns, rdb, bus, Options{KeyPrefix: srv.Prefix()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	if a.genKnown.Load() {
		t.Fatal("A read the generation through a refusing proxy")
	}
	got := applied(a)
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("DeletePattern: %v", err)
	}
	await(t, got, "B's DeletePattern flush (generation 0) on A")
	p.Refuse(false)
	if v, ok, err := a.Get(ctx, "old"); ok || err != nil {
		t.Errorf("A after Clear returned: Get(old) = %q, %v, %v; want a miss (its generation %d, Redis's 1)", v, ok, err, a.nsGen.Load())
	}
	if err := a.Set(ctx, "n", "from-a", 0); err != nil {
		t.Fatal(err)
	}
	mustGet(t, b.c, "n", "from-a", "B after A's Set")
}

// lostReply fails, once armed, the next script a client runs after Redis
// has run it, as a reply lost to a deadline would.
type lostReply struct{ armed *atomic.Bool }

func (lostReply) DialHook(next redis.DialHook) redis.DialHook { return next }
func (h lostReply) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if n := cmd.Name(); err == nil && (n == "evalsha" || n == "eval") && h.armed.CompareAndSwap(true, false) {
			cmd.SetErr(context.DeadlineExceeded)
			return context.DeadlineExceeded
		}
		return err
	}
}
func (lostReply) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestClear_LostReplyRereadsGeneration: a Clear whose reply is lost may
// have moved the generation all the same, and this process's Bus skips its
// own flush. Its later writes must use the generation Redis has: before,
// they kept the old one until the outbox's replay of the Clear, so a
// Delete that returned on A left B serving the value B had written after
// the Clear.
func TestClear_LostReplyRereadsGeneration(t *testing.T) {
	ns := namespace(t)
	rdb := srv.Client(t)
	armed := new(atomic.Bool)
	rdb.AddHook(lostReply{armed})
	a := newInstance[string](t, srv, ns, rdb, Options{}, invalidate.Options{})
	b := direct[string](t, srv, ns, Options{}, invalidate.Options{})
	ctx := ctxT(t)
	// The replay of the failed Clear waits for the end of the test.
	release := make(chan struct{})
	a.c.mu.Lock()
	a.c.beforeReplay = func() { <-release }
	a.c.mu.Unlock()
	t.Cleanup(func() { close(release) })
	got := applied(b.c)
	armed.Store(true)
	if err := a.c.Clear(ctx); err == nil {
		t.Fatal("Clear with its reply lost returned nil")
	}
	await(t, got, "A's flush on B")
	if err := b.c.Set(ctx, "k", "after-clear", 0); err != nil {
		t.Fatal(err)
	}
	mustGet(t, b.c, "k", "after-clear", "B after its Set")
	if err := a.c.Delete(ctx, "k"); err != nil {
		t.Fatal(err)
	}
	await(t, got, "A's Delete on B")
	if v, ok, err := b.c.Get(ctx, "k"); ok || err != nil {
		t.Errorf("B after A's Delete returned: Get(k) = %q, %v, %v; want a miss (A's generation %d, Redis's %s)",
			v, ok, err, a.c.nsGen.Load(), srv.Client(t).Get(ctx, a.c.genKey).Val())
	}
}

// TestClear_AfterGenerationKeyLost: Redis can lose the generation key
// alone (an allkeys-* maxmemory policy evicts it: it has no TTL and is
// rarely read), while the instances keep using the generation they hold.
// A Clear must still move every one of them to a generation no key was
// written under: before, its INCR started again from 1, below theirs,
// advanceGen kept theirs, and the Clear returned having cleared nothing.
func TestClear_AfterGenerationKeyLost(t *testing.T) {
	fleet := newFleet[string](t, shared, 2, Options{})
	a, b := fleet[0], fleet[1]
	ctx := ctxT(t)
	got := applied(b.c)
	for range 2 {
		if err := a.c.Clear(ctx); err != nil {
			t.Fatal(err)
		}
		await(t, got, "A's flush on B")
	}
	if err := a.c.Set(ctx, "k", "before-clear", 0); err != nil {
		t.Fatal(err)
	}
	await(t, got, "A's Set on B")
	mustGet(t, b.c, "k", "before-clear", "B before the Clear")
	if err := a.rdb.Del(ctx, a.c.genKey).Err(); err != nil { // evicted
		t.Fatal(err)
	}
	if err := a.c.Clear(ctx); err != nil {
		t.Fatal(err)
	}
	await(t, got, "A's flush on B")
	for name, in := range map[string]*instance[string]{"A": a, "B": b} {
		if v, ok, err := in.c.Get(ctx, "k"); ok || err != nil {
			t.Errorf("%s after Clear returned: Get(k) = %q, %v, %v; want a miss (its generation %d)", name, v, ok, err, in.c.nsGen.Load())
		}
	}
}

// TestClear_ShardedFlushPrecedesLaterWrites: on a sharded Bus, a Clear's
// flush and the invalidation of a write made after it travel on different
// channels, which each Bus reads on its own goroutine. Held back on shard
// 0's channel (as a slow link would), the flush let instance C apply the
// later write's invalidation first, read the key again under the retired
// generation and return its value from before the Clear. The Clear now
// copies its flush to every shard's channel before it returns, so the
// write's invalidation waits behind the flush on its own channel; a Bus
// applies the first copy to arrive and skips the others once it has.
func TestClear_ShardedFlushPrecedesLaterWrites(t *testing.T) {
	const shards = 4
	f := newFleetBus[string](t, shared, 2, Options{}, invalidate.Options{ShardChannels: shards})
	a, c := f[0].c, f[1].c
	ctx := ctxT(t)
	key := ""
	for i := 0; key == ""; i++ {
		if k := fmt.Sprint("k", i); a.shard(k) != 0 {
			key = k
		}
	}
	done := applied(c)
	if err := a.Set(ctx, key, "before", 0); err != nil {
		t.Fatal(err)
	}
	await(t, done, "C applied the first Set's invalidation")
	if v, ok, err := c.Get(ctx, key); err != nil || !ok || v != "before" {
		t.Fatalf("C's Get = %q, %v, %v; want before", v, ok, err)
	}

	flushes := make(chan struct{}, 2*shards)
	release := make(chan struct{})
	c.mu.Lock()
	c.beforeFlush = func() { flushes <- struct{}{}; <-release }
	c.mu.Unlock()
	defer func() {
		select {
		case <-release:
		default:
			close(release)
		}
	}()
	cb := f[1].bus
	received := cb.Stats().Received
	if err := a.Clear(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.Set(ctx, key, "after", 0); err != nil {
		t.Fatal(err)
	}
	// One flush is held in C's handler; the copies that reach C's other
	// shard goroutines wait for it (and are then skipped as duplicates).
	// Once C has received a copy on every shard channel, the goroutine of
	// the key's channel is stuck behind its copy, ahead of the Set's
	// invalidation. Without the copies, that goroutine applies the
	// invalidation at once instead.
	await(t, flushes, "C's handler got the Clear's flush")
	for deadline := time.Now().Add(5 * time.Second); cb.Stats().Received < received+shards; {
		select {
		case <-done:
			// C applied the Set's invalidation with the flush held back.
			if v, ok, err := c.Get(ctx, key); err != nil || ok && v == "before" {
				t.Fatalf("C's Get after the Set's invalidation, with the Clear's flush held back = %q, %v, %v: the value from before the Clear", v, ok, err)
			}
			t.Fatal("C applied the Set's invalidation before the Clear's flush on its channel")
		case <-time.After(time.Millisecond): // Received has no event: poll it
		}
		if time.Now().After(deadline) {
			t.Fatalf("C received %d messages of the Clear's %d flushes within 5s", cb.Stats().Received-received, shards)
		}
	}
	select {
	case <-done:
		t.Fatal("C applied a message while the Clear's flush was held")
	default:
	}
	close(release)
	await(t, done, "C applied the flush")
	await(t, done, "C applied the Set's invalidation")
	// The copies are skipped as their goroutines get the lock, in any
	// order with the Set's invalidation.
	eventually(t, 5*time.Second, "C skipped the flush's copies", func() bool { return cb.Stats().Duplicates >= shards-1 })
	if st := cb.Stats(); st.Duplicates != shards-1 || st.Applied != 3 {
		t.Errorf("C skipped %d copies of the flush and applied %d messages, want %d and 3 (the first Set, the flush, the second Set)", st.Duplicates, st.Applied, shards-1)
	}
	if v, ok, err := c.Get(ctx, key); err != nil || !ok || v != "after" {
		t.Fatalf("C's Get = %q, %v, %v; want after", v, ok, err)
	}
}
