package tiered

import (
	"errors"
	"fmt"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"
	"strings"
	"time"

	"github.com/tiercache/tiercache/invalidate"
)

// Mode selects the tiers a Cache uses.
type Mode uint8

const (
	// ModeTiered (the default) keeps an L1 in process memory in front of
	// Redis, kept coherent by the Bus.
	ModeTiered Mode = iota
	// ModeMemory runs the L1 alone: no Redis, no Bus. It is what
	// CACHE_TYPE=memory selects, for rollback and for tests of code that
	// embeds the cache. Nothing is shared between instances.
	ModeMemory
	// ModeRedis uses Redis alone, without an L1.
	ModeRedis
)

func (m Mode) String() string {
	switch m {
	case ModeTiered:
		return "tiered"
	case ModeMemory:
		return "memory"
	case ModeRedis:
		return "redis"
	}
	return fmt.Sprintf("Mode(%d)", m)
}

// ParseMode maps the CACHE_TYPE values "redis" (and "tiered", ""), "memory"
// and "redis-only" to a Mode.
func ParseMode(s string) (Mode, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "redis", "tiered":
		return ModeTiered, nil
	case "memory":
		return ModeMemory, nil
	case "redis-only", "l2":
		return ModeRedis, nil
	}
	return 0, fmt.Errorf("tiered: unknown cache type %q (want redis, memory or redis-only)", s)
}

// Defaults for Options.
const (
	DefaultTTL            = time.Hour
	DefaultL1TTL          = time.Minute
	DefaultTTLJitter      = 0.1
	DefaultL1MaxCost      = 64 << 20
	DefaultMaxKeyLen      = 1024
	DefaultMaxValueSize   = 1 << 20
	DefaultCompressAbove  = 1024
	DefaultTombstoneTTL   = 30 * time.Second
	DefaultSchema         = "1"
	DefaultCommandTimeout = 500 * time.Millisecond
	DefaultLoadTimeout    = 10 * time.Second
	DefaultNegativeTTL    = 30 * time.Second
	DefaultRetryThrottle  = 5 * time.Second
)

