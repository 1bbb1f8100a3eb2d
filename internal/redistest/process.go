package redistest

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// errAddrInUse marks a startup failure because the port was taken; New retries with a fresh port.
var errAddrInUse = errors.New("redistest: port already in use")

// logTailLines is how many lines of the process log go into startup error messages.
const logTailLines = 25

// process is one run of redis-server. Exactly one goroutine (run) waits for it; done is closed when
// that goroutine has returned from cmd.Wait, after which waitErr is valid.
type process struct {
	cmd     *exec.Cmd
	done    chan struct{}
	waitErr error
}

// run starts the command and then waits for it, reporting the Start result on started. The goroutine
// stays locked to its OS thread for the life of the child, because on Linux the child's parent-death
// signal fires when the thread that forked it exits, not the process; Go can retire a thread only
// when a locked goroutine exits while still locked, which this goroutine never does.
func (p *process) run(started chan<- error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	defer close(p.done)
	if err := p.cmd.Start(); err != nil {
		p.waitErr = err
		started <- err
		return
	}
	started <- nil
	p.waitErr = p.cmd.Wait()
}

// exited reports whether the process has ended (and been reaped).
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// wait waits at most d for the process to end and reports whether it did.
func (p *process) wait(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-p.done:
		return true
	case <-t.C:
		return false
	}
}

// signal sends sig unless the process has already been reaped.
func (p *process) signal(sig os.Signal) error {
	if p.exited() {
		return nil
	}
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("redistest: signal %v to redis-server pid %d: %w", sig, p.cmd.Process.Pid, err)
	}
	return nil
}

// kill sends SIGKILL and waits at most d for the exit.
func (p *process) kill(d time.Duration) error {
	if err := p.signal(syscall.SIGKILL); err != nil {
		return err
	}
	if !p.wait(d) {
		return fmt.Errorf("redistest: redis-server pid %d did not exit within %v of SIGKILL", p.cmd.Process.Pid, d)
	}
	return nil
}

// stop asks for a clean shutdown (SIGTERM, then SIGCONT in case the process is frozen) and waits at
// most d; if the process is still there it is killed and an error is returned.
func (p *process) stop(d time.Duration) error {
	if err := p.signal(syscall.SIGTERM); err != nil {
		return err
	}
	if err := p.signal(syscall.SIGCONT); err != nil {
		return err
	}
	if p.wait(d) {
		return nil
	}
	kerr := p.kill(d)
	return errors.Join(fmt.Errorf("redistest: redis-server pid %d ignored SIGTERM for %v; killed it", p.cmd.Process.Pid, d), kerr)
}

// lookRedisServer finds redis-server in PATH and returns its absolute path.
func lookRedisServer() (string, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return "", errors.New(errNotFoundText)
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		return "", errors.New(errNotFoundText)
	}
	return abs, nil
}

// freePort returns a port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("redistest: find a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("redistest: find a free port: %w", err)
	}
	return port, nil
}

// launch starts redis-server with s.args and waits until it answers. On failure the process is gone
// and the error carries the end of its log. The caller holds s.mu or owns s exclusively.
func (s *Server) launch() (*process, error) {
	logf, err := os.OpenFile(s.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("redistest: open log: %w", err)
	}
	offset, err := logf.Seek(0, io.SeekEnd)
	if err != nil {
		logf.Close()
		return nil, fmt.Errorf("redistest: open log: %w", err)
	}
	cmd := exec.Command(s.bin, s.args...)
	cmd.Dir = s.dir
	cmd.Stdout = logf // an *os.File: the child writes to it directly, no copying goroutines
	cmd.Stderr = logf
	cmd.SysProcAttr = sysProcAttr()

	p := &process{cmd: cmd, done: make(chan struct{})}
	started := make(chan error, 1)
	go p.run(started)
	err = <-started
	logf.Close() // the child has its own descriptor
	if err != nil {
		<-p.done
		return nil, fmt.Errorf("redistest: start %s: %w", s.bin, err)
	}
	if err := s.waitReady(p, offset); err != nil {
		_ = p.kill(exitTimeout)
		return nil, err
	}
	return p, nil
}

