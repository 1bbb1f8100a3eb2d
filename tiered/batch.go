package tiered

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/internal/flight"

	"github.com/tiercache/tiercache/invalidate"
	"github.com/tiercache/tiercache/metrics"
)

// batchLimit is how many keys one write transaction carries; larger
// batches are split, each part with its own invalidation.
const batchLimit = 1000

// batchKeyBytes bounds what one transaction's keys take in its invalidation
// message (each key and the uvarint of its length: keyWireLen), so that the
// message stays within invalidate.MaxMessageSize, which the Bus refuses to
// encode past. The rest of a message takes at most 314 bytes (docs/wire.md
// section 4: magic, version, kind and flags 4, origin 16, seq up to 10,
// time 8, namespace up to 2+255, key count up to 3, a Secret's tag 16); a
// KiB leaves room to spare. Split by key count alone, 300 keys of 4,000
// bytes (MaxKeyLen may be raised to invalidate.MaxKeyLen) made one message
// over the limit: the write failed, and so did every replay of its keys
// from the outbox, which kept them pending and the Bus from going live.
const batchKeyBytes = invalidate.MaxMessageSize - 1<<10

// keyWireLen is what key takes in an invalidation message: its bytes and
// the uvarint of its length (one byte below 128, two up to
// invalidate.MaxKeyLen).
func keyWireLen(key string) int {
	if len(key) < 1<<7 {
		return len(key) + 1
	}
	return len(key) + 2
}

// oneBatch reports whether keys fit one transaction as they are: at most
// batchLimit keys whose invalidation fits one message. A key longer than a
// message may carry (invalidate.MaxKeyLen) fits none: only DeletePattern
// meets one, matched in Redis (in plain-JSON mode the Node.js side's keys
// have no limit), and it flushes the namespace instead.
func oneBatch(keys []string) bool {
	if len(keys) > batchLimit {
		return false
	}
	n := 0
	for _, k := range keys {
		if len(k) > invalidate.MaxKeyLen {
			return false
		}
		n += keyWireLen(k)
	}
	return n <= batchKeyBytes
}

// GetMany returns the values stored under keys; missing keys are absent from
// the map. L1 hits are served first; the rest are read from Redis in one
// pipelined round trip. On error the map holds what was found before it.
// Like Get, it first waits for any Remember in this process that is
// loading one of those keys (all of them, before it reads any).
func (c *Cache[V]) GetMany(ctx context.Context, keys []string) (_ map[string]V, err error) {
	if err := c.checkKeys(keys); err != nil {
		return nil, err
	}
	if err := c.enter(); err != nil {
		return nil, err
	}
	defer c.leave()
	out, missing, err := c.l1Many(keys, nil)
	if err != nil {
		return out, err
	}
	if len(missing) == 0 {
		return out, nil
	}
	// Through the flight group, key by key: a key another call is already
	// reading is joined rather than read again, so no two fills of one key
	// race in L1 (which could leave the older value there).
	fkeys := make([]string, len(missing))
	// Snapshots are taken before the flights exist (see readL2), and before
	// the mode check (see getSlow).
	snaps := make(map[string]snapshot, len(missing))
	for i, k := range missing {
		fkeys[i] = flightKey(k)
		snaps[k] = c.snap(hashKey(k))
	}
	if c.memoryOnly() {
		return out, nil
	}
	if c.afterModeCheck != nil {
		for _, k := range missing {
			c.afterModeCheck(k)
		}
	}
	if err := ctx.Err(); err != nil {
		return out, err
	}
	start := time.Now()
	defer func() { c.tel.Op(ctx, metrics.OpGetMany, start, err) }()
	results := c.flights.DoMany(ctx, fkeys, c.opts.CommandTimeout, func(ctx context.Context, fkeys []string) (map[string]readResult[V], error) {
		keys := make([]string, len(fkeys))
		ss := make([]snapshot, len(fkeys))
		for i, fk := range fkeys {
			keys[i] = fk[1:]
			ss[i] = snaps[keys[i]]
		}
		return c.readL2(ctx, keys, ss)
	})
	err = c.collect(out, missing, results, true)
	return out, err
}

