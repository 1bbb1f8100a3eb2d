package tiered

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/vmihailenco/msgpack/v5"
)

// Codec turns values into the bytes stored in Redis and back. Implementations
// must be safe for concurrent use. Marshal receives the value (not a
// pointer); Unmarshal receives a pointer to a zero value.
type Codec interface {
	// ID identifies the codec in the L2 envelope, so a reader configured with
	// another codec treats the bytes as a miss instead of misreading them.
	// IDs 1-63 are reserved for this package; use 64-255 for your own.
	ID() byte
	Marshal(v any) ([]byte, error)
	Unmarshal(data []byte, v any) error
}

// Codec IDs of the built-in codecs.
const (
	codecJSON    byte = 1
	codecMsgpack byte = 2
)

// JSON is the default codec: encoding/json. It is also the codec of the
// plain-JSON mode, whose bytes a Node.js service writing JSON.stringify
// output can read and write.
var JSON Codec = jsonCodec{}

// Msgpack is a compact binary codec (github.com/vmihailenco/msgpack/v5),
// faster and smaller than JSON for most structs.
var Msgpack Codec = msgpackCodec{}

type jsonCodec struct{}

func (jsonCodec) ID() byte { return codecJSON }

// Marshal writes what JSON.stringify writes: unlike json.Marshal it leaves
// <, > and & alone (HTML escaping has no place in a cache, and it would
// break byte-compatibility with a Node.js writer). Two differences are
// left: U+2028 and U+2029, which encoding/json always escapes (both sides
// parse either form to the same string), and integers beyond 2^53, which
// this side writes exactly and JavaScript's numbers round (keep such IDs in
// strings when both sides share values).
func (jsonCodec) Marshal(v any) ([]byte, error) {
	e := getJSONEncoder()
	defer putJSONEncoder(e)
	p, err := e.encode(v)
	if err != nil {
		return nil, err
	}
	return bytes.Clone(p), nil
}

// jsonEncoder is a JSON encoder with its buffer, reused through a pool: a
// write would otherwise allocate both, and grow the buffer, every time.
type jsonEncoder struct {
	buf    bytes.Buffer
	enc    *json.Encoder
	failed bool // not reused: nothing promises an Encoder is clean after an error
}

var jsonEncoders sync.Pool

func getJSONEncoder() *jsonEncoder {
	if e, ok := jsonEncoders.Get().(*jsonEncoder); ok {
		return e
	}
	e := new(jsonEncoder)
	e.enc = json.NewEncoder(&e.buf)
	e.enc.SetEscapeHTML(false)
	return e
}

// putJSONEncoder returns e to the pool, unless it failed or its buffer grew
// past 64 KiB: one large value should not pin that much memory for good.
func putJSONEncoder(e *jsonEncoder) {
	if !e.failed && e.buf.Cap() <= 64<<10 {
		jsonEncoders.Put(e)
	}
}

// encode returns v's encoding, which is valid until e's next use.
func (e *jsonEncoder) encode(v any) ([]byte, error) {
	e.buf.Reset()
	if err := e.enc.Encode(v); err != nil {
		e.failed = true
		return nil, err
	}
	return bytes.TrimSuffix(e.buf.Bytes(), []byte{'\n'}), nil
}

func (jsonCodec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }

type msgpackCodec struct{}

func (msgpackCodec) ID() byte                      { return codecMsgpack }
func (msgpackCodec) Marshal(v any) ([]byte, error) { return msgpack.Marshal(v) }

// Unmarshal refuses data whose headers declare more than data holds (see
// msgpackCheck) before msgpack.Unmarshal sees it.
func (msgpackCodec) Unmarshal(data []byte, v any) error {
	if err := msgpackCheck(data); err != nil {
		return err
	}
	return msgpack.Unmarshal(data, v)
}

// msgpackMaxDepth is how deeply msgpackCheck lets arrays and maps nest, as
// encoding/json does: msgpack.Unmarshal recurses once per level, and a
// megabyte of one-element arrays would otherwise take as many frames.
const msgpackMaxDepth = 10000

