package tiered

import (
	"context"
	"errors"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/internal/redistest"
	"github.com/tiercache/tiercache/invalidate"
)

// TestCluster_ShardedChannelMigrates: on a Redis Cluster with sharded
// pub/sub, moving the slot of a key's shard channel to another master makes
// Redis drop the subscribers of that channel (sunsubscribe). Every Bus must
// notice, resubscribe on the new owner, and void L1 as for any gap; writes of
// keys in that shard then reach every instance again.
func TestCluster_ShardedChannelMigrates(t *testing.T) {
	cl := redistest.StartCluster(t, redistest.ClusterConfig{})
	be := clusterBackend{cl}
	bo := invalidate.Options{ShardChannels: 4, HeartbeatInterval: 50 * time.Millisecond, HeartbeatTimeout: 500 * time.Millisecond}
	f := newFleetBus[string](t, be, 2, Options{}, bo)
	a, b := f[0], f[1]
	if b.bus.Shards() != 4 {
		t.Fatalf("Shards() = %d, want 4", b.bus.Shards())
	}
	ctx := ctxT(t)
	// The channels spread over the masters.
	owners := map[string]bool{}
	for i := range 4 {
		owners[cl.MasterForSlot(t, redistest.KeySlot(b.bus.ShardChannel(i)))] = true
	}
	t.Logf("4 shard channels on %d masters", len(owners))

	const key = "hot"
	if err := a.c.Set(ctx, key, "v1", 0); err != nil {
		t.Fatal(err)
	}
	mustGet(t, b.c, key, "v1", "B from Redis")
	mustGet(t, b.c, key, "v1", "B from L1")
	// The key lives in its shard channel's slot.
	slot := redistest.KeySlot(b.bus.ShardChannel(b.c.shard(key)))
	if got := redistest.KeySlot(b.c.dataKey(b.c.nsGen.Load(), key)); got != slot {
		t.Fatalf("data key slot %d, shard channel slot %d: a write and its SPUBLISH would cross slots", got, slot)
	}
	epoch := b.bus.Epoch()
	reconnects := b.bus.Stats().Reconnects

	from := cl.MasterForSlot(t, slot)
	to := otherMaster(t, cl, from)
	cl.MigrateSlot(t, slot, to)
	t.Logf("moved slot %d from %s to %s", slot, from, to)

	eventually(t, 5*time.Second, "B to resubscribe after the sunsubscribe", func() bool {
		return b.bus.Stats().Reconnects > reconnects && b.bus.Live()
	})
	if e := b.bus.Epoch(); e == epoch {
		t.Fatal("the Bus resubscribed without a new epoch: L1 was not voided")
	}
	waitLiveT(t, a.bus, 5*time.Second)
	// Writes in the migrated shard reach B again, through the new owner.
	got := applied(b.c)
	for i := range 3 {
		v := "v" + strconv.Itoa(i+2)
		if err := a.c.Set(ctx, key, v, 0); err != nil {
			t.Fatal(err)
		}
		await(t, got, "B applying the write after the migration")
		mustGet(t, b.c, key, v, "B after the migration")
		mustGet(t, b.c, key, v, "B from L1 after the migration")
	}
	// Batches across shards, Clear and DeletePattern work on the sharded layout.
	items := map[string]string{}
	for i := range 50 {
		items["m"+strconv.Itoa(i)] = "x"
	}
	if err := a.c.SetMany(ctx, items, 0); err != nil {
		t.Fatal(err)
	}
	keys := make([]string, 0, len(items))
	for k := range items {
		keys = append(keys, k)
	}
	if m, err := b.c.GetMany(ctx, keys); err != nil || len(m) != 50 {
		t.Fatalf("GetMany after SetMany: %d values, %v", len(m), err)
	}
	if n, err := a.c.DeletePattern(ctx, "m1*"); err != nil || n != 11 {
		t.Fatalf("DeletePattern(m1*) = %d, %v; want 11", n, err)
	}
	if err := a.c.Clear(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "B to apply the flush", func() bool { return b.c.nsGen.Load() == a.c.nsGen.Load() })
	if _, ok, err := b.c.Get(ctx, key); err != nil || ok {
		t.Fatalf("B after Clear: ok %v err %v; want a miss", ok, err)
	}
}

// nodeAdmin is a plain client of one cluster node, for CLUSTER SETSLOT,
// MIGRATE and the like.
func nodeAdmin(t *testing.T, addr string) *redis.Client {
	t.Helper()
	c := redis.NewClient(&redis.Options{Addr: addr, MaxRetries: -1})
	t.Cleanup(func() { c.Close() })
	return c
}

