package server

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/metric/noop"
)

// Instances started together on a new SQLite file (make demo, docker
// compose up) race to switch it to WAL and to seed it: exactly one seeds,
// and none fails for a lock the others hold.
func TestOpenStore_ConcurrentFirstStart(t *testing.T) {
	const rounds, instances = 8, 4
	for r := range rounds {
		cfg := Config{SQLitePath: filepath.Join(t.TempDir(), fmt.Sprintf("race-%d.db", r)), SeedUsers: 1000, SeedLicenses: 200}
		var wg sync.WaitGroup
		stores := make([]*Store, instances)
		errs := make([]error, instances)
		start := make(chan struct{})
		for i := range instances {
			wg.Go(func() {
				<-start
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				stores[i], errs[i] = OpenStore(ctx, cfg, noop.NewMeterProvider())
			})
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d: instance %d: OpenStore: %v", r, i, err)
			}
		}
		for i, s := range stores {
			users, licenses, err := s.Count(context.Background())
			if err != nil || users != 1000 || licenses != 200 {
				t.Errorf("round %d: instance %d counts %d users, %d licenses (%v); want 1000 and 200, seeded once", r, i, users, licenses, err)
			}
			s.Close()
		}
	}
}
