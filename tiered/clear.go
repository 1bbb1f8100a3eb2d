package tiered

import (
	"context"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/metrics"
)

// clearScript bumps the namespace generation and publishes the flush
// message ARGV[2] with the new generation appended as a uvarint: the old
// keys become unreachable and every L1 drops the namespace, atomically.
// clearScriptSharded does the same with SPUBLISH on shard channel 0, for a
// sharded Bus, whose hash tag the generation key carries. Both return the
// new generation and how many subscribers the node counted for the
// message (see clearRedis).
//
// The new generation is at least ARGV[3], one past the caller's: Redis
// can lose the generation key alone (an allkeys-* maxmemory policy evicts
// it, idle and without a TTL), and INCR would then start again below the
// generation the instances still use, which they keep (advanceGen): the
// Clear would clear nothing (TestClear_AfterGenerationKeyLost).
var (
	clearScript        = newClearScript("PUBLISH")
	clearScriptSharded = newClearScript("SPUBLISH")
)

func newClearScript(publish string) *redis.Script {
	return redis.NewScript(`
local g = redis.call('INCR', KEYS[1])
if g < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[3])
  g = tonumber(ARGV[3])
end
local n = g
local s = ''
while n >= 128 do
  s = s .. string.char(n % 128 + 128)
  n = math.floor(n / 128)
end
s = s .. string.char(n)
local heard = redis.call('` + publish + `', ARGV[1], ARGV[2] .. s)
return {g, heard}`)
}

// Clear empties the namespace in O(1): it bumps the namespace's generation
// in Redis, which every key name includes, so old keys are never read again
// (they expire on their own), and publishes a flush that makes every
// instance drop its L1 entries of the namespace. In plain-JSON mode, where
// keys carry no generation, Clear deletes the prefix's keys with SCAN and
// UNLINK instead: every key under KeyPrefix, the Node.js side's included,
// which is why that mode needs a prefix of its own (Options.PlainJSON).
func (c *Cache[V]) Clear(ctx context.Context) error {
	if err := c.enter(); err != nil {
		return err
	}
	defer c.leave()
	defer c.invalidateAll()
	if c.memoryOnly() {
		if c.bus != nil {
			c.bus.DeferFlush(c.name)
		}
		return nil
	}
	start := time.Now()
	err := c.admit()
	if err == nil {
		err = c.clearRedis(ctx)
		c.report(start, err)
	}
	c.tel.Op(ctx, metrics.OpClear, start, err)
	if err != nil {
		c.st.errors.Add(1)
		c.bus.DeferFlush(c.name)
	}
	return err
}

// clearRedis is Clear's round trip, without the breaker and the outbox.
func (c *Cache[V]) clearRedis(ctx context.Context) (err error) {
	if c.opts.PlainJSON {
		_, err := c.deletePattern(ctx, "*", true)
		return err
	}
	ctx, span := c.tel.Span(ctx, "tiercache.l2.clear", "EVALSHA", 0)
	defer func() { metrics.End(span, err) }()
	ctx, cancel := c.opCtx(ctx)
	defer cancel()
	prefix, err := c.bus.FlushMessagePrefix(c.name)
	if err != nil {
		return err
	}
	script := clearScript
	if c.tags != nil {
		script = clearScriptSharded // the generation key shares shard 0's slot
	}
	var floor uint64 // see clearScript
	if c.genKnown.Load() {
		floor = c.nsGen.Load() + 1
	}
	res, err := script.Run(ctx, c.rdb, []string{c.genKey}, c.bus.Channel(), prefix, floor).Int64Slice()
	if err == nil && len(res) != 2 {
		err = fmt.Errorf("script answered %d values, want 2", len(res))
	}
	if err != nil {
		// The script may have run with only its reply lost, and this
		// process's Bus skips its own flush: the next call reads the
		// generation from Redis. Kept, this instance wrote under the
		// retired one until the outbox's replay of the Clear, where no
		// other instance reads (TestClear_LostReplyRereadsGeneration).
		c.forgetGen()
		return fmt.Errorf("tiered: clear: %w", err)
	}
	g := uint64(res[0])
	c.advanceGen(g) // a later Clear's flush may be here first
	// The flush the script published.
	msg := binary.AppendUvarint(prefix, g)
	if c.tags != nil && res[1] == 0 && c.subscribersOnMasters() {
		// Nobody heard the flush, not even this process's own Bus: the
		// generation key's slot is migrating and the script ran on the
		// node importing it, while the channel's subscribers are still on
		// the one exporting it. Publish it again to the slot's owner.
		if err := c.bus.Publish(ctx, msg); err != nil {
			return fmt.Errorf("tiered: clear (slot migrating): %w", err)
		}
	}
	// On a sharded Bus, each shard channel is received on its own: an
	// instance could apply the invalidation of a write made after this
	// Clear before the flush (on shard 0's channel), read the key again
	// under the retired generation, and serve its value from before the
	// Clear, older than that write, until the flush arrived. A copy on
	// every channel comes before any later write's invalidation there.
	// Best effort: the Clear is done and the flush on shard 0 is the one
	// that counts. A copy that fails leaves its channel unordered with the
	// flush for one hop, as without copies; an error here would send the
	// Clear to the outbox to be run again, clearing writes made since.
	_ = c.bus.PublishCopies(ctx, msg)
	return nil
}

