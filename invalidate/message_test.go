package invalidate

import (
	"github.com/tiercache/tiercache/internal/racebuild"

	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"unsafe"
)

// go test ./invalidate -run TestMessageVectors -update-message-vectors
// rewrites testdata/vectors.json from messageVectors below; copy the hex
// strings into docs/wire.md afterwards (TestMessageVectorsInDocs checks).
var updateMessageVectors = flag.Bool("update-message-vectors", false, "rewrite invalidate/testdata/vectors.json")

const messageVectorsPath = "testdata/vectors.json"

var msgTestOrigin = [16]byte{0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f}

// msgTestSecret is the secret of the tagged test vectors (32 ASCII bytes).
var msgTestSecret = []byte("tiercache test vector secret 32B")

// msgBuild assembles raw message bytes by hand, independently of the
// encoder: []byte and string parts are copied, msgUv parts become uvarints,
// msgBE parts 8-byte big-endian integers, ints and runes single bytes.
type (
	msgUv uint64
	msgBE int64
)

func msgBuild(parts ...any) []byte {
	var b []byte
	for _, p := range parts {
		switch p := p.(type) {
		case []byte:
			b = append(b, p...)
		case string:
			b = append(b, p...)
		case int:
			b = append(b, byte(p))
		case rune:
			b = append(b, byte(p))
		case msgUv:
			b = binary.AppendUvarint(b, uint64(p))
		case msgBE:
			b = binary.BigEndian.AppendUint64(b, uint64(p))
		default:
			panic("msgBuild: bad part")
		}
	}
	return b
}

// msgHead is a valid header: magic, version, kind, flags 0, origin, seq 1,
// time 1, the given namespace.
func msgHead(kind int, ns string) []byte {
	return msgBuild('T', 1, kind, 0, msgTestOrigin[:], msgUv(1), msgBE(1), msgUv(len(ns)), ns)
}

func msgEqual(a, b Message) bool {
	if len(a.Keys) == 0 && len(b.Keys) == 0 {
		a.Keys, b.Keys = nil, nil
	}
	return reflect.DeepEqual(a, b)
}

func msgKeys(n int, f func(i int) string) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = f(i)
	}
	return keys
}

func TestMessageRoundTrip(t *testing.T) {
	cases := []struct {
		name string
		m    Message
	}{
		{"one key", Message{Origin: msgTestOrigin, Seq: 1, Time: 1700000000000000000, Namespace: "users", Kind: KindKeys, Keys: []string{"42"}}},
		{"zero values", Message{Namespace: "n", Kind: KindKeys, Keys: []string{"k"}}},
		{"extremes", Message{Origin: [16]byte{0xff, 0xff}, Seq: ^uint64(0), Time: -1 << 63, Namespace: strings.Repeat("é", 127) + "x", Kind: KindKeys, Keys: []string{"\x00", "\xff\xfe", "{k}"}}},
		{"max key len", Message{Namespace: "n", Kind: KindKeys, Keys: []string{strings.Repeat("k", MaxKeyLen)}}},
		{"max keys", Message{Namespace: "n", Kind: KindKeys, Keys: msgKeys(MaxKeys, func(i int) string { return strconv.Itoa(i) })}},
		{"duplicate keys", Message{Namespace: "n", Kind: KindKeys, Keys: []string{"a", "a"}}},
		{"flush", Message{Origin: msgTestOrigin, Seq: 300, Time: 1, Namespace: "users", Kind: KindFlush, Gen: 7}},
		{"flush gen 0", Message{Namespace: "n", Kind: KindFlush}},
		{"flush max gen", Message{Namespace: "n", Kind: KindFlush, Gen: ^uint64(0), Time: 1<<63 - 1}},
		{"flush empty keys slice", Message{Namespace: "n", Kind: KindFlush, Keys: []string{}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b, err := tc.m.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			if len(b) > MaxMessageSize {
				t.Fatalf("%d bytes", len(b))
			}
			if cap(b) != len(b) {
				t.Errorf("MarshalBinary: cap %d, len %d: size precomputation is off", cap(b), len(b))
			}
			b2, err := tc.m.AppendBinary([]byte("pre"))
			if err != nil || string(b2[:3]) != "pre" || !bytes.Equal(b2[3:], b) {
				t.Fatalf("AppendBinary disagrees with MarshalBinary: %v", err)
			}
			var got Message
			if err := got.UnmarshalBinary(b); err != nil {
				t.Fatal(err)
			}
			if !msgEqual(got, tc.m) {
				t.Fatalf("got %+v\nwant %+v", got, tc.m)
			}
		})
	}
}

