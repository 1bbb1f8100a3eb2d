package wire

import (
	"go.uber.org/goleak"

	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"

	"github.com/klauspost/compress/s2"
)

const testMax = 1 << 20

// header builds a raw 20-byte header, bypassing validation.
func header(version, codec byte, flags Flags, writeID uint64, freshUntil int64) []byte {
	h := make([]byte, HeaderSize)
	h[0] = Magic
	h[1] = version
	h[2] = codec
	h[3] = byte(flags)
	binary.BigEndian.PutUint64(h[4:], writeID)
	binary.BigEndian.PutUint64(h[12:], uint64(freshUntil))
	return h
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

func equalEnvelope(a, b Envelope) bool {
	return a.Codec == b.Codec && a.Flags == b.Flags && a.WriteID == b.WriteID &&
		a.FreshUntil == b.FreshUntil && bytes.Equal(a.Payload, b.Payload)
}

func TestRoundTrip(t *testing.T) {
	compressible := []byte(strings.Repeat(`{"name":"tiercache","n":12345},`, 40))
	incompressible := make([]byte, 300)
	_, _ = rand.NewChaCha8([32]byte{1}).Read(incompressible)
	cases := []struct {
		name          string
		e             Envelope
		compressAbove int
		wantComp      bool
	}{
		{"json", Envelope{Codec: CodecJSON, WriteID: 1, Payload: []byte(`{"a":1}`)}, -1, false},
		{"msgpack fresh", Envelope{Codec: CodecMsgpack, WriteID: 1 << 63, FreshUntil: 1700000000000, Payload: []byte{0x81, 0xa1, 0x61, 0x01}}, -1, false},
		{"raw empty", Envelope{Codec: CodecRaw, WriteID: 7}, 0, false},
		{"user codec", Envelope{Codec: 255, WriteID: ^uint64(0), FreshUntil: 1<<63 - 1, Payload: []byte("x")}, -1, false},
		{"negative", Envelope{Flags: FlagNegative, WriteID: 9, FreshUntil: 5}, 0, false},
		{"tombstone", Envelope{Flags: FlagTombstone, WriteID: 10}, 0, false},
		{"compressed", Envelope{Codec: CodecJSON, WriteID: 11, Payload: compressible}, 0, true},
		{"compress threshold equal", Envelope{Codec: CodecJSON, WriteID: 12, Payload: compressible}, len(compressible), false},
		{"compress threshold below", Envelope{Codec: CodecJSON, WriteID: 12, Payload: compressible}, len(compressible) - 1, true},
		{"compression disabled", Envelope{Codec: CodecJSON, WriteID: 13, Payload: compressible}, -1, false},
		{"incompressible", Envelope{Codec: CodecRaw, WriteID: 14, Payload: incompressible}, 0, false},
		{"tiny", Envelope{Codec: CodecRaw, WriteID: 15, Payload: []byte("aaaa")}, 0, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			prefix := []byte("prefix")
			b, err := AppendEnvelope(bytes.Clone(prefix), tc.e, tc.compressAbove)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.HasPrefix(b, prefix) {
				t.Fatal("prefix clobbered")
			}
			b = b[len(prefix):]
			if !IsEnvelope(b) {
				t.Fatal("IsEnvelope = false")
			}
			gotComp := Flags(b[3])&FlagCompressed != 0
			if gotComp != tc.wantComp {
				t.Fatalf("compressed = %v, want %v", gotComp, tc.wantComp)
			}
			if gotComp && len(b) >= HeaderSize+len(tc.e.Payload) {
				t.Fatalf("compressed to %d bytes, no saving over %d", len(b)-HeaderSize, len(tc.e.Payload))
			}
			if !gotComp && !bytes.Equal(b[HeaderSize:], tc.e.Payload) {
				t.Fatal("uncompressed payload differs")
			}
			got, err := DecodeEnvelope(b, testMax)
			if err != nil {
				t.Fatal(err)
			}
			if !equalEnvelope(got, tc.e) {
				t.Fatalf("got %+v, want %+v", got, tc.e)
			}
			if len(tc.e.Payload) == 0 && got.Payload != nil {
				t.Fatal("empty payload not returned as nil")
			}
		})
	}
}

func TestDecodeAliasing(t *testing.T) {
	b, _ := AppendEnvelope(nil, Envelope{Codec: CodecRaw, WriteID: 1, Payload: []byte("abc")}, -1)
	e, err := DecodeEnvelope(b, testMax)
	if err != nil {
		t.Fatal(err)
	}
	if &e.Payload[0] != &b[HeaderSize] {
		t.Fatal("uncompressed payload does not alias the input")
	}
	if cap(e.Payload) != len(e.Payload) {
		t.Fatal("payload capacity not clipped")
	}
	_ = append(e.Payload, 'x') // must not write past b
}

