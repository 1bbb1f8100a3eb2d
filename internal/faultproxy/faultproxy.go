// Package faultproxy is a TCP proxy for tests that sits between a client (typically a go-redis
// client) and a server (typically a redistest redis-server) and injects network faults on demand:
// added latency ([Proxy.SetLatency]), a half-open link that keeps sockets open but forwards nothing
// ([Proxy.Blackhole]), abrupt disconnection ([Proxy.Cut]) and refused connections ([Proxy.Refuse]).
//
// A Proxy owns its listener, every proxied connection (both the client side and the server side)
// and every goroutine it starts; [Proxy.Close] releases all of them and waits for the goroutines to
// exit, so tests using goleak stay clean. All methods are safe for concurrent use.
package faultproxy

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// bufSize is the size of the buffer each direction of a connection forwards with.
	bufSize = 32 << 10
	// dialTimeout bounds one dial to the target.
	dialTimeout = 5 * time.Second
	// maxAcceptBackoff caps the wait after a temporary Accept error.
	maxAcceptBackoff = time.Second
)

// Proxy forwards TCP connections accepted on a local listener (127.0.0.1, free port) to a target
// address, optionally injecting faults.
//
// Every accepted connection is paired with a fresh connection to the target and served by two
// goroutines, one per direction, owned by the Proxy. When either direction ends (EOF or error on
// either side) both sockets of the pair are closed; half-closes are not propagated.
//
// All methods are safe for concurrent use. Fault settings (latency, blackhole, refuse) take effect
// for live and future connections alike. The zero value is not usable; create a Proxy with [Start]
// and release it with [Proxy.Close].
type Proxy struct {
	// Immutable after Start.
	ln     net.Listener
	target string
	addr   string
	ctx    context.Context // canceled by Close; aborts dials
	cancel context.CancelFunc

	latency   atomic.Int64 // time.Duration added before forwarding each chunk
	blackhole atomic.Bool
	refuse    atomic.Bool

	wg sync.WaitGroup // the accept loop and every forwarding goroutine

	closeOnce sync.Once
	closeErr  error

	mu     sync.Mutex
	links  map[*link]struct{} // live proxied connections
	closed bool
}

// link is one proxied connection: the accepted client socket and the dialed server socket.
type link struct {
	client, server net.Conn
	cut            chan struct{} // closed when the link is closed; interrupts latency sleeps
	once           sync.Once
}

// close closes both sockets and the cut channel; idempotent.
func (l *link) close() {
	l.once.Do(func() {
		close(l.cut)
		_ = l.client.Close()
		_ = l.server.Close()
	})
}

// Start listens on 127.0.0.1 on a free port and starts accepting connections, forwarding each one to
// target (host:port, dialed anew for every accepted connection).
//
// The accept loop and the two forwarding goroutines of each connection are owned by the returned
// Proxy; the caller owns the Proxy and must call [Proxy.Close] to release them. Start does not check
// that target is reachable: when a dial fails, the accepted connection is simply closed.
func Start(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &Proxy{
		ln:     ln,
		target: target,
		addr:   ln.Addr().String(),
		ctx:    ctx,
		cancel: cancel,
		links:  make(map[*link]struct{}),
	}
	p.wg.Add(1)
	go p.acceptLoop()
	return p, nil
}

// Addr returns the address clients dial, "127.0.0.1:PORT". It never changes, not even after Close
// (after which dialing it fails). Safe for concurrent use.
func (p *Proxy) Addr() string { return p.addr }

// SetLatency sets a delay added before forwarding each chunk read, in both directions; 0 (or a
// negative value) means none. It applies to live and new connections, from the next chunk on (a
// chunk already waiting keeps the delay it started with).
//
// A request/response round trip through the proxy therefore takes at least 2*d. Chunks of one
// direction are delayed one after the other, so a stream of many chunks is also throttled. A delay
// in progress ends promptly when the connection is cut or the Proxy closed, and the chunk is then
// discarded. Safe for concurrent use.
func (p *Proxy) SetLatency(d time.Duration) {
	if d < 0 {
		d = 0
	}
	p.latency.Store(int64(d))
}