// Options configures a Cache. The zero value is valid: a tiered cache with
// JSON values, an hour in Redis, a minute in L1, 64 MiB of L1.
type Options struct {
	// Mode selects the tiers. Zero is ModeTiered.
	Mode Mode

	// KeyPrefix starts every Redis key of this cache. Zero means the Bus's
	// prefix (invalidate.DefaultPrefix). Keys are
	// <KeyPrefix><namespace>:<Schema>:<generation>:{<key>} (docs/wire.md).
	// It should hold no brace, which would take over the keys' hash tag; on
	// a sharded Bus, New refuses one.
	KeyPrefix string

	// Schema versions the stored bytes: change it when V's encoding changes
	// incompatibly, and old and new deployments read separate keys. Zero
	// means DefaultSchema.
	Schema string

	// Codec encodes values for Redis. Nil means JSON.
	Codec Codec

	// PlainJSON stores JSON.stringify-compatible bytes with no envelope at
	// exactly KeyPrefix+key, so a Node.js service and this cache can share L2
	// during a migration. It forces the JSON codec and disables compression.
	// Clear becomes a SCAN+UNLINK of the prefix, and Delete a plain DEL:
	// with no tombstone, a Remember whose loader read the source before a
	// delete can store the old value after the Delete returned (it lives
	// until TTL; a Set is still safe, since a fill never overwrites a key
	// that exists). So it needs a KeyPrefix of its own: not empty and not the Bus's,
	// under which every namespace keeps its keys (New refuses both), and
	// not shared with another plain-JSON cache, whose keys Clear would
	// delete too. A value under the prefix this cache cannot decode (the
	// Node.js side's, of another shape, or over MaxValueSize) is a miss,
	// counted as corrupt: never deleted, never overwritten by Remember. Absence (NegativeTTL) is remembered in L1
	// alone: plain JSON has no form for it that the Node.js side would read
	// as such. Lease is not available.
	PlainJSON bool

	// CompressAbove s2-compresses encoded values longer than this many
	// bytes. Zero means DefaultCompressAbove; negative disables compression.
	CompressAbove int

	// TTL is how long a value lives in Redis when a write passes ttl 0.
	// Zero means DefaultTTL.
	TTL time.Duration

	// L1TTL bounds how long an entry lives in process memory. It is a
	// backstop only: invalidations and the Bus's liveness keep L1 coherent.
	// An entry never outlives the Redis key it was read from. Zero means
	// DefaultL1TTL; negative disables L1 (like ModeRedis; New refuses it
	// with ModeMemory, which runs on L1 alone).
	L1TTL time.Duration

	// TTLJitter shortens every TTL (L1 and L2) by a random fraction up to
	// this much, so keys written together do not expire together. Zero means
	// DefaultTTLJitter; negative disables jitter. At most 0.5.
	TTLJitter float64

	// L1MaxCost bounds L1 in bytes (approximate: encoded size plus key plus a
	// fixed overhead per entry). Zero means DefaultL1MaxCost. The hot index
	// that serves most L1 hits adds 24 bytes per 8 KiB of it (between 1,024
	// and 65,536 slots), outside this bound.
	L1MaxCost int64

	// MaxKeyLen rejects longer keys with ErrInvalidKey. Zero means
	// DefaultMaxKeyLen.
	MaxKeyLen int

	// MaxValueSize rejects writes whose encoded value is larger, with
	// ErrValueTooLarge, and reads of larger values are treated as corrupt.
	// Zero means DefaultMaxValueSize.
	MaxValueSize int

	// CopyOnRead makes every read return a fresh copy decoded from the
	// stored bytes, for callers that mutate what they get. It costs a decode
	// and allocations on every L1 hit. Without it, values returned by the
	// cache are shared and must be treated as read-only.
	CopyOnRead bool

	// TombstoneTTL is how long Delete leaves a tombstone in Redis so that a
	// load that started before the delete cannot store its older value
	// afterwards. It should exceed the longest load. Zero means
	// DefaultTombstoneTTL.
	TombstoneTTL time.Duration

	// LoadTimeout bounds a Remember load (the Redis reads, the loader and
	// the store): its context is cancelled then and the waiters get the
	// error. It must be shorter than TombstoneTTL, which fences late loads.
	// Zero means DefaultLoadTimeout.
	LoadTimeout time.Duration

	// FreshFor turns on stale-while-revalidate and fail-safe for Remember
	// and RememberMany. A value is fresh for FreshFor after it was written;
	// after that, and until TTL removes it from Redis, it is stale: Remember
	// returns it and refreshes it (see SoftTimeout), RememberMany returns
	// them and refreshes them in one background load, and while the loader
	// fails they keep returning it (fail-safe), retrying at most every
	// RetryThrottle. So TTL minus FreshFor is the longest a stale value is
	// served. Get returns stale values like any other. In ModeMemory a
	// value is fresh for FreshFor from when it was loaded or written (what
	// L1 keeps while Redis is down lives DegradedL1TTL at most, and goes
	// not stale). Zero disables it.
	FreshFor time.Duration

	// SoftTimeout is how long a Remember that found a stale value waits for
	// its refresh before returning the stale value; the refresh goes on in
	// the background either way. Zero means no wait at all: pure
	// stale-while-revalidate.
	SoftTimeout time.Duration

	// EagerRefresh, between 0 and 1, refreshes a value in the background
	// when a Remember or RememberMany finds it in L1 past that fraction of
	// its fresh period (0.8:
	// after 80% of FreshFor), so busy keys never go stale. It needs
	// FreshFor. Zero disables it.
	EagerRefresh float64

	// RetryThrottle is how long after a failed refresh Remember and
	// RememberMany serve the stale value without calling the loader again
	// for that key. Zero means
	// DefaultRetryThrottle.
	RetryThrottle time.Duration

	// Lease makes Remember load each key once across the whole fleet, not
	// once per instance: on a miss in Redis an instance takes a short lease
	// (SET NX PX, for a third of LoadTimeout, renewed while it loads) and
	// loads; the others poll Redis every 10 ms for its result, and take over
	// if the lease expires first (the holder died), so a dead holder delays
	// them a third of LoadTimeout at most and they keep two thirds of it to
	// load. Off by default: each waiting instance costs a Redis read per
	// poll. Each try at the lease reads the key in the same round trip, so
	// an instance that finds the lease free also finds whatever its last
	// holder stored, and does not load it again. RememberMany's batch loads
	// and refreshes take no lease. Limit: when the holder's loader fails,
	// the waiters do not get its error but take the lease one after another
	// and each load.
	Lease bool

	// NegativeTTL is how long a loader's ErrNotFound is remembered, in both
	// tiers (in ModeMemory and plain-JSON mode, in L1 alone). Zero means
	// DefaultNegativeTTL; negative disables negative caching: then a refresh
	// (FreshFor) that finds the key gone leaves a short tombstone
	// (TombstoneTTL) over the stale value instead (in ModeMemory and
	// plain-JSON mode it voids the stale value in L1).
	NegativeTTL time.Duration

	// DegradedL1TTL is how long L1 keeps a value filled while the
	// invalidation stream is not trusted (subscription lost, Redis
	// unreachable, circuit open): what a Remember loaded or a Set wrote
	// during an outage. Such entries are not invalidated by other instances,
	// so this is their staleness bound. Zero means the Bus's
	// HeartbeatTimeout, the bound that holds for every other fault;
	// negative means nothing is kept in L1 while degraded.
	DegradedL1TTL time.Duration

	// MeterProvider and TracerProvider receive the cache's telemetry (see
	// package metrics and the README's table of instruments). Nil means
	// the global providers. Nothing is recorded on an L1 hit: its counters
	// are exported by observable instruments at collection time.
	MeterProvider  metric.MeterProvider
	TracerProvider trace.TracerProvider

	// CommandTimeout bounds each Redis round trip the cache makes on a
	// caller's behalf, in addition to the caller's ctx. Zero means
	// DefaultCommandTimeout; negative means only ctx bounds it.
	CommandTimeout time.Duration
}