func TestAppendEnvelopeRejects(t *testing.T) {
	cases := []struct {
		name string
		e    Envelope
	}{
		{"caller set compressed", Envelope{Codec: CodecJSON, Flags: FlagCompressed, WriteID: 1, Payload: []byte("x")}},
		{"reserved flag", Envelope{Codec: CodecJSON, Flags: 1 << 3, WriteID: 1}},
		{"high flag", Envelope{Codec: CodecJSON, Flags: 0x80, WriteID: 1}},
		{"zero write id", Envelope{Codec: CodecJSON}},
		{"negative fresh-until", Envelope{Codec: CodecJSON, WriteID: 1, FreshUntil: -1}},
		{"tombstone payload", Envelope{Flags: FlagTombstone, WriteID: 1, Payload: []byte("x")}},
		{"negative payload", Envelope{Flags: FlagNegative, WriteID: 1, Payload: []byte("x")}},
		{"tombstone and negative", Envelope{Flags: FlagTombstone | FlagNegative, WriteID: 1}},
		{"tombstone codec", Envelope{Codec: CodecJSON, Flags: FlagTombstone, WriteID: 1}},
		{"negative codec", Envelope{Codec: CodecJSON, Flags: FlagNegative, WriteID: 1}},
		{"value codec 0", Envelope{WriteID: 1, Payload: []byte("x")}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dst := []byte("keep")
			b, err := AppendEnvelope(dst, tc.e, 0)
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("err = %v, want ErrInvalid", err)
			}
			if string(b) != "keep" {
				t.Fatalf("dst modified: %q", b)
			}
		})
	}
}

func TestDecodeEnvelopeRejects(t *testing.T) {
	valid := header(Version, CodecJSON, 0, 1, 0)
	bomb := s2.Encode(nil, make([]byte, 1<<20)) // 1 MiB of zeros in a few dozen bytes
	goodBlock := s2.Encode(nil, bytes.Repeat([]byte("abcd"), 64))
	truncBlock := goodBlock[:len(goodBlock)-3]
	cases := []struct {
		name string
		b    []byte
		max  int
		want error
	}{
		{"nil", nil, testMax, ErrCorrupt},
		{"one byte", []byte{Magic}, testMax, ErrCorrupt},
		{"19 bytes", valid[:19], testMax, ErrCorrupt},
		{"json", []byte(`{"a":1,"bbbbbbbbbbbbbbbbbbbbbbbb":2}`), testMax, ErrCorrupt},
		{"wrong magic", cat([]byte{0xFF}, valid[1:]), testMax, ErrCorrupt},
		{"version 0", header(0, CodecJSON, 0, 1, 0), testMax, ErrUnsupportedVersion},
		{"version 2", header(2, CodecJSON, 0, 1, 0), testMax, ErrUnsupportedVersion},
		{"flag bit 3", header(Version, CodecJSON, 1<<3, 1, 0), testMax, ErrCorrupt},
		{"flag bit 7", header(Version, CodecJSON, 1<<7, 1, 0), testMax, ErrCorrupt},
		{"zero write id", header(Version, CodecJSON, 0, 0, 0), testMax, ErrCorrupt},
		{"negative fresh-until", header(Version, CodecJSON, 0, 1, -1), testMax, ErrCorrupt},
		{"tombstone with payload", cat(header(Version, CodecNone, FlagTombstone, 1, 0), []byte("x")), testMax, ErrCorrupt},
		{"negative with payload", cat(header(Version, CodecNone, FlagNegative, 1, 0), []byte("x")), testMax, ErrCorrupt},
		{"tombstone and negative", header(Version, CodecNone, FlagTombstone|FlagNegative, 1, 0), testMax, ErrCorrupt},
		{"tombstone with codec", header(Version, CodecJSON, FlagTombstone, 1, 0), testMax, ErrCorrupt},
		{"compressed tombstone", header(Version, CodecNone, FlagTombstone|FlagCompressed, 1, 0), testMax, ErrCorrupt},
		{"value with codec 0", cat(header(Version, CodecNone, 0, 1, 0), []byte("x")), testMax, ErrCorrupt},
		{"compressed empty", header(Version, CodecJSON, FlagCompressed, 1, 0), testMax, ErrCorrupt},
		{"compressed bad length varint", cat(header(Version, CodecJSON, FlagCompressed, 1, 0), []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}), testMax, ErrCorrupt},
		{"compressed truncated", cat(header(Version, CodecJSON, FlagCompressed, 1, 0), truncBlock), testMax, ErrCorrupt},
		{"compressed garbage", cat(header(Version, CodecJSON, FlagCompressed, 1, 0), []byte{0x10, 0xff, 0xff, 0xff}), testMax, ErrCorrupt},
		{"compressed trailing garbage", cat(header(Version, CodecJSON, FlagCompressed, 1, 0), goodBlock, []byte{0}), testMax, ErrCorrupt},
		{"oversize plain", cat(valid, make([]byte, 11)), 10, ErrTooLarge},
		{"oversize compressed", cat(header(Version, CodecJSON, FlagCompressed, 1, 0), goodBlock), 255, ErrTooLarge},
		{"zip bomb", cat(header(Version, CodecJSON, FlagCompressed, 1, 0), bomb), 1 << 16, ErrTooLarge},
		{"negative max", cat(valid, []byte("x")), -1, ErrTooLarge},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e, err := DecodeEnvelope(tc.b, tc.max)
			if !errors.Is(err, tc.want) || !errors.Is(err, ErrCorrupt) {
				t.Fatalf("err = %v, want %v (wrapping ErrCorrupt); envelope %+v", err, tc.want, e)
			}
			if !equalEnvelope(e, Envelope{}) {
				t.Fatalf("non-zero envelope returned with error: %+v", e)
			}
		})
	}
	// Limits at the boundary are accepted.
	if _, err := DecodeEnvelope(cat(valid, make([]byte, 10)), 10); err != nil {
		t.Fatalf("payload at the limit: %v", err)
	}
	if _, err := DecodeEnvelope(cat(header(Version, CodecJSON, FlagCompressed, 1, 0), goodBlock), 256); err != nil {
		t.Fatalf("compressed payload at the limit: %v", err)
	}
	if _, err := DecodeEnvelope(header(Version, CodecNone, FlagTombstone, 1, 0), -1); err != nil {
		t.Fatalf("tombstone with negative max: %v", err)
	}
}