// The encoder's output matches bytes assembled by hand from the layout in
// docs/wire.md.
func TestMessageLayout(t *testing.T) {
	m := Message{Origin: msgTestOrigin, Seq: 300, Time: 0x0102030405060708, Namespace: "ns", Kind: KindKeys, Keys: []string{"a", "bc"}}
	want := msgBuild('T', 1, 1, 0, msgTestOrigin[:], 0xac, 0x02, 1, 2, 3, 4, 5, 6, 7, 8, 2, "ns", 2, 1, "a", 2, "bc")
	got, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("got  %x\nwant %x", got, want)
	}

	// A flush ends with the uvarint generation, and uvarint(0) is one byte:
	// invalidate.Bus relies on this to let a script append the generation.
	f := Message{Origin: msgTestOrigin, Seq: 5, Time: 9, Namespace: "ns", Kind: KindFlush}
	prefix, err := f.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	for _, gen := range []uint64{0, 1, 127, 128, 1 << 40, ^uint64(0)} {
		f.Gen = gen
		full, err := f.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		if want := binary.AppendUvarint(bytes.Clone(prefix[:len(prefix)-1]), gen); !bytes.Equal(full, want) {
			t.Fatalf("gen %d: got %x, want %x", gen, full, want)
		}
	}
}

func TestMessageDecodedKeysDoNotAlias(t *testing.T) {
	m := Message{Namespace: "ns", Kind: KindKeys, Keys: []string{"alpha", "beta"}}
	b, _ := m.MarshalBinary()
	var got Message
	if err := got.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	lo, hi := uintptr(unsafe.Pointer(&b[0])), uintptr(unsafe.Pointer(&b[len(b)-1]))
	for _, s := range append([]string{got.Namespace}, got.Keys...) {
		if p := uintptr(unsafe.Pointer(unsafe.StringData(s))); p >= lo && p <= hi {
			t.Fatalf("%q aliases the input", s)
		}
	}
	for i := range b {
		b[i] = 0
	}
	if got.Namespace != "ns" || got.Keys[0] != "alpha" || got.Keys[1] != "beta" {
		t.Fatalf("decoded message changed with its input: %+v", got)
	}
}

func TestMessageEncodeRejects(t *testing.T) {
	cases := []struct {
		name string
		m    Message
	}{
		{"kind 0", Message{Namespace: "n", Keys: []string{"k"}}},
		{"kind 3", Message{Namespace: "n", Kind: 3}},
		{"empty namespace", Message{Kind: KindFlush}},
		{"namespace 256 bytes", Message{Namespace: strings.Repeat("n", 256), Kind: KindFlush}},
		{"namespace invalid UTF-8", Message{Namespace: "\xff", Kind: KindFlush}},
		{"no keys", Message{Namespace: "n", Kind: KindKeys}},
		{"too many keys", Message{Namespace: "n", Kind: KindKeys, Keys: msgKeys(MaxKeys+1, func(int) string { return "k" })}},
		{"empty key", Message{Namespace: "n", Kind: KindKeys, Keys: []string{"a", ""}}},
		{"key too long", Message{Namespace: "n", Kind: KindKeys, Keys: []string{strings.Repeat("k", MaxKeyLen+1)}}},
		{"keys with gen", Message{Namespace: "n", Kind: KindKeys, Keys: []string{"k"}, Gen: 1}},
		{"flush with keys", Message{Namespace: "n", Kind: KindFlush, Keys: []string{"k"}}},
		{"over MaxMessageSize", Message{Namespace: "n", Kind: KindKeys, Keys: msgKeys(300, func(int) string { return strings.Repeat("k", MaxKeyLen) })}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b, err := tc.m.AppendBinary([]byte("keep"))
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("err = %v, want ErrMalformed", err)
			}
			if string(b) != "keep" {
				t.Fatalf("buffer modified: %q", b)
			}
			if b, err := tc.m.MarshalBinary(); err == nil || b != nil {
				t.Fatalf("MarshalBinary = %x, %v", b, err)
			}
		})
	}
}

