package server

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/tiercache/tiercache/example/internal/pgtest"
	"github.com/tiercache/tiercache/internal/redistest"
	"github.com/tiercache/tiercache/invalidate"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// testEnv is the environment of a test's instances: a private Redis, a
// fresh SQLite file (or PostgreSQL schema), small seeds.
func testEnv(t *testing.T, rs *redistest.Server, extra map[string]string) map[string]string {
	t.Helper()
	env := map[string]string{
		"SQLITE_PATH":   filepath.Join(t.TempDir(), "app.db"),
		"SEED_USERS":    "500",
		"SEED_LICENSES": "120",
		"CACHE_TYPE":    "redis",
	}
	if rs != nil {
		env["REDIS_URL"] = "redis://" + rs.Addr() + "/0"
	}
	for k, v := range extra {
		env[k] = v
	}
	return env
}

// instance is one app instance serving on a test server.
type instance struct {
	srv *Server
	url string
}

// start starts an instance with env (and INSTANCE_ID name); the test's
// cleanup stops it.
func start(t *testing.T, env map[string]string, name string, d Deps) *instance {
	t.Helper()
	e := map[string]string{"INSTANCE_ID": name}
	for k, v := range env {
		e[k] = v
	}
	cfg, err := LoadConfig(envOf(e))
	if err != nil {
		t.Fatalf("LoadConfig: %v", err)
	}
	d.Bus = invalidate.Options{HeartbeatInterval: 50 * time.Millisecond, HeartbeatTimeout: 250 * time.Millisecond}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv, err := New(ctx, cfg, d)
	if err != nil {
		t.Fatalf("New(%s): %v", name, err)
	}
	ts := httptest.NewServer(srv.Handler())
	t.Cleanup(func() {
		ts.Close()
		if err := srv.Close(); err != nil {
			t.Errorf("Close(%s): %v", name, err)
		}
	})
	return &instance{srv: srv, url: ts.URL}
}

// call sends a request and decodes the JSON answer into out (if not nil).
func call(t *testing.T, method, url, body string, out any) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "application/json") && !strings.HasPrefix(url[strings.LastIndex(url, "/"):], "/metrics") {
		t.Errorf("%s %s: Content-Type %q, want application/json", method, url, ct)
	}
	if out != nil && resp.StatusCode < 300 {
		if err := json.Unmarshal(b, out); err != nil {
			t.Fatalf("%s %s: %v in %s", method, url, err, b)
		}
	}
	return resp.StatusCode, string(b)
}

func getUser(t *testing.T, in *instance, id int) User {
	t.Helper()
	var u User
	if code, body := call(t, "GET", fmt.Sprintf("%s/api/v1/users/%d", in.url, id), "", &u); code != 200 {
		t.Fatalf("GET user %d on %s = %d %s", id, in.srv.cfg.InstanceID, code, body)
	}
	return u
}

func putUser(t *testing.T, in *instance, id int, body string) User {
	t.Helper()
	var u User
	if code, resp := call(t, "PUT", fmt.Sprintf("%s/api/v1/users/%d", in.url, id), body, &u); code != 200 {
		t.Fatalf("PUT user %d on %s = %d %s", id, in.srv.cfg.InstanceID, code, resp)
	}
	return u
}

