package invalidate

import (
	"cmp"
	"context"
	crand "crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"reflect"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/redis/go-redis/v9"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/tiercache/tiercache/metrics"
)

// Defaults for Options.
const (
	DefaultPrefix            = "tc:"
	DefaultHeartbeatInterval = 250 * time.Millisecond
	DefaultHeartbeatTimeout  = time.Second
)

// Options configures a Bus. The zero value is valid.
type Options struct {
	// Prefix scopes the channel (and, by convention, every key of the caches
	// that use this Bus) so that two applications sharing one Redis never read
	// each other's messages. Zero means DefaultPrefix.
	Prefix string

	// HeartbeatInterval is how often the Bus pings Redis over its
	// subscription, whether or not messages flow. Zero means
	// DefaultHeartbeatInterval.
	HeartbeatInterval time.Duration

	// HeartbeatTimeout is how long the Bus may go without confirming that
	// its subscription is current before it declares the stream dead. A
	// pong confirms it as of when its ping was sent (and the subscription's
	// confirmation as of the SUBSCRIBE): everything published before then
	// has been received. Messages alone confirm nothing, as they may arrive
	// late. While dead, caches bypass L1; when the Bus subscribes again
	// every cache's L1 is invalidated. This is the staleness bound under
	// faults. Pings go out every HeartbeatInterval, so a link whose round
	// trip exceeds HeartbeatTimeout - HeartbeatInterval counts as dead.
	// Zero means DefaultHeartbeatTimeout. It must exceed HeartbeatInterval.
	HeartbeatTimeout time.Duration

	// Secret, when set, authenticates invalidation messages: every message
	// the Bus produces carries an HMAC-SHA256 tag under it, and the Bus
	// drops every message without a valid tag (counted in Stats.Rejected)
	// without applying it or voiding any L1 entry, so that a client allowed
	// to PUBLISH on the channel cannot invalidate or flush the caches.
	// Every instance on the channel must use the same Secret; enabling or
	// changing it on a running fleet drops the invalidations exchanged
	// between instances that disagree, until they all agree (docs/wire.md,
	// section 4.1, says what a tag does and does not protect). It must be
	// at least 16 bytes (32 random bytes is a good choice). Nil means
	// messages carry no tag and tags are not checked: such a Bus accepts
	// tagged and untagged messages alike. The Bus keeps its own copy and
	// never logs it.
	Secret []byte

	// Name tells this Bus's telemetry apart from another Bus's in the same
	// process (one per Redis deployment): every Bus series carries it as
	// the tiercache.bus attribute. Empty means Prefix, "@" and the client's
	// first address (such as "tc:@redis:6379").
	Name string

	// Logger receives state changes (stream lost and regained). Nil means
	// silent. Nothing is logged per message.
	Logger *slog.Logger

	// BreakerThreshold is how many Redis calls in a row may fail (see
	// [Unavailable]) before the circuit opens. Zero means
	// DefaultBreakerThreshold; negative disables the breaker.
	BreakerThreshold int

	// BreakerCooldown is how long the circuit stays open before the Bus
	// probes Redis again in the background. Zero means
	// DefaultBreakerCooldown.
	BreakerCooldown time.Duration

	// MeterProvider and TracerProvider receive the Bus's telemetry (see
	// package metrics). Nil means the global providers.
	MeterProvider  metric.MeterProvider
	TracerProvider trace.TracerProvider

	// ShardChannels, when positive, carries invalidations over sharded
	// pub/sub (SSUBSCRIBE/SPUBLISH, Redis 7 and later) on that many
	// channels instead of one classic channel. Each channel has its own
	// hash tag, so in a Redis Cluster the channels, and the load of
	// delivering invalidations, spread over the shards instead of every
	// message being broadcast to every node. The Bus holds one connection
	// per channel; a channel whose slot migrates is resubscribed (Redis
	// sends sunsubscribe; go-redis does not resubscribe by itself), and L1 is
	// voided as after any gap. Caches on such a Bus keep each key in the
	// slot of one of the channels (docs/wire.md), so a write and its
	// invalidation stay one transaction. Zero means classic pub/sub, which
	// a cluster broadcasts to every node. On a ClusterClient that reads
	// from replicas, New refuses it (ErrReplicaSubscription).
	ShardChannels int

	// OutboxLimit bounds the keys kept in the outbox (see [Bus.Defer]);
	// beyond it a namespace degrades to a flush. Zero means
	// DefaultOutboxLimit.
	OutboxLimit int
}

