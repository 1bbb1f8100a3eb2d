package redistest

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// The fault-injection methods below fail the test through tb (tb.Fatal) on an external server, after
// Close, or when the operation fails. They are meant for the test goroutine. An internal lock
// serializes them (and Close), so they never corrupt the Server, but they are not designed to be
// used concurrently with each other: the outcome of overlapping faults is whatever order the lock
// grants.

// errNotRunning is reported by faults that need a live process.
var errNotRunning = errors.New("redistest: redis-server is not running (Stop or Kill it was called, or it exited)")

// errClosed is reported by any fault after Close.
var errClosed = errors.New("redistest: Server is closed")

// errFrozen is reported by admin commands while the process is frozen: they could never be answered.
var errFrozen = errors.New("redistest: redis-server is frozen; call Thaw first")

// private fails tb when s is external and reports whether the caller may go on.
func (s *Server) private(tb testing.TB) bool {
	tb.Helper()
	if s.external {
		tb.Fatal(faultOnExternal)
		return false
	}
	return true
}

// liveLocked returns the running process. s.mu must be held.
func (s *Server) liveLocked() (*process, error) {
	if s.closed {
		return nil, errClosed
	}
	if s.proc == nil || s.proc.exited() {
		return nil, errNotRunning
	}
	return s.proc, nil
}

// Stop shuts the server down cleanly (SIGTERM; a frozen process is also sent SIGCONT so it can act on
// it) and waits for the process to exit, killing it if it takes more than 10s. Data is not saved. The
// port number stays with the Server for Restart (nothing else is prevented from binding it meanwhile,
// but free ports are picked at random, so a clash is unlikely). Stopping a server that is not running
// does nothing. Clients see connection errors until Restart. If the process ignores SIGTERM for 10s it
// is killed and the test fails. Test goroutine only; see the note above.
func (s *Server) Stop(tb testing.TB) {
	tb.Helper()
	if !s.private(tb) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		tb.Fatal(errClosed)
		return
	}
	if s.proc == nil || s.proc.exited() {
		return
	}
	s.frozen = false
	if err := s.proc.stop(exitTimeout); err != nil {
		tb.Fatal(err)
	}
}

// Kill sends SIGKILL and waits for the process to exit: an abrupt crash, with every connection reset.
// Killing a server that is not running does nothing. Test goroutine only; see the note above.
func (s *Server) Kill(tb testing.TB) {
	tb.Helper()
	if !s.private(tb) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		tb.Fatal(errClosed)
		return
	}
	if s.proc == nil || s.proc.exited() {
		return
	}
	s.frozen = false
	if err := s.proc.kill(exitTimeout); err != nil {
		tb.Fatal(err)
	}
}

// Restart starts redis-server again on the SAME port with the same arguments (data empty) and waits
// until it answers PING; a running server is stopped first, as by Stop. Existing clients reconnect on
// their next command (their old connections are dead). Test goroutine only; see the note above.
func (s *Server) Restart(tb testing.TB) {
	tb.Helper()
	if !s.private(tb) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		tb.Fatal(errClosed)
		return
	}
	if p := s.proc; p != nil && !p.exited() {
		s.frozen = false
		if err := p.stop(exitTimeout); err != nil {
			tb.Fatal(err)
			return
		}
	}
	p, err := s.launch()
	if err != nil {
		s.proc = nil
		tb.Fatal(fmt.Errorf("redistest: restart on %s: %w", s.addr, err))
		return
	}
	s.proc = p
}

// Freeze sends SIGSTOP and returns once the process is stopped: it stops answering, but its sockets
// stay open and the kernel still accepts connections and buffers writes (a half-open link). Commands
// then fail only by timeout. Thaw resumes it; Stop, Kill, Restart and Close also work on a frozen
// server. Test goroutine only; see the note above.
func (s *Server) Freeze(tb testing.TB) {
	tb.Helper()
	if !s.private(tb) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	p, err := s.liveLocked()
	if err != nil {
		tb.Fatal(err)
		return
	}
	if err := p.signal(syscall.SIGSTOP); err != nil {
		tb.Fatal(err)
		return
	}
	s.frozen = true
	if err := waitState(p.cmd.Process.Pid, true, exitTimeout); err != nil {
		tb.Fatal(err)
	}
}

// Thaw sends SIGCONT and returns once the process runs again; it then answers what was queued while
// frozen (clients that already timed out have dropped those connections). Thawing a server that is
// not frozen is harmless; thawing one that is not running does nothing. Test goroutine only; see the
// note above.
func (s *Server) Thaw(tb testing.TB) {
	tb.Helper()
	if !s.private(tb) {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		tb.Fatal(errClosed)
		return
	}
	p := s.proc
	if p == nil || p.exited() {
		s.frozen = false
		return
	}
	if err := p.signal(syscall.SIGCONT); err != nil {
		tb.Fatal(err)
		return
	}
	s.frozen = false
	if err := waitState(p.cmd.Process.Pid, false, exitTimeout); err != nil {
		tb.Fatal(err)
	}
}

// Pause runs CLIENT PAUSE for d (rounded up to whole milliseconds; d must be positive), with WRITE
// when writeOnly: during the pause the server holds the affected commands of all clients (only
// writes, or every command) and answers them when it ends. It returns at once; the pause ends by
// itself. It fails the test if the server is not running or is frozen. Test goroutine only; see the
// note above.
func (s *Server) Pause(tb testing.TB, d time.Duration, writeOnly bool) {
	tb.Helper()
	if !s.private(tb) {
		return
	}
	if d <= 0 {
		tb.Fatalf("redistest: Pause(%v): duration must be positive", d)
		return
	}
	ms := (d + time.Millisecond - 1) / time.Millisecond
	args := []any{"CLIENT", "PAUSE", strconv.FormatInt(int64(ms), 10)}
	if writeOnly {
		args = append(args, "WRITE")
	}
	if _, err := s.admin(args...); err != nil {
		tb.Fatal(fmt.Errorf("redistest: CLIENT PAUSE: %w", err))
	}
}

// KillPubSub runs CLIENT KILL TYPE pubsub, which closes the connection of every client in
// subscribed state (RESP2 and RESP3 alike on Redis 7.0), and returns how many were killed. Note that
// a go-redis PubSub reports the broken connection (io.EOF) to its next Receive and then reconnects and
// resubscribes on its own. It fails the test if the server is not running or is frozen. Test
// goroutine only; see the note above.
func (s *Server) KillPubSub(tb testing.TB) int {
	tb.Helper()
	if !s.private(tb) {
		return 0
	}
	v, err := s.admin("CLIENT", "KILL", "TYPE", "pubsub")
	if err != nil {
		tb.Fatal(fmt.Errorf("redistest: CLIENT KILL TYPE pubsub: %w", err))
		return 0
	}
	n, ok := v.(int64)
	if !ok {
		tb.Fatalf("redistest: CLIENT KILL TYPE pubsub: reply %#v, want an integer", v)
		return 0
	}
	return int(n)
}

// admin runs one command on a short-lived client over the plain (non-TLS) port and closes it.
func (s *Server) admin(args ...any) (any, error) {
	s.mu.Lock()
	_, err := s.liveLocked()
	if err == nil && s.frozen {
		err = errFrozen
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	opt := s.Options()
	opt.Addr = s.adminAddr
	opt.TLSConfig = nil
	opt.PoolSize = 1
	opt.ReadTimeout = adminTimeout
	opt.WriteTimeout = adminTimeout
	c := redis.NewClient(opt)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), adminTimeout)
	defer cancel()
	return c.Do(ctx, args...).Result()
}