// l1Many answers what it can of keys from L1 and returns the keys left for
// Redis (each once). A negative entry answers "absent": the key is neither
// in out nor in missing. onHit, if not nil, sees every entry that answered a
// key with a value.
func (c *Cache[V]) l1Many(keys []string, onHit func(key string, e *entry[V])) (out map[string]V, missing []string, err error) {
	out = make(map[string]V, len(keys))
	seen := make(map[string]bool, len(keys))
	for _, k := range keys {
		if seen[k] {
			continue
		}
		seen[k] = true
		if c.l1 != nil {
			h := hashKey(k)
			if e, hit := c.l1Hit(h, k); hit {
				if !e.negative {
					v, _, err := c.readEntry(e)
					if err != nil {
						return out, nil, err
					}
					out[k] = v
					if onHit != nil {
						onHit(k, e)
					}
				}
				continue
			}
			c.st.l1Misses.Add(1)
		}
		missing = append(missing, k)
	}
	return out, missing, nil
}

// collect adds the found values of a DoMany over missing to out (private
// copies with CopyOnRead) and returns the first error, as the caller should
// see it. redisErrs says the flights' errors are Redis failures, counted in
// Stats.Errors (GetMany's; RememberMany's are its loader's).
func (c *Cache[V]) collect(out map[string]V, missing []string, results []flight.Result[readResult[V]], redisErrs bool) error {
	var first error
	for i, r := range results {
		switch {
		case r.Err != nil || r.Val.err != nil:
			if first == nil {
				first = cmp.Or(r.Err, r.Val.err)
			}
		case r.Val.found:
			v := r.Val.val
			if c.opts.CopyOnRead {
				var err error
				if v, _, err = c.copyValue(v); err != nil {
					return err
				}
			}
			out[missing[i]] = v
		}
	}
	var pe *flight.PanicError
	switch {
	case first == nil:
		return nil
	case c.closing.Load():
		return ErrClosed // the flights were cancelled by Close
	}
	if redisErrs {
		c.st.errors.Add(1)
	}
	if errors.As(first, &pe) {
		return &PanicError{Value: pe.Value, Stack: pe.Stack}
	}
	return first // the same failure, usually, for every key of a run
}

func (c *Cache[V]) readEntry(e *entry[V]) (V, bool, error) {
	if c.opts.CopyOnRead {
		return c.decodeCopy(e)
	}
	return e.val, true, nil
}

// SetMany stores every item for ttl (0 means Options.TTL), like Set, with
// one invalidation message per batch of up to 1,000 keys (fewer when the
// keys are long: a message holds at most about 1 MiB of them), each batch
// one atomic round trip.
func (c *Cache[V]) SetMany(ctx context.Context, items map[string]V, ttl time.Duration) error {
	keys := make([]string, 0, len(items))
	vals := make([]V, 0, len(items))
	for k, v := range items {
		keys = append(keys, k)
		vals = append(vals, v)
	}
	return c.set(ctx, keys, vals, ttl)
}

