package wire

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/s2"
)

// go test ./internal/wire -run TestVectors -update rewrites testdata/vectors.json
// from wireVectors below. The hex strings must then be copied into
// docs/wire.md (TestVectorsInDocs checks that they are there).
var update = flag.Bool("update", false, "rewrite testdata/vectors.json")

const vectorsPath = "testdata/vectors.json"

// vectorFile is the layout of testdata/vectors.json. 64-bit integers are
// decimal strings so that JavaScript's JSON.parse does not round them.
type vectorFile struct {
	Comment string          `json:"comment"`
	Valid   []validVector   `json:"valid"`
	Invalid []invalidVector `json:"invalid"`
}

type validVector struct {
	Name       string `json:"name"`
	Hex        string `json:"hex"`
	MaxPayload int    `json:"max_payload"`
	// Decoded fields. Flags never includes bit0; Compressed says whether the
	// stored payload was an S2 block.
	Codec      byte   `json:"codec"`
	Flags      Flags  `json:"flags"`
	Compressed bool   `json:"compressed"`
	WriteID    uint64 `json:"write_id,string"`
	FreshUntil int64  `json:"fresh_until,string"`
	PayloadHex string `json:"payload_hex"`
}

type invalidVector struct {
	Name       string `json:"name"`
	Hex        string `json:"hex"`
	MaxPayload int    `json:"max_payload"`
	// Error is "corrupt", "version" (ErrUnsupportedVersion) or "too_large"
	// (ErrTooLarge); all of them are ErrCorrupt.
	Error string `json:"error"`
}

const defaultVectorMax = 1 << 20

func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

func mustAppend(e Envelope, compressAbove int) []byte {
	b, err := AppendEnvelope(nil, e, compressAbove)
	if err != nil {
		panic(err)
	}
	return b
}

// wireVectors builds the vector set. Valid vectors are produced by
// AppendEnvelope; invalid ones are hand-made.
func wireVectors() vectorFile {
	const ts = 1700000000000 // 2023-11-14T22:13:20Z in unix ms
	long := []byte(`{"v":"` + strings.Repeat("a", 64) + `"}`)
	repeats := []byte(`[` + strings.Repeat(`"tiercache",`, 8) + `"x"]`)
	valid := []struct {
		name string
		e    Envelope
		ca   int
	}{
		{"json value", Envelope{Codec: CodecJSON, WriteID: 0x0102030405060708, Payload: []byte(`{"a":1}`)}, -1},
		{"raw string with fresh-until", Envelope{Codec: CodecRaw, WriteID: 1, FreshUntil: ts, Payload: []byte("hello")}, -1},
		{"msgpack value", Envelope{Codec: CodecMsgpack, WriteID: 0x8000000000000000, Payload: []byte{0x81, 0xa1, 0x61, 0x01}}, -1},
		{"user codec, empty payload", Envelope{Codec: CodecUserMin, WriteID: 2}, -1},
		{"negative entry", Envelope{Flags: FlagNegative, WriteID: 42, FreshUntil: ts}, -1},
		{"tombstone", Envelope{Flags: FlagTombstone, WriteID: 0xFFFFFFFFFFFFFFFF}, -1},
		{"s2-compressed json", Envelope{Codec: CodecJSON, WriteID: 3, FreshUntil: ts, Payload: long}, 0},
		{"s2-compressed json with an S2 repeat code", Envelope{Codec: CodecJSON, WriteID: 4, Payload: repeats}, 0},
	}
	// Compressed bytes depend on the S2 encoder (its version, and assembly
	// versus pure Go), so the blocks are fixed here rather than produced by
	// s2.Encode. blockRepeats holds an S2 repeat-offset copy (15 00 45),
	// which plain Snappy decoders reject.
	blockLong := mustHex("48187b2276223a2261fa010004227d")
	blockRepeats := mustHex("65305b22746965726361636865222c110c1500450878225d")
	blocks := map[string][]byte{"s2-compressed json": blockLong, "s2-compressed json with an S2 repeat code": blockRepeats}
	bomb := mustHex("80808008000011011d00f3fffe") // 16 MiB of zeros
	h := func(version, codec byte, flags Flags, writeID uint64, fresh int64) []byte {
		return header(version, codec, flags, writeID, fresh)
	}
	compressedLong := cat(h(1, 1, FlagCompressed, 3, 0), blockLong)
	invalid := []struct {
		name string
		b    []byte
		max  int
		err  string
	}{
		{"empty", nil, 0, "corrupt"},
		{"header truncated to 19 bytes", h(1, 1, 0, 1, 0)[:19], 0, "corrupt"},
		{"bare JSON (plain mode value)", []byte(`{"name":"bare json value"}`), 0, "corrupt"},
		{"wrong magic", cat([]byte{0xFD}, h(1, 1, 0, 1, 0)[1:]), 0, "corrupt"},
		{"version 0", h(0, 1, 0, 1, 0), 0, "version"},
		{"version 2", h(2, 1, 0, 1, 0), 0, "version"},
		{"reserved flag bit 3", h(1, 1, 0x08, 1, 0), 0, "corrupt"},
		{"write ID 0", cat(h(1, 1, 0, 0, 0), []byte("1")), 0, "corrupt"},
		{"negative fresh-until", cat(h(1, 1, 0, 1, -1), []byte("1")), 0, "corrupt"},
		{"tombstone with payload", cat(h(1, 0, FlagTombstone, 1, 0), []byte("1")), 0, "corrupt"},
		{"negative entry with payload", cat(h(1, 0, FlagNegative, 1, 0), []byte("1")), 0, "corrupt"},
		{"tombstone with codec 1", h(1, 1, FlagTombstone, 1, 0), 0, "corrupt"},
		{"negative and tombstone", h(1, 0, FlagNegative|FlagTombstone, 1, 0), 0, "corrupt"},
		{"compressed tombstone", h(1, 0, FlagTombstone|FlagCompressed, 1, 0), 0, "corrupt"},
		{"value with codec 0", cat(h(1, 0, 0, 1, 0), []byte("1")), 0, "corrupt"},
		{"compressed, empty S2 block", h(1, 1, FlagCompressed, 1, 0), 0, "corrupt"},
		{"compressed, truncated S2 block", compressedLong[:len(compressedLong)-1], 0, "corrupt"},
		{"payload over max_payload", cat(h(1, 3, 0, 1, 0), []byte("hello")), 4, "too_large"},
		{"compressed payload over max_payload", compressedLong, len(long) - 1, "too_large"},
		{"zip bomb: valid 13-byte S2 block of 16 MiB of zeros", cat(h(1, 1, FlagCompressed, 1, 0), bomb), 0, "too_large"},
	}

	var f vectorFile
	f.Comment = "tiercache L2 envelope test vectors, see docs/wire.md. " +
		"valid: decoding hex with max_payload gives the fields (flags never includes bit0; compressed says whether the stored payload is an S2 block). " +
		"invalid: a reader must reject hex. 64-bit integers are decimal strings."
	for _, v := range valid {
		b := mustAppend(v.e, v.ca)
		if block, ok := blocks[v.name]; ok {
			b = cat(b[:HeaderSize], block)
			b[3] |= byte(FlagCompressed)
			if p, err := s2.Decode(nil, block); err != nil || !bytes.Equal(p, v.e.Payload) {
				panic("bad fixed block for " + v.name)
			}
		}
		f.Valid = append(f.Valid, validVector{
			Name: v.name, Hex: hex.EncodeToString(b), MaxPayload: defaultVectorMax,
			Codec: v.e.Codec, Flags: v.e.Flags, Compressed: Flags(b[3])&FlagCompressed != 0,
			WriteID: v.e.WriteID, FreshUntil: v.e.FreshUntil, PayloadHex: hex.EncodeToString(v.e.Payload),
		})
	}
	for _, v := range invalid {
		max := v.max
		if max == 0 {
			max = defaultVectorMax
		}
		f.Invalid = append(f.Invalid, invalidVector{Name: v.name, Hex: hex.EncodeToString(v.b), MaxPayload: max, Error: v.err})
	}
	return f
}