// A PUT on one instance is seen by a GET on another as soon as the
// invalidation has crossed one pub/sub hop, although that instance held
// the user in L1: the next read after the hop is a miss.
func TestAPI_WriteSeenByOtherInstances(t *testing.T) {
	for _, db := range databases(t) {
		t.Run(db.name, func(t *testing.T) {
			rs := redistest.Start(t)
			env := testEnv(t, rs, db.env)
			a, b, c := start(t, env, "a", Deps{}), start(t, env, "b", Deps{}), start(t, env, "c", Deps{})
			const rounds = 20
			immediate := 0
			for i := range rounds {
				id := 1 + i%3
				// b and c hold the user in L1: their second read is an L1 hit.
				for _, in := range []*instance{b, c} {
					getUser(t, in, id)
					before := in.srv.Stats().L1.Hits
					getUser(t, in, id)
					if after := in.srv.Stats().L1.Hits; after != before+1 {
						t.Fatalf("round %d: the second GET on %s was not an L1 hit (L1 hits %d -> %d)", i, in.srv.cfg.InstanceID, before, after)
					}
				}
				name := fmt.Sprintf("Renamed %d", i)
				w := putUser(t, a, id, fmt.Sprintf(`{"name": %q}`, name))
				if w.Name != name || w.Version < 2 {
					t.Fatalf("PUT returned %+v, want name %q and a new version", w, name)
				}
				for _, in := range []*instance{b, c} {
					// Bounded by one pub/sub hop: allow 100 ms, then it is a failure.
					deadline := time.Now().Add(100 * time.Millisecond)
					first := true
					for {
						u := getUser(t, in, id)
						if u.Version >= w.Version {
							if u.Version != w.Version || u.Name != name {
								t.Fatalf("GET on %s = %+v, want version %d named %q", in.srv.cfg.InstanceID, u, w.Version, name)
							}
							if first {
								immediate++
							}
							break
						}
						if time.Now().After(deadline) {
							t.Fatalf("round %d: GET user %d on %s still returns version %d 100 ms after PUT returned version %d", i, id, in.srv.cfg.InstanceID, u.Version, w.Version)
						}
						first = false
						time.Sleep(time.Millisecond)
					}
				}
			}
			t.Logf("%d of %d reads after a PUT saw it on the first try", immediate, 2*rounds)
			if immediate < rounds {
				t.Errorf("only %d of %d reads saw the PUT at once", immediate, 2*rounds)
			}
		})
	}
}