// set is Set and SetMany: validate and encode everything first, so bad
// input writes nothing, then write.
func (c *Cache[V]) set(ctx context.Context, keys []string, vals []V, ttl time.Duration) error {
	if ttl < 0 {
		return fmt.Errorf("%w: %v", ErrInvalidTTL, ttl)
	}
	if ttl == 0 {
		ttl = c.opts.TTL
	}
	var one [1][]byte // a Set's payload: no slice to allocate
	payloads := one[:0]
	if len(keys) > 1 {
		payloads = make([][]byte, 0, len(keys))
	}
	for i, k := range keys {
		if err := c.checkKey(k); err != nil {
			return err
		}
		raw, err := c.encodeRaw(vals[i])
		if err != nil {
			return fmt.Errorf("tiered: set %q: %w", k, err)
		}
		payloads = append(payloads, raw)
	}
	if err := c.enter(); err != nil {
		return err
	}
	defer c.leave()
	// Read before the mode check: a SetMode(ModeTiered) that ends memory
	// mode after it bumps the epoch, which voids what this stores. Read
	// after, a write that began in memory mode stored an entry valid in
	// tiered mode: a value Redis never had, served until L1TTL.
	ns := c.nsEpoch.Load()
	if c.memoryOnly() {
		// SetMode(ModeMemory): Redis must not keep what these replace.
		// Deferred before setMemory voids the keys, as write does: a read
		// in tiered mode again (SetMode back) then either finds them
		// pending or has its fill refused.
		c.deferKeys(keys)
		for i, k := range keys {
			c.setMemory(k, vals[i], payloads[i], ttl, ns)
		}
		return nil
	}
	op := metrics.OpSet
	if len(keys) != 1 {
		op = metrics.OpSetMany
	}
	err := c.write(ctx, op, keys, writeItems{payloads: payloads, ttl: ttl})
	if err != nil && c.l1 != nil && degraded(c.snap(0)) && c.opts.DegradedL1TTL > 0 {
		// Redis is unhealthy: serve what was written from L1 for the
		// degraded bound (automatic memory-only operation); the outbox
		// holds the keys' invalidation.
		for i, k := range keys {
			c.setDegraded(k, vals[i], payloads[i], ttl)
		}
	}
	return err
}

// DeleteMany deletes keys like Delete, in batches like SetMany.
func (c *Cache[V]) DeleteMany(ctx context.Context, keys ...string) error {
	if err := c.checkKeys(keys); err != nil {
		return err
	}
	if err := c.enter(); err != nil {
		return err
	}
	defer c.leave()
	if c.memoryOnly() {
		c.deferKeys(keys) // before the void: see set
		for _, k := range keys {
			c.invalidateLocal(k)
		}
		c.st.writes.Add(uint64(len(keys))) // as a tiered delete counts
		return nil
	}
	op := metrics.OpDelete
	if len(keys) != 1 {
		op = metrics.OpDeleteMany
	}
	return c.write(ctx, op, keys, writeItems{})
}

// writeItems is what a write stores under its keys: payloads[i] under
// keys[i], for ttl jittered per key; or, with payloads nil, a delete of
// every key (see item).
type writeItems struct {
	payloads [][]byte
	ttl      time.Duration
}

// item is what items write under their i-th key. A delete writes a
// tombstone, or in plain-JSON mode (where a tombstone would not be JSON to
// the Node.js side) a plain DEL, which item returns as a nil payload.
func (c *Cache[V]) item(items writeItems, i int) ([]byte, time.Duration) {
	if items.payloads != nil {
		return items.payloads[i], c.jitter(items.ttl)
	}
	if c.opts.PlainJSON {
		return nil, 0
	}
	return tombstone(), c.opts.TombstoneTTL
}

// write stores items under keys (or deletes keys) and publishes their
// invalidation in one MULTI/EXEC per batch: atomic, and one round trip.
// (A Lua script would do too, but measured 1.36x a bare SET against 1.01x
// for the transaction.) Neither SET nor PUBLISH can fail once queued, and a
// queueing error aborts the whole EXEC, so a write and its invalidation
// cannot half-happen. The local invalidation happens whatever the outcome:
// after a failed write this instance's L1 must not keep serving what it
// held before.
//
// A write that fails, or that the circuit breaker refuses, leaves its keys
// in the Bus's outbox: Redis may hold the values it meant to replace, and
// other instances may still serve them, until the outbox's replay deletes
// and invalidates them.
func (c *Cache[V]) write(ctx context.Context, op string, keys []string, items writeItems) (err error) {
	if len(keys) == 0 {
		// No round trip: nothing to tell the breaker, whose count of
		// failures in a row a reported success would reset.
		return nil
	}
	start := time.Now()
	defer func() { c.tel.Op(ctx, op, start, err) }()
	failed := keys
	err = c.admit()
	if err == nil {
		failed, err = c.writeRedis(ctx, keys, items, true)
		c.report(start, err)
		if err == nil {
			return nil
		}
	}
	c.st.errors.Add(1)
	// Outbox first, then void. A read takes its snapshot before it asks
	// whether its key is pending: one that snapshots before the void has
	// its fill refused, one after finds the key pending and does not read
	// Redis. Voided first, a read in between read Redis's old value and
	// kept it in L1 under a current snapshot, and the replay never voids
	// this process's L1 (its Bus skips its own messages).
	// Only the keys of the transactions that failed: each of the others
	// reached Redis with its invalidation, as a Set of its keys alone
	// would have. Deferred too, they were read from the loader until the
	// replay, which then deleted what they had written.
	c.deferKeys(failed)
	for _, k := range failed {
		c.invalidateLocal(k)
	}
	return err
}