// msgInvalidCases are hand-made encodings every reader must reject. They
// become the invalid vectors in testdata/vectors.json.
func msgInvalidCases() []struct {
	name string
	b    []byte
} {
	keys := func(rest ...any) []byte { return msgBuild(append([]any{msgHead(1, "ns")}, rest...)...) }
	flush := func(rest ...any) []byte { return msgBuild(append([]any{msgHead(2, "ns")}, rest...)...) }
	withHeader := func(magic, version, kind, flags int) []byte {
		b := keys(msgUv(1), msgUv(1), "k")
		b[0], b[1], b[2], b[3] = byte(magic), byte(version), byte(kind), byte(flags)
		return b
	}
	return []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"wrong magic", withHeader('t', 1, 1, 0)},
		{"version 0", withHeader('T', 0, 1, 0)},
		{"version 2 without the tag flag", withHeader('T', 2, 1, 0)},
		{"version 3", withHeader('T', 3, 1, 0)},
		{"version 2, flags 0x03", msgBuild('T', 2, 1, 3, msgTestOrigin[:], msgUv(1), msgBE(1), msgUv(2), "ns", msgUv(1), msgUv(1), "k", bytes.Repeat([]byte{0xaa}, TagSize))},
		{"version 2 keys: tag truncated", msgBuild('T', 2, 1, 1, msgTestOrigin[:], msgUv(1), msgBE(1), msgUv(2), "ns", msgUv(1), msgUv(1), "k", bytes.Repeat([]byte{0xaa}, TagSize-1))},
		{"version 2 keys: no tag", msgBuild('T', 2, 1, 1, msgTestOrigin[:], msgUv(1), msgBE(1), msgUv(2), "ns", msgUv(1), msgUv(1), "k")},
		{"version 2 flush: tag truncated", msgBuild('T', 2, 2, 1, msgTestOrigin[:], msgUv(1), msgBE(1), msgUv(2), "ns", bytes.Repeat([]byte{0xaa}, TagSize-1))},
		{"version 2 flush: missing gen", msgBuild('T', 2, 2, 1, msgTestOrigin[:], msgUv(1), msgBE(1), msgUv(2), "ns", bytes.Repeat([]byte{0xaa}, TagSize))},
		{"version 2 flush: trailing byte", msgBuild('T', 2, 2, 1, msgTestOrigin[:], msgUv(1), msgBE(1), msgUv(2), "ns", bytes.Repeat([]byte{0xaa}, TagSize), msgUv(7), 0)},
		{"kind 0", withHeader('T', 1, 0, 0)},
		{"kind 3", withHeader('T', 1, 3, 0)},
		{"flags 0x01", withHeader('T', 1, 1, 1)},
		{"flags 0x80", withHeader('T', 1, 1, 0x80)},
		{"truncated origin", msgBuild('T', 1, 1, 0, msgTestOrigin[:15])},
		{"truncated time", msgBuild('T', 1, 1, 0, msgTestOrigin[:], msgUv(1), 0, 0, 0)},
		{"seq overflows 64 bits", msgBuild('T', 1, 2, 0, msgTestOrigin[:], bytes.Repeat([]byte{0xff}, 9), 0x02, msgBE(1), msgUv(2), "ns", msgUv(1))},
		{"seq not minimally encoded", msgBuild('T', 1, 2, 0, msgTestOrigin[:], 0x81, 0x00, msgBE(1), msgUv(2), "ns", msgUv(1))},
		{"namespace length 0", msgBuild(msgHead(2, ""), msgUv(1))},
		{"namespace length 256", msgBuild(msgHead(2, strings.Repeat("n", 256)), msgUv(1))},
		{"namespace length 256, bytes omitted", msgBuild('T', 1, 2, 0, msgTestOrigin[:], msgUv(1), msgBE(1), msgUv(256))},
		{"namespace invalid UTF-8", msgBuild(msgHead(2, "n\xff"), msgUv(1))},
		{"namespace truncated", msgHead(2, "ns")[:len(msgHead(2, "ns"))-1]},
		{"keys: count 0", keys(msgUv(0))},
		{"keys: count 10001", keys(msgUv(MaxKeys+1), bytes.Repeat([]byte{1, 'k'}, MaxKeys+1))},
		{"keys: count 10001, keys omitted", keys(msgUv(MaxKeys + 1))},
		{"keys: count larger than the bytes left", keys(msgUv(3), msgUv(1), "a", msgUv(1), "b")},
		{"keys: key length 0", keys(msgUv(2), msgUv(1), "a", msgUv(0))},
		{"keys: key length 4097", keys(msgUv(1), msgUv(MaxKeyLen+1), strings.Repeat("k", MaxKeyLen+1))},
		{"keys: key length 4097, bytes omitted", keys(msgUv(1), msgUv(MaxKeyLen+1))},
		{"keys: key truncated", keys(msgUv(1), msgUv(3), "ab")},
		{"keys: key length not minimally encoded", keys(msgUv(1), 0x81, 0x00, "a")},
		{"keys: trailing byte", keys(msgUv(1), msgUv(1), "k", 0)},
		{"flush: missing gen", flush()},
		{"flush: gen not minimally encoded", flush(0x80, 0x00)},
		{"flush: trailing byte", flush(msgUv(7), 0)},
	}
}

