package tiered

import (
	"strconv"
	"testing"
	"time"

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
	var to string
	for _, m := range cl.Masters(t) {
		if m != from {
			to = m
			break
		}
	}
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