func (o Options) withDefaults(bus *invalidate.Bus) (Options, error) {
	var errs []error
	if o.PlainJSON {
		// Clear and a flush deleting every key under the prefix is right
		// for a prefix of its own, and wipes every namespace (their data,
		// their generations) under the shared default.
		busPrefix := invalidate.DefaultPrefix
		if bus != nil {
			busPrefix = bus.Prefix()
		}
		switch o.KeyPrefix {
		case "":
			errs = append(errs, errors.New("tiered: PlainJSON needs a KeyPrefix of its own: the prefix of the keys shared with the Node.js side, every one of which Clear deletes"))
		case busPrefix, invalidate.DefaultPrefix:
			errs = append(errs, fmt.Errorf("tiered: PlainJSON KeyPrefix %q is the Bus's, under which every namespace keeps its keys: Clear would delete them all; give it a prefix of its own", o.KeyPrefix))
		}
		if o.Lease {
			errs = append(errs, errors.New("tiered: Lease is not available with PlainJSON: its lease keys would sit among the keys shared with the Node.js side"))
		}
	}
	if o.KeyPrefix == "" {
		o.KeyPrefix = invalidate.DefaultPrefix
	}
	if o.Schema == "" {
		o.Schema = DefaultSchema
	}
	if o.Codec == nil || o.PlainJSON {
		o.Codec = JSON
	}
	if o.CompressAbove == 0 {
		o.CompressAbove = DefaultCompressAbove
	}
	if o.PlainJSON {
		o.CompressAbove = -1
	}
	if o.TTL == 0 {
		o.TTL = DefaultTTL
	}
	if o.L1TTL == 0 {
		o.L1TTL = DefaultL1TTL
	}
	if o.TTLJitter == 0 {
		o.TTLJitter = DefaultTTLJitter
	}
	if o.TTLJitter < 0 {
		o.TTLJitter = 0
	}
	if o.L1MaxCost == 0 {
		o.L1MaxCost = DefaultL1MaxCost
	}
	if o.MaxKeyLen == 0 {
		o.MaxKeyLen = DefaultMaxKeyLen
	}
	if o.MaxValueSize == 0 {
		o.MaxValueSize = DefaultMaxValueSize
	}
	if o.TombstoneTTL == 0 {
		o.TombstoneTTL = DefaultTombstoneTTL
	}
	if o.CommandTimeout == 0 {
		o.CommandTimeout = DefaultCommandTimeout
	}
	if o.LoadTimeout == 0 {
		o.LoadTimeout = DefaultLoadTimeout
	}
	if o.NegativeTTL == 0 {
		o.NegativeTTL = DefaultNegativeTTL
	}
	if o.RetryThrottle == 0 {
		o.RetryThrottle = DefaultRetryThrottle
	}
	if o.DegradedL1TTL == 0 {
		o.DegradedL1TTL = invalidate.DefaultHeartbeatTimeout
		if bus != nil {
			o.DegradedL1TTL = bus.HeartbeatTimeout()
		}
	}
	if o.Mode > ModeRedis {
		errs = append(errs, fmt.Errorf("tiered: unknown Mode %d", o.Mode))
	}
	if o.TTL < 0 {
		errs = append(errs, fmt.Errorf("tiered: TTL %v is negative", o.TTL))
	}
	if !(o.TTLJitter <= 0.5) { // NaN too: every jittered TTL would be garbage
		errs = append(errs, fmt.Errorf("tiered: TTLJitter %v is not at most 0.5", o.TTLJitter))
	}
	if o.L1MaxCost < 0 || o.MaxKeyLen < 0 || o.MaxValueSize < 0 || o.TombstoneTTL < 0 {
		errs = append(errs, errors.New("tiered: negative size or duration in Options"))
	}
	if o.LoadTimeout < 0 || o.LoadTimeout >= o.TombstoneTTL {
		errs = append(errs, fmt.Errorf("tiered: LoadTimeout %v must be positive and shorter than TombstoneTTL %v", o.LoadTimeout, o.TombstoneTTL))
	}
	if o.FreshFor < 0 || (o.FreshFor > 0 && o.FreshFor >= o.TTL) {
		errs = append(errs, fmt.Errorf("tiered: FreshFor %v must be shorter than TTL %v (the difference is the stale window)", o.FreshFor, o.TTL))
	}
	if !(o.EagerRefresh >= 0 && o.EagerRefresh < 1) || (o.EagerRefresh > 0 && o.FreshFor == 0) { // NaN too
		errs = append(errs, fmt.Errorf("tiered: EagerRefresh %v must be in [0, 1) and needs FreshFor", o.EagerRefresh))
	}
	if o.SoftTimeout < 0 || o.RetryThrottle < 0 {
		errs = append(errs, errors.New("tiered: negative SoftTimeout or RetryThrottle"))
	}
	if o.MaxKeyLen > invalidate.MaxKeyLen {
		errs = append(errs, fmt.Errorf("tiered: MaxKeyLen %d exceeds the wire limit %d", o.MaxKeyLen, invalidate.MaxKeyLen))
	}
	if o.Codec.ID() == 0 {
		errs = append(errs, errors.New("tiered: codec ID 0 is reserved"))
	}
	if strings.ContainsAny(o.Schema, ":{}") {
		errs = append(errs, fmt.Errorf("tiered: Schema %q must not contain ':', '{' or '}'", o.Schema))
	}
	if o.Mode == ModeMemory && o.L1TTL < 0 {
		errs = append(errs, fmt.Errorf("tiered: ModeMemory runs on L1 alone, and L1TTL %v disables L1: the cache would store nothing", o.L1TTL))
	}
	if o.Mode == ModeTiered && bus == nil {
		errs = append(errs, errors.New("tiered: ModeTiered needs a Bus"))
	}
	return o, errors.Join(errs...)
}
