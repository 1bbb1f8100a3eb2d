package tiered

import (
	"errors"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
)

// ErrContextTimeouts is returned by New for a Redis client built without
// ContextTimeoutEnabled: go-redis then ignores context deadlines on socket
// I/O (a GET with a 100 ms deadline can block for ReadTimeout, 3 s by
// default), so neither Options.CommandTimeout nor the callers' deadlines
// would hold, and a slow Redis would stall every request instead of
// tripping the circuit breaker. Build the client with [RedisOptions] or set
// the field.
var ErrContextTimeouts = errors.New("tiered: the Redis client must set ContextTimeoutEnabled: true so deadlines are honoured")

// ErrUnsupportedClient is returned by New for a *redis.Ring. A Ring splits a
// transaction by shard, so a write and the PUBLISH of its invalidation
// would go to different servers as separate steps and could half-happen; a
// Clear's flush would be published on the generation key's shard, where the
// Bus may not listen; and DeletePattern's SCAN would see one shard. Use a
// Client (one server, or Sentinel through NewFailoverClient) or a
// ClusterClient.
var ErrUnsupportedClient = errors.New("tiered: a redis.Ring cannot keep a write and its invalidation atomic: use a Client or a ClusterClient")

// ErrReplicaReads is returned by New for a ClusterClient that sends reads
// to replicas: ReadOnly, which RouteByLatency and RouteRandomly set. A
// replica applies a write some time after its master has run it and
// published its invalidation, so a read that follows the invalidation
// could fetch the value the write replaced from a replica, and keep it in
// L1, under a fence snapshot taken after the invalidation, until L1TTL.
// Build the client without those options.
var ErrReplicaReads = errors.New("tiered: a ClusterClient that reads from replicas (ReadOnly, RouteByLatency, RouteRandomly) could refill L1 with a value a write replaced: read from the masters")

// RedisOptions parses a redis:// or rediss:// URL (user, password, database
// and TLS included; see redis.ParseURL) and applies the settings a cache
// needs on top: context deadlines honoured, short pool waits, no command
// retries (a cache read that fails goes to the loader; a write that fails
// goes to the outbox), and connect timeout connectTimeout (0: 1 s). Adjust
// the result before redis.NewClient as you like.
func RedisOptions(url string, connectTimeout time.Duration) (*redis.Options, error) {
	o, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("tiered: Redis URL: %w", err) // ParseURL's errors never echo the password
	}
	if connectTimeout <= 0 {
		connectTimeout = time.Second
	}
	o.ContextTimeoutEnabled = true
	o.DialTimeout = connectTimeout
	o.ReadTimeout = 2 * time.Second
	o.WriteTimeout = 2 * time.Second
	o.PoolTimeout = 200 * time.Millisecond
	o.MaxRetries = -1 // none: go-redis's 0 means 3
	return o, nil
}

// checkClient rejects a Ring (see ErrUnsupportedClient), a ClusterClient
// that reads replicas (see ErrReplicaReads) and a client that would ignore
// deadlines (see ErrContextTimeouts). Clients whose options cannot be read
// are trusted.
func checkClient(rdb redis.UniversalClient) error {
	var ok bool
	switch c := rdb.(type) {
	case *redis.Client:
		ok = c.Options().ContextTimeoutEnabled
	case *redis.ClusterClient:
		if c.Options().ReadOnly { // NewClusterClient sets it for RouteByLatency and RouteRandomly
			return ErrReplicaReads
		}
		ok = c.Options().ContextTimeoutEnabled
	case *redis.Ring:
		return ErrUnsupportedClient
	default:
		ok = true
	}
	if !ok {
		return ErrContextTimeouts
	}
	return nil
}
