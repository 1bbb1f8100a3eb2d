package redistest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// keyOn returns a key with prefix whose slot the cluster currently gives to master.
func keyOn(t *testing.T, c *Cluster, prefix, master string) string {
	t.Helper()
	for i := range 10000 {
		k := fmt.Sprintf("%s%d", prefix, i)
		if c.MasterFor(t, k) == master {
			return k
		}
	}
	t.Fatalf("no key with prefix %q maps to %s", prefix, master)
	return ""
}

// nodeClient is a plain client to one node (no redirects followed), closed at cleanup.
func nodeClient(t *testing.T, c *Cluster, addr string) *redis.Client {
	t.Helper()
	s := c.Node(addr)
	if s == nil {
		t.Fatalf("Node(%q) = nil, want a node", addr)
	}
	return s.Client(t)
}

func TestKeySlot(t *testing.T) {
	t.Parallel()
	// Values from the cluster specification and redis-cli CLUSTER KEYSLOT.
	for _, tc := range []struct {
		key  string
		want int
	}{
		{"", 0},
		{"foo", 12182},
		{"123456789", 12739}, // CRC16 XMODEM check value 0x31C3
		{"{user1000}.following", KeySlot("user1000")},
		{"{user1000}.followers", KeySlot("user1000")},
		{"foo{}{bar}", KeySlot("foo{}{bar}")}, // empty first tag: the whole key is hashed
		{"foo{{bar}}zap", KeySlot("{bar")},
		{"foo{bar}{zap}", KeySlot("bar")},
	} {
		if got := KeySlot(tc.key); got != tc.want {
			t.Errorf("KeySlot(%q) = %d, want %d", tc.key, got, tc.want)
		}
	}
}

func TestParseClusterNodes(t *testing.T) {
	t.Parallel()
	raw := "" +
		"aaa 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460 [5461->-bbb]\n" +
		"bbb 127.0.0.1:7002@17002,host2 master - 0 1 2 connected 5461-10922 12000 [5461-<-aaa]\n" +
		"ccc 127.0.0.1:7003@17003 master,fail - 0 1 3 disconnected\n" +
		"ddd 127.0.0.1:7004@17004 slave aaa 0 1 1 connected\n"
	v, err := parseClusterNodes(raw)
	if err != nil {
		t.Fatalf("parseClusterNodes = %v, want nil", err)
	}
	if v.self.id != "aaa" || v.self.addr != "127.0.0.1:7001" {
		t.Fatalf("self = %+v, want aaa at 127.0.0.1:7001", v.self)
	}
	for _, tc := range []struct {
		slot int
		want string
	}{{0, "127.0.0.1:7001"}, {5461, "127.0.0.1:7002"}, {12000, "127.0.0.1:7002"}, {11000, ""}} {
		if got := v.owner(tc.slot); got != tc.want {
			t.Errorf("owner(%d) = %q, want %q", tc.slot, got, tc.want)
		}
	}
	want := "master 127.0.0.1:7001 0-5460\nmaster 127.0.0.1:7002 5461-10922,12000-12000\nreplica 127.0.0.1:7004 of 127.0.0.1:7001"
	if got := v.signature(); got != want {
		t.Errorf("signature() =\n%s\nwant\n%s", got, want)
	}
	if _, err := parseClusterNodes("aaa 127.0.0.1:1@2 master - 0 0 1 connected\n"); err == nil {
		t.Errorf("parseClusterNodes without myself = nil error, want one")
	}
}