func TestMessageDecodeRejects(t *testing.T) {
	for _, tc := range msgInvalidCases() {
		t.Run(tc.name, func(t *testing.T) {
			msgCheckRejected(t, tc.b)
		})
	}
	t.Run("over MaxMessageSize", func(t *testing.T) {
		// Valid except for its size: 257 keys of 4096 bytes.
		b := msgBuild(msgHead(1, "ns"), msgUv(257))
		for range 257 {
			b = msgBuild(b, msgUv(MaxKeyLen), strings.Repeat("k", MaxKeyLen))
		}
		msgCheckRejected(t, b)
	})
}

func msgCheckRejected(t *testing.T, b []byte) {
	t.Helper()
	sentinel := Message{Namespace: "untouched", Kind: KindFlush, Gen: 99}
	m := sentinel
	err := m.UnmarshalBinary(b)
	if !errors.Is(err, ErrMalformed) {
		t.Fatalf("UnmarshalBinary(%x) = %v, want ErrMalformed", b, err)
	}
	if !msgEqual(m, sentinel) {
		t.Fatalf("message modified on error: %+v", m)
	}
}

// Every proper prefix of a valid message is rejected.
func TestMessageTruncated(t *testing.T) {
	for _, m := range []Message{
		{Origin: msgTestOrigin, Seq: 1 << 20, Time: 1700000000000000000, Namespace: "users", Kind: KindKeys, Keys: []string{"42", "a-much-longer-key:with:parts", strings.Repeat("x", 200)}},
		{Origin: msgTestOrigin, Seq: 300, Time: 1, Namespace: "café", Kind: KindFlush, Gen: 1 << 35},
	} {
		b, err := m.MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		for n := range len(b) {
			var got Message
			if err := got.UnmarshalBinary(b[:n]); !errors.Is(err, ErrMalformed) {
				t.Fatalf("%s message truncated to %d of %d bytes: err = %v", m.Kind, n, len(b), err)
			}
		}
	}
}

// A hostile key count must not drive allocation.
func TestMessageCountBoundsAllocation(t *testing.T) {
	b := msgBuild(msgHead(1, "ns"), msgUv(MaxKeys), msgUv(1), "k")
	allocs := testing.AllocsPerRun(20, func() {
		var m Message
		if err := m.UnmarshalBinary(b); !errors.Is(err, ErrMalformed) {
			t.Fatal(err)
		}
	})
	limit := 5.0 // the error value only
	if racebuild.Enabled {
		limit = 20 // the race detector allocates on its own account
	}
	if allocs > limit {
		t.Fatalf("%v allocations, want ≤ %v", allocs, limit)
	}
}

func TestMessageKindString(t *testing.T) {
	for k, want := range map[Kind]string{KindKeys: "keys", KindFlush: "flush", 0: "Kind(0)", 200: "Kind(200)"} {
		if got := k.String(); got != want {
			t.Errorf("Kind(%d).String() = %q, want %q", uint8(k), got, want)
		}
	}
}

// messageVectorFile is the layout of testdata/vectors.json. 64-bit integers
// are decimal strings so that JavaScript's JSON.parse does not round them.
type messageVectorFile struct {
	Comment string                 `json:"comment"`
	Valid   []messageValidVector   `json:"valid"`
	Invalid []messageInvalidVector `json:"invalid"`
}

type messageValidVector struct {
	Name      string   `json:"name"`
	Hex       string   `json:"hex"`
	Origin    string   `json:"origin_hex"`
	Seq       uint64   `json:"seq,string"`
	Time      int64    `json:"time,string"`
	Namespace string   `json:"namespace"`
	Kind      Kind     `json:"kind"`
	Keys      []string `json:"keys"`
	Gen       uint64   `json:"gen,string"`
	// Tagged vectors only: the tag, and the secret it verifies under.
	Tag    string `json:"tag_hex,omitempty"`
	Secret string `json:"secret_hex,omitempty"`
}

