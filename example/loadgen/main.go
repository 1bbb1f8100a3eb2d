// Command loadgen drives several instances of the example app at once, checks
// every read for staleness, prints a summary and writes a JSON result and an
// HTML report.
//
//	loadgen -targets http://localhost:8081,http://localhost:8082 -duration 20s
//
// It exits 1 when the run could not be made, and with -check also when a
// read was stale or a request failed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/tiercache/tiercache/example/loadgen/load"
)

func main() {
	var cfg load.Config
	targets := flag.String("targets", os.Getenv("LOADGEN_TARGETS"), "comma-separated base URLs of the app instances (or LOADGEN_TARGETS)")
	flag.DurationVar(&cfg.Duration, "duration", load.DefaultDuration, "how long to measure")
	flag.DurationVar(&cfg.Warmup, "warmup", 2*time.Second, "load before the measured window (its reads are checked too)")
	flag.Int64Var(&cfg.Requests, "requests", 0, "measure at least this many requests, however long -duration is")
	flag.Int64Var(&cfg.WarmupRequests, "warmup-requests", 0, "warm up with at least this many requests")
	flag.DurationVar(&cfg.MaxDuration, "max-duration", 0, "bound on the whole run (default: warmup + duration, or 10m with -requests)")
	flag.Float64Var(&cfg.Rate, "rate", 0, "total requests per second to aim at; 0 = flat out")
	flag.IntVar(&cfg.Concurrency, "concurrency", load.DefaultConcurrency, "workers sending requests")
	mix := flag.String("mix", load.DefaultMix.Flag(), "weights of the kinds of request")
	flag.IntVar(&cfg.Users, "users", 0, "users to draw from (IDs 1..N); 0 = ask the first instance")
	flag.Float64Var(&cfg.Zipf, "zipf", load.DefaultZipf, "exponent of the Zipf distribution of users and pages (above 1)")
	flag.IntVar(&cfg.Pages, "pages", load.DefaultPages, "license pages to draw from")
	flag.IntVar(&cfg.Limit, "limit", load.DefaultLimit, "licenses per page")
	flag.DurationVar(&cfg.Delta, "delta", load.DefaultDelta, "staleness allowed: a read that began more than this after a newer write returned is stale")
	flag.DurationVar(&cfg.Timeout, "timeout", load.DefaultTimeout, "per-request timeout")
	flag.DurationVar(&cfg.Interval, "interval", load.DefaultInterval, "time series resolution and scrape interval")
	flag.Uint64Var(&cfg.Seed, "seed", 1, "random seed")
	wait := flag.Duration("wait", 0, "wait this long for every target to answer its health check first")
	jsonOut := flag.String("json", "loadgen-result.json", "write the result here ('' = don't)")
	htmlOut := flag.String("html", "loadgen-report.html", "write the HTML report here ('' = don't)")
	quiet := flag.Bool("quiet", false, "no progress bar")
	strict := flag.Bool("check", false, "exit 1 if any read was stale or any request failed")
	flag.Parse()

	var err error
	if cfg.Mix, err = load.ParseMix(*mix); err != nil {
		fail(err)
	}
	for t := range strings.SplitSeq(*targets, ",") {
		if t = strings.TrimSpace(t); t != "" {
			cfg.Targets = append(cfg.Targets, t)
		}
	}
	if len(cfg.Targets) == 0 {
		fail(errors.New("no targets: give -targets http://host:port,... or LOADGEN_TARGETS"))
	}
	if !*quiet {
		cfg.Progress = os.Stderr
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *wait > 0 {
		if err := waitReady(ctx, cfg.Targets, *wait); err != nil {
			fail(err)
		}
	}
	res, err := load.Run(ctx, cfg)
	if err != nil {
		fail(err)
	}
	res.WriteSummary(os.Stdout)
	if *jsonOut != "" {
		if err := res.WriteJSON(*jsonOut); err != nil {
			fail(err)
		}
		fmt.Printf("  result       %s\n", *jsonOut)
	}
	if *htmlOut != "" {
		if err := res.WriteHTML(*htmlOut); err != nil {
			fail(err)
		}
		fmt.Printf("  report       %s\n", *htmlOut)
	}
	if *strict && (res.Coherence.Stale() || len(res.ErrorKinds) > 0) {
		fmt.Fprintln(os.Stderr, "loadgen: -check failed: stale reads or errors")
		os.Exit(1)
	}
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "loadgen: %v\n", err)
	os.Exit(1)
}

// waitReady polls every target's health endpoint until all answer 200.
func waitReady(ctx context.Context, targets []string, d time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	c := &http.Client{Timeout: time.Second}
	for _, t := range targets {
		for {
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimRight(t, "/")+"/api/v1/health", nil)
			resp, err := c.Do(req)
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == http.StatusOK {
					break
				}
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("%s did not become healthy within %v", t, d)
			case <-time.After(250 * time.Millisecond):
			}
		}
	}
	return nil
}