func TestCluster_StartSetGet(t *testing.T) {
	// Not parallel: it checks that REDIS_ADDR, even when set, is not used.
	t.Setenv(envAddr, "127.0.0.1:1")
	start := time.Now()
	c := StartCluster(t, ClusterConfig{})
	t.Logf("timing: StartCluster took %v", time.Since(start))

	if got := len(c.Addrs()); got != 6 {
		t.Fatalf("len(Addrs()) = %d, want 6", got)
	}
	for _, s := range c.Nodes() {
		if s.External() || s.Addr() == "127.0.0.1:1" {
			t.Fatalf("node %s External() = %v, want a private server", s.Addr(), s.External())
		}
	}
	masters := c.Masters(t)
	if len(masters) != 3 {
		t.Fatalf("Masters() = %v, want 3", masters)
	}
	for _, m := range masters {
		if r := c.ReplicasOf(t, m); len(r) != 1 {
			t.Fatalf("ReplicasOf(%s) = %v, want one replica", m, r)
		}
	}

	cc := c.Client(t)
	ctx := ctxT(t, 10*time.Second)
	for _, m := range masters {
		k := keyOn(t, c, "k", m)
		if err := cc.Set(ctx, k, "v-"+m, 0).Err(); err != nil {
			t.Fatalf("Set(%q) = %v, want nil", k, err)
		}
		if got, err := cc.Get(ctx, k).Result(); err != nil || got != "v-"+m {
			t.Fatalf("Get(%q) = %q, %v, want %q, nil", k, got, err, "v-"+m)
		}
		// The key is really on that master.
		if got, err := nodeClient(t, c, m).Get(ctx, k).Result(); err != nil || got != "v-"+m {
			t.Fatalf("Get(%q) on %s = %q, %v, want %q, nil", k, m, got, err, "v-"+m)
		}
		// KeySlot agrees with the server.
		if got, err := nodeClient(t, c, m).ClusterKeySlot(ctx, k).Result(); err != nil || int(got) != KeySlot(k) {
			t.Fatalf("CLUSTER KEYSLOT %q = %d, %v, want %d", k, got, err, KeySlot(k))
		}
	}
}

func TestCluster_KillMasterFailover(t *testing.T) {
	t.Parallel()
	c := StartCluster(t, ClusterConfig{})
	cc := c.Client(t)
	ctx := ctxT(t, 30*time.Second)

	old := c.Masters(t)[0]
	replica := c.ReplicasOf(t, old)[0]
	key := keyOn(t, c, "fo", old)
	if err := cc.Set(ctx, key, "before", 0).Err(); err != nil {
		t.Fatalf("Set(%q) = %v, want nil", key, err)
	}
	// Make sure the replica has it before the crash (replication is asynchronous).
	if n, err := nodeClient(t, c, old).Wait(ctx, 1, time.Second).Result(); err != nil || n != 1 {
		t.Fatalf("WAIT 1 = %d, %v, want 1, nil", n, err)
	}

	start := time.Now()
	c.KillMaster(t, old)
	c.WaitFailover(t, 20*time.Second)
	t.Logf("timing: KillMaster to WaitFailover took %v", time.Since(start))

	if got := c.MasterFor(t, key); got != replica {
		t.Fatalf("MasterFor(%q) = %s after failover, want the replica %s", key, got, replica)
	}
	if got := c.Masters(t); len(got) != 3 || slices.Contains(got, old) {
		t.Fatalf("Masters() = %v after failover, want 3 without %s", got, old)
	}

	// go-redis routes by its cached slot map, which connection errors do not refresh; count how
	// long the client keeps failing on its own, then ask it to reload.
	var failed int
	setStart := time.Now()
	if err := cc.Set(ctx, key, "after", 0).Err(); err != nil {
		failed++
		t.Logf("go-redis: Set after failover without reload = %v after %v (the client still routes to %s)",
			err, time.Since(setStart), old)
		cc.ReloadState(ctx)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := cc.Set(ctx, key, "after", 0).Err()
		if err == nil {
			break
		}
		failed++
		if time.Now().After(deadline) {
			t.Fatalf("Set(%q) after failover and ReloadState = %v, want nil", key, err)
		}
		time.Sleep(20 * time.Millisecond) // the reload is asynchronous and cannot be awaited
	}
	t.Logf("go-redis: %d failed Sets before the client followed the failover", failed)
	if got, err := cc.Get(ctx, key).Result(); err != nil || got != "after" {
		t.Fatalf("Get(%q) = %q, %v, want %q, nil", key, got, err, "after")
	}

	// The killed master comes back as a replica of its successor.
	start = time.Now()
	c.Node(old).Restart(t)
	c.WaitOK(t, 20*time.Second)
	t.Logf("timing: Restart of the killed master to WaitOK took %v", time.Since(start))
	if got := c.ReplicasOf(t, replica); !slices.Equal(got, []string{old}) {
		t.Fatalf("ReplicasOf(%s) = %v after Restart, want [%s]", replica, got, old)
	}
}