// writeRedis is write without the breaker and the outbox: the outbox's
// replay uses it too. On error, failed holds the keys whose transaction
// may not have been applied: all of them, or on a split batch those of the
// transactions that failed.
//
// With local, the keys are voided in this process's L1 afterwards. A replay
// passes false: what L1 holds now was read after the failed write (from the
// loader, or written in memory mode) and is no older than what it replays.
func (c *Cache[V]) writeRedis(ctx context.Context, keys []string, items writeItems, local bool) (failed []string, err error) {
	if len(keys) == 0 {
		return nil, nil
	}
	ctx, span := c.tel.Span(ctx, "tiercache.l2.write", "MULTI", len(keys))
	defer func() { metrics.End(span, err) }()
	ctx, cancel := c.opCtx(ctx)
	defer cancel()
	gen, err := c.generation(ctx, c.snap(0))
	if err != nil {
		if local {
			for _, k := range keys {
				c.invalidateLocal(k)
			}
		}
		return keys, err
	}
	if _, cluster := c.rdb.(*redis.ClusterClient); len(keys) == 1 || c.tags == nil && !cluster && oneBatch(keys) {
		// One transaction: no split, no copies.
		if err := c.writeBatch(ctx, gen, keys, items, local); err != nil {
			return keys, err
		}
		return nil, nil
	}
	return c.writeBatches(ctx, gen, keys, items, local)
}

// writeBatches writes keys in the transactions batches assigns them to, and
// returns the keys of those that failed. A cluster's batches (one per slot)
// go out concurrently, a few at a time; each is still one atomic MULTI/EXEC.
func (c *Cache[V]) writeBatches(ctx context.Context, gen uint64, keys []string, items writeItems, local bool) (failed []string, err error) {
	batches := c.batches(gen, keys)
	errs := make([]error, len(batches))
	parts := make([][]string, len(batches))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for bi, idx := range batches {
		part := make([]string, len(idx))
		sub := writeItems{ttl: items.ttl}
		if items.payloads != nil {
			sub.payloads = make([][]byte, len(idx))
		}
		for i, j := range idx {
			part[i] = keys[j]
			if sub.payloads != nil {
				sub.payloads[i] = items.payloads[j]
			}
		}
		parts[bi] = part
		if len(batches) == 1 {
			errs[bi] = c.writeBatch(ctx, gen, part, sub, local)
			break
		}
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			errs[bi] = c.writeBatch(ctx, gen, part, sub, local)
		})
	}
	wg.Wait()
	for bi, err := range errs {
		if err != nil {
			failed = append(failed, parts[bi]...)
		}
	}
	return failed, errors.Join(errs...)
}

