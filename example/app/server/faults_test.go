package server

// Faults around a write: Redis down at start, a client that leaves after
// the database committed, a shutdown whose drain times out.

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tiercache/tiercache/example/internal/pgtest"
	"github.com/tiercache/tiercache/internal/faultproxy"
	"github.com/tiercache/tiercache/internal/redistest"
)

// server.New's doc: "A Redis that does not answer yet is no error: the
// caches serve from the database meanwhile and the health endpoint says so."
// An instance started while Redis is unreachable must come up and serve
// reads from the database.
func TestServer_StartsWhileRedisIsDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now: Redis is "down"
	env := testEnv(t, nil, map[string]string{"REDIS_URL": "redis://" + addr + "/0", "INSTANCE_ID": "a"})
	cfg, err := LoadConfig(envOf(env))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv, err := New(ctx, cfg, Deps{})
	if err != nil {
		t.Fatalf("New with Redis down = %v; the doc says the app starts and serves from the database", err)
	}
	defer srv.Close()
	ts := httptest.NewServer(srv.Handler())
	defer ts.Close()
	in := &instance{srv: srv, url: ts.URL}
	if u := getUser(t, in, 3); u.ID != 3 {
		t.Errorf("GET user 3 = %+v", u)
	}
}

// A PUT whose database UPDATE committed, but whose request context ended
// before the driver returned the answer, never invalidates the cache: every
// instance keeps serving the old row until CACHE_TTL (10 minutes). The
// reply to the UPDATE is held back by a TCP proxy in front of PostgreSQL
// (what a slow network or a busy server does) and the client goes away
// once the row is committed.
func TestPut_CommittedThoughCancelledInvalidates(t *testing.T) {
	dsn, ok := pgtest.URL(t)
	if !ok {
		t.Skip("no PostgreSQL")
	}
	u, _ := url.Parse(dsn)
	proxy, err := faultproxy.Start(u.Host)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { proxy.Close() })
	viaProxy := *u
	viaProxy.Host = proxy.Addr()

	rs := redistest.Start(t)
	env := testEnv(t, rs, map[string]string{"DATABASE_URL": viaProxy.String()})
	a := start(t, env, "a", Deps{})
	b := start(t, env, "b", Deps{})

	const id = 5
	before := getUser(t, b, id) // cached in b's L1 and in Redis
	getUser(t, a, id)

	direct, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer direct.Close()
	version := func() int64 {
		var v int64
		if err := direct.QueryRow("SELECT version FROM users WHERE id = $1", id).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}

	proxy.SetLatency(2 * time.Second)
	ctx, cancel := context.WithCancel(context.Background())
	req := httptest.NewRequestWithContext(ctx, "PUT", fmt.Sprintf("/api/v1/users/%d", id), strings.NewReader(`{"name": "Committed"}`))
	req.Header.Set("Content-Type", "application/json")
	rec := httptest.NewRecorder()
	done := make(chan struct{})
	go func() { defer close(done); a.srv.Handler().ServeHTTP(rec, req) }()

	deadline := time.Now().Add(10 * time.Second)
	for version() == before.Version {
		if time.Now().After(deadline) {
			t.Fatal("the UPDATE never committed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel() // the client goes away: the row is committed, its answer still in flight
	<-done
	proxy.SetLatency(0)
	committed := version()
	t.Logf("PUT handler answered %d %q; database holds version %d", rec.Code, strings.TrimSpace(rec.Body.String()), committed)

	for _, in := range []*instance{a, b} {
		if got := versionWithin(t, in, id, committed, time.Second); got != committed {
			t.Errorf("GET on %s = version %d; the database committed version %d a second ago (stale until CACHE_TTL)",
				in.srv.cfg.InstanceID, got, committed)
		}
	}
}

// When the drain of a graceful shutdown times out (SHUTDOWN_TIMEOUT) with a
// PUT still in flight, Serve closes the caches under it. The PUT then
// commits, answers 200 with the new version, and its invalidation fails
// with ErrClosed (logged as "the outbox will retry", which it will not):
// the other instances serve the old row until CACHE_TTL.
func TestShutdown_DrainTimeoutKeepsInvalidation(t *testing.T) {
	rs := redistest.Start(t)
	env := testEnv(t, rs, map[string]string{"SHUTDOWN_TIMEOUT": "200ms"})
	b := start(t, env, "b", Deps{})

	e := map[string]string{"INSTANCE_ID": "a"}
	for k, v := range env {
		e[k] = v
	}
	srv, base, stop, served := serving(t, e)

	const id = 9
	before := getUser(t, b, id) // in b's L1 and in Redis

	// Another process holds SQLite's write lock for a while (a migration,
	// a long batch): the PUT waits for it (busy_timeout).
	locker, err := sql.Open("sqlite", "file:"+env["SQLITE_PATH"]+"?_txlock=immediate")
	if err != nil {
		t.Fatal(err)
	}
	defer locker.Close()
	tx, err := locker.Begin()
	if err != nil {
		t.Fatal(err)
	}

	var wg sync.WaitGroup
	var code int
	var put User
	wg.Go(func() {
		req, _ := http.NewRequest("PUT", fmt.Sprintf("%s/api/v1/users/%d", base, id), strings.NewReader(`{"name": "Written during shutdown"}`))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Errorf("PUT: %v", err)
			return
		}
		defer resp.Body.Close()
		code = resp.StatusCode
		_ = jsonDecode(resp, &put)
	})
	for srv.requests.Load() == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)   // the UPDATE is waiting for the lock
	stop()                              // SIGTERM
	time.Sleep(500 * time.Millisecond)  // the drain (200ms) has timed out; Serve closes the caches
	if err := tx.Commit(); err != nil { // the other writer finishes
		t.Fatal(err)
	}
	wg.Wait()
	t.Logf("Serve returned %v", <-served)
	t.Logf("the PUT in flight got %d, version %d", code, put.Version)
	if code != 200 {
		t.Fatalf("PUT = %d: a write in flight when the drain timed out must still complete", code)
	}
	if got := versionWithin(t, b, id, put.Version, time.Second); got != put.Version {
		t.Errorf("GET on b = version %d (was %d); the PUT answered 200 with version %d a second ago (stale until CACHE_TTL)", got, before.Version, put.Version)
	}
}

// versionWithin reads user id on in until it has version want or within
// has passed, and returns the last version read.
func versionWithin(t *testing.T, in *instance, id int, want int64, within time.Duration) int64 {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		got := getUser(t, in, id).Version
		if got == want || time.Now().After(deadline) {
			return got
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func jsonDecode(resp *http.Response, v any) error {
	return json.NewDecoder(resp.Body).Decode(v)
}