// DeletePattern deletes every key of the namespace matching the Redis glob
// pattern (SCAN MATCH, never KEYS; UNLINK in batches, on every master of a
// cluster) and invalidates them in every instance's L1 with one message, or
// a namespace-wide L1 flush when more than 1,000 keys matched, their names
// would make that message pass invalidate.MaxMessageSize, or one is longer
// than invalidate.MaxKeyLen (in plain-JSON mode, a Node.js key). The pattern
// applies to user keys only (the namespace, prefix and schema are matched
// literally); one ending in '\' or with a '[' but no ']' is refused with
// ErrInvalidKey. It returns how many keys it deleted, tombstones and cached
// absences included.
//
// It is not atomic, and leaves no tombstones (it deletes other writes'
// tombstones too): a load already in flight may store its value after the
// delete, and so may a Set that lands after the SCAN passed its key, even
// one that returned before DeletePattern did. Only keys found in Redis are
// invalidated: a copy an instance's L1 still holds after Redis lost the key
// (evicted, or lost in a failover) lives until its L1 TTL. If Redis fails
// part way, what is left goes to the outbox as a namespace flush: its
// replay clears the whole namespace (like Clear), not only the pattern,
// and this process's L1 of the namespace is voided at once.
func (c *Cache[V]) DeletePattern(ctx context.Context, pattern string) (int, error) {
	if err := checkGlob(pattern); err != nil {
		return 0, err
	}
	if err := c.enter(); err != nil {
		return 0, err
	}
	defer c.leave()
	if c.memoryOnly() {
		c.deferFlush() // L1 cannot be scanned by pattern: drop it all
		return 0, nil
	}
	if err := c.admit(); err != nil {
		c.deferFlush() // which keys matched is unknown: flush them all on recovery
		return 0, err
	}
	start := time.Now()
	n, err := c.deletePattern(ctx, pattern, false)
	c.report(start, err)
	c.tel.Op(ctx, metrics.OpDeletePattern, start, err)
	if err != nil {
		c.deferFlush()
	}
	return n, err
}

// deferFlush keeps in the outbox a namespace flush that may not have
// reached Redis (or, in memory mode, was not sent there), then voids this
// process's L1, as Clear does: what L1 holds may be what the call deleted
// from Redis (an UNLINK whose reply was lost), and the replay's flush never
// reaches this process (its Bus skips its own messages). In that order, a
// read that starts after the void finds the flush pending and does not
// refill L1 from Redis.
func (c *Cache[V]) deferFlush() {
	if c.beforeDefer != nil {
		c.beforeDefer(nil)
	}
	if c.bus != nil { // nil in ModeMemory
		c.bus.DeferFlush(c.name)
	}
	c.invalidateAll()
}