// writeBatch writes keys, which batches would put in one transaction, and
// their invalidation in one MULTI/EXEC. With local, it voids the keys in
// this process's L1 afterwards, whatever the outcome.
func (c *Cache[V]) writeBatch(ctx context.Context, gen uint64, keys []string, items writeItems, local bool) error {
	if local {
		defer func() {
			for _, k := range keys {
				c.invalidateLocal(k)
			}
		}()
	}
	msg, err := c.bus.KeysMessage(c.name, keys)
	if err != nil {
		return err
	}
	tx := c.rdb.TxPipeline()
	c.queueWrites(ctx, tx, gen, keys, items)
	var heard *redis.IntCmd
	if c.tags != nil { // one shard per batch: see batches
		heard = tx.SPublish(ctx, c.bus.ShardChannel(c.shard(keys[0])), msg)
	} else {
		tx.Publish(ctx, c.bus.Channel(), msg)
	}
	if _, err := tx.Exec(ctx); err != nil {
		if c.tags != nil && isTryAgain(err) {
			return c.writeApart(ctx, gen, keys, items, msg)
		}
		return fmt.Errorf("tiered: write %d keys: %w", len(keys), err)
	}
	if heard != nil && heard.Val() == 0 && c.subscribersOnMasters() {
		// Nobody heard it, not even this process's own Bus: the slot is
		// migrating, and the transaction ran on the node importing it,
		// while the channel's subscribers are still on the one exporting
		// it. Publish again, outside the transaction: a plain SPUBLISH goes
		// to the slot's owner, where they are.
		if err := c.publishShard(ctx, keys[0], msg); err != nil {
			return err
		}
	}
	c.st.writes.Add(uint64(len(keys)))
	c.st.published.Add(1)
	return nil
}

// queueWrites queues the SET or DEL of each key on p.
func (c *Cache[V]) queueWrites(ctx context.Context, p redis.Pipeliner, gen uint64, keys []string, items writeItems) {
	for i, k := range keys {
		payload, ttl := c.item(items, i)
		if payload == nil {
			p.Del(ctx, c.dataKey(gen, k))
		} else {
			p.Set(ctx, c.dataKey(gen, k), payload, max(ttl, time.Millisecond))
		}
	}
}

// writeApart is writeBatch for a sharded Bus while the keys' slot is being
// migrated and some of them have moved: the target refuses a transaction
// whose keys it does not all hold (TRYAGAIN), and the channel counts as one
// it never holds, for as long as the migration lasts. The keys are written
// on their own (go-redis follows each ASK), then the invalidation is
// published to the slot's owner, where the channel's subscribers still
// are. It is the one write that is not atomic with its invalidation: if
// the publish fails, the error sends the keys to the outbox, as for any
// failed write.
func (c *Cache[V]) writeApart(ctx context.Context, gen uint64, keys []string, items writeItems, msg []byte) error {
	p := c.rdb.Pipeline()
	c.queueWrites(ctx, p, gen, keys, items)
	if _, err := p.Exec(ctx); err != nil {
		return fmt.Errorf("tiered: write %d keys (slot migrating): %w", len(keys), err)
	}
	if err := c.publishShard(ctx, keys[0], msg); err != nil {
		return err
	}
	c.st.writes.Add(uint64(len(keys)))
	c.st.published.Add(1)
	return nil
}

// publishShard publishes msg on the channel of key's shard, on its own.
func (c *Cache[V]) publishShard(ctx context.Context, key string, msg []byte) error {
	if err := c.rdb.SPublish(ctx, c.bus.ShardChannel(c.shard(key)), msg).Err(); err != nil {
		return fmt.Errorf("tiered: publish invalidation (slot migrating): %w", err)
	}
	return nil
}

// subscribersOnMasters reports whether the Bus's sharded subscriptions are
// on the masters, so that an SPUBLISH that the master counts no subscriber
// for reached nobody. With a ReadOnly ClusterClient they are on replicas,
// which hear it through replication and which the count leaves out.
func (c *Cache[V]) subscribersOnMasters() bool {
	cc, ok := c.rdb.(*redis.ClusterClient)
	return ok && !cc.Options().ReadOnly
}

// isTryAgain reports whether err is Redis's TRYAGAIN: a multi-key command
// on a slot being migrated, some of whose keys have moved.
func isTryAgain(err error) bool {
	var re redis.Error
	return errors.As(err, &re) && strings.HasPrefix(re.Error(), "TRYAGAIN")
}