// TestCluster_ShardedWritesDuringMigration: while the slot of a shard
// channel is being migrated (IMPORTING on the target, MIGRATING on the
// source, some keys already MIGRATEd, as redis-cli --cluster reshard does
// batch by batch), the channel's subscribers stay on the source until the
// slot's owner changes, while a command whose key has moved is answered by
// the target (ASK). Two things broke there:
//
//   - Clear's script ran on the target (the generation key had moved), and
//     its SPUBLISH reached nobody: Clear returned nil and the other
//     instances kept the old generation, serving what it had removed, until
//     the migration ended. Now a flush nobody heard is published again, to
//     the slot's owner.
//   - A Set of a moved key failed for the whole migration: on the target the
//     channel counts as a key of the slot it does not hold, and Redis 7.0
//     answers TRYAGAIN to the transaction (which also opened the circuit).
//     Now such a write goes apart: the keys, then the invalidation to the
//     slot's owner.
//
// DeletePattern's keys message, a plain SPUBLISH, was heard all along.
func TestCluster_ShardedWritesDuringMigration(t *testing.T) {
	cl := redistest.StartCluster(t, redistest.ClusterConfig{})
	be := clusterBackend{cl}
	bo := invalidate.Options{HeartbeatInterval: 50 * time.Millisecond, HeartbeatTimeout: 500 * time.Millisecond, ShardChannels: 1} // every key in shard 0's slot
	f := newFleetBus[string](t, be, 2, Options{}, bo)
	a, b := f[0], f[1]
	ctx := ctxT(t)

	const key = "hot"
	if err := a.c.Clear(ctx); err != nil { // so that the generation key exists
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "B to apply the first Clear", func() bool { return b.c.nsGen.Load() == a.c.nsGen.Load() })
	dk := b.c.dataKey(b.c.nsGen.Load(), key)
	slot := redistest.KeySlot(dk)
	if redistest.KeySlot(b.c.genKey) != slot || redistest.KeySlot(b.bus.ShardChannel(0)) != slot {
		t.Fatal("generation key, data key and channel not in one slot")
	}
	for _, k := range []string{key, "dp1"} {
		if err := a.c.Set(ctx, k, "v1", 0); err != nil {
			t.Fatal(err)
		}
		mustGet(t, b.c, k, "v1", "B from Redis")
		mustGet(t, b.c, k, "v1", "B from L1")
	}

	src := cl.MasterForSlot(t, slot)
	dst := otherMaster(t, cl, src)
	sa, da := nodeAdmin(t, src), nodeAdmin(t, dst)
	srcID, err := sa.Do(ctx, "CLUSTER", "MYID").Text()
	if err != nil {
		t.Fatal(err)
	}
	dstID, err := da.Do(ctx, "CLUSTER", "MYID").Text()
	if err != nil {
		t.Fatal(err)
	}
	if err := da.Do(ctx, "CLUSTER", "SETSLOT", slot, "IMPORTING", srcID).Err(); err != nil {
		t.Fatal(err)
	}
	if err := sa.Do(ctx, "CLUSTER", "SETSLOT", slot, "MIGRATING", dstID).Err(); err != nil {
		t.Fatal(err)
	}
	host, port, _ := net.SplitHostPort(dst)
	if err := sa.Do(ctx, "MIGRATE", host, port, "", 0, 5000, "KEYS", dk, a.c.genKey).Err(); err != nil {
		t.Fatalf("MIGRATE: %v", err)
	}
	t.Logf("slot %d migrating from %s to %s; the data key and the generation key moved", slot, src, dst)

	// DeletePattern: UNLINK on the source (dp1 is still there), then a plain
	// SPUBLISH, which the source serves.
	got := applied(b.c)
	if n, err := a.c.DeletePattern(ctx, "dp*"); err != nil || n != 1 {
		t.Fatalf("DeletePattern during the migration: %d, %v", n, err)
	}
	await(t, got, "B to apply A's DeletePattern")
	if v, ok, err := b.c.Get(ctx, "dp1"); ok || err != nil {
		t.Errorf("B after A's DeletePattern returned: %q, %v, %v; want a miss", v, ok, err)
	}

	// Clear: its script runs on the target, where the generation key is.
	got = applied(b.c)
	if err := a.c.Clear(ctx); err != nil {
		t.Fatalf("Clear during the migration: %v", err)
	}
	await(t, got, "B to apply A's Clear")
	if g, want := b.c.nsGen.Load(), a.c.nsGen.Load(); g != want {
		t.Errorf("B on generation %d after A's Clear (A on %d)", g, want)
	}
	if v, ok, err := b.c.Get(ctx, key); ok || err != nil {
		t.Errorf("B after A's Clear returned: %q, %v, %v; want a miss", v, ok, err)
	}

	// Set of a key whose slot is migrating. After the Clear its data key
	// (new generation) is on neither node: write it once so that it moves,
	// then write it again.
	dk = a.c.dataKey(a.c.nsGen.Load(), key)
	if err := a.c.Set(ctx, key, "v2", 0); err != nil {
		t.Fatalf("Set during the migration: %v", err)
	}
	mustGet(t, b.c, key, "v2", "B from Redis")
	mustGet(t, b.c, key, "v2", "B from L1")
	if err := sa.Do(ctx, "MIGRATE", host, port, "", 0, 5000, "KEYS", dk).Err(); err != nil {
		t.Fatalf("MIGRATE: %v", err)
	}
	got = applied(b.c) // from here on: only what follows
	if err := a.c.Set(ctx, key, "v3", 0); err != nil {
		t.Fatalf("Set of a moved key during the migration: %v", err)
	}
	await(t, got, "B to apply A's Set")
	mustGet(t, b.c, key, "v3", "B after A's Set of a moved key")
	if a.bus.CircuitOpen() || a.bus.OutboxDepth() != 0 {
		t.Errorf("A after its writes: circuit open %v, outbox %d; want closed and empty", a.bus.CircuitOpen(), a.bus.OutboxDepth())
	}
}