func (c *Cache[V]) deletePattern(ctx context.Context, pattern string, flush bool) (int, error) {
	gen, err := c.generation(ctx, c.snap(0))
	if err != nil {
		return 0, err
	}
	// The key layout around an empty user key: what to strip before and
	// after. Its fixed parts are escaped in the glob: a namespace, prefix or
	// schema may hold '*', '?', '[' or '\', which would otherwise match
	// (and delete) other namespaces' keys.
	before, after, _ := strings.Cut(c.dataKey(gen, ""), "{}")
	before, after = before+"{", "}"+after
	if c.opts.PlainJSON {
		before, after = c.opts.KeyPrefix, ""
	}
	match := globEscape(before) + pattern + globEscape(after)
	if c.tags != nil {
		// <base><gen>:{<shard tag>}<key>: any shard's tag. A '}' in a key
		// can make the glob match a little more than asked, which only
		// deletes more (a cache miss, never a stale read).
		before = c.base + strconv.FormatUint(gen, 10) + ":{"
		match = globEscape(before+c.tags[0][:len(c.tags[0])-1]) + "*}" + pattern
	}
	var mu sync.Mutex // ForEachMaster runs masters concurrently
	var keys []string
	cc, cluster := c.rdb.(*redis.ClusterClient)
	unlink := func(ctx context.Context, rdb redis.UniversalClient, batch []string) error {
		if !cluster {
			return rdb.Unlink(ctx, batch...).Err()
		}
		// A cluster node refuses a multi-key UNLINK across slots: one
		// key per command, pipelined.
		pipe := rdb.Pipeline()
		for _, k := range batch {
			pipe.Unlink(ctx, k)
		}
		_, err := pipe.Exec(ctx)
		return err
	}
	scan := func(ctx context.Context, rdb redis.UniversalClient) error {
		it := rdb.Scan(ctx, 0, match, 1000).Iterator()
		var batch []string
		flush := func() error {
			if err := unlink(ctx, rdb, batch); err != nil {
				return err
			}
			mu.Lock()
			keys = append(keys, batch...)
			mu.Unlock()
			batch = batch[:0]
			return nil
		}
		for it.Next(ctx) {
			batch = append(batch, it.Val())
			if len(batch) == 500 {
				if err := flush(); err != nil {
					return err
				}
			}
		}
		if err := it.Err(); err != nil {
			return err
		}
		if len(batch) > 0 {
			return flush()
		}
		return nil
	}
	if cluster {
		err = cc.ForEachMaster(ctx, func(ctx context.Context, m *redis.Client) error { return scan(ctx, m) })
	} else {
		err = scan(ctx, c.rdb)
	}
	userKeys := make([]string, 0, len(keys))
	for _, k := range keys {
		s, ok := strings.CutPrefix(k, before)
		switch {
		case !ok:
		case c.tags != nil:
			if _, s, ok = strings.Cut(s, "}"); ok && s != "" {
				userKeys = append(userKeys, s)
			}
		default:
			if s, ok = strings.CutSuffix(s, after); ok && s != "" {
				userKeys = append(userKeys, s)
			}
		}
	}
	for _, k := range userKeys {
		c.invalidateLocal(k)
	}
	if len(userKeys) == 0 && !flush {
		return 0, err
	}
	var msg []byte
	var merr error
	if flush || !oneBatch(userKeys) {
		c.invalidateAll()
		var p []byte
		if p, merr = c.bus.FlushMessagePrefix(c.name); merr == nil {
			msg = binary.AppendUvarint(p, gen)
		}
	} else {
		msg, merr = c.bus.KeysMessage(c.name, userKeys)
	}
	if merr == nil {
		merr = c.bus.Publish(ctx, msg)
	}
	if err == nil {
		err = merr
	}
	if err != nil {
		c.st.errors.Add(1)
		return len(userKeys), fmt.Errorf("tiered: delete pattern %q: %w", pattern, err)
	}
	return len(userKeys), nil
}

// globEscape escapes the characters Redis globs treat specially, so that s
// matches only itself.
func globEscape(s string) string {
	if !strings.ContainsAny(s, `*?[]\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if strings.IndexByte(`*?[]\`, s[i]) >= 0 {
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// checkGlob refuses a DeletePattern pattern that is empty or malformed: a
// trailing '\' or a '[' without its ']'. Redis matches those loosely (the
// layout's closing '}' then counts as part of them), so "a[" deleted "a".
func checkGlob(pattern string) error {
	if pattern == "" {
		return fmt.Errorf("%w: empty pattern", ErrInvalidKey)
	}
	for i := 0; i < len(pattern); i++ {
		switch pattern[i] {
		case '\\':
			if i++; i == len(pattern) {
				return fmt.Errorf("%w: pattern %q ends in an escape", ErrInvalidKey, pattern)
			}
		case '[':
			j := i + 1
			if j < len(pattern) && pattern[j] == '^' {
				j++
			}
			for ; j < len(pattern) && pattern[j] != ']'; j++ {
				if pattern[j] == '\\' {
					j++
				}
			}
			if j >= len(pattern) {
				return fmt.Errorf("%w: pattern %q has a '[' without its ']'", ErrInvalidKey, pattern)
			}
			i = j
		}
	}
	return nil
}