func TestCluster_KillMasterNotMaster(t *testing.T) {
	t.Parallel()
	c := StartCluster(t, ClusterConfig{})
	replica := c.ReplicasOf(t, c.Masters(t)[0])[0]
	f := &fakeTB{TB: t}
	c.KillMaster(f, replica)
	c.KillMaster(f, "127.0.0.1:1")
	if got := f.take(); len(got) != 2 {
		t.Fatalf("KillMaster(replica), KillMaster(unknown) fatals = %q, want 2", got)
	}
	if !c.Node(replica).running() {
		t.Fatalf("replica %s was killed by a refused KillMaster", replica)
	}
}

func TestCluster_MigrateSlotUnderTraffic(t *testing.T) {
	t.Parallel()
	c := StartCluster(t, ClusterConfig{})
	cc := c.Client(t)
	ctx := ctxT(t, 30*time.Second)

	const tag = "{hot}"
	slot := KeySlot(tag)
	src := c.MasterForSlot(t, slot)
	dst := c.Masters(t)[0]
	if dst == src {
		dst = c.Masters(t)[1]
	}
	// Enough keys for several MIGRATE batches.
	const nkeys = 350
	for i := range nkeys {
		if err := cc.Set(ctx, fmt.Sprintf("%s:%d", tag, i), i, 0).Err(); err != nil {
			t.Fatalf("Set = %v, want nil", err)
		}
	}

	// Writers and readers on the hot slot during the migration, through the ClusterClient.
	var (
		stop     atomic.Bool
		incrs    atomic.Int64
		reads    atomic.Int64
		errMu    sync.Mutex
		opErrors []error
		wg       sync.WaitGroup
	)
	for w := range 4 {
		wg.Go(func() {
			for i := 0; !stop.Load(); i++ {
				var err error
				if w%2 == 0 {
					err = cc.Incr(ctx, tag+":counter").Err()
					if err == nil {
						incrs.Add(1)
					}
				} else {
					k := fmt.Sprintf("%s:%d", tag, i%nkeys)
					var got int
					got, err = cc.Get(ctx, k).Int()
					if err == nil && got != i%nkeys {
						err = fmt.Errorf("Get(%q) = %d, want %d", k, got, i%nkeys)
					}
					if err == nil {
						reads.Add(1)
					}
				}
				if err != nil {
					errMu.Lock()
					opErrors = append(opErrors, err)
					errMu.Unlock()
				}
			}
		})
	}
	// Let traffic start before moving.
	for incrs.Load() < 50 || reads.Load() < 50 {
		time.Sleep(time.Millisecond)
	}
	start := time.Now()
	c.MigrateSlot(t, slot, dst)
	t.Logf("timing: MigrateSlot of %d keys took %v", nkeys+1, time.Since(start))
	// A little traffic after the move, to go through MOVED too.
	after := incrs.Load()
	for incrs.Load() < after+50 {
		time.Sleep(time.Millisecond)
	}
	stop.Store(true)
	wg.Wait()

	if len(opErrors) > 0 {
		t.Fatalf("%d operations failed during the migration, first: %v", len(opErrors), opErrors[0])
	}
	t.Logf("%d INCRs and %d GETs during the migration, none failed", incrs.Load(), reads.Load())
	if got := c.MasterForSlot(t, slot); got != dst {
		t.Fatalf("MasterForSlot(%d) = %s, want %s", slot, got, dst)
	}
	if got, err := nodeClient(t, c, dst).ClusterCountKeysInSlot(ctx, slot).Result(); err != nil || got != nkeys+1 {
		t.Fatalf("CLUSTER COUNTKEYSINSLOT on target = %d, %v, want %d", got, err, nkeys+1)
	}
	if got, err := nodeClient(t, c, src).ClusterCountKeysInSlot(ctx, slot).Result(); err != nil || got != 0 {
		t.Fatalf("CLUSTER COUNTKEYSINSLOT on source = %d, %v, want 0", got, err)
	}
	if got, err := cc.Get(ctx, tag+":counter").Int64(); err != nil || got != incrs.Load() {
		t.Fatalf("Get(counter) = %d, %v, want %d", got, err, incrs.Load())
	}
	c.WaitOK(t, 10*time.Second)

	// Moving it back works too, and moving to the current owner is a no-op.
	c.MigrateSlot(t, slot, src)
	c.MigrateSlot(t, slot, src)
	if got := c.MasterForSlot(t, slot); got != src {
		t.Fatalf("MasterForSlot(%d) = %s after moving back, want %s", slot, got, src)
	}
}

