package tiered

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/internal/redistest"
)

// lostReplyHook lets commands named cmd through while on is set, then
// fails them as a connection that broke before the reply would: Redis
// applied them, the caller hears an error.
type lostReplyHook struct {
	cmd string
	on  *atomic.Bool
}

func (lostReplyHook) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h lostReplyHook) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		err := next(ctx, cmd)
		if err == nil && h.on.Load() && strings.EqualFold(cmd.Name(), h.cmd) {
			err = &net.OpError{Op: "read", Err: errors.New("test: connection lost before the reply")}
			cmd.SetErr(err)
		}
		return err
	}
}

func (lostReplyHook) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// TestDeletePattern_FailureVoidsWritersL1: a DeletePattern that fails part
// way (here its UNLINK reached Redis, its reply did not) leaves a namespace
// flush in the outbox and, like a failed Clear or Set, voids what the
// writer's own L1 holds. Before, the writer kept serving the deleted value
// from L1 while Redis and its peers had none, and still did after the
// replay (whose flush its own Bus skips as an echo), until L1TTL.
func TestDeletePattern_FailureVoidsWritersL1(t *testing.T) {
	s := redistest.Start(t)
	ns := namespace(t)
	bo := faultBus
	bo.BreakerThreshold = -1
	rdb := s.Client(t)
	lost := new(atomic.Bool)
	rdb.AddHook(lostReplyHook{cmd: "unlink", on: lost})
	a := newInstance[string](t, s, ns, rdb, Options{}, bo)
	b := direct[string](t, s, ns, Options{}, bo)
	ctx := ctxT(t)
	if err := a.c.Set(ctx, "k", "v", 0); err != nil {
		t.Fatal(err)
	}
	mustGet(t, a.c, "k", "v", "A")
	mustGet(t, a.c, "k", "v", "A from L1")
	lost.Store(true)
	if _, err := a.c.DeletePattern(ctx, "k*"); err == nil {
		t.Fatal("DeletePattern whose UNLINK reply was lost returned nil")
	}
	lost.Store(false)
	if v, ok, err := b.c.Get(ctx, "k"); err != nil || ok {
		t.Fatalf("B after the UNLINK: Get(k) = %q, %v, %v; want a miss", v, ok, err)
	}
	if v, ok, err := a.c.Get(ctx, "k"); err != nil || ok {
		t.Fatalf("A after its failed DeletePattern: Get(k) = %q, %v, %v; want a miss (its flush waits in the outbox)", v, ok, err)
	}
	if err := a.bus.ReplayNow(ctx, ns); err != nil {
		t.Fatalf("ReplayNow: %v", err)
	}
	if v, ok, err := a.c.Get(ctx, "k"); err != nil || ok {
		t.Fatalf("A after the replay: Get(k) = %q, %v, %v; want a miss", v, ok, err)
	}
}

// TestOutbox_ReadRacingFailedWrite: a Get of a key on the instance whose
// write of it has just failed (here its ctx was cancelled, so the write
// never reached Redis) runs as the write puts the key in the outbox. It
// must not leave in L1 the value the write meant to replace. Before, the
// write voided the key first and deferred it after, so a Get in between
// found it neither void nor pending, read Redis's old value and kept it in
// L1 under a current snapshot: the writer served it, and still did after
// the replay (its Bus skips its own invalidation) until L1TTL.
func TestOutbox_ReadRacingFailedWrite(t *testing.T) {
	a := direct[string](t, srv, namespace(t), Options{}, faultBus)
	ctx := ctxT(t)
	if err := a.c.Set(ctx, "k", "old", 0); err != nil {
		t.Fatal(err)
	}
	raced := false
	a.c.mu.Lock()
	a.c.beforeDefer = func([]string) {
		raced = true
		if v, ok, err := a.c.Get(ctx, "k"); err != nil || (ok && v != "old") {
			t.Errorf("Get racing the failed Set = %q, %v, %v", v, ok, err)
		}
	}
	a.c.mu.Unlock()
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	if err := a.c.Set(cancelled, "k", "new", 0); err == nil {
		t.Fatal("Set with a cancelled ctx returned nil")
	}
	if !raced {
		t.Fatal("the failed Set did not reach the outbox")
	}
	if v, ok, err := a.c.Get(ctx, "k"); err != nil || ok {
		t.Fatalf("Get after the failed Set = %q, %v, %v; want a miss (the key is pending)", v, ok, err)
	}
	if err := a.bus.ReplayNow(ctx, a.c.name); err != nil {
		t.Fatalf("ReplayNow: %v", err)
	}
	if v, ok, err := a.c.Get(ctx, "k"); err != nil || ok {
		t.Fatalf("Get after the replay = %q, %v, %v; want a miss (the replay left a tombstone)", v, ok, err)
	}
}

// TestSetMode_BackRacingMemoryWriteDefer: a memory-mode Set, Delete or
// DeletePattern whose key a Get reads just as SetMode(ModeTiered) ends
// memory mode. The Get, in tiered mode, must not keep in L1 what Redis
// holds, which the memory-mode write replaced and whose replay deletes it.
// Before, the write stored (or voided) its keys in L1 first and deferred
// them after, so a Get in between found the key neither void nor pending
// and kept Redis's older value: served after the write returned nil, until
// L1TTL.
func TestSetMode_BackRacingMemoryWriteDefer(t *testing.T) {
	a := direct[string](t, srv, namespace(t), Options{}, faultBus)
	ctx := ctxT(t)
	writes := map[string]func(k string) error{
		"Set":    func(k string) error { return a.c.Set(ctx, k, "memory-mode write", 0) },
		"Delete": func(k string) error { return a.c.Delete(ctx, k) },
		"DeletePattern": func(k string) error {
			_, err := a.c.DeletePattern(ctx, k)
			return err
		},
	}
	for name, write := range writes {
		k := "k-" + name
		if err := a.c.Set(ctx, k, "old", 0); err != nil {
			t.Fatal(err)
		}
		if err := a.c.SetMode(ModeMemory); err != nil {
			t.Fatal(err)
		}
		var raced bool
		a.c.mu.Lock()
		a.c.beforeDefer = func([]string) {
			if raced {
				return
			}
			raced = true
			if err := a.c.SetMode(ModeTiered); err != nil {
				t.Error(err)
			}
			if _, _, err := a.c.Get(ctx, k); err != nil {
				t.Errorf("Get racing the memory-mode %s: %v", name, err)
			}
		}
		a.c.mu.Unlock()
		if err := write(k); err != nil {
			t.Fatalf("%s in memory mode: %v", name, err)
		}
		if !raced {
			t.Fatalf("the memory-mode %s did not reach the outbox", name)
		}
		if v, ok, err := a.c.Get(ctx, k); err != nil || ok {
			t.Errorf("Get(%s) after a memory-mode %s = %q, %v, %v; want a miss", k, name, v, ok, err)
		}
		if err := a.bus.ReplayNow(ctx, a.c.name); err != nil {
			t.Fatalf("ReplayNow: %v", err)
		}
		if v, ok, err := a.c.Get(ctx, k); err != nil || ok {
			t.Errorf("Get(%s) after the replay of a memory-mode %s = %q, %v, %v; want a miss", k, name, v, ok, err)
		}
	}
}
