package tiered_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/invalidate"
	"github.com/tiercache/tiercache/tiered"
)

type User struct {
	ID   int    `json:"id"`
	Name string `json:"name"`
}

// redisAddr is where the examples find Redis: the test binary's own
// redis-server (TestMain sets the variable), else the default port.
func redisAddr() string {
	if a := os.Getenv("TIERCACHE_EXAMPLE_REDIS"); a != "" {
		return a
	}
	return "localhost:6379"
}

func Example() {
	ctx := context.Background()
	rdb := redis.NewClient(&redis.Options{
		Addr:                  redisAddr(),
		ContextTimeoutEnabled: true, // honour ctx deadlines (pitfalls G10)
	})
	defer rdb.Close()

	// One Bus per process carries invalidations for every cache.
	bus, err := invalidate.New(rdb, invalidate.Options{})
	if err != nil {
		panic(err)
	}
	defer bus.Close()

	users, err := tiered.New[User]("example-users", rdb, bus, tiered.Options{
		TTL:   10 * time.Minute, // in Redis
		L1TTL: time.Minute,      // in this process, at most
	})
	if err != nil {
		panic(err)
	}
	defer users.Close()

	// Set writes Redis and tells every instance in one round trip.
	if err := users.Set(ctx, "42", User{ID: 42, Name: "Ada"}, 0); err != nil {
		panic(err)
	}
	u, ok, err := users.Get(ctx, "42") // from Redis, then from memory
	fmt.Println(u.Name, ok, err)

	if err := users.Delete(ctx, "42"); err != nil {
		panic(err)
	}
	_, ok, _ = users.Get(ctx, "42")
	fmt.Println("after delete:", ok)
	// Output:
	// Ada true <nil>
	// after delete: false
}

func ExampleCache_GetMany() {
	ctx := context.Background()
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr(), ContextTimeoutEnabled: true})
	defer rdb.Close()
	bus, _ := invalidate.New(rdb, invalidate.Options{})
	defer bus.Close()
	prices, _ := tiered.New[float64]("example-prices", rdb, bus, tiered.Options{})
	defer prices.Close()

	_ = prices.SetMany(ctx, map[string]float64{"apple": 1.25, "pear": 2.5}, time.Hour)
	got, err := prices.GetMany(ctx, []string{"apple", "pear", "plum"})
	fmt.Println(len(got), got["apple"], got["pear"], err)
	// Output: 2 1.25 2.5 <nil>
}

// In ModeMemory (what CACHE_TYPE=memory selects) the cache needs no Redis:
// for rollback, and for tests of code that embeds the cache.
func ExampleModeMemory() {
	ctx := context.Background()
	c, _ := tiered.New[string]("example-memory", nil, nil, tiered.Options{Mode: tiered.ModeMemory})
	defer c.Close()
	_ = c.Set(ctx, "greeting", "hello", 0)
	v, ok, _ := c.Get(ctx, "greeting")
	fmt.Println(v, ok)
	// Output: hello true
}

func ExampleCache_Remember() {
	ctx := context.Background()
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr(), ContextTimeoutEnabled: true})
	defer rdb.Close()
	bus, _ := invalidate.New(rdb, invalidate.Options{})
	defer bus.Close()
	users, _ := tiered.New[User]("example-remember", rdb, bus, tiered.Options{})
	defer users.Close()
	_ = users.Delete(ctx, "7") // a clean start for the example

	db := map[string]User{"7": {ID: 7, Name: "Grace"}} // the source of truth
	loads := 0
	load := func(ctx context.Context, key string) (User, error) {
		loads++
		u, ok := db[key]
		if !ok {
			return User{}, tiered.ErrNotFound // remembered for NegativeTTL
		}
		return u, nil
	}
	u, err := users.Remember(ctx, "7", load) // loads, stores in Redis and L1
	fmt.Println(u.Name, err)
	u, err = users.Remember(ctx, "7", load) // from L1
	fmt.Println(u.Name, err, "loads:", loads)
	_, err = users.Remember(ctx, "missing", load)
	fmt.Println(err)
	// Output:
	// Grace <nil>
	// Grace <nil> loads: 1
	// tiered: not found
}

// A graceful stop: stop serving, then give the caches a bounded time to
// replay the invalidations of writes that failed while Redis was out of
// reach, then close the Bus. ErrOutboxDropped means some could not be sent:
// other instances may serve the values those writes replaced until they
// expire.
func ExampleCache_Shutdown() {
	rdb := redis.NewClient(&redis.Options{Addr: redisAddr(), ContextTimeoutEnabled: true})
	defer rdb.Close()
	bus, err := invalidate.New(rdb, invalidate.Options{})
	if err != nil {
		panic(err)
	}
	sessions, err := tiered.New[string]("example-sessions", rdb, bus, tiered.Options{})
	if err != nil {
		panic(err)
	}
	// ... serve requests; then, on SIGTERM, after http.Server.Shutdown:
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = errors.Join(sessions.Shutdown(ctx), bus.Close())
	fmt.Println("dropped:", errors.Is(err, invalidate.ErrOutboxDropped), "err:", err)
	// Output: dropped: false err: <nil>
}
