# tiercache: the commands a newcomer and CI use. `make help` lists them.
GO        ?= go
PKGS      ?= ./...
BENCHTIME ?= 200ms
COUNT     ?= 6
SOAK_PHASE ?= 30s

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: test
test: ## run every test with -race against private redis-server processes (what CI runs)
	@command -v redis-server >/dev/null || { echo "redis-server not found: install it (apt-get install redis-server); the fault tests start their own even with REDIS_ADDR set"; exit 1; }
	$(GO) vet $(PKGS)
	$(GO) test -race -count=1 -timeout 10m $(PKGS)
	@# The core and read-through suites again, against a local Redis Cluster (3 masters, 3 replicas), over sharded pub/sub.
	TIERCACHE_TEST_CLUSTER=1 TIERCACHE_TEST_SHARDS=8 $(GO) test -race -count=1 -timeout 10m ./tiered/
	@# Without -race: allocation counts (meaningless under it, where those tests skip), the
	@# per-P hit counter, whose plain add only exists outside race builds, and the hot index's
	@# admission test (under -race sync.Pool drops starve ristretto's access ring; that test is !race).
	$(GO) test -count=1 -run 'Allocs|CountedExactly|HotIndex' ./tiered/
	$(GO) test -count=1 ./internal/pcount/

.PHONY: demo
demo: ## the example fleet: throwaway redis-server (or REDIS_URL), 3 app instances on SQLite, 20s of checked load, summary + HTML report
	$(GO) run ./example/demo $(DEMO_ARGS)

.PHONY: soak
soak: ## the coherence checker's long run: every fault phase (standalone, then cluster) for SOAK_PHASE (30s) each, more instances and readers
	@command -v redis-server >/dev/null || { echo "redis-server not found: install it (apt-get install redis-server)"; exit 1; }
	TIERCACHE_SOAK=1 TIERCACHE_SOAK_PHASE=$(SOAK_PHASE) $(GO) test -count=1 -timeout 60m -run '^TestSoak(Cluster)?$$' -v ./integration/

.PHONY: bench
bench: ## run the benchmarks beside their bare-dependency baselines; compare with benchstat
	$(GO) test -run '^$$' -bench . -benchtime $(BENCHTIME) -count $(COUNT) ./tiered/ | tee bench.txt
	@command -v benchstat >/dev/null && benchstat bench.txt || echo "install benchstat: go install golang.org/x/perf/cmd/benchstat@latest"

.PHONY: bench-paired
bench-paired: ## the targets' ratios as docs/benchmarks.md reports them: bare and tiercache take turns within each run
	$(GO) test -run '^$$' -bench 'L1HitPaired' -benchtime 4000000x -count 3 ./tiered/ | tee bench-paired.txt
	$(GO) test -run '^$$' -bench 'L2HitPaired|SetPaired' -benchtime 4000x -count 3 ./tiered/ | tee -a bench-paired.txt
	$(GO) test -run '^$$' -bench 'Propagation' -benchtime 1s -count 3 ./tiered/ | tee -a bench-paired.txt

.PHONY: fuzz
fuzz: ## fuzz the wire decoders for 30s each
	$(GO) test -run '^$$' -fuzz FuzzDecodeEnvelope -fuzztime 30s ./internal/wire/
	$(GO) test -run '^$$' -fuzz FuzzDecodeMessage -fuzztime 30s ./invalidate/

.PHONY: lint
lint: ## gofmt, go vet and staticcheck
	@test -z "$$(gofmt -l .)" || { gofmt -l .; echo "gofmt: the files above need formatting"; exit 1; }
	$(GO) vet $(PKGS)
	$(GO) run honnef.co/go/tools/cmd/staticcheck@v0.8.2 $(PKGS)