type messageInvalidVector struct {
	Name string `json:"name"`
	Hex  string `json:"hex"`
}

func messageVectors() messageVectorFile {
	const ts = 1700000000000000000 // 2023-11-14T22:13:20Z in unix ns
	valid := []struct {
		name string
		m    Message
		sign bool // sign with msgTestSecret
	}{
		{"keys: one key", Message{Origin: msgTestOrigin, Seq: 1, Time: ts, Namespace: "users", Kind: KindKeys, Keys: []string{"42"}}, false},
		{"keys: three keys, two-byte seq", Message{Origin: msgTestOrigin, Seq: 300, Time: ts, Namespace: "orders", Kind: KindKeys, Keys: []string{"a", "b:c", "{ü}"}}, false},
		{"flush", Message{Origin: msgTestOrigin, Seq: 2, Time: ts, Namespace: "users", Kind: KindFlush, Gen: 7}, false},
		{"flush: UTF-8 namespace, max seq and gen, negative time", Message{Origin: [16]byte{0xff, 0xee, 0xdd, 0xcc, 0xbb, 0xaa, 0x99, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0x00}, Seq: ^uint64(0), Time: -1, Namespace: "café", Kind: KindFlush, Gen: ^uint64(0)}, false},
		{"tagged keys: one key", Message{Origin: msgTestOrigin, Seq: 1, Time: ts, Namespace: "users", Kind: KindKeys, Keys: []string{"42"}}, true},
		{"tagged flush", Message{Origin: msgTestOrigin, Seq: 2, Time: ts, Namespace: "users", Kind: KindFlush, Gen: 7}, true},
		{"tagged flush: same tag, gen 300", Message{Origin: msgTestOrigin, Seq: 2, Time: ts, Namespace: "users", Kind: KindFlush, Gen: 300}, true},
	}
	f := messageVectorFile{Comment: "tiercache invalidation message test vectors, see docs/wire.md. " +
		"valid: decoding hex gives the fields and encoding the fields gives hex. invalid: a reader must reject hex. " +
		"64-bit integers are decimal strings; keys and namespace are UTF-8 strings here, bytes on the wire."}
	for _, v := range valid {
		var tag, secret string
		if v.sign {
			if err := v.m.Sign(msgTestSecret); err != nil {
				panic(err)
			}
			tag, secret = hex.EncodeToString(v.m.Tag), hex.EncodeToString(msgTestSecret)
		}
		b, err := v.m.MarshalBinary()
		if err != nil {
			panic(err)
		}
		keys := v.m.Keys
		if keys == nil {
			keys = []string{} // "keys": [] rather than null
		}
		f.Valid = append(f.Valid, messageValidVector{
			Name: v.name, Hex: hex.EncodeToString(b), Origin: hex.EncodeToString(v.m.Origin[:]), Seq: v.m.Seq, Time: v.m.Time,
			Namespace: v.m.Namespace, Kind: v.m.Kind, Keys: keys, Gen: v.m.Gen, Tag: tag, Secret: secret,
		})
	}
	for _, c := range msgInvalidCases() {
		if len(c.b) > 100 {
			continue // too long to print; covered by TestMessageDecodeRejects
		}
		f.Invalid = append(f.Invalid, messageInvalidVector{Name: c.name, Hex: hex.EncodeToString(c.b)})
	}
	return f
}

func msgLoadVectors(t testing.TB) messageVectorFile {
	data, err := os.ReadFile(messageVectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	var f messageVectorFile
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&f); err != nil {
		t.Fatal(err)
	}
	if len(f.Valid) == 0 || len(f.Invalid) == 0 {
		t.Fatal("no vectors")
	}
	return f
}

