// Command demo runs the example fleet on this machine, which is what `make
// demo` does: a throwaway redis-server (unless REDIS_URL names one), three
// instances of example/app sharing one SQLite file, and example/loadgen for
// about 20 seconds against all three. It prints the load generator's
// summary, leaves its JSON result, its HTML report and the instances' logs
// in the output directory, and stops everything it started, whether the run
// succeeds, fails or is interrupted (Ctrl-C).
//
//	go run ./example/demo                    # CACHE_TYPE=redis: L1 + Redis, coherent
//	CACHE_TYPE=memory go run ./example/demo  # L1 only: fast, and stale across instances
//	CACHE_TYPE=off go run ./example/demo     # every read from the database
//
// It builds the app and the load generator with the go command (so it runs
// from within this module), unless -bin names a directory holding both.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/tiercache/tiercache/example/loadgen/load"
	"github.com/tiercache/tiercache/internal/redistest"
)

type options struct {
	instances   int
	cacheType   string
	dbLatency   time.Duration
	databaseURL string
	duration    time.Duration
	warmup      time.Duration
	rate        float64
	concurrency int
	mix         string
	out         string
	bin         string
}

func main() {
	cacheType := os.Getenv("CACHE_TYPE")
	if cacheType == "" {
		cacheType = "redis"
	}
	var o options
	flag.IntVar(&o.instances, "instances", 3, "app instances to run")
	flag.StringVar(&o.cacheType, "cache", cacheType, "CACHE_TYPE of the instances: redis (L1 + Redis), memory, redis-only or off")
	flag.DurationVar(&o.dbLatency, "db-latency", time.Millisecond, "DB_LATENCY of the instances: added to every database query")
	flag.StringVar(&o.databaseURL, "database-url", "", "a postgres:// URL to use instead of SQLite")
	flag.DurationVar(&o.duration, "duration", 20*time.Second, "how long the load generator measures")
	flag.DurationVar(&o.warmup, "warmup", 2*time.Second, "load before the measured window")
	flag.Float64Var(&o.rate, "rate", 0, "requests per second to aim at; 0 = flat out")
	flag.IntVar(&o.concurrency, "concurrency", load.DefaultConcurrency, "load generator workers")
	flag.StringVar(&o.mix, "mix", load.DefaultMix.Flag(), "request mix")
	flag.StringVar(&o.out, "out", defaultOut(), "directory for the result, the report and the logs")
	flag.StringVar(&o.bin, "bin", "", "directory holding prebuilt app and loadgen binaries (default: build them)")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	// Output piped into a pager or tee that Ctrl-C ended must not kill the
	// demo before it has stopped what it started.
	signal.Ignore(syscall.SIGPIPE)
	code, err := run(ctx, o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// defaultOut is example/out in this repository, else ./demo-out.
func defaultOut() string {
	if fi, err := os.Stat("example/demo"); err == nil && fi.IsDir() {
		return filepath.Join("example", "out")
	}
	return "demo-out"
}

func say(format string, args ...any) { fmt.Printf("demo: "+format+"\n", args...) }

// run does the demo and returns the exit code. Everything it starts is
// stopped by the deferred calls, in reverse order: the load generator, the
// instances, redis-server.
func run(ctx context.Context, o options) (int, error) {
	if o.instances < 1 || o.instances > 20 {
		return 2, errors.New("-instances: want 1 to 20")
	}
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return 1, err
	}
	tmp, err := os.MkdirTemp("", "tiercache-demo-")
	if err != nil {
		return 1, err
	}
	defer os.RemoveAll(tmp)

	// Redis: the one REDIS_URL names, or a throwaway one.
	redisURL := os.Getenv("REDIS_URL")
	usesRedis := o.cacheType != "memory" && o.cacheType != "off"
	switch {
	case !usesRedis:
		say("CACHE_TYPE=%s: no Redis", o.cacheType)
	case redisURL != "":
		say("Redis: %s (from REDIS_URL)", redacted(redisURL))
	default:
		if _, err := exec.LookPath("redis-server"); err != nil {
			return 1, errors.New("redis-server is not installed. Install it (Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis) " +
				"or point the demo at a Redis you have: REDIS_URL=redis://host:6379/0 make demo")
		}
		rs, err := redistest.New(redistest.Config{Dir: filepath.Join(tmp, "redis")})
		if err != nil {
			return 1, fmt.Errorf("start redis-server: %w", err)
		}
		defer rs.Close()
		redisURL = "redis://" + rs.Addr() + "/0"
		say("Redis: a throwaway redis-server on %s (stopped at the end)", rs.Addr())
	}

	bin := o.bin
	if bin == "" {
		bin = filepath.Join(tmp, "bin")
		say("building example/app and example/loadgen")
		build := exec.CommandContext(ctx, "go", "build", "-o", bin+string(filepath.Separator), "./example/app", "./example/loadgen")
		build.Dir = moduleRoot()
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			return 1, fmt.Errorf("go build: %w", err)
		}
	}

	// The instances, each in its own process group so that Ctrl-C reaches
	// only this program, which then stops them in order.
	db := "SQLite " + filepath.Join(tmp, "demo.db")
	if o.databaseURL != "" {
		db = "PostgreSQL " + redacted(o.databaseURL)
	}
	say("%d app instances, CACHE_TYPE=%s, on %s with DB_LATENCY=%v", o.instances, o.cacheType, db, o.dbLatency)
	var apps []*app
	defer func() {
		for _, a := range apps {
			a.stop()
		}
		if len(apps) > 0 {
			say("stopped %d app instances", len(apps))
		}
	}()
	var targets []string
	for i := 1; i <= o.instances; i++ {
		a, err := startApp(ctx, i, bin, o, redisURL, tmp)
		if err != nil {
			return 1, err
		}
		apps = append(apps, a)
		targets = append(targets, a.url)
		fmt.Printf("  %s  %s  (log %s)\n", a.name, a.url, a.logPath)
	}
	for _, a := range apps {
		if err := a.waitHealthy(ctx, time.Minute); err != nil {
			return 1, err
		}
	}

	say("load: %v after a %v warm-up, flat out unless -rate; %s", o.duration, o.warmup, o.mix)
	resultPath, reportPath := filepath.Join(o.out, "result.json"), filepath.Join(o.out, "report.html")
	args := []string{
		"-targets", strings.Join(targets, ","),
		"-duration", o.duration.String(), "-warmup", o.warmup.String(),
		"-rate", strconv.FormatFloat(o.rate, 'f', -1, 64), "-concurrency", strconv.Itoa(o.concurrency),
		"-mix", o.mix, "-json", resultPath, "-html", reportPath,
	}
	if usesRedis {
		args = append(args, "-check") // stale reads or errors fail the demo
	}
	lg := exec.Command(filepath.Join(bin, "loadgen"), args...)
	lg.Stdout, lg.Stderr = os.Stdout, os.Stderr
	lg.SysProcAttr = childAttr()
	if err := lg.Start(); err != nil {
		return 1, err
	}
	done := make(chan error, 1)
	go func() { done <- lg.Wait() }()
	var lgErr error
	select {
	case lgErr = <-done:
	case <-ctx.Done():
		say("interrupted: stopping the load generator")
		_ = lg.Process.Signal(os.Interrupt)
		select {
		case lgErr = <-done:
		case <-time.After(10 * time.Second):
			_ = lg.Process.Kill()
			lgErr = <-done
		}
	}
	if ctx.Err() != nil {
		return 130, nil
	}
	var exit *exec.ExitError
	if errors.As(lgErr, &exit) {
		return exit.ExitCode(), errors.New("the load generator reported a failure (see above)")
	}
	if lgErr != nil {
		return 1, lgErr
	}
	say("open %s in a browser for the charts", reportPath)
	return 0, nil
}