// waitReady polls until the server answers on its plain port as the process just started (see
// serverPID), the process exits, or readyTimeout passes.
func (s *Server) waitReady(p *process, logOffset int64) error {
	deadline := time.Now().Add(readyTimeout)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		if p.exited() {
			tail := s.logTail(logOffset)
			err := fmt.Errorf("redistest: redis-server on %s exited during startup (%v); last lines of %s:\n%s",
				s.addr, p.waitErr, s.logPath, tail)
			if strings.Contains(tail, "Address already in use") {
				return errors.Join(errAddrInUse, err)
			}
			return err
		}
		switch serverPID(s.adminAddr, s.password) {
		case -1: // not answering yet
		case 0: // answering, but it would not say which process it is
			return nil
		case p.cmd.Process.Pid:
			return nil
		default:
			// Another redis-server holds the port (taken between freePort and
			// our bind: a parallel test, or another node of the same cluster).
			// Its PING would have passed for ours, and ours is about to exit.
			return errors.Join(errAddrInUse, fmt.Errorf("redistest: %s answers, but not as redis-server pid %d", s.adminAddr, p.cmd.Process.Pid))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("redistest: redis-server on %s did not answer PING within %v; last lines of %s:\n%s",
				s.addr, readyTimeout, s.logPath, s.logTail(logOffset))
		}
		select {
		case <-tick.C:
		case <-p.done:
		}
	}
}

// serverPID asks the redis-server at addr for its process id (INFO server), after AUTH when password
// is set. It returns -1 when nothing answers yet (or the server is still loading), 0 when a server
// answers but will not tell (an error reply, e.g. NOAUTH), and the pid otherwise.
func serverPID(addr, password string) int {
	c, err := net.DialTimeout("tcp", addr, 250*time.Millisecond)
	if err != nil {
		return -1
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(500 * time.Millisecond)); err != nil {
		return -1
	}
	r := bufio.NewReader(c)
	if password != "" {
		if _, err := io.WriteString(c, respCommand("AUTH", password)); err != nil {
			return -1
		}
		if _, err := r.ReadString('\n'); err != nil {
			return -1
		}
	}
	if _, err := io.WriteString(c, respCommand("INFO", "server")); err != nil {
		return -1
	}
	head, err := r.ReadString('\n')
	if err != nil {
		return -1
	}
	switch {
	case strings.HasPrefix(head, "-LOADING"):
		return -1
	case strings.HasPrefix(head, "-"):
		return 0
	case !strings.HasPrefix(head, "$"):
		return 0
	}
	n, err := strconv.Atoi(strings.TrimSpace(head[1:]))
	if err != nil || n < 0 {
		return 0
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return -1
	}
	for _, line := range strings.Split(string(body), "\r\n") {
		if v, ok := strings.CutPrefix(line, "process_id:"); ok {
			if pid, err := strconv.Atoi(v); err == nil && pid > 0 {
				return pid
			}
		}
	}
	return 0
}

// respCommand encodes a command as a RESP array of bulk strings.
func respCommand(args ...string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	return b.String()
}

// answersPing sends an inline PING and reports whether a RESP reply other than -LOADING came back
// (so -NOAUTH from a password-protected server counts as up).
func answersPing(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, 250*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(500 * time.Millisecond)); err != nil {
		return false
	}
	if _, err := io.WriteString(c, "PING\r\n"); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return false
	}
	switch {
	case strings.HasPrefix(line, "+"):
		return true
	case strings.HasPrefix(line, "-"):
		return !strings.HasPrefix(line, "-LOADING")
	default:
		return false
	}
}

// logTail returns the last logTailLines lines written to the log at or after offset.
func (s *Server) logTail(offset int64) string {
	f, err := os.Open(s.logPath)
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	defer f.Close()
	if _, err := f.Seek(offset, io.SeekStart); err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	data, err := io.ReadAll(f)
	if err != nil {
		return fmt.Sprintf("(cannot read log: %v)", err)
	}
	lines := bytes.Split(bytes.TrimRight(data, "\n"), []byte("\n"))
	if len(lines) > logTailLines {
		lines = lines[len(lines)-logTailLines:]
	}
	out := string(bytes.Join(lines, []byte("\n")))
	if out == "" {
		return "(log is empty)"
	}
	return out
}