// otherMaster is a master of cl other than addr.
func otherMaster(t *testing.T, cl *redistest.Cluster, addr string) string {
	t.Helper()
	for _, m := range cl.Masters(t) {
		if m != addr {
			return m
		}
	}
	t.Fatalf("no master other than %s", addr)
	return ""
}

// TestCluster_NewRejectsReplicaReads: a ClusterClient with ReadOnly (or
// RouteByLatency or RouteRandomly, which set it) sends GETs to replicas.
// A replica applies a write after its master has run it and published its
// invalidation, so a read that follows the invalidation can fetch the
// value the write replaced there. Before New refused such a client, a
// cache on one served that value after applying the invalidation, and
// kept it in L1 under a fresh snapshot after the replica had caught up.
// Here the lag is forced: CLIENT PAUSE WRITE on the replica holds back its
// replication stream, while a subscriber hears the master's PUBLISH and a
// READONLY GET on the replica still answers.
func TestCluster_NewRejectsReplicaReads(t *testing.T) {
	cl := redistest.StartCluster(t, redistest.ClusterConfig{})
	ctx := ctxT(t)
	const key, channel = "replica:k", "replica:inv"
	master := cl.MasterFor(t, key)
	reps := cl.ReplicasOf(t, master)
	if len(reps) == 0 {
		t.Fatalf("no replica of %s", master)
	}
	ma, ra := nodeAdmin(t, master), nodeAdmin(t, reps[0])
	if err := ma.Set(ctx, key, "v1", time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	ro := ra.Conn()
	defer ro.Close()
	if err := ro.ReadOnly(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the replica to hold v1", func() bool { return ro.Get(ctx, key).Val() == "v1" })
	sub := ra.Subscribe(ctx, channel) // classic pub/sub: the cluster bus brings it to every node
	defer sub.Close()
	if _, err := sub.Receive(ctx); err != nil {
		t.Fatal(err)
	}
	if err := ra.Do(ctx, "CLIENT", "PAUSE", 5000, "WRITE").Err(); err != nil {
		t.Fatal(err)
	}
	defer ra.Do(context.Background(), "CLIENT", "UNPAUSE")
	if _, err := ma.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.Set(ctx, key, "v2", time.Minute)
		p.Publish(ctx, channel, key)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.ReceiveMessage(ctx); err != nil {
		t.Fatal(err)
	}
	if v := ro.Get(ctx, key).Val(); v != "v1" {
		t.Fatalf("replica after the invalidation was heard: %q, want v1 (the replaced value)", v)
	}

	bus := newBus(t, clusterBackend{cl}, cl.Client(t), invalidate.Options{})
	for _, set := range []func(*redis.ClusterOptions){
		func(o *redis.ClusterOptions) { o.ReadOnly = true },
		func(o *redis.ClusterOptions) { o.RouteByLatency = true },
		func(o *redis.ClusterOptions) { o.RouteRandomly = true },
	} {
		o := cl.Options()
		set(o)
		rdb := redis.NewClusterClient(o)
		defer rdb.Close()
		if _, err := New[string](namespace(t), rdb, bus, Options{}); !errors.Is(err, ErrReplicaReads) {
			t.Fatalf("New with ReadOnly %v, RouteByLatency %v, RouteRandomly %v: %v, want ErrReplicaReads",
				o.ReadOnly, o.RouteByLatency, o.RouteRandomly, err)
		}
	}
}
