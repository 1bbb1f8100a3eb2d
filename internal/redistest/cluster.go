package redistest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// DefaultClusterNodeTimeout is the cluster-node-timeout of a Cluster when ClusterConfig.NodeTimeout is zero.
// It is short so that failover tests are fast (a killed master's replica takes over in about 2-3 s)
// and long enough that a loaded test machine does not see false failures.
const DefaultClusterNodeTimeout = time.Second

// ClusterSlots is the number of hash slots of a Redis Cluster.
const ClusterSlots = 16384

const (
	// clusterMasters is how many masters a Cluster has; each gets one replica.
	clusterMasters = 3
	// clusterReadyTimeout bounds how long NewCluster waits for the new cluster to settle.
	clusterReadyTimeout = 30 * time.Second
	// migrateSettleTimeout bounds how long MigrateSlot waits for every node to agree on the new owner.
	migrateSettleTimeout = 10 * time.Second
	// migrateBatch is how many keys one MIGRATE moves.
	migrateBatch = 100
	// migrateTimeoutMS is MIGRATE's own timeout, in milliseconds.
	migrateTimeoutMS = 5000
	// pollInterval is how often the wait loops of Cluster and Sentinel look again.
	pollInterval = 25 * time.Millisecond
	// meetRetryInterval is how long NewCluster waits for nodes to know each other before it sends
	// CLUSTER MEET again for the pairs that do not.
	meetRetryInterval = 2 * time.Second
	// pollQueryTimeout bounds one query of a wait loop, so a node that hangs counts as "not yet".
	pollQueryTimeout = time.Second
)

// errClusterNotFoundText is what NewCluster and NewSentinel report when redis-server is missing. Unlike
// errNotFoundText it does not suggest REDIS_ADDR: these set-ups always start their own processes.
const errClusterNotFoundText = "redistest: redis-server not found in PATH: install it (e.g. apt-get install redis-server); " +
	"cluster and sentinel tests always start their own servers (REDIS_ADDR is not used)"

// ClusterConfig for NewCluster and StartCluster. The zero value works.
//
// A ClusterConfig is only read by NewCluster; the caller keeps ownership and may reuse it.
type ClusterConfig struct {
	// Args are extra redis-server args given to every node, after the cluster defaults (so they
	// override them), e.g. {"--cluster-require-full-coverage", "no"} or {"--requirepass", "x"}
	// (a password is also used as masterauth, by MigrateSlot's MIGRATE, and by Options). Do not
	// override --port, --bind, --dir, --cluster-enabled, --cluster-config-file or --cluster-port.
	// TLS (--tls-port) is not supported.
	Args []string
	// NodeTimeout is cluster-node-timeout: how long a node may be unreachable before it is
	// considered failing. Zero means DefaultClusterNodeTimeout. It is rounded to milliseconds.
	NodeTimeout time.Duration
}

// Cluster is a private Redis Cluster of three masters with one replica each: six redis-server
// processes on free 127.0.0.1 ports, each with its own temporary directory and cluster bus port.
// Masters own the slot ranges 0-5460, 5461-10922 and 10923-16383 at start. Replica validity is
// unlimited (cluster-replica-validity-factor 0), so a killed master's replica always takes over, and
// replica migration is off, so replicas stay where the fixture put them.
//
// A Cluster never uses REDIS_ADDR: it always starts its own processes.
//
// Ownership: the Cluster owns its nodes (see Nodes) and the admin connections it uses to query them;
// Close releases all of them. Node handles are ordinary [Server] values, so every fault of Server
// (Stop, Kill, Restart, Freeze, Thaw, Pause, KillPubSub) works on one node; Restart keeps the node's
// nodes.conf, so a restarted node rejoins the cluster (a failed-over master comes back as a replica
// of its successor, with empty data, once the cluster has told it so).
//
// The accessors (Addrs, Nodes, Node, Options, Client) are safe for concurrent use. The methods that
// take a testing.TB are meant for the test goroutine. Close is idempotent and safe to call
// concurrently with anything.
type Cluster struct {
	// Immutable after construction.
	nodes    []*Server       // masters first (in slot order), then their replicas in the same order
	ids      []string        // cluster node IDs, index-aligned with nodes; they survive Restart
	admins   []*redis.Client // one admin client per node (plain port), index-aligned with nodes
	password string

	closeOnce sync.Once
	closeErr  error
}