// A zip bomb must be rejected before the decoder allocates its claimed size.
func TestDecodeEnvelopeBombDoesNotAllocate(t *testing.T) {
	b := cat(header(Version, CodecJSON, FlagCompressed, 1, 0), s2.Encode(nil, make([]byte, 8<<20)))
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range 20 {
		if _, err := DecodeEnvelope(b, 1<<10); !errors.Is(err, ErrTooLarge) {
			t.Fatal(err)
		}
	}
	runtime.ReadMemStats(&after)
	// Only error values may be allocated: far less than one 8 MiB buffer.
	if n := after.TotalAlloc - before.TotalAlloc; n > 64<<10 {
		t.Fatalf("rejecting 20 bombs allocated %d bytes", n)
	}
}

func TestIsEnvelope(t *testing.T) {
	for _, tc := range []struct {
		b    []byte
		want bool
	}{
		{nil, false},
		{[]byte{Magic}, false},
		{header(Version, CodecJSON, 0, 1, 0)[:19], false},
		{header(Version, CodecJSON, 0, 1, 0), true},
		{header(9, 0, 0xff, 0, -1), true}, // IsEnvelope does not validate
		{[]byte(`"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"`), false},
		{[]byte("\uFEFF{}aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"), false}, // BOM is EF BB BF
	} {
		if got := IsEnvelope(tc.b); got != tc.want {
			t.Errorf("IsEnvelope(%x) = %v, want %v", tc.b, got, tc.want)
		}
	}
}

func TestAppendEnvelopeAllocs(t *testing.T) {
	p := bytes.Repeat([]byte(`{"k":"v"},`), 100)
	dst := make([]byte, 0, 4096)
	for _, ca := range []int{-1, 0} {
		allocs := testing.AllocsPerRun(50, func() {
			if _, err := AppendEnvelope(dst[:0], Envelope{Codec: CodecJSON, WriteID: 1, Payload: p}, ca); err != nil {
				t.Fatal(err)
			}
		})
		if allocs != 0 {
			t.Errorf("compressAbove=%d: %v allocs with a large enough dst", ca, allocs)
		}
	}
}

func benchPayload(n int) []byte {
	// JSON-ish, moderately compressible, deterministic.
	var sb strings.Builder
	for i := 0; sb.Len() < n; i++ {
		fmt.Fprintf(&sb, `{"id":%d,"name":"user-%d","active":%t,"score":%d.%02d},`, i, i*7919%10007, i%3 == 0, i*37%1000, i%100)
	}
	return []byte(sb.String()[:n])
}

var benchSizes = []struct {
	name string
	n    int
}{{"100B", 100}, {"1KiB", 1 << 10}, {"16KiB", 16 << 10}}

func BenchmarkAppendEnvelope(b *testing.B) {
	for _, sz := range benchSizes {
		p := benchPayload(sz.n)
		for _, mode := range []struct {
			name string
			ca   int
		}{{"plain", -1}, {"s2", 0}} {
			b.Run(sz.name+"/"+mode.name, func(b *testing.B) {
				b.ReportAllocs()
				b.SetBytes(int64(len(p)))
				var dst []byte
				for b.Loop() {
					var err error
					dst, err = AppendEnvelope(dst[:0], Envelope{Codec: CodecJSON, WriteID: 1, Payload: p}, mode.ca)
					if err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(len(dst)), "bytes/envelope")
			})
		}
	}
}

func BenchmarkDecodeEnvelope(b *testing.B) {
	for _, sz := range benchSizes {
		p := benchPayload(sz.n)
		for _, mode := range []struct {
			name string
			ca   int
		}{{"plain", -1}, {"s2", 0}} {
			enc, err := AppendEnvelope(nil, Envelope{Codec: CodecJSON, WriteID: 1, Payload: p}, mode.ca)
			if err != nil {
				b.Fatal(err)
			}
			b.Run(sz.name+"/"+mode.name, func(b *testing.B) {
				b.ReportAllocs()
				b.SetBytes(int64(len(p)))
				for b.Loop() {
					if _, err := DecodeEnvelope(enc, testMax); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// TestMain checks that no test leaves a goroutine behind.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