// The health endpoint tells the truth about the cache: degraded while
// Redis is stopped (and reads still served from the database), ok again
// once it is back.
func TestAPI_HealthWhenRedisStops(t *testing.T) {
	rs := redistest.Start(t)
	in := start(t, testEnv(t, rs, nil), "a", Deps{})
	health := func() (int, Health) {
		var h Health
		code, body := call(t, "GET", in.url+"/api/v1/health", "", nil)
		if err := json.Unmarshal([]byte(body), &h); err != nil {
			t.Fatalf("health: %v in %s", err, body)
		}
		return code, h
	}
	waitFor := func(what string, ok func(Health) bool) Health {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			code, h := health()
			if code != 200 {
				t.Fatalf("health = %d %+v, want 200 (the database is up)", code, h)
			}
			if ok(h) {
				return h
			}
			if time.Now().After(deadline) {
				t.Fatalf("health never showed %s: %+v", what, h)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	h := waitFor("ok", func(h Health) bool { return h.Status == "ok" && h.Cache.Bus != nil && h.Cache.Bus.Live })
	if h.Cache.Type != "tiered" || h.Cache.Status != "ok" || h.Cache.Redis == nil || !h.Cache.Redis.Reachable || h.Database.Status != "ok" || h.Database.Driver != "sqlite" {
		t.Fatalf("healthy: %+v", h)
	}
	getUser(t, in, 7)
	if _, h = health(); h.Cache.Keys == 0 || h.Cache.Memory == 0 {
		t.Errorf("after a read: cache keys %d, memory %d; want both above 0", h.Cache.Keys, h.Cache.Memory)
	}

	rs.Stop(t)
	h = waitFor("the bus dead", func(h Health) bool { return !h.Cache.Bus.Live })
	if h.Status != "degraded" || h.Cache.Status != "degraded" || h.Cache.Redis.Reachable || h.Cache.Redis.Error == "" {
		t.Errorf("Redis stopped: status %q, cache %+v redis %+v; want degraded and unreachable", h.Status, h.Cache, h.Cache.Redis)
	}
	// Reads are still served, from the database.
	if u := getUser(t, in, 8); u.ID != 8 {
		t.Errorf("GET user 8 with Redis down = %+v", u)
	}
	w := putUser(t, in, 8, `{"plan": "team"}`)
	if u := getUser(t, in, 8); u.Version != w.Version || u.Plan != "team" {
		t.Errorf("GET after PUT with Redis down = %+v, want version %d on plan team", u, w.Version)
	}

	rs.Restart(t)
	h = waitFor("ok again", func(h Health) bool { return h.Status == "ok" })
	if !h.Cache.Redis.Reachable || !h.Cache.Bus.Live || h.Cache.Bus.CircuitOpen || h.Cache.Bus.Outbox != 0 {
		t.Errorf("Redis back: %+v %+v %+v", h.Cache, h.Cache.Redis, h.Cache.Bus)
	}
}

// Bad input gets a 4xx with a message that says what is wrong.
func TestAPI_BadInput(t *testing.T) {
	rs := redistest.Start(t)
	in := start(t, testEnv(t, rs, nil), "a", Deps{})
	big := `{"name": "` + strings.Repeat("x", maxBody) + `"}`
	for _, tc := range []struct {
		method, path, body string
		code               int
		want               string
	}{
		{"GET", "/api/v1/users/99999", "", 404, "user 99999 not found"},
		{"PUT", "/api/v1/users/99999", `{"name": "Nobody"}`, 404, "user 99999 not found"},
		{"GET", "/api/v1/users/abc", "", 400, `user id "abc": want a positive integer`},
		{"GET", "/api/v1/users/0", "", 400, "want a positive integer"},
		{"GET", "/api/v1/users/-3", "", 400, "want a positive integer"},
		{"PUT", "/api/v1/users/1", `{"name": "Ada"`, 400, "malformed JSON body: unexpected EOF"},
		{"PUT", "/api/v1/users/1", `{"name": "Ada"} {"name": "Bob"}`, 400, "malformed JSON body: data after the JSON object"},
		{"PUT", "/api/v1/users/1", `{"nme": "Ada"}`, 400, `malformed JSON body: json: unknown field "nme"`},
		{"PUT", "/api/v1/users/1", `{"name": 42}`, 400, `field "name": want a string, got number`},
		{"PUT", "/api/v1/users/1", `[1, 2]`, 400, "want a JSON object, got array"},
		{"PUT", "/api/v1/users/1", ``, 400, "malformed JSON body: empty body"},
		{"PUT", "/api/v1/users/1", `{}`, 422, "nothing to update: give name, email or plan"},
		{"PUT", "/api/v1/users/1", `{"name": "  "}`, 422, "name must be 1 to 100 characters"},
		{"PUT", "/api/v1/users/1", `{"email": "ada at example"}`, 422, `email "ada at example" is not an address`},
		{"PUT", "/api/v1/users/1", `{"plan": "gold"}`, 422, `plan "gold": want one of free, pro, team, enterprise`},
		{"PUT", "/api/v1/users/1", big, 413, "body larger than 65536 bytes"},
		{"GET", "/api/v1/licenses?limit=0", "", 400, `limit must be an integer from 1 to 100, got "0"`},
		{"GET", "/api/v1/licenses?limit=101", "", 400, `limit must be an integer from 1 to 100, got "101"`},
		{"GET", "/api/v1/licenses?limit=ten", "", 400, `limit must be an integer from 1 to 100, got "ten"`},
		{"GET", "/api/v1/licenses?page=0", "", 400, `page must be an integer from 1 to 100000, got "0"`},
		{"DELETE", "/api/v1/users/1", "", 405, "DELETE /api/v1/users/1: want GET, PUT"},
		{"POST", "/api/v1/licenses", "", 405, "want GET"},
		{"GET", "/api/v2/users/1", "", 404, "no route for GET /api/v2/users/1"},
	} {
		code, body := call(t, tc.method, in.url+tc.path, tc.body, nil)
		var e struct {
			Error string `json:"error"`
		}
		_ = json.Unmarshal([]byte(body), &e)
		if code != tc.code || !strings.Contains(e.Error, tc.want) {
			t.Errorf("%s %s %.40q = %d %.200s, want %d with an error containing %q", tc.method, tc.path, tc.body, code, body, tc.code, tc.want)
		}
	}
	// A form post is refused for its Content-Type.
	resp, err := http.Post(in.url+"/api/v1/users/1", "application/x-www-form-urlencoded", strings.NewReader("name=x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	req, _ := http.NewRequest("PUT", in.url+"/api/v1/users/1", strings.NewReader("name=x"))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if resp, err = http.DefaultClient.Do(req); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnsupportedMediaType {
		t.Errorf("PUT with a form body = %d, want 415", resp.StatusCode)
	}
	// Nothing above changed user 1.
	if u := getUser(t, in, 1); u.Version != 1 {
		t.Errorf("user 1 after only bad requests has version %d, want 1", u.Version)
	}
}

// Pages of licenses are read through the cache: the second read of a page
// costs no query.
func TestAPI_Licenses(t *testing.T) {
	rs := redistest.Start(t)
	in := start(t, testEnv(t, rs, nil), "a", Deps{})
	var p LicensePage
	if code, body := call(t, "GET", in.url+"/api/v1/licenses?page=3&limit=7", "", &p); code != 200 {
		t.Fatalf("GET licenses = %d %s", code, body)
	}
	if p.Page != 3 || p.Limit != 7 || p.Total != 120 || len(p.Items) != 7 || p.Items[0].ID != 15 || p.Items[0].Key == "" || p.Items[0].OwnerID < 1 {
		t.Errorf("page 3 of 7 = %+v", p)
	}
	q := in.srv.store.Queries()
	var again LicensePage
	call(t, "GET", in.url+"/api/v1/licenses?limit=7&page=3", "", &again)
	if n := in.srv.store.Queries() - q; n != 0 || len(again.Items) != 7 || again.Items[6].ID != 21 {
		t.Errorf("the same page again made %d queries and returned %+v; want 0 queries, the same page", n, again)
	}
	var def, past LicensePage
	call(t, "GET", in.url+"/api/v1/licenses", "", &def)
	call(t, "GET", in.url+"/api/v1/licenses?page=99", "", &past)
	if def.Page != 1 || def.Limit != DefaultLimit || len(def.Items) != DefaultLimit {
		t.Errorf("default page = page %d, limit %d, %d items", def.Page, def.Limit, len(def.Items))
	}
	if past.Total != 120 || len(past.Items) != 0 || past.Items == nil {
		t.Errorf("page past the end = %+v, want no items (an empty list) and the total", past)
	}
}

// CACHE_TYPE=off sends every read to the database; memory mode caches in
// each instance alone, with no Redis.
func TestAPI_CacheTypes(t *testing.T) {
	t.Run("off", func(t *testing.T) {
		in := start(t, testEnv(t, nil, map[string]string{"CACHE_TYPE": "off"}), "a", Deps{})
		q := in.srv.store.Queries()
		for range 3 {
			getUser(t, in, 5)
		}
		if n := in.srv.store.Queries() - q; n != 3 {
			t.Errorf("3 reads with the cache off made %d queries, want 3", n)
		}
		var h Health
		call(t, "GET", in.url+"/api/v1/health", "", &h)
		if h.Status != "ok" || h.Cache.Type != "off" || h.Cache.Status != "disabled" || h.Cache.Redis != nil || h.Cache.Bus != nil {
			t.Errorf("health with the cache off = %+v", h)
		}
	})
	t.Run("memory", func(t *testing.T) {
		env := testEnv(t, nil, map[string]string{"CACHE_TYPE": "memory"})
		a, b := start(t, env, "a", Deps{}), start(t, env, "b", Deps{})
		getUser(t, b, 5)
		w := putUser(t, a, 5, `{"name": "Only a knows"}`)
		if u := getUser(t, a, 5); u.Version != w.Version {
			t.Errorf("memory mode: the writer reads version %d, want %d", u.Version, w.Version)
		}
		// Without Redis nothing tells b: it keeps serving what it had. That
		// is what CACHE_TYPE=memory means, and why the loadgen finds stale
		// reads there.
		if u := getUser(t, b, 5); u.Version != 1 {
			t.Errorf("memory mode: another instance reads version %d, want its cached 1", u.Version)
		}
		var h Health
		call(t, "GET", b.url+"/api/v1/health", "", &h)
		if h.Status != "ok" || h.Cache.Type != "memory" || h.Cache.Status != "ok" || h.Cache.Redis != nil || h.Cache.Bus != nil || h.Cache.Keys == 0 {
			t.Errorf("health in memory mode = %+v", h)
		}
	})
}

// Serve shuts down in order: a request in flight is answered, new ones are
// refused, then the cache and the database are closed.
func TestServe_GracefulShutdown(t *testing.T) {
	rs := redistest.Start(t)
	srv, base, cancel, served := serving(t, testEnv(t, rs, map[string]string{"DB_LATENCY": "300ms", "SHUTDOWN_TIMEOUT": "5s"}))

	var wg sync.WaitGroup
	var code int
	var u User
	wg.Go(func() {
		resp, err := http.Get(base + "/api/v1/users/3") // a miss: 300 ms in the database
		if err != nil {
			t.Errorf("request in flight: %v", err)
			return
		}
		defer resp.Body.Close()
		code = resp.StatusCode
		_ = json.NewDecoder(resp.Body).Decode(&u)
	})
	deadline := time.Now().Add(5 * time.Second)
	for srv.requests.Load() == 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	cancel()
	if err := <-served; err != nil {
		t.Errorf("Serve = %v, want nil", err)
	}
	wg.Wait()
	if code != 200 || u.ID != 3 {
		t.Errorf("the request in flight got %d %+v, want 200 and user 3", code, u)
	}
	if _, err := http.Get(base + "/api/v1/health"); err == nil {
		t.Error("a request after shutdown was answered")
	}
	if err := srv.store.Ping(context.Background()); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("database after shutdown: Ping = %v, want closed", err)
	}
	if _, err := srv.users.Remember(context.Background(), "3", srv.loadUser); err == nil {
		t.Error("the cache answered after shutdown")
	}
}

// GET /metrics serves the OpenTelemetry instruments in Prometheus form:
// the app's database queries, the HTTP server's requests and tiercache's.
func TestAPI_Metrics(t *testing.T) {
	rs := redistest.Start(t)
	ctx := context.Background()
	tel, err := NewTelemetry(ctx, Config{InstanceID: "a"})
	if err != nil {
		t.Fatal(err)
	}
	defer tel.Shutdown(ctx)
	in := start(t, testEnv(t, rs, nil), "a", Deps{MeterProvider: tel.MeterProvider, TracerProvider: tel.TracerProvider, Metrics: tel.Metrics})
	getUser(t, in, 1)
	getUser(t, in, 1)
	code, body := call(t, "GET", in.url+"/metrics", "", nil)
	if code != 200 {
		t.Fatalf("GET /metrics = %d", code)
	}
	for _, want := range []string{
		`app_db_queries_total{db_operation_name="select_user"`,
		"app_db_query_duration_seconds_bucket",
		"http_server_request_duration_seconds",
		"go_goroutines",
		// tiercache's own, from the providers the app passed on.
		`tiercache_requests_total{`,
		`tiercache_l1_keys{`,
		"tiercache_bus_live",
		"tiercache_operation_duration_seconds_bucket",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// database is one database the API tests run against.
type database struct {
	name string
	env  map[string]string
}

// databases returns SQLite and, when one can be reached, PostgreSQL (see
// pgtest.URL: under CI it must be there).
func databases(t *testing.T) []database {
	dbs := []database{{"sqlite", nil}}
	if u, ok := pgtest.URL(t); ok {
		dbs = append(dbs, database{"postgres", map[string]string{"DATABASE_URL": u}})
	}
	return dbs
}

// With an OTLP endpoint configured, spans reach it: one per request, named
// by its route.
func TestTelemetry_OTLPTraces(t *testing.T) {
	var mu sync.Mutex
	var bodies []string
	collector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		bodies = append(bodies, r.URL.Path+" "+string(b))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/x-protobuf")
	}))
	defer collector.Close()
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.URL)
	t.Setenv("OTEL_SERVICE_NAME", "otlp-test-service")
	cfg, err := LoadConfig(os.Getenv)
	if err != nil || cfg.OTLPEndpoint != collector.URL {
		t.Fatalf("LoadConfig: %v, OTLPEndpoint %q", err, cfg.OTLPEndpoint)
	}
	ctx := context.Background()
	tel, err := NewTelemetry(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	rs := redistest.Start(t)
	in := start(t, testEnv(t, rs, nil), "a", Deps{MeterProvider: tel.MeterProvider, TracerProvider: tel.TracerProvider})
	getUser(t, in, 4)
	if err := tel.Shutdown(ctx); err != nil { // flushes the batch
		t.Fatalf("Shutdown: %v", err)
	}
	mu.Lock()
	defer mu.Unlock()
	all := strings.Join(bodies, "\n")
	for _, want := range []string{"/v1/traces", "GET /api/v1/users/{id}", "otlp-test-service"} {
		if !strings.Contains(all, want) {
			t.Errorf("the collector did not receive %q (%d requests)", want, len(bodies))
		}
	}
}

// serving starts a Server from env on a port of its own, serving until
// stop is called; served receives what Serve returned.
func serving(t *testing.T, env map[string]string) (srv *Server, base string, stop context.CancelFunc, served <-chan error) {
	t.Helper()
	cfg, err := LoadConfig(envOf(env))
	if err != nil {
		t.Fatal(err)
	}
	if srv, err = New(context.Background(), cfg, Deps{}); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	return srv, "http://" + ln.Addr().String(), stop, done
}