// Blackhole turns the half-open link fault on or off, for live and new connections.
//
// While on, every socket stays open and new connections are still accepted and dialed, but nothing
// is forwarded in either direction: the proxy keeps reading and DROPS what it reads (it does not
// buffer it), so peers see neither data nor an error — only their own timeouts fire. Turning it off
// resumes forwarding of bytes read from then on; bytes dropped meanwhile are never delivered, so a
// connection that had a request or reply in flight is typically desynchronized afterwards (for
// Redis, a reply that never comes or comes to the wrong command): clients should discard such
// connections, as go-redis does after a timeout. Bytes sent right around the toggle may fall on
// either side of it. Safe for concurrent use.
func (p *Proxy) Blackhole(on bool) { p.blackhole.Store(on) }

// Cut closes every current connection, both the client and the server socket, as an abrupt network
// failure would: peers see EOF or a reset. New connections are accepted normally afterwards (see
// [Proxy.Refuse] to prevent that). Cut returns once the sockets are closed; their forwarding
// goroutines exit shortly after (Close waits for them). Safe for concurrent use.
func (p *Proxy) Cut() {
	p.mu.Lock()
	links := p.takeLinksLocked()
	p.mu.Unlock()
	for _, l := range links {
		l.close()
	}
}

// Refuse turns refusal of new connections on or off. While on, each new connection is accepted and
// immediately closed (the client sees EOF or a reset on its first read); existing connections are
// not affected. Safe for concurrent use.
func (p *Proxy) Refuse(on bool) { p.refuse.Store(on) }

// Conns returns the number of live proxied connections (accepted, paired with a target connection,
// and not yet closed). Safe for concurrent use.
func (p *Proxy) Conns() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.links)
}

// Close stops accepting, closes every connection and waits until every goroutine of the Proxy has
// exited. It is idempotent and safe for concurrent use: every call waits, and every call returns
// the same error (from closing the listener, normally nil).
func (p *Proxy) Close() error {
	p.closeOnce.Do(func() {
		p.mu.Lock()
		p.closed = true
		links := p.takeLinksLocked()
		p.mu.Unlock()
		p.cancel()
		p.closeErr = p.ln.Close()
		for _, l := range links {
			l.close()
		}
	})
	p.wg.Wait()
	return p.closeErr
}

// takeLinksLocked empties the link set and returns its former members. p.mu must be held.
func (p *Proxy) takeLinksLocked() []*link {
	links := make([]*link, 0, len(p.links))
	for l := range p.links {
		links = append(links, l)
	}
	clear(p.links)
	return links
}

// acceptLoop accepts connections until the listener is closed.
func (p *Proxy) acceptLoop() {
	defer p.wg.Done()
	backoff := 5 * time.Millisecond
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if p.ctx.Err() != nil || errors.Is(err, net.ErrClosed) {
				return
			}
			// Temporary failure (e.g. out of file descriptors): back off, unless closing.
			t := time.NewTimer(backoff)
			select {
			case <-p.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
			backoff = min(backoff*2, maxAcceptBackoff)
			continue
		}
		backoff = 5 * time.Millisecond
		if p.refuse.Load() {
			_ = c.Close()
			continue
		}
		p.serve(c)
	}
}

// serve dials the target for the accepted connection c and starts forwarding. It runs on the
// accept loop, whose wg count keeps Close from returning before the forwarders are registered.
func (p *Proxy) serve(c net.Conn) {
	d := net.Dialer{Timeout: dialTimeout}
	s, err := d.DialContext(p.ctx, "tcp", p.target)
	if err != nil {
		_ = c.Close()
		return
	}
	l := &link{client: c, server: s, cut: make(chan struct{})}
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		l.close()
		return
	}
	p.links[l] = struct{}{}
	p.mu.Unlock()

	p.wg.Add(2)
	go p.forward(l, c, s)
	go p.forward(l, s, c)
}

// forward copies src to dst chunk by chunk, applying the current faults, until either side fails;
// then it closes the whole link and removes it from the set.
func (p *Proxy) forward(l *link, src, dst net.Conn) {
	defer p.wg.Done()
	defer p.drop(l)
	buf := make([]byte, bufSize)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if d := time.Duration(p.latency.Load()); d > 0 {
				t := time.NewTimer(d)
				select {
				case <-l.cut:
					t.Stop()
					return
				case <-t.C:
				}
			}
			// Checked after the delay so that nothing is delivered once the blackhole is on.
			if !p.blackhole.Load() {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
			}
		}
		if err != nil {
			return
		}
	}
}

// drop closes l and removes it from the live set (if Cut or Close has not already).
func (p *Proxy) drop(l *link) {
	l.close()
	p.mu.Lock()
	delete(p.links, l)
	p.mu.Unlock()
}
