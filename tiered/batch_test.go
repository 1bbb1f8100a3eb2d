package tiered

import (
	"context"
	"errors"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/invalidate"
)

// failTxHook fails, once armed, the next transaction that writes a data key
// ending in suffix, as a master that stopped answering would; every other
// command (the other transactions of the batch, the Bus's) goes through.
type failTxHook struct {
	suffix string
	armed  *atomic.Bool
}

func (failTxHook) DialHook(next redis.DialHook) redis.DialHook          { return next }
func (failTxHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook { return next }
func (h failTxHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		for _, cmd := range cmds {
			if cmd.Name() != "set" && cmd.Name() != "del" {
				continue
			}
			if k, _ := cmd.Args()[1].(string); strings.HasSuffix(k, h.suffix) && h.armed.CompareAndSwap(true, false) {
				err := &net.OpError{Op: "read", Err: errors.New("test: this master does not answer")}
				for _, c := range cmds {
					c.SetErr(err)
				}
				return err
			}
		}
		return next(ctx, cmds)
	}
}

// TestSetMany_PartialFailureDefersFailedKeys: when one of a batch's
// transactions fails and the others commit (keys of several shards, or
// slots of a cluster, go out as separate transactions), only the failed
// transaction's keys go to the outbox, as a Set of each key alone would.
// The others were written to Redis with their invalidation, atomically.
// Before, every key of the batch was deferred: reads of the written keys
// on this instance skipped Redis until the replay, and the replay then
// deleted what they had written.
func TestSetMany_PartialFailureDefersFailedKeys(t *testing.T) {
	in := direct[string](t, srv, namespace(t), Options{}, invalidate.Options{ShardChannels: 2})
	c := in.c
	ctx := ctxT(t)
	bad := "bad"
	good := ""
	for i := 0; good == ""; i++ {
		if k := "good" + strconv.Itoa(i); c.shard(k) != c.shard(bad) {
			good = k
		}
	}
	armed := new(atomic.Bool)
	in.rdb.(*redis.Client).AddHook(failTxHook{suffix: "}" + bad, armed: armed})
	var deferred []string
	c.mu.Lock()
	c.beforeDefer = func(keys []string) { deferred = append(deferred, keys...) }
	c.mu.Unlock()

	for _, tc := range []struct {
		name  string
		write func() error
		want  string // good's value afterwards; "" for absent
	}{
		{"SetMany", func() error { return c.SetMany(ctx, map[string]string{good: "new", bad: "new"}, 0) }, "new"},
		{"DeleteMany", func() error { return c.DeleteMany(ctx, good, bad) }, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := c.Set(ctx, good, "old", 0); err != nil {
				t.Fatal(err)
			}
			deferred = nil
			armed.Store(true)
			if err := tc.write(); err == nil {
				t.Fatalf("%s with %q's transaction failing = nil; want its error", tc.name, bad)
			}
			if !slices.Equal(deferred, []string{bad}) {
				t.Errorf("%s deferred %q; want only the failed transaction's key %q", tc.name, deferred, bad)
			}
			v, ok, err := c.Get(ctx, good)
			if err != nil || ok != (tc.want != "") || v != tc.want {
				t.Errorf("Get(%q) after %s = %q, %v, %v; want %q, %v (its transaction committed)", good, tc.name, v, ok, err, tc.want, tc.want != "")
			}
		})
	}
}

// TestRememberMany_LoaderExtraKeysNotCounted: a BatchLoader that returns
// keys it was not asked for (and leaves out one it was) is counted by the
// keys it was asked for, as Remember's loader of each key would be: the
// extra keys are neither loader hits nor kept. Before, the loader metrics
// counted every key of the map as a hit, so a loader that answered with extras hid the
// keys it had found absent.
func TestRememberMany_LoaderExtraKeysNotCounted(t *testing.T) {
	c := newCache[string](t, Options{})
	ctx := ctxT(t)
	load := func(_ context.Context, keys []string) (map[string]string, error) {
		return map[string]string{"a": "A", "x": "X", "y": "Y"}, nil // b absent; x, y not asked for
	}
	before := c.telemetry()
	got, err := c.RememberMany(ctx, []string{"a", "b"}, load)
	if err != nil || len(got) != 1 || got["a"] != "A" {
		t.Fatalf("RememberMany(a, b) = %v, %v; want only a", got, err)
	}
	st := c.telemetry()
	if hits, nf := st.LoaderHits-before.LoaderHits, st.LoaderNotFound-before.LoaderNotFound; hits != 1 || nf != 1 {
		t.Errorf("RememberMany(a, b) counted %d loader hits and %d not found (tiercache.requests, tier loader); want 1 and 1", hits, nf)
	}
	if v, ok, err := c.Get(ctx, "x"); ok || err != nil {
		t.Errorf("Get(x) = %q, %v, %v; want a miss: the loader was not asked for x", v, ok, err)
	}
}

// TestRememberMany_LoaderErrorSparesKeysFromRedis: when a RememberMany's
// loader fails, the keys its run answered from Redis (the loader was not
// asked for them) keep their values, for the call and for a Remember of
// such a key that joined the run, as a Remember of that key alone would
// have had them. Before, the loader's error went to every key of the run:
// RememberMany returned none of them, and the joined Remember(a) failed
// with the error of a load of b. (The joiner runs without L1, where the
// run's fill of a would answer it before it could join.)
func TestRememberMany_LoaderErrorSparesKeysFromRedis(t *testing.T) {
	for _, m := range []Mode{ModeTiered, ModeRedis} {
		t.Run(m.String(), func(t *testing.T) {
			f := newFleet[string](t, shared, 2, Options{Mode: m})
			ctx := ctxT(t)
			c := f[1].c
			got := applied(c)
			if err := f[0].c.Set(ctx, "a", "A", 0); err != nil {
				t.Fatal(err)
			}
			// Its invalidation must not forget a's call in the run below.
			await(t, got, "the Set's invalidation")
			boom := errors.New("test: source down")
			join := m == ModeRedis
			type result struct {
				v   string
				err error
			}
			joined := make(chan result, 1)
			load := func(_ context.Context, keys []string) (map[string]string, error) {
				if !slices.Equal(keys, []string{"b"}) {
					t.Errorf("batch loader asked for %q; want [b]", keys)
				}
				if join {
					// a's call is in flight in this run until it returns.
					go func() {
						v, err := c.Remember(ctx, "a", func(context.Context, string) (string, error) {
							return "", errors.New("test: Remember(a) loaded instead of joining")
						})
						joined <- result{v, err}
					}()
					for deadline := time.Now().Add(5 * time.Second); c.flights.Waiters(rememberKey("a")) < 2; {
						if time.Now().After(deadline) {
							t.Error("Remember(a) did not join the run")
							break
						}
						time.Sleep(time.Millisecond) // until Remember(a) has joined
					}
				}
				return nil, boom
			}
			vals, err := c.RememberMany(ctx, []string{"a", "b"}, load)
			if !errors.Is(err, boom) || len(vals) != 1 || vals["a"] != "A" {
				t.Errorf("RememberMany(a, b) with b's load failing = %v, %v; want a from Redis and the loader's error", vals, err)
			}
			if join {
				if r := <-joined; r.err != nil || r.v != "A" {
					t.Errorf("Remember(a), joined to that run = %q, %v; want %q from Redis", r.v, r.err, "A")
				}
			}
		})
	}
}