// batches splits keys (by index) into the write transactions that carry
// them: at most batchLimit keys each, whose invalidation fits one message
// (batchKeyBytes), and, in a cluster, keys of one slot each, since a
// transaction may not span slots there. PUBLISH has no key and rides along
// with any slot.
//
// On a sharded Bus every batch holds keys of one shard, whose channel its
// SPUBLISH uses (and whose tag puts the keys and the channel in one slot).
func (c *Cache[V]) batches(gen uint64, keys []string) [][]int {
	var out [][]int
	_, cluster := c.rdb.(*redis.ClusterClient)
	if c.tags != nil || (cluster && len(keys) > 1) {
		bySlot := make(map[uint16][]int)
		var order []uint16
		for i, k := range keys {
			var s uint16
			if c.tags != nil {
				s = uint16(c.shard(k))
			} else {
				s = keySlot(c.dataKey(gen, k))
			}
			if _, seen := bySlot[s]; !seen {
				order = append(order, s)
			}
			bySlot[s] = append(bySlot[s], i)
		}
		for _, s := range order {
			out = splitBatch(out, bySlot[s], keys)
		}
		return out
	}
	idx := make([]int, len(keys))
	for i := range idx {
		idx[i] = i
	}
	return splitBatch(out, idx, keys)
}

// splitBatch appends idx (indexes into keys) to out in runs of at most
// batchLimit keys that take at most batchKeyBytes in a message.
func splitBatch(out [][]int, idx []int, keys []string) [][]int {
	start, size := 0, 0
	for i, j := range idx {
		n := keyWireLen(keys[j])
		if i > start && (i-start == batchLimit || size+n > batchKeyBytes) {
			out = append(out, idx[start:i])
			start, size = i, 0
		}
		size += n
	}
	if start < len(idx) {
		out = append(out, idx[start:])
	}
	return out
}

// setMemory stores a value in L1 in ModeMemory: invalidate first, so no
// earlier entry survives, then store under the new snapshot, but for the
// namespace epoch ns, read before the write found the cache memory-only.
func (c *Cache[V]) setMemory(key string, v V, payload []byte, ttl time.Duration, ns uint64) {
	if c.l1 == nil {
		return
	}
	c.invalidateLocal(key)
	if c.beforeMemoryStore != nil {
		c.beforeMemoryStore(key)
	}
	h := xxhash.Sum64String(key)
	epoch := c.busEpoch()
	// Under an untrusted stream (SetMode(ModeMemory) while Redis is down)
	// no other instance's invalidation can reach it: DegradedL1TTL at most.
	ttl = c.degradedTTL(snapshot{epoch: epoch}, min(c.jitter(ttl), c.jitter(c.opts.L1TTL)))
	if ttl <= clockTick {
		return
	}
	e := &entry[V]{key: key, val: v, stripe: c.stripes[h&stripeMask].Load(), ns: ns, epoch: epoch,
		expires: expiry(ttl), cost: int64(len(payload) + len(key) + entryCost)}
	if e.epoch&1 == 0 { // a trusted stream: see degraded
		e.fresh, e.wid = c.localFreshness()
		c.setEager(e)
	}
	if c.opts.CopyOnRead {
		e.raw, _ = encode(c.opts.Codec, v)
	}
	c.store(h, e)
	c.st.writes.Add(1)
}

// setDegraded stores a value whose write Redis refused in L1, for at most
// DegradedL1TTL and only while the stream stays untrusted in this epoch.
func (c *Cache[V]) setDegraded(key string, v V, payload []byte, ttl time.Duration) {
	h := hashKey(key)
	s := c.snap(h) // after write's invalidateLocal
	if !degraded(s) {
		return
	}
	ttl = min(ttl, c.opts.DegradedL1TTL, c.jitter(c.opts.L1TTL))
	if ttl <= clockTick {
		return
	}
	e := &entry[V]{key: key, val: v, stripe: s.stripe, ns: s.ns, epoch: s.epoch,
		expires: expiry(ttl), cost: int64(len(payload) + len(key) + entryCost)}
	if c.opts.CopyOnRead {
		e.raw, _ = encode(c.opts.Codec, v)
	}
	c.store(h, e)
	c.st.degradedFills.Add(1)
}

var _ invalidate.Handler = handler[int]{}
