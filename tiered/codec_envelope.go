package tiered

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tiercache/tiercache/internal/wire"
)

// encodeRaw returns the bytes stored in Redis for v: encodeValue without
// the payload, which lets the built-in JSON codec encode into a reused
// buffer, so that the stored bytes are the one allocation.
func (c *Cache[V]) encodeRaw(v V) ([]byte, error) {
	if _, ok := c.opts.Codec.(jsonCodec); !ok {
		raw, _, err := c.encodeValue(v)
		return raw, err
	}
	e := getJSONEncoder()
	defer putJSONEncoder(e)
	payload, err := e.encode(v)
	if err != nil {
		return nil, fmt.Errorf("tiered: encode: %w", err)
	}
	if c.opts.PlainJSON {
		payload = bytes.Clone(payload) // it is stored as it is, and e's buffer goes back to the pool
	}
	return c.stored(payload)
}

// stored returns what is stored in Redis for an encoded payload within
// MaxValueSize: the payload itself in plain-JSON mode, otherwise a new
// envelope around it.
func (c *Cache[V]) stored(payload []byte) ([]byte, error) {
	if len(payload) > c.opts.MaxValueSize {
		return nil, fmt.Errorf("%w: %d bytes encoded, limit %d", ErrValueTooLarge, len(payload), c.opts.MaxValueSize)
	}
	if c.opts.PlainJSON {
		return payload, nil
	}
	return c.envelope(payload)
}

// envelope wraps an encoded payload in a new envelope (wire.AppendEnvelope
// copies it, compressed when it is large).
func (c *Cache[V]) envelope(payload []byte) ([]byte, error) {
	env := wire.Envelope{Codec: c.opts.Codec.ID(), WriteID: writeID(), Payload: payload}
	if c.opts.FreshFor > 0 {
		env.FreshUntil = time.Now().Add(c.opts.FreshFor).UnixMilli()
	}
	return wire.AppendEnvelope(nil, env, c.opts.CompressAbove)
}

// encodeValue returns the bytes stored in Redis for v, and the codec's
// payload inside them.
func (c *Cache[V]) encodeValue(v V) (raw, payload []byte, err error) {
	payload, err = encode(c.opts.Codec, v)
	if err != nil {
		return nil, nil, err
	}
	if raw, err = c.stored(payload); err != nil {
		return nil, nil, err
	}
	return raw, payload, nil
}

// freshness returns when an encoded value goes stale (unix ns, 0: never)
// and its write ID, from the envelope header; plain JSON has neither.
func freshness(raw []byte, plain bool) (fresh int64, wid uint64) {
	if plain || len(raw) < wire.HeaderSize {
		return 0, 0
	}
	if ms := int64(binary.BigEndian.Uint64(raw[12:20])); ms > 0 {
		fresh = ms * int64(time.Millisecond)
	}
	return fresh, binary.BigEndian.Uint64(raw[4:12])
}

// tombstone returns the bytes Delete leaves behind.
func tombstone() []byte {
	b, err := wire.AppendEnvelope(nil, wire.Envelope{Flags: wire.FlagTombstone, WriteID: writeID()}, -1)
	if err != nil {
		panic(err) // cannot happen: a fixed, valid envelope
	}
	return b
}

func writeID() uint64 {
	for {
		if id := rand.Uint64(); id != 0 {
			return id
		}
	}
}

// storedWriteID is the write ID of bytes read from Redis (see freshness): 0 for
// plain JSON, which has none, and for anything too short to hold one. A
// refresh of a value L1 kept alone replaces a write ID of its own, which
// no bytes in Redis carry.
func (c *Cache[V]) storedWriteID(raw []byte) uint64 {
	_, wid := freshness(raw, c.opts.PlainJSON)
	return wid
}

// decode parses bytes read from Redis. found is false for tombstones and
// negative entries. payload is the decoded (decompressed) payload.
func (c *Cache[V]) decode(raw []byte) (v V, payload []byte, found bool, err error) {
	if c.opts.PlainJSON {
		if len(raw) > c.opts.MaxValueSize {
			// As in an envelope: treated as corrupt. Foreign, though: the
			// Node.js side may well have written it (see above).
			return v, nil, false, fmt.Errorf("%w: plain JSON of %d bytes, limit %d", errForeign, len(raw), c.opts.MaxValueSize)
		}
		if err := c.opts.Codec.Unmarshal(raw, &v); err != nil {
			// The key is shared with the Node.js side, which may have
			// written a value of another shape: a miss, never deleted or
			// overwritten (see foreign).
			return v, nil, false, fmt.Errorf("%w: plain JSON this cache cannot read: %v", errForeign, err)
		}
		return v, raw, true, nil
	}
	env, err := wire.DecodeEnvelope(raw, c.opts.MaxValueSize)
	if err != nil {
		return v, nil, false, err
	}
	if env.Flags&(wire.FlagTombstone|wire.FlagNegative) != 0 {
		return v, nil, false, nil
	}
	if env.Codec != c.opts.Codec.ID() {
		return v, nil, false, fmt.Errorf("%w: codec %d, want %d", errForeign, env.Codec, c.opts.Codec.ID())
	}
	if err := c.opts.Codec.Unmarshal(env.Payload, &v); err != nil {
		return v, nil, false, fmt.Errorf("%w: %v", wire.ErrCorrupt, err)
	}
	return v, env.Payload, true, nil
}

// decodeCopy returns a private copy of an L1 entry's value (CopyOnRead).
func (c *Cache[V]) decodeCopy(e *entry[V]) (v V, ok bool, err error) {
	if err := c.opts.Codec.Unmarshal(e.raw, &v); err != nil {
		return v, false, fmt.Errorf("tiered: copy on read: %w", err)
	}
	return v, true, nil
}

// copyValue returns a private copy of v through the codec (CopyOnRead).
func (c *Cache[V]) copyValue(v V) (out V, ok bool, err error) {
	b, err := encode(c.opts.Codec, v)
	if err != nil {
		return out, false, err
	}
	if err := c.opts.Codec.Unmarshal(b, &out); err != nil {
		return out, false, fmt.Errorf("tiered: copy on read: %w", err)
	}
	return out, true, nil
}

// delIfEqual deletes a key only if it still holds the bytes we found
// corrupt, so a concurrent good write is never lost.
var delIfEqual = redis.NewScript(`
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0`)

// errForeign marks bytes this cache cannot read but another may: a newer
// envelope version, another codec, a value over this instance's size limit,
// in plain-JSON mode anything under the key shared with the Node.js side.
var errForeign = errors.New("tiered: value written by an incompatible writer")

// foreign reports whether a decode error means "written by a writer this
// cache cannot read" rather than "corrupt".
func foreign(err error) bool {
	return errors.Is(err, errForeign) || errors.Is(err, wire.ErrUnsupportedVersion) || errors.Is(err, wire.ErrTooLarge)
}

// dropCorrupt counts undecodable bytes and deletes them from Redis, unless
// they may be another writer's valid value (a newer format version during a
// rollout, another codec or size limit): those are only skipped. The caller
// treats the read as a miss either way.
func (c *Cache[V]) dropCorrupt(ctx context.Context, dataKey string, raw []byte, err error) {
	c.st.corrupt.Add(1)
	if foreign(err) {
		return
	}
	_ = delIfEqual.Run(ctx, c.rdb, []string{dataKey}, raw).Err()
}