func TestMessageVectors(t *testing.T) {
	want, err := json.MarshalIndent(messageVectors(), "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	want = append(want, '\n')
	if *updateMessageVectors {
		if err := os.MkdirAll(filepath.Dir(messageVectorsPath), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(messageVectorsPath, want, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	f := msgLoadVectors(t)
	for _, v := range f.Valid {
		t.Run("valid/"+v.Name, func(t *testing.T) {
			b, err := hex.DecodeString(v.Hex)
			if err != nil {
				t.Fatal(err)
			}
			wantM := Message{Seq: v.Seq, Time: v.Time, Namespace: v.Namespace, Kind: v.Kind, Keys: v.Keys, Gen: v.Gen}
			o, err := hex.DecodeString(v.Origin)
			if err != nil || len(o) != 16 {
				t.Fatalf("bad origin_hex %q", v.Origin)
			}
			copy(wantM.Origin[:], o)
			if v.Tag != "" {
				if wantM.Tag, err = hex.DecodeString(v.Tag); err != nil {
					t.Fatalf("bad tag_hex %q", v.Tag)
				}
			}
			var got Message
			if err := got.UnmarshalBinary(b); err != nil {
				t.Fatal(err)
			}
			if !msgEqual(got, wantM) {
				t.Fatalf("decoded %+v\nwant %+v", got, wantM)
			}
			enc, err := wantM.MarshalBinary()
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(enc, b) {
				t.Fatalf("encoded %x\nwant    %s", enc, v.Hex)
			}
			if v.Tag == "" {
				return
			}
			secret, err := hex.DecodeString(v.Secret)
			if err != nil || len(secret) == 0 {
				t.Fatalf("bad secret_hex %q", v.Secret)
			}
			if !got.Verify(secret) {
				t.Errorf("Verify(secret_hex) = false, want true")
			}
			if got.Verify([]byte("another secret, also 32 bytes...")) {
				t.Errorf("Verify(another secret) = true, want false")
			}
			a, err := newAuth(secret)
			if err != nil {
				t.Fatal(err)
			}
			if !a.verify(b, &got) {
				t.Errorf("the Bus's verify rejects the vector")
			}
			signed := wantM
			signed.Tag = nil
			if p, err := a.marshal(&signed); err != nil || !bytes.Equal(p, b) {
				t.Errorf("the Bus's marshal = %x, %v, want %x", p, err, b)
			}
		})
	}
	for _, v := range f.Invalid {
		t.Run("invalid/"+v.Name, func(t *testing.T) {
			b, err := hex.DecodeString(v.Hex)
			if err != nil {
				t.Fatal(err)
			}
			msgCheckRejected(t, b)
		})
	}
	got, err := os.ReadFile(messageVectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s is out of date with messageVectors(); run go test -run TestMessageVectors -update-message-vectors", messageVectorsPath)
	}
}

// Every vector's hex must appear in docs/wire.md.
func TestMessageVectorsInDocs(t *testing.T) {
	doc, err := os.ReadFile("../docs/wire.md")
	if err != nil {
		t.Fatal(err)
	}
	f := msgLoadVectors(t)
	for _, v := range f.Valid {
		if !bytes.Contains(doc, []byte(v.Hex)) {
			t.Errorf("docs/wire.md lacks valid vector %q: %s", v.Name, v.Hex)
		}
	}
	for _, v := range f.Invalid {
		if v.Hex != "" && !bytes.Contains(doc, []byte(v.Hex)) {
			t.Errorf("docs/wire.md lacks invalid vector %q: %s", v.Name, v.Hex)
		}
	}
}

func BenchmarkMessageMarshal(b *testing.B) {
	for _, n := range []int{1, 100} {
		m := Message{Origin: msgTestOrigin, Seq: 123456, Time: 1700000000000000000, Namespace: "users", Kind: KindKeys,
			Keys: msgKeys(n, func(i int) string { return "user:" + strconv.Itoa(1000000+i) })}
		b.Run(strconv.Itoa(n)+"keys", func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := m.MarshalBinary(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(strconv.Itoa(n)+"keys/append", func(b *testing.B) {
			b.ReportAllocs()
			var buf []byte
			for b.Loop() {
				var err error
				if buf, err = m.AppendBinary(buf[:0]); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkMessageUnmarshal(b *testing.B) {
	for _, n := range []int{1, 100} {
		m := Message{Origin: msgTestOrigin, Seq: 123456, Time: 1700000000000000000, Namespace: "users", Kind: KindKeys,
			Keys: msgKeys(n, func(i int) string { return "user:" + strconv.Itoa(1000000+i) })}
		enc, err := m.MarshalBinary()
		if err != nil {
			b.Fatal(err)
		}
		b.Run(strconv.Itoa(n)+"keys", func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(enc)))
			for b.Loop() {
				var got Message
				if err := got.UnmarshalBinary(enc); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