func (o Options) withDefaults() (Options, error) {
	if o.Prefix == "" {
		o.Prefix = DefaultPrefix
	}
	if o.HeartbeatInterval == 0 {
		o.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if o.HeartbeatTimeout == 0 {
		o.HeartbeatTimeout = DefaultHeartbeatTimeout
	}
	if o.BreakerThreshold == 0 {
		o.BreakerThreshold = DefaultBreakerThreshold
	}
	if o.BreakerCooldown <= 0 {
		o.BreakerCooldown = DefaultBreakerCooldown
	}
	if o.OutboxLimit <= 0 {
		o.OutboxLimit = DefaultOutboxLimit
	}
	if o.ShardChannels < 0 || o.ShardChannels > 1024 {
		return o, fmt.Errorf("invalidate: ShardChannels %d out of range 0..1024", o.ShardChannels)
	}
	switch {
	case o.HeartbeatInterval < 0 || o.HeartbeatTimeout < 0:
		return o, errors.New("invalidate: negative heartbeat duration")
	case o.HeartbeatTimeout <= o.HeartbeatInterval:
		return o, fmt.Errorf("invalidate: HeartbeatTimeout %v must exceed HeartbeatInterval %v", o.HeartbeatTimeout, o.HeartbeatInterval)
	}
	return o, nil
}

// defaultName is Options.Name's default: prefix@address of the client's
// first node.
func defaultName(rdb redis.UniversalClient, prefix string) string {
	var addr string
	switch c := rdb.(type) {
	case *redis.Client:
		addr = c.Options().Addr
	case *redis.ClusterClient:
		if a := c.Options().Addrs; len(a) > 0 {
			addr = a[0]
		}
	}
	if addr == "" {
		return prefix
	}
	return prefix + "@" + addr
}

// Handler receives the messages of one namespace. Its methods are called
// from the Bus's receive goroutine, outside any lock of the Bus. A Bus with
// ShardChannels has one receive goroutine per channel, and calls a
// handler's methods concurrently from them: Resync on one channel can
// overlap Invalidate or Flush on another. They must return quickly and must
// not block on Redis (but for Resync and FlushResync): a slow handler delays
// every other namespace's invalidations.
type Handler interface {
	// Invalidate is called with the keys of a received keys message.
	// The slice must not be retained.
	Invalidate(keys []string)
	// Flush is called for a received namespace flush; gen is the
	// namespace's new generation (see docs/wire.md). A Bus with a Secret
	// never calls it: see Resync.
	Flush(gen uint64)
	// Resync is called after every (re)subscription, before the Bus reports
	// itself live again, so the handler can re-read state it may have missed
	// (a namespace generation). An error keeps the Bus dead and the
	// subscription is retried. ctx is bounded by HeartbeatTimeout.
	//
	// A Bus with a Secret also calls it, while live, in place of Flush for
	// an authenticated flush, whose generation the tag does not cover; the
	// Bus then voids every L1 entry (a new epoch). An error then ends the
	// subscription, as a gap in the stream would.
	Resync(ctx context.Context) error
}

// FlushResyncer is implemented by handlers that can apply an authenticated
// flush on their own: re-read the namespace's generation from Redis (the
// message's generation is not covered by the tag) and void their own L1.
// Without it, a Bus with a Secret calls Resync and voids every namespace's
// L1 (a new epoch).
type FlushResyncer interface {
	FlushResync(ctx context.Context) error
}

// namespaceLimit is the longest namespace a message can carry.
const namespaceLimit = 255

// ErrClosed is returned by Bus methods called after Close.
var ErrClosed = errors.New("invalidate: bus closed")

// ErrDuplicateNamespace is returned by Register when the namespace already
// has a handler on this Bus.
var ErrDuplicateNamespace = errors.New("invalidate: namespace already registered")

// ErrReplicaSubscription is returned by New for sharded channels
// (ShardChannels) on a ClusterClient that reads from replicas (ReadOnly,
// which RouteByLatency and RouteRandomly set): go-redis then subscribes on a
// replica, which receives the master's messages by replication, later than
// it answers the Bus's pings. A pong would no longer prove that every
// message published before its ping has arrived, and the Bus could trust a
// lagging stream.
var ErrReplicaSubscription = errors.New("invalidate: sharded channels on a ClusterClient that reads from replicas would be subscribed on replicas, whose lag the heartbeats cannot see")

// Bus is the invalidation stream of one process for one Redis deployment.
// Caches of every namespace share it. It owns a receive goroutine and a
// pub/sub connection per channel (one, or ShardChannels), and the outbox's
// goroutine, all stopped by Close; it never closes the Redis client it was
// given.
//
// All methods are safe for concurrent use.
type Bus struct {
	rdb     redis.UniversalClient
	opts    Options
	channel string
	origin  [16]byte
	auth    *auth // nil without Options.Secret

	// flushMu serialises the application of namespace flushes, and
	// flushes remembers the last ones applied: a sharded Clear publishes
	// one flush on every shard channel (each read by its own goroutine),
	// and only the first to arrive is applied; the others wait until it
	// has been, then skip it (see dispatch).
	flushMu sync.Mutex
	flushes [64]flushID
	flushAt int

	// epoch is even while the stream is trusted (subscribed, and the
	// circuit closed) and odd otherwise; it changes on every transition, so
	// an entry filled under epoch e is valid only while epoch is still e.
	// It is written under stateMu.
	epoch   atomic.Uint64
	stateMu sync.Mutex

	// The circuit breaker (breaker.go).
	open      atomic.Bool
	fails     atomic.Int32
	openedAt  atomic.Int64
	opens     atomic.Uint64
	closes    atomic.Uint64
	replaying chan struct{} // holds a token while a replay runs: one at a time, waited for under a ctx
	wake      chan struct{}
	obDone    chan struct{}
	obMu      sync.Mutex
	outbox    map[string]*pendingNS // under obMu
	obKeys    int                   // keys in outbox, under obMu
	obFlushes int                   // flushes in outbox, under obMu
	obSeq     uint64                // under obMu
	depth     atomic.Int64          // obKeys + obFlushes
	deferred  atomic.Uint64
	replayed  atomic.Uint64
	dropped   atomic.Uint64
	overflows atomic.Uint64
	lastHeard atomic.Int64 // unix ns
	seq       atomic.Uint64

	received, applied, own, ignored, malformed, rejected, reconnects atomic.Uint64
	duplicates                                                       atomic.Uint64
	resets                                                           atomic.Uint64 // epoch changes

	tel *metrics.Bus

	mu       sync.RWMutex
	handlers map[string]*registration
	closed   bool

	subs     []*sub     // one per channel
	psMu     sync.Mutex // guards every sub's ps, and psClosed
	psClosed bool

	liveCh    chan struct{} // closed and replaced on every transition to live
	liveMu    sync.Mutex
	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
}

// New starts a Bus on rdb. It returns at once; the Bus becomes live (see
// [Bus.Live]) when its subscription is confirmed, usually within a
// millisecond. Until then caches read L2 directly. Call Close to stop it.
func New(rdb redis.UniversalClient, opts Options) (*Bus, error) {
	if isNil(rdb) {
		return nil, errors.New("invalidate: nil Redis client")
	}
	opts, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if cc, ok := rdb.(*redis.ClusterClient); ok && opts.ShardChannels > 0 && cc.Options().ReadOnly {
		return nil, ErrReplicaSubscription
	}
	b := &Bus{
		rdb:       rdb,
		opts:      opts,
		handlers:  make(map[string]*registration),
		liveCh:    make(chan struct{}),
		stop:      make(chan struct{}),
		done:      make(chan struct{}),
		wake:      make(chan struct{}, 1),
		replaying: make(chan struct{}, 1),
		obDone:    make(chan struct{}),
		outbox:    make(map[string]*pendingNS),
	}
	if b.auth, err = newAuth(opts.Secret); err != nil {
		return nil, err
	}
	b.opts.Secret = nil // only auth keeps it
	if _, err := crand.Read(b.origin[:]); err != nil {
		return nil, fmt.Errorf("invalidate: instance id: %w", err)
	}
	if opts.ShardChannels == 0 {
		b.subs = []*sub{{channel: opts.Prefix + "inv:1"}}
	} else {
		for i := range opts.ShardChannels {
			b.subs = append(b.subs, &sub{channel: b.ShardChannel(i), sharded: true})
		}
	}
	b.channel = b.subs[0].channel
	b.epoch.Store(1) // dead until the first subscription is confirmed
	b.tel, err = metrics.NewBus(metrics.Providers{Meter: opts.MeterProvider, Tracer: opts.TracerProvider}, cmp.Or(opts.Name, defaultName(rdb, opts.Prefix)), b.telemetry)
	if err != nil {
		return nil, fmt.Errorf("invalidate: telemetry: %w", err)
	}
	var runs sync.WaitGroup
	for _, s := range b.subs {
		runs.Go(func() { b.run(s) })
	}
	go func() {
		runs.Wait()
		close(b.done)
	}()
	go b.outboxLoop()
	return b, nil
}

// sub is one channel's subscription.
type sub struct {
	channel string
	sharded bool
	ps      *redis.PubSub // the current one, under Bus.psMu; Close closes it to interrupt a blocked read
	live    bool          // confirmed, under Bus.stateMu
}

// Shards is Options.ShardChannels: 0 for classic pub/sub.
func (b *Bus) Shards() int { return b.opts.ShardChannels }

// ShardTag is the hash tag of shard channel i (0 <= i < Shards()): a
// cache on a sharded Bus puts each key under one shard's tag, so the key
// and the channel its invalidation goes to share a cluster slot.
func (b *Bus) ShardTag(i int) string { return b.opts.Prefix + "s" + strconv.Itoa(i) }

// ShardChannel is the name of shard channel i.
func (b *Bus) ShardChannel(i int) string { return b.opts.Prefix + "inv:1:{" + b.ShardTag(i) + "}" }

// Prefix returns the prefix of every Redis key and channel of this Bus
// (Options.Prefix), which is also where caches keep their keys by default.
func (b *Bus) Prefix() string { return b.opts.Prefix }

// Channel is the Redis channel the Bus publishes to outside writes: the
// one classic channel, or with ShardChannels shard channel 0.
func (b *Bus) Channel() string { return b.channel }

// Origin is this Bus's random instance ID, carried in every message it
// creates.
func (b *Bus) Origin() [16]byte { return b.origin }

// Epoch reports the stream's epoch: even while live, odd while dead. It
// changes on every transition and whenever the Bus voids every L1 entry
// (an unreadable message). Caches compare an entry's epoch with it on every
// L1 hit; it is a single atomic load.
func (b *Bus) Epoch() uint64 { return b.epoch.Load() }

// HeartbeatTimeout is the Bus's configured silence bound: how long a dead
// stream can go unnoticed, and so the staleness bound under faults.
func (b *Bus) HeartbeatTimeout() time.Duration { return b.opts.HeartbeatTimeout }

// Live reports whether the stream is currently trusted: subscribed, and the
// circuit breaker closed.
func (b *Bus) Live() bool { return b.epoch.Load()&1 == 0 }

// LastHeard is when the Bus last received anything on its subscription; the
// zero Time if never.
func (b *Bus) LastHeard() time.Time {
	ns := b.lastHeard.Load()
	if ns == 0 {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// WaitLive blocks until the stream is live or ctx is done.
func (b *Bus) WaitLive(ctx context.Context) error {
	for {
		b.liveMu.Lock()
		ch := b.liveCh
		b.liveMu.Unlock()
		if b.Live() {
			return nil
		}
		select {
		case <-ch:
		case <-b.done:
			return ErrClosed
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Register routes the messages of namespace ns to h and returns a function
// that removes it. One handler per namespace per Bus.
//
// Unregistering also drops what the outbox still holds for ns, since only
// its handler can replay it: the entries are counted in
// Stats().OutboxDropped, logged, and their number returned (a namespace
// flush counts as one). A cache replays them first (ReplayNow) as it
// closes.
func (b *Bus) Register(ns string, h Handler) (unregister func() (dropped int), err error) {
	if ns == "" || len(ns) > namespaceLimit || !utf8.ValidString(ns) {
		return nil, fmt.Errorf("invalidate: namespace %q must be 1..%d bytes of UTF-8", ns, namespaceLimit)
	}
	if isNil(h) {
		return nil, errors.New("invalidate: nil Handler")
	}
	reg := &registration{h: h}
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return nil, ErrClosed
	}
	if _, dup := b.handlers[ns]; dup {
		return nil, fmt.Errorf("%w: %q", ErrDuplicateNamespace, ns)
	}
	b.handlers[ns] = reg
	var once sync.Once
	return func() (dropped int) {
		once.Do(func() {
			b.mu.Lock()
			defer b.mu.Unlock()
			if b.handlers[ns] != reg { // compare registrations: handlers need not be comparable
				return
			}
			delete(b.handlers, ns)
			// Only the handler could name these keys in Redis: with it
			// gone, they are dropped here, in the same step, so that the
			// caller learns of them (no replay can see ns without its
			// handler and drop them unreported in between).
			b.obMu.Lock()
			dropped = b.dropLocked(ns)
			b.obMu.Unlock()
		})
		if dropped > 0 {
			b.logf(slog.LevelWarn, "tiercache: outbox entries dropped unreplayed: other instances may serve what the failed writes replaced until it expires",
				"namespace", ns, "invalidations", dropped)
		}
		return dropped
	}, nil
}

// registration is one Register call; its pointer identifies it.
type registration struct{ h Handler }

// isNil reports whether v is nil or a typed nil pointer, map, func or
// interface inside an interface.
func isNil(v any) bool {
	if v == nil {
		return true
	}
	switch rv := reflect.ValueOf(v); rv.Kind() {
	case reflect.Pointer, reflect.Map, reflect.Func, reflect.Interface, reflect.Slice, reflect.Chan:
		return rv.IsNil()
	}
	return false
}

// KeysMessage encodes an invalidation of keys in namespace ns, stamped with
// this Bus's origin, the next sequence number and the current time. The
// caller publishes it, usually in the transaction that mutates L2.
func (b *Bus) KeysMessage(ns string, keys []string) ([]byte, error) {
	m := Message{Origin: b.origin, Seq: b.seq.Add(1), Time: time.Now().UnixNano(), Namespace: ns, Kind: KindKeys, Keys: keys}
	return b.auth.marshal(&m)
}

// FlushMessagePrefix encodes a namespace flush without its trailing
// generation: a script appends the uvarint of the generation it created
// (see docs/wire.md), so the flush and its generation are one atomic step.
func (b *Bus) FlushMessagePrefix(ns string) ([]byte, error) {
	m := Message{Origin: b.origin, Seq: b.seq.Add(1), Time: time.Now().UnixNano(), Namespace: ns, Kind: KindFlush, Gen: 0}
	p, err := b.auth.marshal(&m)
	if err != nil {
		return nil, err
	}
	return p[:len(p)-1], nil // uvarint(0) is one byte
}

// Publish sends an encoded message on the channel. Writes that mutate L2
// publish inside their own script instead, so that the mutation and its
// invalidation cannot half-happen.
func (b *Bus) Publish(ctx context.Context, msg []byte) error {
	var err error
	if b.opts.ShardChannels > 0 {
		err = b.rdb.SPublish(ctx, b.channel, msg).Err()
	} else {
		err = b.rdb.Publish(ctx, b.channel, msg).Err()
	}
	if err != nil {
		return fmt.Errorf("invalidate: publish: %w", err)
	}
	return nil
}

// PublishCopies publishes a flush msg, already published with Publish, on
// every other shard channel too (none without ShardChannels), so that on
// each channel it comes before whatever is published there after it. Each
// channel is received on its own goroutine, so nothing else orders a
// message on one channel with a message on another. A Bus applies the
// first copy of a flush to arrive and skips the others once it has
// (Stats.Duplicates): copies share their origin and sequence number.
func (b *Bus) PublishCopies(ctx context.Context, msg []byte) error {
	if b.opts.ShardChannels < 2 {
		return nil
	}
	p := b.rdb.Pipeline()
	for i := 1; i < b.opts.ShardChannels; i++ {
		p.SPublish(ctx, b.ShardChannel(i), msg)
	}
	if _, err := p.Exec(ctx); err != nil {
		return fmt.Errorf("invalidate: publish copies: %w", err)
	}
	return nil
}

// Stats is a snapshot of the Bus's counters.
type Stats struct {
	Live       bool
	LastHeard  time.Time
	Reconnects uint64 // subscriptions confirmed after the first
	Received   uint64 // messages received
	Applied    uint64 // messages handed to a handler
	Own        uint64 // this Bus's own messages, skipped (see dispatch)
	Ignored    uint64 // messages for namespaces with no handler here
	Malformed  uint64 // messages that failed to decode
	Rejected   uint64 // messages dropped for want of a valid tag (Options.Secret)
	Duplicates uint64 // copies of a flush already applied, skipped (a sharded Clear sends one per shard channel)

	CircuitOpen   bool   // the circuit breaker is open
	CircuitOpens  uint64 // times it opened
	CircuitCloses uint64 // times a probe closed it
	OutboxDepth   int    // keys and namespace flushes waiting to be replayed
	Deferred      uint64 // invalidations put in the outbox
	Replayed      uint64 // invalidations replayed from it
	OutboxDropped uint64 // invalidations dropped unreplayed: their cache or the Bus closed first, or their namespace had no cache here
	Overflows     uint64 // times a namespace degraded to a flush because the outbox was full
	Resets        uint64 // epoch changes: each voided every namespace's L1 here
}

// Stats returns the Bus's counters.
func (b *Bus) Stats() Stats {
	return Stats{
		Live: b.Live(), LastHeard: b.LastHeard(), Reconnects: b.reconnects.Load(),
		Received: b.received.Load(), Applied: b.applied.Load(), Own: b.own.Load(), Ignored: b.ignored.Load(), Malformed: b.malformed.Load(), Rejected: b.rejected.Load(), Duplicates: b.duplicates.Load(),
		CircuitOpen: b.open.Load(), CircuitOpens: b.opens.Load(), CircuitCloses: b.closes.Load(),
		OutboxDepth: b.OutboxDepth(), Deferred: b.deferred.Load(), Replayed: b.replayed.Load(), OutboxDropped: b.dropped.Load(), Overflows: b.overflows.Load(),
		Resets: b.resets.Load(),
	}
}

// telemetry is the Bus's figures for its observable instruments.
func (b *Bus) telemetry() metrics.BusSnapshot {
	st := b.Stats()
	s := metrics.BusSnapshot{
		Live: st.Live, Reconnects: st.Reconnects, Resets: st.Resets, Received: st.Received,
		Applied: st.Applied, Own: st.Own, Ignored: st.Ignored, Malformed: st.Malformed, Rejected: st.Rejected,
		CircuitOpen: st.CircuitOpen, CircuitOpens: st.CircuitOpens, OutboxDepth: st.OutboxDepth,
		Deferred: st.Deferred, Replayed: st.Replayed, Overflows: st.Overflows, Dropped: st.OutboxDropped,
		HeartbeatTimeout: b.opts.HeartbeatTimeout,
	}
	if !st.LastHeard.IsZero() {
		s.SinceHeard = time.Since(st.LastHeard)
	}
	return s
}

// Close stops the receive goroutine, waits for it and closes the
// subscription. It is idempotent and safe to call concurrently; it does not
// close the Redis client. It returns at once, except while the Bus is
// resubscribing to a Redis that does not answer (go-redis cannot abandon a
// connection handshake, so Close then waits up to HeartbeatTimeout), or
// while a closing cache replays its outbox entries (bounded by that
// cache's Close or Shutdown).
//
// Close the caches first: each replays its outbox entries as it closes.
// Whatever the outbox still holds when the Bus closes is dropped, counted
// and logged, and Close returns an error wrapping ErrOutboxDropped (only the
// first call does).
func (b *Bus) Close() error {
	var err error
	b.closeOnce.Do(func() {
		b.mu.Lock()
		b.closed = true
		b.mu.Unlock()
		close(b.stop)
		b.psMu.Lock()
		b.psClosed = true
		for _, s := range b.subs {
			if s.ps != nil {
				_ = s.ps.Close() // interrupts a read blocked in ReceiveTimeout
			}
		}
		b.psMu.Unlock()
		<-b.done
		<-b.obDone
		b.replaying <- struct{}{} // after a cache's ReplayNow, bounded by its ctx
		b.obMu.Lock()
		n := 0
		for ns := range b.outbox {
			n += b.dropLocked(ns)
		}
		b.obMu.Unlock()
		<-b.replaying
		if n > 0 {
			b.logf(slog.LevelWarn, "tiercache: Bus closed with outbox entries unreplayed; they are dropped", "invalidations", n)
			err = fmt.Errorf("invalidate: close: %d invalidations dropped: %w", n, ErrOutboxDropped)
		}
		b.tel.Close()
	})
	return err
}

// setLive records whether s's subscription is confirmed and moves the
// epoch accordingly: the stream is trusted only while every channel is.
// Only s's receive goroutine calls it.
func (b *Bus) setLive(s *sub, live bool) {
	b.stateMu.Lock()
	s.live = live
	b.updateEpochLocked()
	b.stateMu.Unlock()
}

// updateEpochLocked moves the epoch to the next even (trusted) or odd
// (untrusted) value if the state calls for it: trusted means subscribed
// with the circuit closed.
func (b *Bus) updateEpochLocked() {
	live := !b.open.Load()
	for _, s := range b.subs {
		live = live && s.live
	}
	e := b.epoch.Load()
	if (e&1 == 0) == live {
		return
	}
	b.epoch.Store(e + 1)
	b.resets.Add(1)
	if live {
		b.liveMu.Lock()
		close(b.liveCh)
		b.liveCh = make(chan struct{})
		b.liveMu.Unlock()
	}
}

func (b *Bus) logf(level slog.Level, msg string, args ...any) {
	if b.opts.Logger != nil {
		b.opts.Logger.Log(context.Background(), level, msg, append([]any{"channel", b.channel}, args...)...)
	}
}

// run owns the subscription: subscribe, confirm, receive with a deadline,
// ping when idle, and on any error or silence declare the stream dead,
// drop the connection and start over with backoff.
func (b *Bus) run(s *sub) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-b.stop:
			cancel()
		case <-ctx.Done():
		}
	}()

	backoff := time.Duration(0)
	first := true
	for {
		if backoff > 0 {
			t := time.NewTimer(backoff + rand.N(backoff/2+1))
			select {
			case <-b.stop:
				t.Stop()
				return
			case <-t.C:
			}
		}
		wasLive, err := b.session(ctx, s, &first)
		b.setLive(s, false)
		select {
		case <-b.stop:
			return
		default:
		}
		if wasLive {
			backoff = 0
			b.logf(slog.LevelWarn, "tiercache: invalidation stream lost; L1 bypassed until resubscribed", "subscription", s.channel, "err", err)
		}
		if cc, ok := b.rdb.(*redis.ClusterClient); ok {
			// A moved slot (sunsubscribe) or a failed-over master: route
			// the next subscription with a fresh slot map.
			cc.ReloadState(ctx)
		}
		// Capped near HeartbeatTimeout: a stream back after an outage is
		// trusted again within about one timeout, not seconds later.
		backoff = min(max(2*backoff, 25*time.Millisecond), max(b.opts.HeartbeatTimeout, 250*time.Millisecond))
	}
}

// session runs one subscription until it fails. It returns why.
func (b *Bus) session(ctx context.Context, s *sub, first *bool) (wasLive bool, err error) {
	var ps *redis.PubSub
	if s.sharded {
		ps = b.rdb.SSubscribe(ctx)
	} else {
		ps = b.rdb.Subscribe(ctx)
	}
	b.psMu.Lock()
	if b.psClosed {
		b.psMu.Unlock()
		_ = ps.Close()
		return false, ErrClosed
	}
	s.ps = ps
	b.psMu.Unlock()
	defer func() {
		b.psMu.Lock()
		s.ps = nil
		b.psMu.Unlock()
		_ = ps.Close()
	}()
	sentAt := time.Now() // everything published before this is delivered before the confirmation
	subCtx, cancel := context.WithTimeout(ctx, b.opts.HeartbeatTimeout)
	if s.sharded {
		// A ClusterClient routes the connection by the channel's slot.
		err = ps.SSubscribe(subCtx, s.channel)
	} else {
		err = ps.Subscribe(subCtx, s.channel)
	}
	cancel()
	if err != nil {
		return wasLive, fmt.Errorf("subscribe: %w", err)
	}
	// heard is how current the stream is known to be: the send time of the
	// last command (SUBSCRIBE, PING) whose reply has arrived. Replies and
	// messages share one ordered connection, so every message published
	// before that command reached Redis has been received by then. The
	// stream is dead once heard is HeartbeatTimeout old. A message's
	// arrival does not move heard: it says nothing of how late it is. So a
	// stream that still delivers but lags (a slow link, a backlog in Redis's
	// output buffer) and then goes silent is declared dead HeartbeatTimeout
	// after the last moment it was known current, not after its last late
	// message, and no L1 entry outlives the bound by the lag.
	heard := sentAt
	lastPing := time.Now()
	var pings []time.Time // send times of the unanswered pings, oldest first
	for {
		now := time.Now()
		if now.Sub(heard) >= b.opts.HeartbeatTimeout {
			return wasLive, errors.New("heartbeat timeout: nothing confirmed current for HeartbeatTimeout")
		}
		// Pings go out on a schedule, answered or not, so that a lagging
		// stream still confirms itself every HeartbeatInterval + its lag.
		if now.Sub(lastPing) >= b.opts.HeartbeatInterval {
			pctx, cancel := context.WithTimeout(ctx, b.opts.HeartbeatInterval)
			err := ps.Ping(pctx)
			cancel()
			if err != nil {
				return wasLive, fmt.Errorf("ping: %w", err)
			}
			pings, lastPing = append(pings, now), now
		}
		wait := min(b.opts.HeartbeatTimeout-time.Since(heard), b.opts.HeartbeatInterval-time.Since(lastPing))
		msg, err := ps.ReceiveTimeout(ctx, max(wait, time.Millisecond))
		if err != nil {
			if ctx.Err() != nil {
				return wasLive, ctx.Err()
			}
			var ne net.Error
			if !errors.As(err, &ne) || !ne.Timeout() {
				return wasLive, fmt.Errorf("receive: %w", err)
			}
			continue
		}
		b.lastHeard.Store(time.Now().UnixNano())
		if _, ok := msg.(*redis.Pong); ok && len(pings) > 0 {
			heard, pings = pings[0], pings[1:]
		}
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind != "subscribe" && m.Kind != "ssubscribe" {
				return wasLive, fmt.Errorf("server sent %s", m.Kind)
			}
			// Everything published while we were not subscribed is lost:
			// let handlers resync, then trust the stream under a new epoch.
			if err := b.resync(ctx); err != nil {
				return wasLive, fmt.Errorf("resync: %w", err)
			}
			// Invalidations this process could not send go out before
			// its own L1 is trusted again.
			if err := b.replay(ctx, ""); err != nil {
				return wasLive, fmt.Errorf("replay outbox: %w", err)
			}
			// A confirmation can only arrive after a dead period (the epoch
			// is odd), so setLive always moves to a fresh even epoch.
			if !*first {
				b.reconnects.Add(1)
				b.logf(slog.LevelInfo, "tiercache: invalidation stream regained; L1 flushed")
			}
			*first = false
			b.setLive(s, true)
			wasLive = true
			// The new epoch voided L1, so whatever it holds from now on was
			// read after this instant: for it, the stream is as current as
			// it needs to be here, however long the resync and replay took.
			heard = time.Now()
		case *redis.Message:
			if err := b.dispatch(ctx, m.Payload); err != nil {
				return wasLive, err
			}
		case *redis.Pong:
		}
	}
}

func (b *Bus) resync(ctx context.Context) error {
	b.mu.RLock()
	hs := make([]Handler, 0, len(b.handlers))
	for _, r := range b.handlers {
		hs = append(hs, r.h)
	}
	b.mu.RUnlock()
	ctx, cancel := context.WithTimeout(ctx, b.opts.HeartbeatTimeout)
	defer cancel()
	for _, h := range hs {
		if err := h.Resync(ctx); err != nil {
			return err
		}
	}
	return nil
}

// dispatch applies one received message. An error ends the subscription.
func (b *Bus) dispatch(ctx context.Context, payload string) error {
	b.received.Add(1)
	if isOwn(payload, &b.origin) {
		b.own.Add(1) // see below; checked before decoding, as every write echoes here
		return nil
	}
	data := []byte(payload)
	var m Message
	if err := m.UnmarshalBinary(data); err != nil {
		b.malformed.Add(1)
		if b.auth != nil {
			// With a Secret, what cannot be authenticated is dropped:
			// voiding L1 for it would let anyone who may PUBLISH force
			// resets, which is what the Secret is for.
			return nil
		}
		// It may have been an invalidation we cannot read (a newer
		// version, say): assume the worst and void every L1 entry, as for
		// a gap in the stream, without leaving the live state.
		b.stateMu.Lock()
		b.epoch.Add(2)
		b.resets.Add(1)
		b.stateMu.Unlock()
		return nil
	}
	if m.Origin == b.origin {
		// Our own write: the writer invalidated its L1 locally after the
		// write returned, which covers every fill that could have raced
		// with it. Applying the echo would only evict the next fresh entry.
		b.own.Add(1)
		return nil
	}
	if b.auth != nil && !b.auth.verify(data, &m) {
		b.rejected.Add(1)
		return nil
	}
	b.mu.RLock()
	r := b.handlers[m.Namespace]
	b.mu.RUnlock()
	if r == nil {
		b.ignored.Add(1)
		return nil
	}
	h := r.h
	if m.Kind == KindFlush {
		// A copy of a flush already applied (a sharded Clear sends one
		// per shard channel) is skipped, once that application is
		// complete: what follows the copy on its channel comes after the
		// flush, so it must not be applied before the flush has been.
		b.flushMu.Lock()
		defer b.flushMu.Unlock()
		id := flushID{m.Origin, m.Seq}
		if slices.Contains(b.flushes[:], id) {
			b.duplicates.Add(1)
			return nil
		}
		defer func() {
			b.flushes[b.flushAt] = id
			b.flushAt = (b.flushAt + 1) % len(b.flushes)
		}()
	}
	b.tel.Lag(ctx, time.Duration(time.Now().UnixNano()-m.Time))
	switch {
	case m.Kind == KindKeys:
		h.Invalidate(m.Keys)
	case b.auth == nil:
		h.Flush(m.Gen)
	default:
		// The tag cannot cover a flush's generation: a script appends it
		// after signing. Anyone who saw this flush could have republished
		// it with another one, so it is not used: the handler re-reads the
		// generation from Redis, and a new epoch voids every L1 entry
		// filled before (a flush is rare; see docs/wire.md, 4.1).
		rctx, cancel := context.WithTimeout(ctx, b.opts.HeartbeatTimeout)
		var err error
		if fr, ok := h.(FlushResyncer); ok {
			err = fr.FlushResync(rctx) // voids this namespace only
		} else if err = h.Resync(rctx); err == nil {
			b.stateMu.Lock()
			b.epoch.Add(2)
			b.resets.Add(1)
			b.stateMu.Unlock()
		}
		cancel()
		if err != nil {
			return fmt.Errorf("resync after an authenticated flush: %w", err)
		}
	}
	b.applied.Add(1)
	return nil
}

// flushID names a flush message: its origin and sequence number, which
// every copy of it shares.
type flushID struct {
	origin [16]byte
	seq    uint64
}

// isOwn reports whether an encoded message (versions 1 and 2: magic,
// version, kind, flags, then the 16-byte origin) comes from origin, without
// decoding it.
func isOwn(payload string, origin *[16]byte) bool {
	return len(payload) >= 20 && payload[0] == msgMagic && (payload[1] == msgVersion || payload[1] == msgVersionTagged) &&
		payload[4:20] == string(origin[:])
}
