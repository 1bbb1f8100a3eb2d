// Package invalidate is the invalidation stream of tiercache: one Bus per
// process and Redis deployment, shared by every cache namespace.
//
// Writers publish an invalidation in the same Redis script as their write,
// so the two cannot half-happen. The Bus subscribes to the channel with its
// own receive loop: it reads with a deadline, pings when idle and declares
// the stream dead when it has heard nothing (message, pong or confirmation)
// for Options.HeartbeatTimeout, which go-redis's Channel() cannot do on a
// half-open connection. A dead stream flips Bus.Epoch to an odd value, which
// makes every cache bypass its L1; the Bus then resubscribes with backoff,
// lets every Handler resync, and moves to a fresh even epoch, which voids
// every L1 entry filled before the gap. Pub/sub is at-most-once, so every gap
// is assumed to have lost messages.
//
// Messages are versioned and bounded (docs/wire.md); the decoder rejects
// anything malformed, and malformed messages are counted, never applied.
// Each message carries its publisher's random instance ID; a Bus skips its
// own messages, because its writer has already invalidated locally after
// the write returned.
//
// # Authentication
//
// With Options.Secret, every message carries an HMAC-SHA256 tag, and the
// Bus drops, without voiding anything, every message whose tag is missing
// or wrong, so that a client that may PUBLISH on the channel cannot
// invalidate or flush the caches. The tag covers every field but a flush's
// generation (a Redis script appends it), so an authenticated flush makes
// the handler re-read the generation from Redis instead of trusting it.
// Tags do not stop a subscriber from replaying messages it has seen; see
// docs/wire.md, section 4.1.
//
// # Concurrency
//
// All methods are safe for concurrent use. Handlers are called from the
// Bus's receive goroutine (one per channel with ShardChannels, so then
// concurrently) and must return quickly.
//
// # Lifecycle
//
// New starts the receive goroutines and the outbox's; Close stops them,
// waits for them and closes the subscriptions. The Redis client belongs to
// the caller.
package invalidate