// msgpackCheck walks data as a sequence of MessagePack values (one, unless
// a CustomEncoder wrote several) without decoding them, and refuses it if a
// length or count that a header declares runs past the end of data, if
// arrays and maps nest deeper than msgpackMaxDepth, or if it holds the
// never-used code 0xc1. msgpack.Unmarshal allocates what a header declares
// before it reads the bytes behind it (v5.4.1 grows a slice to an array's
// full count at once: its allocation limit's check is inverted), so 5
// corrupt bytes in Redis declaring an array of 2^32 elements cost
// gigabytes, or the process, before the decode failed. Each value takes at
// least one byte, so what passes declares no more elements than data has
// bytes.
func msgpackCheck(data []byte) error {
	var buf [16]uint64
	open := buf[:0]    // values still to read in each open array or map, innermost last
	var pending uint64 // their sum
	off := 0
	// length reads a w-byte big-endian length after the code.
	length := func(w int) (uint64, error) {
		if len(data)-off < w {
			return 0, errors.New("tiered: msgpack: truncated length")
		}
		var n uint64
		for _, b := range data[off : off+w] {
			n = n<<8 | uint64(b)
		}
		off += w
		return n, nil
	}
	for off < len(data) {
		if len(open) > 0 { // else a top-level value
			open[len(open)-1]--
			pending--
		}
		c := data[off]
		off++
		var skip, items uint64 // bytes that follow the header; values it contains
		var err error
		switch {
		case c <= 0x7f || c >= 0xe0: // fixint
		case c <= 0x8f: // fixmap
			items = 2 * uint64(c&0x0f)
		case c <= 0x9f: // fixarray
			items = uint64(c & 0x0f)
		case c <= 0xbf: // fixstr
			skip = uint64(c & 0x1f)
		case c == 0xc0, c == 0xc2, c == 0xc3: // nil, false, true
		case c == 0xc1:
			return errors.New("tiered: msgpack: never-used code 0xc1")
		case c == 0xc4, c == 0xd9: // bin 8, str 8
			skip, err = length(1)
		case c == 0xc5, c == 0xda: // bin 16, str 16
			skip, err = length(2)
		case c == 0xc6, c == 0xdb: // bin 32, str 32
			skip, err = length(4)
		case c == 0xc7, c == 0xc8, c == 0xc9: // ext 8, 16, 32: length, then a type byte
			skip, err = length(1 << (c - 0xc7))
			skip++
		case c == 0xca, c == 0xce, c == 0xd2: // float 32, uint 32, int 32
			skip = 4
		case c == 0xcb, c == 0xcf, c == 0xd3: // float 64, uint 64, int 64
			skip = 8
		case c == 0xcc, c == 0xd0: // uint 8, int 8
			skip = 1
		case c == 0xcd, c == 0xd1: // uint 16, int 16
			skip = 2
		case c >= 0xd4 && c <= 0xd8: // fixext 1, 2, 4, 8, 16: a type byte, then the data
			skip = 1 + 1<<(c-0xd4)
		case c == 0xdc, c == 0xdd: // array 16, 32
			items, err = length(2 << (c - 0xdc))
		case c == 0xde, c == 0xdf: // map 16, 32
			items, err = length(2 << (c - 0xde))
			items *= 2
		}
		if err != nil {
			return err
		}
		left := uint64(len(data) - off)
		if skip > left {
			return fmt.Errorf("tiered: msgpack: %d bytes declared, %d left", skip, left)
		}
		off += int(skip)
		if items > 0 {
			if len(open) == msgpackMaxDepth {
				return fmt.Errorf("tiered: msgpack: arrays and maps nested deeper than %d", msgpackMaxDepth)
			}
			open = append(open, items)
			if pending += items; pending > left-skip {
				return fmt.Errorf("tiered: msgpack: %d values declared, %d bytes left", pending, left-skip)
			}
		}
		for len(open) > 0 && open[len(open)-1] == 0 {
			open = open[:len(open)-1]
		}
	}
	return nil
}

func encode[V any](c Codec, v V) ([]byte, error) {
	b, err := c.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("tiered: encode: %w", err)
	}
	return b, nil
}