// TestCluster_MigrateSlotSunsubscribe proves that the fixture produces what the library must handle:
// a go-redis sharded subscriber receives an unsolicited sunsubscribe when its channel's slot moves,
// and is then deaf. It also records how go-redis behaves afterwards.
func TestCluster_MigrateSlotSunsubscribe(t *testing.T) {
	t.Parallel()
	c := StartCluster(t, ClusterConfig{})
	cc := c.Client(t)
	ctx := ctxT(t, 30*time.Second)

	const ch = "{inv}:ch"
	slot := KeySlot(ch)
	src := c.MasterForSlot(t, slot)
	dst := c.Masters(t)[0]
	if dst == src {
		dst = c.Masters(t)[1]
	}

	ps := cc.SSubscribe(ctx, ch)
	defer ps.Close()
	wantSubscription(t, ps, "ssubscribe", ch, 1)
	if n, err := cc.SPublish(ctx, ch, "m1").Result(); err != nil || n != 1 {
		t.Fatalf("SPublish before the move = %d, %v, want 1, nil", n, err)
	}
	wantMessage(t, ps, ch, "m1")

	start := time.Now()
	c.MigrateSlot(t, slot, dst)
	t.Logf("timing: MigrateSlot of an empty slot took %v", time.Since(start))
	wantSubscription(t, ps, "sunsubscribe", ch, 0)

	// go-redis does not resubscribe: the PubSub keeps its connection to the old owner.
	if n, err := cc.SPublish(ctx, ch, "m2").Result(); err != nil || n != 0 {
		t.Fatalf("SPublish after the move = %d, %v, want 0 subscribers, nil", n, err)
	}
	if msg, err := ps.ReceiveTimeout(ctx, 300*time.Millisecond); !isTimeout(err) {
		t.Fatalf("Receive after sunsubscribe = %v, %v, want a timeout (no resubscription)", msg, err)
	}
	// SSubscribe again on the same PubSub goes to the same (old) connection; the server answers MOVED.
	if err := ps.SSubscribe(ctx, ch); err != nil {
		t.Fatalf("SSubscribe again = %v, want nil (the reply comes to Receive)", err)
	}
	msg, err := ps.ReceiveTimeout(ctx, 2*time.Second)
	if err == nil || !strings.HasPrefix(err.Error(), "MOVED ") {
		t.Fatalf("Receive after re-SSubscribe on the old PubSub = %v, %v, want a MOVED error", msg, err)
	}
	t.Logf("go-redis: re-SSubscribe on the same PubSub: %v", err)

	// A new PubSub routes by the client's slot map, which the MOVED of SPublish has refreshed
	// (asynchronously): retry until the subscription is confirmed.
	var ps2 *redis.PubSub
	deadline := time.Now().Add(5 * time.Second)
	for attempt := 1; ; attempt++ {
		ps2 = cc.SSubscribe(ctx, ch)
		msg, err := ps2.ReceiveTimeout(ctx, 2*time.Second)
		if s, ok := msg.(*redis.Subscription); ok && s.Kind == "ssubscribe" {
			t.Logf("go-redis: a new PubSub was subscribed on attempt %d", attempt)
			break
		}
		_ = ps2.Close()
		if time.Now().After(deadline) {
			t.Fatalf("new SSubscribe after the move = %v, %v, want a subscription", msg, err)
		}
		time.Sleep(20 * time.Millisecond) // the client's slot map reload cannot be awaited
	}
	defer ps2.Close()
	if n, err := cc.SPublish(ctx, ch, "m3").Result(); err != nil || n != 1 {
		t.Fatalf("SPublish to the new owner = %d, %v, want 1, nil", n, err)
	}
	wantMessage(t, ps2, ch, "m3")
}