func loadVectors(t testing.TB) vectorFile {
	data, err := os.ReadFile(vectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	var f vectorFile
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

func TestVectors(t *testing.T) {
	want, err := json.MarshalIndent(wireVectors(), "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	want = append(want, '\n')
	if *update {
		if err := os.MkdirAll(filepath.Dir(vectorsPath), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(vectorsPath, want, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	f := loadVectors(t)

	for _, v := range f.Valid {
		t.Run("valid/"+v.Name, func(t *testing.T) {
			b, err := hex.DecodeString(v.Hex)
			if err != nil {
				t.Fatal(err)
			}
			p, err := hex.DecodeString(v.PayloadHex)
			if err != nil {
				t.Fatal(err)
			}
			wantE := Envelope{Codec: v.Codec, Flags: v.Flags, WriteID: v.WriteID, FreshUntil: v.FreshUntil, Payload: p}
			got, err := DecodeEnvelope(b, v.MaxPayload)
			if err != nil {
				t.Fatal(err)
			}
			if !equalEnvelope(got, wantE) {
				t.Fatalf("decoded %+v, want %+v", got, wantE)
			}
			if gotComp := Flags(b[3])&FlagCompressed != 0; gotComp != v.Compressed {
				t.Fatalf("compressed bit = %v, vector says %v", gotComp, v.Compressed)
			}
			// Uncompressed encodings are canonical: encoding the fields gives
			// the vector byte for byte. Compressed bytes depend on the S2
			// encoder version, so they are only checked by decoding.
			if !v.Compressed {
				enc, err := AppendEnvelope(nil, wantE, -1)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(enc, b) {
					t.Fatalf("encoded %x, want %s", enc, v.Hex)
				}
			}
		})
	}
	for _, v := range f.Invalid {
		t.Run("invalid/"+v.Name, func(t *testing.T) {
			b, err := hex.DecodeString(v.Hex)
			if err != nil {
				t.Fatal(err)
			}
			_, err = DecodeEnvelope(b, v.MaxPayload)
			want := map[string]error{"corrupt": ErrCorrupt, "version": ErrUnsupportedVersion, "too_large": ErrTooLarge}[v.Error]
			if want == nil {
				t.Fatalf("unknown error class %q", v.Error)
			}
			if !errors.Is(err, want) || !errors.Is(err, ErrCorrupt) {
				t.Fatalf("err = %v, want %v", err, want)
			}
			if v.Error == "corrupt" && (errors.Is(err, ErrTooLarge) || errors.Is(err, ErrUnsupportedVersion)) {
				t.Fatalf("err = %v, want plain corrupt", err)
			}
		})
	}

	got, err := os.ReadFile(vectorsPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s is out of date with wireVectors(); run go test -run TestVectors -update", vectorsPath)
	}
}

// Every vector's hex must appear in docs/wire.md.
func TestVectorsInDocs(t *testing.T) {
	doc, err := os.ReadFile("../../docs/wire.md")
	if err != nil {
		t.Fatal(err)
	}
	f := loadVectors(t)
	var hexes []string
	for _, v := range f.Valid {
		hexes = append(hexes, v.Hex)
	}
	for _, v := range f.Invalid {
		hexes = append(hexes, v.Hex)
	}
	for _, h := range hexes {
		if h != "" && !bytes.Contains(doc, []byte(h)) {
			t.Errorf("docs/wire.md lacks vector %s", h)
		}
	}
}