// app is one running instance.
type app struct {
	name, url, logPath string
	cmd                *exec.Cmd
	done               chan struct{}
	err                error // set before done is closed
}

func startApp(ctx context.Context, i int, bin string, o options, redisURL, tmp string) (*app, error) {
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	a := &app{
		name:    "app-" + strconv.Itoa(i),
		url:     "http://127.0.0.1:" + strconv.Itoa(port),
		logPath: filepath.Join(o.out, "app-"+strconv.Itoa(i)+".log"),
		done:    make(chan struct{}),
	}
	logf, err := os.Create(a.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own descriptor
	a.cmd = exec.Command(filepath.Join(bin, "app"))
	a.cmd.Env = append(os.Environ(),
		"HOST=127.0.0.1",
		"PORT="+strconv.Itoa(port),
		"INSTANCE_ID="+a.name,
		"CACHE_TYPE="+o.cacheType,
		"REDIS_URL="+redisURL,
		"SQLITE_PATH="+filepath.Join(tmp, "demo.db"),
		"DATABASE_URL="+o.databaseURL,
		"DB_LATENCY="+o.dbLatency.String(),
		"LOG_FORMAT=text",
	)
	a.cmd.Stdout, a.cmd.Stderr = logf, logf
	a.cmd.SysProcAttr = childAttr()
	if err := a.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", a.name, err)
	}
	go func() {
		a.err = a.cmd.Wait()
		close(a.done)
	}()
	return a, nil
}

// waitHealthy polls the instance's health endpoint until it answers 200.
func (a *app) waitHealthy(ctx context.Context, d time.Duration) error {
	deadline := time.Now().Add(d)
	c := &http.Client{Timeout: time.Second}
	for {
		resp, err := c.Get(a.url + "/api/v1/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-a.done:
			return fmt.Errorf("%s exited (%v) before it was healthy:\n%s", a.name, a.err, tail(a.logPath))
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s was not healthy within %v:\n%s", a.name, d, tail(a.logPath))
		}
	}
}

// stop asks the instance to shut down gracefully (SIGTERM), and kills it
// if it has not within 15 seconds.
func (a *app) stop() {
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.done:
	case <-time.After(15 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.done
	}
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// moduleRoot is the directory of this module's go.mod.
func moduleRoot() string {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if gomod := strings.TrimSpace(string(out)); err == nil && gomod != "" && gomod != os.DevNull {
		return filepath.Dir(gomod)
	}
	return "."
}

func redacted(s string) string {
	if u, err := url.Parse(s); err == nil {
		return u.Redacted()
	}
	return "(unparsable URL)"
}

// tail is the end of a log file, for error messages.
func tail(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > 2000 {
		_, _ = f.Seek(-2000, io.SeekEnd)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}
