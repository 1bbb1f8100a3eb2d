package invalidate

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/tiercache/tiercache/internal/redistest"
)

var (
	secretA = []byte("secret A: thirty-two bytes long!")
	secretB = []byte("secret B: thirty-two bytes long!")
)

// A Bus with a Secret applies what another Bus with the same Secret sends,
// and drops, without voiding anything, whatever anyone else publishes: no
// tag, a wrong tag, a tag under another secret, garbage. A Bus without a
// Secret still applies tagged and untagged messages alike.
func TestBusSecret(t *testing.T) {
	s := redistest.Shared(t)
	rdb := s.Client(t)
	a := newTestBus(t, s, rdb, Options{Secret: secretA})
	peer := newTestBus(t, s, s.Client(t), Options{Secret: secretA})
	other := newTestBus(t, s, s.Client(t), Options{Secret: secretB})
	open := newTestBus(t, s, s.Client(t), Options{})
	ha := register(t, a, "ns")
	ho := register(t, open, "ns")
	for _, b := range []*Bus{a, peer, other, open} {
		waitLive(t, b)
	}
	ha.drainResync()
	ctx := ctxT(t)
	e0 := checkLiveEpoch(t, a)

	raw := func(p []byte) {
		t.Helper()
		if err := rdb.Publish(ctx, a.Channel(), p).Err(); err != nil {
			t.Fatalf("PUBLISH: %v", err)
		}
	}
	must := func(p []byte, err error) []byte {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	flush := func(prefix []byte, err error) []byte {
		t.Helper()
		return binary.AppendUvarint(must(prefix, err), 5)
	}

	// Forgeries, each a keys message or a flush of a registered namespace.
	untaggedKeys := must((&Message{Origin: foreignOrigin, Seq: 1, Time: 1, Namespace: "ns", Kind: KindKeys, Keys: []string{"forged-untagged"}}).MarshalBinary())
	untaggedFlush := must((&Message{Origin: foreignOrigin, Seq: 2, Time: 1, Namespace: "ns", Kind: KindFlush, Gen: 5}).MarshalBinary())
	badTag := must(peer.KeysMessage("ns", []string{"forged-bad-tag"}))
	badTag[len(badTag)-1] ^= 1
	// A peer's genuine message with one authenticated byte changed.
	changedKey := must(peer.KeysMessage("ns", []string{"genuine"}))
	changedKey[len(changedKey)-TagSize-1] = 'X'
	forged := [][]byte{
		untaggedKeys,
		untaggedFlush,
		badTag,
		changedKey,
		must(other.KeysMessage("ns", []string{"forged-secret-B"})),
		flush(other.FlushMessagePrefix("ns")),
	}
	garbage := [][]byte{[]byte("garbage"), badTag[:len(badTag)-1], append(bytes.Clone(untaggedKeys), 0)}
	for _, p := range forged {
		raw(p)
	}
	for _, p := range garbage {
		raw(p)
	}
	// Pub/sub keeps the order: once the peer's message is seen, every
	// forgery before it has been dropped.
	raw(must(peer.KeysMessage("ns", []string{"from-peer"})))
	wantKeys(t, recv(t, ha.inv, "Invalidate of the peer's message"), "from-peer")
	noValue(t, ha.flush, "Flush of a forgery")
	noValue(t, ha.resync, "Resync for a forged flush")
	st := a.Stats()
	if st.Rejected != uint64(len(forged)) || st.Malformed != uint64(len(garbage)) {
		t.Errorf("Stats() = %+v, want Rejected %d, Malformed %d", st, len(forged), len(garbage))
	}
	if e := a.Epoch(); e != e0 || !a.Live() {
		t.Errorf("Epoch() = %d, Live() = %v after forgeries, want %d, true: nothing is voided", e, a.Live(), e0)
	}

	// The Bus without a Secret applied every decodable one, tags unchecked,
	// and voided L1 for the garbage.
	for _, want := range []string{"forged-untagged", "forged-bad-tag", "genuine", "forged-secret-B", "from-peer"} {
		got := recv(t, ho.inv, "open Bus: Invalidate "+want)
		if want == "genuine" {
			want = "genuinX"
		}
		wantKeys(t, got, want)
	}
	for range 2 {
		if g := recv(t, ho.flush, "open Bus: Flush"); g != 5 {
			t.Errorf("open Bus: Flush(%d), want Flush(5)", g)
		}
	}
	if st := open.Stats(); st.Rejected != 0 || st.Malformed != uint64(len(garbage)) {
		t.Errorf("open Bus: Stats() = %+v, want Rejected 0, Malformed %d", st, len(garbage))
	}

	// An authenticated flush: its gen is not trusted, so the handler re-reads
	// the generation (Resync, while live) and the epoch voids L1.
	if err := peer.Publish(ctx, flush(peer.FlushMessagePrefix("ns"))); err != nil {
		t.Fatal(err)
	}
	c := recv(t, ha.resync, "Resync for the peer's flush")
	if !c.live || c.epoch != e0 || !c.hasDeadline {
		t.Errorf("during Resync: Live() = %v, Epoch() = %d, deadline %v, want true, %d, true", c.live, c.epoch, c.hasDeadline, e0)
	}
	if err := peer.Publish(ctx, must(peer.KeysMessage("ns", []string{"after-flush"}))); err != nil {
		t.Fatal(err)
	}
	wantKeys(t, recv(t, ha.inv, "Invalidate after the flush"), "after-flush")
	noValue(t, ha.flush, "Flush on a Bus with a Secret")
	if e := a.Epoch(); e != e0+2 || !a.Live() {
		t.Errorf("Epoch() = %d, Live() = %v after an authenticated flush, want %d, true", e, a.Live(), e0+2)
	}
	if st := a.Stats(); st.Rejected != uint64(len(forged)) || st.Reconnects != 0 {
		t.Errorf("Stats() = %+v, want Rejected %d and no reconnect", st, len(forged))
	}

	// A Resync that fails for a flush ends the subscription, like a gap.
	ha.fail.Store(true)
	if err := peer.Publish(ctx, flush(peer.FlushMessagePrefix("ns"))); err != nil {
		t.Fatal(err)
	}
	recv(t, ha.resync, "failing Resync for the flush")
	pollUntil(t, busWait, "Live() = false after a failed Resync", func() bool { return !a.Live() })
	ha.fail.Store(false)
	waitLive(t, a)
	if e := a.Epoch(); e <= e0+2 {
		t.Errorf("Epoch() = %d after resubscribing, want > %d", e, e0+2)
	}
}

// The Bus's own messages carry a valid tag under its Secret; its own echo
// is still skipped before any verification.
func TestBusSecretSigns(t *testing.T) {
	s := redistest.Shared(t)
	b := newTestBus(t, s, s.Client(t), Options{Secret: secretA})
	h := register(t, b, "ns")
	waitLive(t, b)
	p, err := b.KeysMessage("ns", []string{"k"})
	if err != nil {
		t.Fatal(err)
	}
	var m Message
	if err := m.UnmarshalBinary(p); err != nil {
		t.Fatalf("UnmarshalBinary(KeysMessage): %v", err)
	}
	if len(m.Tag) != TagSize || !m.Verify(secretA) || m.Verify(secretB) {
		t.Errorf("KeysMessage: Tag %x, Verify(A) %v, Verify(B) %v; want a tag valid under A only", m.Tag, m.Verify(secretA), m.Verify(secretB))
	}
	fp, err := b.FlushMessagePrefix("ns")
	if err != nil {
		t.Fatal(err)
	}
	for _, gen := range []uint64{0, 1, 1 << 40} {
		if err := m.UnmarshalBinary(binary.AppendUvarint(bytes.Clone(fp), gen)); err != nil {
			t.Fatalf("UnmarshalBinary(flush with gen %d): %v", gen, err)
		}
		if m.Gen != gen || !m.Verify(secretA) {
			t.Errorf("flush with gen %d: Gen %d, Verify(A) %v, want %d, true", gen, m.Gen, m.Verify(secretA), gen)
		}
	}
	if err := b.Publish(ctxT(t), p); err != nil {
		t.Fatal(err)
	}
	peer := newTestBus(t, s, s.Client(t), Options{Secret: secretA})
	if err := peer.Publish(ctxT(t), must(peer.KeysMessage("ns", []string{"sentinel"}))); err != nil {
		t.Fatal(err)
	}
	wantKeys(t, recv(t, h.inv, "Invalidate of the peer's sentinel"), "sentinel")
	if st := b.Stats(); st.Own != 1 || st.Rejected != 0 {
		t.Errorf("Stats() = %+v, want Own 1, Rejected 0", st)
	}
}

func TestBusSecretOptions(t *testing.T) {
	s := redistest.Shared(t)
	short := []byte("fifteen bytes!!")
	if b, err := New(s.Client(t), Options{Secret: short}); err == nil {
		b.Close()
		t.Errorf("New with a %d-byte Secret = nil error, want an error", len(short))
	} else if strings.Contains(err.Error(), string(short)) {
		t.Errorf("New's error %q contains the secret", err)
	}
	// The Bus keeps its own copy: changing the caller's slice changes nothing.
	secret := bytes.Clone(secretA)
	b := newTestBus(t, s, s.Client(t), Options{Secret: secret})
	copy(secret, secretB)
	var m Message
	if err := m.UnmarshalBinary(must(b.KeysMessage("ns", []string{"k"}))); err != nil || !m.Verify(secretA) {
		t.Errorf("after the caller changed its slice: Verify(original secret) = %v (%v), want true", m.Verify(secretA), err)
	}
}

func must(p []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return p
}

// lockedBuffer is a bytes.Buffer safe for the Bus's goroutine and the test.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// The secret never reaches the log, in any common encoding, through the
// state changes the Bus logs.
func TestBusSecretNotLogged(t *testing.T) {
	s := redistest.Start(t)
	var buf lockedBuffer
	log := slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	b := newTestBus(t, s, s.Client(t), Options{Secret: secretA, Logger: log})
	h := register(t, b, "ns")
	waitLive(t, b)
	h.drainResync()
	s.KillPubSub(t)
	recv(t, h.resync, "Resync after KillPubSub")
	waitLive(t, b)
	out := buf.String()
	if !strings.Contains(out, "regained") {
		t.Fatalf("log lacks the regained stream: %q", out)
	}
	for _, enc := range []string{string(secretA), hex.EncodeToString(secretA), base64.StdEncoding.EncodeToString(secretA), string(secretA[:12])} {
		if strings.Contains(out, enc) {
			t.Errorf("log contains the secret (as %q): %s", enc, out)
		}
	}
}

// countingHandler counts the keys it is told to invalidate.
type countingHandler struct{ keys atomic.Int64 }

func (h *countingHandler) Invalidate(keys []string)     { h.keys.Add(int64(len(keys))) }
func (h *countingHandler) Flush(uint64)                 {}
func (h *countingHandler) Resync(context.Context) error { return nil }

// TestBusSecretShardedConcurrentVerify: a sharded Bus verifies tags on one
// goroutine per channel at once. They shared one HMAC state, which under
// load either panicked in sha256 (killing the process) or rejected valid
// messages, whose keys then stayed stale in L1.
func TestBusSecretShardedConcurrentVerify(t *testing.T) {
	s := redistest.Shared(t)
	o := Options{ShardChannels: 4, Secret: secretA, BreakerThreshold: -1}
	rb := newTestBus(t, s, s.Client(t), o)
	sb := newTestBus(t, s, s.Client(t), o)
	waitLive(t, rb)
	waitLive(t, sb)
	h := &countingHandler{}
	if _, err := rb.Register("ns", h); err != nil {
		t.Fatal(err)
	}
	const per = 2000
	rdb := s.Client(t)
	ctx := ctxT(t)
	var wg sync.WaitGroup
	for i := range rb.Shards() {
		wg.Go(func() {
			for j := range per {
				msg, err := sb.KeysMessage("ns", []string{fmt.Sprintf("k%d-%d", i, j)})
				if err != nil {
					t.Error(err)
					return
				}
				if err := rdb.SPublish(ctx, sb.ShardChannel(i), msg).Err(); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	want := int64(per * rb.Shards())
	// Received counts a message before its handler runs: wait for the
	// handler's count (or for the refusals that would keep it short).
	pollUntil(t, busWait, "every message handled or refused", func() bool {
		st := rb.Stats()
		return h.keys.Load()+int64(st.Rejected+st.Malformed) >= want
	})
	if st := rb.Stats(); st.Rejected != 0 || h.keys.Load() != want {
		t.Fatalf("valid, authenticated invalidations lost: applied %d of %d keys; Stats %+v", h.keys.Load(), want, st)
	}
}
