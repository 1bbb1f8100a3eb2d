package tiered

import (
	"bytes"
	"encoding/json"
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

func (msgpackCodec) ID() byte                           { return codecMsgpack }
func (msgpackCodec) Marshal(v any) ([]byte, error)      { return msgpack.Marshal(v) }
func (msgpackCodec) Unmarshal(data []byte, v any) error { return msgpack.Unmarshal(data, v) }

func encode[V any](c Codec, v V) ([]byte, error) {
	b, err := c.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("tiered: encode: %w", err)
	}
	return b, nil
}