func wantSubscription(t *testing.T, ps *redis.PubSub, kind, ch string, count int) {
	t.Helper()
	msg, err := ps.ReceiveTimeout(ctxT(t, 10*time.Second), 5*time.Second)
	s, ok := msg.(*redis.Subscription)
	if err != nil || !ok || s.Kind != kind || s.Channel != ch || s.Count != count {
		t.Fatalf("Receive = %#v, %v, want Subscription{Kind: %q, Channel: %q, Count: %d}", msg, err, kind, ch, count)
	}
}

func wantMessage(t *testing.T, ps *redis.PubSub, ch, payload string) {
	t.Helper()
	msg, err := ps.ReceiveTimeout(ctxT(t, 10*time.Second), 5*time.Second)
	m, ok := msg.(*redis.Message)
	if err != nil || !ok || m.Channel != ch || m.Payload != payload {
		t.Fatalf("Receive = %#v, %v, want Message{Channel: %q, Payload: %q}", msg, err, ch, payload)
	}
}

func TestCluster_MissingBinary(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	c, err := NewCluster(ClusterConfig{})
	if err == nil {
		c.Close()
		t.Fatalf("NewCluster() with empty PATH = nil error, want one")
	}
	if err.Error() != errClusterNotFoundText {
		t.Fatalf("NewCluster() error = %q, want %q", err, errClusterNotFoundText)
	}
	f := &fakeTB{TB: t}
	if c := StartCluster(f, ClusterConfig{}); c != nil {
		t.Fatalf("StartCluster() with empty PATH = %v, want nil", c)
	}
	if got := f.take(); len(got) == 0 || got[0] != errClusterNotFoundText {
		t.Fatalf("StartCluster() fatals = %q, want [%q]", got, errClusterNotFoundText)
	}
}

func TestCluster_BadConfig(t *testing.T) {
	t.Parallel()
	for _, cfg := range []ClusterConfig{
		{Args: []string{"--tls-port", "0"}},
		{NodeTimeout: time.Microsecond},
	} {
		if c, err := NewCluster(cfg); err == nil {
			c.Close()
			t.Errorf("NewCluster(%+v) = nil error, want one", cfg)
		}
	}
}

func TestCluster_Password(t *testing.T) {
	t.Parallel()
	c := StartCluster(t, ClusterConfig{Args: []string{"--requirepass", "s3cret"}})
	cc := c.Client(t)
	ctx := ctxT(t, 20*time.Second)
	const key = "{pw}:k"
	if err := cc.Set(ctx, key, "v", 0).Err(); err != nil {
		t.Fatalf("Set(%q) = %v, want nil", key, err)
	}
	// MIGRATE must authenticate at the target.
	slot := KeySlot(key)
	to := c.Masters(t)[0]
	if to == c.MasterForSlot(t, slot) {
		to = c.Masters(t)[1]
	}
	c.MigrateSlot(t, slot, to)
	if got, err := cc.Get(ctx, key).Result(); err != nil || got != "v" {
		t.Fatalf("Get(%q) after MigrateSlot = %q, %v, want %q, nil", key, got, err, "v")
	}
	opt := c.Options()
	opt.Password = ""
	noAuth := redis.NewClusterClient(opt)
	defer noAuth.Close()
	if err := noAuth.Get(ctx, key).Err(); err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Get without password = %v, want an auth error", err)
	}
}