// NewCluster starts a Cluster and waits until every node reports cluster_state:ok, all nodes agree on
// the slot map and every replica's link to its master is up (at most 30s). It works outside tests
// (TestMain). The caller owns the returned Cluster and must Close it.
//
// When redis-server is missing the error says so and how to install it. NewCluster never reads
// REDIS_ADDR. It is safe for concurrent use.
func NewCluster(cfg ClusterConfig) (*Cluster, error) {
	if _, err := lookRedisServer(); err != nil {
		return nil, errors.New(errClusterNotFoundText)
	}
	if _, tlsMode := stripTLSPort(cfg.Args); tlsMode {
		return nil, errors.New("redistest: NewCluster: TLS (--tls-port) is not supported")
	}
	timeout := cfg.NodeTimeout
	if timeout == 0 {
		timeout = DefaultClusterNodeTimeout
	}
	if timeout < time.Millisecond {
		return nil, fmt.Errorf("redistest: NewCluster: NodeTimeout %v must be at least 1ms", cfg.NodeTimeout)
	}

	c := &Cluster{password: passwordFromArgs(cfg.Args)}
	n := 2 * clusterMasters
	c.nodes = make([]*Server, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { c.nodes[i], errs[i] = startClusterNode(timeout, c.password, cfg.Args) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, errors.Join(err, c.Close())
	}
	c.admins = make([]*redis.Client, n)
	for i, s := range c.nodes {
		c.admins[i] = adminClient(s)
	}
	if err := c.create(); err != nil {
		return nil, errors.Join(err, c.Close())
	}
	return c, nil
}

// StartCluster is NewCluster for a test: it fails the test on error (never skips, also when
// redis-server is missing) and registers Close with tb.Cleanup. The Cluster belongs to the test.
func StartCluster(tb testing.TB, cfg ClusterConfig) *Cluster {
	tb.Helper()
	c, err := NewCluster(cfg)
	if err != nil {
		tb.Fatal(err)
		return nil
	}
	tb.Cleanup(func() {
		if err := c.Close(); err != nil {
			tb.Errorf("redistest: close cluster: %v", err)
		}
	})
	return c
}

// startClusterNode starts one cluster-enabled redis-server. The cluster bus port is picked like the
// client port (a free port, not port+10000, which may not exist); when it turns out to be taken, the
// node is started again with another one.
func startClusterNode(timeout time.Duration, password string, extra []string) (*Server, error) {
	for attempt := 1; ; attempt++ {
		bus, err := freePort()
		if err != nil {
			return nil, err
		}
		args := []string{
			"--cluster-enabled", "yes",
			"--cluster-config-file", "nodes.conf",
			"--cluster-port", strconv.Itoa(bus),
			"--cluster-node-timeout", strconv.FormatInt(timeout.Milliseconds(), 10),
			"--cluster-replica-validity-factor", "0",
			"--cluster-allow-replica-migration", "no",
			// A full sync starts at once instead of after the default 5s wait for more replicas.
			"--repl-diskless-sync-delay", "0",
		}
		if password != "" {
			args = append(args, "--masterauth", password)
		}
		s, err := New(Config{Args: append(args, extra...)})
		if err == nil {
			return s, nil
		}
		if errors.Is(err, errAddrInUse) && attempt < bindAttempts {
			continue
		}
		return nil, err
	}
}

// create assigns slots, introduces the nodes to each other, attaches the replicas and waits until the
// cluster has settled. Commands instead of redis-cli --cluster create: no extra binary, and no fixed
// one-second sleeps.
func (c *Cluster) create() error {
	ctx, cancel := context.WithTimeout(context.Background(), clusterReadyTimeout)
	defer cancel()

	c.ids = make([]string, len(c.nodes))
	for i := range c.nodes {
		id, err := c.admins[i].Do(ctx, "CLUSTER", "MYID").Text()
		if err != nil {
			return fmt.Errorf("redistest: CLUSTER MYID on %s: %w", c.nodes[i].Addr(), err)
		}
		c.ids[i] = id
	}
	for i := range clusterMasters {
		lo, hi := i*ClusterSlots/clusterMasters, (i+1)*ClusterSlots/clusterMasters-1
		if i == clusterMasters-1 {
			hi = ClusterSlots - 1
		}
		if err := c.admins[i].Do(ctx, "CLUSTER", "ADDSLOTSRANGE", lo, hi).Err(); err != nil {
			return fmt.Errorf("redistest: CLUSTER ADDSLOTSRANGE %d %d on %s: %w", lo, hi, c.nodes[i].Addr(), err)
		}
	}
	for i := 1; i < len(c.nodes); i++ {
		if err := c.meet(ctx, 0, i); err != nil {
			return err
		}
	}
	// REPLICATE needs the replica to know its master, so wait until every node knows every node.
	// A handshake that does not complete within max(node timeout, 1s) is dropped by Redis and never
	// retried (seen on a loaded 2-CPU machine); like redis-cli, introduce such nodes again.
	lastMeet := time.Now()
	err := poll(ctx, func() (bool, string) {
		ok, why, missing := c.allKnown(ctx)
		if !ok && len(missing) > 0 && time.Since(lastMeet) > meetRetryInterval {
			lastMeet = time.Now()
			for _, m := range missing {
				_ = c.meet(ctx, m[0], m[1])
			}
		}
		return ok, why
	})
	if err != nil {
		return fmt.Errorf("redistest: cluster nodes did not meet: %w\n%s\n%s", err, c.dump(), c.logs())
	}
	for i := range clusterMasters {
		r := clusterMasters + i
		if err := c.admins[r].Do(ctx, "CLUSTER", "REPLICATE", c.ids[i]).Err(); err != nil {
			return fmt.Errorf("redistest: CLUSTER REPLICATE on %s: %w", c.nodes[r].Addr(), err)
		}
	}
	if err := poll(ctx, func() (bool, string) { return c.settled(ctx) }); err != nil {
		return fmt.Errorf("redistest: cluster did not settle: %w\n%s\n%s", err, c.dump(), c.logs())
	}
	return nil
}

// meet runs CLUSTER MEET on node i for node j.
func (c *Cluster) meet(ctx context.Context, i, j int) error {
	host, port, bus := c.busAddr(j)
	if err := c.admins[i].Do(ctx, "CLUSTER", "MEET", host, port, bus).Err(); err != nil {
		return fmt.Errorf("redistest: CLUSTER MEET %s on %s: %w", c.nodes[j].Addr(), c.nodes[i].Addr(), err)
	}
	return nil
}

// busAddr returns the host, client port and cluster bus port of node i, as CLUSTER MEET wants them.
func (c *Cluster) busAddr(i int) (host string, port, bus int) {
	s := c.nodes[i]
	for j := 0; j+1 < len(s.args); j++ {
		if s.args[j] == "--cluster-port" {
			bus, _ = strconv.Atoi(s.args[j+1])
		}
	}
	return "127.0.0.1", s.Port(), bus
}

// allKnown reports whether every node lists all nodes, none of them still in handshake. When not,
// missing lists the pairs {i, j} where node i does not know node j at all.
func (c *Cluster) allKnown(ctx context.Context) (ok bool, why string, missing [][2]int) {
	for i := range c.nodes {
		v, err := c.view(ctx, i)
		if err != nil {
			return false, err.Error(), nil
		}
		for j, s := range c.nodes {
			if j == i {
				continue // a node may not know its own IP before it has heard from a peer
			}
			n, known := v.byAddr(s.Addr())
			switch {
			case !known:
				missing = append(missing, [2]int{i, j})
				why = fmt.Sprintf("%s does not know %s", c.nodes[i].Addr(), s.Addr())
			case n.flags["handshake"] || n.flags["noaddr"]:
				why = fmt.Sprintf("%s: %s is in handshake", c.nodes[i].Addr(), s.Addr())
			}
		}
	}
	return why == "", why, missing
}

// Addrs returns the client addresses of all six nodes ("127.0.0.1:PORT"), masters first, for
// redis.ClusterOptions.Addrs. They never change, not even across failovers or Restart. The caller
// owns the returned slice. Safe for concurrent use.
func (c *Cluster) Addrs() []string {
	addrs := make([]string, len(c.nodes))
	for i, s := range c.nodes {
		addrs[i] = s.Addr()
	}
	return addrs
}

// Nodes returns the six node handles: the three initial masters (in slot order), then their
// replicas in the same order. Roles change with failovers; use Masters, MasterFor and ReplicasOf for
// the current ones. The caller owns the returned slice, not the Servers. Safe for concurrent use.
func (c *Cluster) Nodes() []*Server { return slices.Clone(c.nodes) }

// Node returns the handle of the node with client address addr, or nil if there is none. Safe for
// concurrent use.
func (c *Cluster) Node(addr string) *Server {
	if i := c.index(addr); i >= 0 {
		return c.nodes[i]
	}
	return nil
}

func (c *Cluster) index(addr string) int {
	return slices.IndexFunc(c.nodes, func(s *Server) bool { return s.Addr() == addr })
}

// Options returns *redis.ClusterOptions for this cluster with the same test-friendly settings as
// Server.Options: all six addresses as seeds, ContextTimeoutEnabled true, DialTimeout, ReadTimeout,
// WriteTimeout and PoolTimeout 1s, MaxRetries -1 (no retries of a failed command on the same node;
// MOVED and ASK are still followed, up to go-redis's default MaxRedirects of 3), DisableIdentity true,
// maint notifications disabled, and the password from ClusterConfig.Args.
//
// ClusterStateReloadInterval is left at go-redis's default (60s): a ClusterClient reloads its slot
// map only on MOVED/ASK/READONLY replies or after that interval, not on connection errors, so after
// a master is killed and its replica promoted, commands for that master's slots keep failing until
// something triggers a reload (ClusterClient.ReloadState, or a MOVED from another command). The fault
// tests of this module must see that behaviour, not a fixture that hides it.
//
// Every call returns a fresh value the caller owns and may modify. Safe for concurrent use.
func (c *Cluster) Options() *redis.ClusterOptions {
	return &redis.ClusterOptions{
		Addrs:                 c.Addrs(),
		Password:              c.password,
		ContextTimeoutEnabled: true,
		DialTimeout:           time.Second,
		ReadTimeout:           time.Second,
		WriteTimeout:          time.Second,
		PoolTimeout:           time.Second,
		MaxRetries:            -1,
		DisableIdentity:       true,
		MaintNotificationsConfig: &maintnotifications.Config{
			Mode: maintnotifications.ModeDisabled,
		},
	}
}

// Client returns a new ClusterClient from Options(), closed by tb.Cleanup. The client belongs to the
// test; it may be used from any goroutine.
func (c *Cluster) Client(tb testing.TB) *redis.ClusterClient {
	tb.Helper()
	cc := redis.NewClusterClient(c.Options())
	tb.Cleanup(func() { _ = cc.Close() })
	return cc
}

// Close kills every node, waits for them, and removes their directories. It is idempotent and safe
// to call concurrently with anything; the methods that take a testing.TB fail the test after it.
func (c *Cluster) Close() error {
	c.closeOnce.Do(func() {
		var errs []error
		for _, a := range c.admins {
			_ = a.Close()
		}
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, s := range c.nodes {
			if s == nil {
				continue
			}
			wg.Go(func() {
				if err := s.Close(); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			})
		}
		wg.Wait()
		c.closeErr = errors.Join(errs...)
	})
	return c.closeErr
}

// KeySlot returns the cluster hash slot of key: CRC16 (XMODEM) of the key, or of its hash tag (the
// part between the first "{" and the next "}" when that part is not empty), modulo 16384. It is the
// same as the CLUSTER KEYSLOT command and go-redis's routing (except that go-redis sends the empty
// key to a random slot).
func KeySlot(key string) int {
	if s := strings.IndexByte(key, '{'); s >= 0 {
		if e := strings.IndexByte(key[s+1:], '}'); e > 0 {
			key = key[s+1 : s+1+e]
		}
	}
	var crc uint16
	for i := 0; i < len(key); i++ {
		crc ^= uint16(key[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return int(crc % ClusterSlots)
}

// MasterFor returns the client address of the master that owns key's slot, as most running nodes see
// it. Ask it when the cluster is settled (after StartCluster, WaitOK or MigrateSlot); during a
// failover the answer may already be stale. It fails the test if no running node answers.
func (c *Cluster) MasterFor(tb testing.TB, key string) string {
	tb.Helper()
	return c.MasterForSlot(tb, KeySlot(key))
}

// MasterForSlot is MasterFor for a slot number (0-16383).
func (c *Cluster) MasterForSlot(tb testing.TB, slot int) string {
	tb.Helper()
	if slot < 0 || slot >= ClusterSlots {
		tb.Fatalf("redistest: slot %d out of range [0, %d)", slot, ClusterSlots)
		return ""
	}
	v, err := c.majorityView()
	if err != nil {
		tb.Fatal(err)
		return ""
	}
	owner := v.owner(slot)
	if owner == "" {
		tb.Fatalf("redistest: slot %d has no working master; cluster view:\n%s", slot, v.raw)
	}
	return owner
}

// Masters returns the client addresses of the masters that own slots, as most running nodes see it,
// sorted by their first slot. It fails the test if no running node answers.
func (c *Cluster) Masters(tb testing.TB) []string {
	tb.Helper()
	v, err := c.majorityView()
	if err != nil {
		tb.Fatal(err)
		return nil
	}
	type m struct {
		addr  string
		first int
	}
	var ms []m
	for _, n := range v.nodes {
		if n.flags["master"] && !n.failed() && len(n.slots) > 0 {
			ms = append(ms, m{n.addr, n.slots[0][0]})
		}
	}
	slices.SortFunc(ms, func(a, b m) int { return a.first - b.first })
	out := make([]string, len(ms))
	for i := range ms {
		out[i] = ms[i].addr
	}
	return out
}

// ReplicasOf returns the client addresses of the working replicas of master, as most running nodes
// see it, sorted. It fails the test if no running node answers.
func (c *Cluster) ReplicasOf(tb testing.TB, master string) []string {
	tb.Helper()
	v, err := c.majorityView()
	if err != nil {
		tb.Fatal(err)
		return nil
	}
	var id string
	for _, n := range v.nodes {
		if n.addr == master {
			id = n.id
		}
	}
	var out []string
	for _, n := range v.nodes {
		if id != "" && n.flags["slave"] && !n.failed() && n.masterID == id {
			out = append(out, n.addr)
		}
	}
	slices.Sort(out)
	return out
}

// KillMaster sends SIGKILL to the node at addr, which must be a running master that owns slots, and
// waits for the process to exit. Its replica is promoted by the cluster after about NodeTimeout plus
// a second; WaitOK waits for that. The killed node stays down until Node(addr).Restart, after which
// it rejoins as a replica of its successor. Test goroutine only.
func (c *Cluster) KillMaster(tb testing.TB, addr string) {
	tb.Helper()
	i := c.index(addr)
	if i < 0 {
		tb.Fatalf("redistest: KillMaster(%q): no such node; nodes are %v", addr, c.Addrs())
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), adminTimeout)
	defer cancel()
	v, err := c.view(ctx, i)
	if err != nil {
		tb.Fatalf("redistest: KillMaster(%q): %v", addr, err)
		return
	}
	if !v.self.flags["master"] || len(v.self.slots) == 0 {
		tb.Fatalf("redistest: KillMaster(%q): node is not a master with slots (flags %v)", addr, v.self.flagList)
		return
	}
	c.nodes[i].Kill(tb)
}

// WaitOK waits at most timeout until the cluster has settled: every running node reports
// cluster_state:ok; all of them agree on which master owns which slots and which replica follows
// which master; all 16384 slots are owned by running masters that no node flags as failing; every
// running node is part of that map (a master, or a replica whose replication link is up). After
// KillMaster this means the replica has been promoted (and, with the default full-coverage setting,
// the cluster accepts commands again); after a Restart it means the node has rejoined. Nodes that are
// stopped or frozen are not asked, and must not own slots. It fails the test on timeout, with the
// reason and the cluster view. Test goroutine only.
func (c *Cluster) WaitOK(tb testing.TB, timeout time.Duration) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	if err := poll(ctx, func() (bool, string) {
		ok, why := c.settled(ctx)
		if !ok {
			c.mendOwnSlots(ctx)
		}
		return ok, why
	}); err != nil {
		tb.Fatalf("redistest: cluster not ok within %v: %v\n%s", timeout, err, c.dump())
	}
}

// mendOwnSlots tells a running master the slots that most nodes say it
// owns but its own view leaves out, as redis-cli --cluster fix would
// (CLUSTER SETSLOT NODE, idempotent). A soak saw it after a slot migration
// and a failover: the promoted replica never learned of the slot its old
// master had taken over, while every other node credited it with the slot,
// and the cluster stayed down for good. Errors are ignored: the next poll
// looks again.
func (c *Cluster) mendOwnSlots(ctx context.Context) {
	maj, err := c.majorityView()
	if err != nil {
		return
	}
	for i, s := range c.nodes {
		if !s.running() {
			continue
		}
		qctx, cancel := context.WithTimeout(ctx, pollQueryTimeout)
		v, err := c.view(qctx, i)
		if err == nil && v.self.flags["master"] {
			if n, ok := maj.byAddr(s.Addr()); ok {
				for _, r := range n.slots {
					for slot := r[0]; slot <= r[1]; slot++ {
						if v.owner(slot) != s.Addr() {
							_ = c.admins[i].Do(qctx, "CLUSTER", "SETSLOT", slot, "NODE", v.self.id).Err()
						}
					}
				}
			}
		}
		cancel()
	}
}

// WaitFailover is WaitOK, named for its use after KillMaster: it returns once every killed master's
// slots are served by its promoted replica and the cluster is ok again.
func (c *Cluster) WaitFailover(tb testing.TB, timeout time.Duration) {
	tb.Helper()
	c.WaitOK(tb, timeout)
}

// MigrateSlot moves slot to the master at toMaster with the real resharding protocol, as
// redis-cli --cluster reshard does: CLUSTER SETSLOT IMPORTING on the target and MIGRATING on the
// source; CLUSTER GETKEYSINSLOT and MIGRATE in batches of 100 keys until the slot is empty on the
// source; then CLUSTER SETSLOT NODE on the target, the source and every other master. Clients keep
// working throughout: a key still on the source is served there, a key already moved (or new) gets
// an ASK redirect to the target, and after the move a MOVED redirect. Redis 7 sends every sharded
// pub/sub subscriber of a channel in that slot on the source (and its replicas) an unsolicited
// "sunsubscribe" when the source gives the slot up.
//
// MigrateSlot returns once every running node agrees that toMaster owns the slot (at most 10s).
// Moving a slot to its current owner does nothing. It fails the test if toMaster is not a running
// master, if a MIGRATE fails (e.g. BUSYKEY: the target already holds a key of that name), or on
// timeout. Test goroutine only; do not run two MigrateSlot calls at once.
func (c *Cluster) MigrateSlot(tb testing.TB, slot int, toMaster string) {
	tb.Helper()
	if err := c.migrateSlot(slot, toMaster); err != nil {
		tb.Fatalf("redistest: MigrateSlot(%d, %q): %v\n%s", slot, toMaster, err, c.dump())
	}
}

func (c *Cluster) migrateSlot(slot int, toMaster string) error {
	if slot < 0 || slot >= ClusterSlots {
		return fmt.Errorf("slot out of range [0, %d)", ClusterSlots)
	}
	dst := c.index(toMaster)
	if dst < 0 {
		return fmt.Errorf("no such node; nodes are %v", c.Addrs())
	}
	ctx, cancel := context.WithTimeout(context.Background(), migrateSettleTimeout+clusterReadyTimeout)
	defer cancel()

	dv, err := c.view(ctx, dst)
	if err != nil {
		return err
	}
	if !dv.self.flags["master"] {
		return fmt.Errorf("target is not a master (flags %v)", dv.self.flagList)
	}
	v, err := c.majorityView()
	if err != nil {
		return err
	}
	from := v.owner(slot)
	if from == toMaster {
		return nil
	}
	src := c.index(from)
	if src < 0 {
		return fmt.Errorf("slot %d has no working owner", slot)
	}

	steps := []struct {
		node int
		args []any
	}{
		{dst, []any{"CLUSTER", "SETSLOT", slot, "IMPORTING", c.ids[src]}},
		{src, []any{"CLUSTER", "SETSLOT", slot, "MIGRATING", c.ids[dst]}},
	}
	for _, st := range steps {
		if err := c.admins[st.node].Do(ctx, st.args...).Err(); err != nil {
			return fmt.Errorf("%v on %s: %w", st.args, c.nodes[st.node].Addr(), err)
		}
	}
	if err := c.moveKeys(ctx, slot, src, dst); err != nil {
		return err
	}

	setNode := []any{"CLUSTER", "SETSLOT", slot, "NODE", c.ids[dst]}
	if err := c.admins[dst].Do(ctx, setNode...).Err(); err != nil {
		return fmt.Errorf("%v on target %s: %w", setNode, toMaster, err)
	}
	// The source refuses while it still holds keys of the slot. It cannot get new ones (a write to
	// a missing key is redirected with ASK), but be safe: move what is there and try again.
	for attempt := 1; ; attempt++ {
		err := c.admins[src].Do(ctx, setNode...).Err()
		if err == nil {
			break
		}
		if !strings.Contains(err.Error(), "still hold keys") || attempt == 5 {
			return fmt.Errorf("%v on source %s: %w", setNode, from, err)
		}
		if err := c.moveKeys(ctx, slot, src, dst); err != nil {
			return err
		}
	}
	for i := range c.nodes {
		if i == src || i == dst || !c.nodes[i].running() {
			continue
		}
		// Optional step (gossip would tell them too), so errors are ignored; replicas refuse it.
		qctx, qcancel := context.WithTimeout(ctx, pollQueryTimeout)
		if v, err := c.view(qctx, i); err == nil && v.self.flags["master"] {
			_ = c.admins[i].Do(qctx, setNode...).Err()
		}
		qcancel()
	}

	wctx, wcancel := context.WithTimeout(ctx, migrateSettleTimeout)
	defer wcancel()
	err = poll(wctx, func() (bool, string) {
		for i := range c.nodes {
			if !c.nodes[i].running() {
				continue
			}
			v, err := c.view(wctx, i)
			if err != nil {
				return false, err.Error()
			}
			if o := v.owner(slot); o != toMaster {
				// Gossip usually mends a master that missed the change, but
				// not always: a soak once saw the target itself go back to
				// naming the source, while every other node, the source
				// included, named the target, for 10 s. Tell such a master
				// again, as redis-cli --cluster fix would (idempotent; a
				// replica refuses it, and follows its master).
				if v.self.flags["master"] {
					qctx, qcancel := context.WithTimeout(wctx, pollQueryTimeout)
					_ = c.admins[i].Do(qctx, setNode...).Err()
					qcancel()
				}
				return false, fmt.Sprintf("%s says slot %d belongs to %q", c.nodes[i].Addr(), slot, o)
			}
		}
		return true, ""
	})
	if err != nil {
		return fmt.Errorf("nodes did not agree on the new owner: %w", err)
	}
	return nil
}

// moveKeys MIGRATEs every key of slot from node src to node dst, in batches.
func (c *Cluster) moveKeys(ctx context.Context, slot, src, dst int) error {
	host, port, _ := net.SplitHostPort(c.nodes[dst].Addr())
	for {
		keys, err := c.admins[src].Do(ctx, "CLUSTER", "GETKEYSINSLOT", slot, migrateBatch).StringSlice()
		if err != nil {
			return fmt.Errorf("CLUSTER GETKEYSINSLOT %d on %s: %w", slot, c.nodes[src].Addr(), err)
		}
		if len(keys) == 0 {
			return nil
		}
		args := []any{"MIGRATE", host, port, "", 0, migrateTimeoutMS}
		if c.password != "" {
			args = append(args, "AUTH", c.password)
		}
		args = append(args, "KEYS")
		for _, k := range keys {
			args = append(args, k)
		}
		if err := c.admins[src].Do(ctx, args...).Err(); err != nil {
			return fmt.Errorf("MIGRATE %d keys of slot %d from %s: %w", len(keys), slot, c.nodes[src].Addr(), err)
		}
	}
}

// running reports whether the process is up and not frozen, i.e. whether it can answer.
func (s *Server) running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.closed && s.proc != nil && !s.proc.exited() && !s.frozen
}

// settled is the condition WaitOK waits for; the string says why not.
func (c *Cluster) settled(ctx context.Context) (bool, string) {
	live := map[string]bool{}
	var ref *clusterView
	for i, s := range c.nodes {
		if !s.running() {
			continue
		}
		live[s.Addr()] = true
		qctx, cancel := context.WithTimeout(ctx, pollQueryTimeout)
		info, err := c.admins[i].Do(qctx, "CLUSTER", "INFO").Text()
		cancel()
		if err != nil {
			return false, fmt.Sprintf("CLUSTER INFO on %s: %v", s.Addr(), err)
		}
		if !strings.Contains(info, "cluster_state:ok") {
			return false, fmt.Sprintf("%s: cluster_state is not ok", s.Addr())
		}
		v, err := c.view(ctx, i)
		if err != nil {
			return false, err.Error()
		}
		if ref == nil {
			ref = v
		} else if v.signature() != ref.signature() {
			return false, fmt.Sprintf("%s and %s disagree:\n%s\nvs\n%s", ref.self.addr, s.Addr(), ref.signature(), v.signature())
		}
		if v.self.flags["slave"] {
			qctx, cancel := context.WithTimeout(ctx, pollQueryTimeout)
			repl, err := c.admins[i].Info(qctx, "replication").Result()
			cancel()
			if err != nil {
				return false, fmt.Sprintf("INFO replication on %s: %v", s.Addr(), err)
			}
			if !strings.Contains(repl, "master_link_status:up") {
				return false, fmt.Sprintf("replica %s: link to its master is not up", s.Addr())
			}
		}
	}
	if ref == nil {
		return false, "no node is running"
	}
	owned := 0
	byID := map[string]clusterNode{}
	for _, n := range ref.nodes {
		byID[n.id] = n
	}
	for _, n := range ref.nodes {
		if !n.flags["master"] || n.failed() {
			continue
		}
		for _, r := range n.slots {
			owned += r[1] - r[0] + 1
		}
		if len(n.slots) > 0 && !live[n.addr] {
			return false, fmt.Sprintf("master %s owns slots but is not running", n.addr)
		}
	}
	if owned != ClusterSlots {
		return false, fmt.Sprintf("working masters own %d of %d slots", owned, ClusterSlots)
	}
	for addr := range live {
		n, ok := ref.byAddr(addr)
		switch {
		case !ok || n.failed():
			return false, fmt.Sprintf("%s is not a working member", addr)
		case n.flags["slave"]:
			if m, ok := byID[n.masterID]; !ok || !m.flags["master"] || m.failed() || !live[m.addr] {
				return false, fmt.Sprintf("replica %s follows no working master", addr)
			}
		case !n.flags["master"]:
			return false, fmt.Sprintf("%s is neither master nor replica", addr)
		}
	}
	return true, ""
}

// clusterNode is one line of CLUSTER NODES.
type clusterNode struct {
	id       string
	addr     string // client address, host:port
	flags    map[string]bool
	flagList string
	masterID string   // "" for a master
	slots    [][2]int // owned ranges, inclusive; migrating/importing markers are left out
}

// failed reports whether the node is flagged failing, still in handshake, or without address.
func (n clusterNode) failed() bool {
	return n.flags["fail"] || n.flags["fail?"] || n.flags["handshake"] || n.flags["noaddr"]
}

// clusterView is one node's CLUSTER NODES.
type clusterView struct {
	self  clusterNode
	nodes []clusterNode
	raw   string
}

func (v *clusterView) byAddr(addr string) (clusterNode, bool) {
	for _, n := range v.nodes {
		if n.addr == addr {
			return n, true
		}
	}
	return clusterNode{}, false
}

// owner returns the address of the working master owning slot in this view, or "".
func (v *clusterView) owner(slot int) string {
	for _, n := range v.nodes {
		if !n.flags["master"] || n.failed() {
			continue
		}
		for _, r := range n.slots {
			if r[0] <= slot && slot <= r[1] {
				return n.addr
			}
		}
	}
	return ""
}

// signature is the part of the view all nodes must agree on: working masters with their slots and
// working replicas.
func (v *clusterView) signature() string {
	byID := map[string]string{}
	for _, n := range v.nodes {
		byID[n.id] = n.addr
	}
	var lines []string
	for _, n := range v.nodes {
		if n.failed() {
			continue
		}
		switch {
		case n.flags["master"]:
			var rs []string
			for _, r := range n.slots {
				rs = append(rs, fmt.Sprintf("%d-%d", r[0], r[1]))
			}
			lines = append(lines, fmt.Sprintf("master %s %s", n.addr, strings.Join(rs, ",")))
		case n.flags["slave"]:
			lines = append(lines, fmt.Sprintf("replica %s of %s", n.addr, byID[n.masterID]))
		}
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// view asks node i for CLUSTER NODES.
func (c *Cluster) view(ctx context.Context, i int) (*clusterView, error) {
	qctx, cancel := context.WithTimeout(ctx, pollQueryTimeout)
	defer cancel()
	raw, err := c.admins[i].Do(qctx, "CLUSTER", "NODES").Text()
	if err != nil {
		return nil, fmt.Errorf("CLUSTER NODES on %s: %w", c.nodes[i].Addr(), err)
	}
	v, err := parseClusterNodes(raw)
	if err != nil {
		return nil, fmt.Errorf("CLUSTER NODES on %s: %w", c.nodes[i].Addr(), err)
	}
	return v, nil
}

// majorityView returns the view most running nodes share (by signature).
func (c *Cluster) majorityView() (*clusterView, error) {
	ctx, cancel := context.WithTimeout(context.Background(), adminTimeout)
	defer cancel()
	votes := map[string]int{}
	views := map[string]*clusterView{}
	var errs []error
	for i, s := range c.nodes {
		if !s.running() {
			continue
		}
		v, err := c.view(ctx, i)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		sig := v.signature()
		votes[sig]++
		views[sig] = v
	}
	best, n := "", 0
	for sig, k := range votes {
		if k > n || (k == n && sig < best) {
			best, n = sig, k
		}
	}
	if n == 0 {
		return nil, fmt.Errorf("redistest: no cluster node answered: %w", errors.Join(errs...))
	}
	return views[best], nil
}

// dump returns every running node's CLUSTER NODES, for failure messages.
func (c *Cluster) dump() string {
	ctx, cancel := context.WithTimeout(context.Background(), adminTimeout)
	defer cancel()
	var b strings.Builder
	for i, s := range c.nodes {
		if !s.running() {
			fmt.Fprintf(&b, "%s: not running\n", s.Addr())
			continue
		}
		v, err := c.view(ctx, i)
		if err != nil {
			fmt.Fprintf(&b, "%s: %v\n", s.Addr(), err)
			continue
		}
		fmt.Fprintf(&b, "%s sees:\n%s", s.Addr(), v.raw)
	}
	return b.String()
}

// logs returns the end of every node's log, for failure messages.
func (c *Cluster) logs() string {
	var b strings.Builder
	for _, s := range c.nodes {
		fmt.Fprintf(&b, "log of %s (%s):\n%s\n", s.Addr(), s.logPath, s.logTail(0))
	}
	return b.String()
}

// parseClusterNodes parses the CLUSTER NODES format:
// <id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent> <pong-recv> <config-epoch> <link-state> <slot> ...
func parseClusterNodes(raw string) (*clusterView, error) {
	v := &clusterView{raw: raw}
	for line := range strings.Lines(raw) {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if len(f) < 8 {
			return nil, fmt.Errorf("short line %q", line)
		}
		addr, _, _ := strings.Cut(f[1], "@")
		addr, _, _ = strings.Cut(addr, ",")
		n := clusterNode{id: f[0], addr: addr, flags: map[string]bool{}, flagList: f[2]}
		for fl := range strings.SplitSeq(f[2], ",") {
			n.flags[fl] = true
		}
		if f[3] != "-" {
			n.masterID = f[3]
		}
		for _, s := range f[8:] {
			if strings.HasPrefix(s, "[") {
				continue // [slot->-id] migrating, [slot-<-id] importing
			}
			lo, hi, isRange := strings.Cut(s, "-")
			if !isRange {
				hi = lo
			}
			a, err1 := strconv.Atoi(lo)
			b, err2 := strconv.Atoi(hi)
			if err1 != nil || err2 != nil {
				return nil, fmt.Errorf("bad slot range %q in line %q", s, line)
			}
			n.slots = append(n.slots, [2]int{a, b})
		}
		slices.SortFunc(n.slots, func(a, b [2]int) int { return a[0] - b[0] })
		if n.flags["myself"] {
			v.self = n
		}
		v.nodes = append(v.nodes, n)
	}
	if v.self.id == "" {
		return nil, errors.New("no line flagged myself")
	}
	return v, nil
}

// poll calls cond every pollInterval until it reports true or ctx ends; the error carries the last
// reason cond gave.
func poll(ctx context.Context, cond func() (bool, string)) error {
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		ok, why := cond()
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %s)", ctx.Err(), why)
		case <-t.C:
		}
	}
}
