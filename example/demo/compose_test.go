package main

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
	"go.yaml.in/yaml/v4"

	"github.com/tiercache/tiercache/example/app/server"
)

// No Docker engine runs in CI, so docker-compose.yml is checked by loading
// it as Docker Compose would (compose-spec's own loader: schema,
// interpolation, anchors, merges) and looking at what it would run.
func TestComposeFile(t *testing.T) {
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	p, err := loader.LoadWithContext(context.Background(), types.ConfigDetails{
		WorkingDir:  root,
		ConfigFiles: []types.ConfigFile{{Filename: filepath.Join(root, "docker-compose.yml")}},
		Environment: types.Mapping{}, // the defaults, as on a machine with nothing set
	}, func(o *loader.Options) {
		o.SetProjectName("tiercache", true)
		o.Profiles = []string{"load", "observe"}
	})
	if err != nil {
		t.Fatalf("load docker-compose.yml: %v", err)
	}
	svc := func(name string) types.ServiceConfig {
		t.Helper()
		s, err := p.GetService(name)
		if err != nil {
			t.Fatalf("service %s: %v", name, err)
		}
		return s
	}
	if got, want := slices.Sorted(func(yield func(string) bool) {
		for n := range p.Services {
			if !yield(n) {
				return
			}
		}
	}), []string{"app-1", "app-2", "app-3", "jaeger", "loadgen", "otel-collector", "prometheus", "redis"}; !slices.Equal(got, want) {
		t.Errorf("services = %v, want %v", got, want)
	}

	// Redis as the original plan had it (append-only file, 256 MB, a health
	// check, data on a volume), but LRU over the keys with a TTL only: the
	// namespaces' generation keys have none, and evicting one would split
	// the fleet across generations (README, "Redis configuration").
	redis := svc("redis")
	cmd := strings.Join(redis.Command, " ")
	for _, want := range []string{"--appendonly yes", "--maxmemory 256mb", "--maxmemory-policy volatile-lru"} {
		if !strings.Contains(cmd, want) {
			t.Errorf("redis command %q lacks %q", cmd, want)
		}
	}
	if hc := redis.HealthCheck; hc == nil || !slices.Equal([]string(hc.Test), []string{"CMD", "redis-cli", "ping"}) || hc.Interval == nil || hc.Retries == nil {
		t.Errorf("redis health check = %+v, want redis-cli ping with an interval and retries", hc)
	}
	if len(redis.Profiles) != 0 || len(redis.Volumes) != 1 || redis.Volumes[0].Target != "/data" {
		t.Errorf("redis: profiles %v, volumes %+v; want none and its data on a volume", redis.Profiles, redis.Volumes)
	}

	// The three instances: wait for a healthy Redis, are health-checked
	// themselves, share one database volume, and have an environment the
	// app accepts.
	var targets []string
	ids := map[string]bool{}
	for _, name := range []string{"app-1", "app-2", "app-3"} {
		app := svc(name)
		if dep, ok := app.DependsOn["redis"]; !ok || dep.Condition != types.ServiceConditionHealthy {
			t.Errorf("%s depends_on = %+v, want redis: service_healthy", name, app.DependsOn)
		}
		if hc := app.HealthCheck; hc == nil || !slices.Equal([]string(hc.Test), []string{"CMD", "/usr/local/bin/app", "-healthcheck"}) {
			t.Errorf("%s health check = %+v", name, hc)
		}
		if app.Build == nil || app.Build.Dockerfile != "example/Dockerfile" || len(app.Profiles) != 0 {
			t.Errorf("%s: build %+v, profiles %v", name, app.Build, app.Profiles)
		}
		env := map[string]string{}
		for k, v := range app.Environment {
			if v != nil {
				env[k] = *v
			}
		}
		cfg, err := server.LoadConfig(func(k string) string { return env[k] })
		if err != nil {
			t.Errorf("%s: the app refuses its environment: %v", name, err)
			continue
		}
		if cfg.Redis == nil || cfg.Redis.Addr != "redis:6379" || cfg.CacheType != "redis" || cfg.DatabaseURL != "" || ids[cfg.InstanceID] {
			t.Errorf("%s: Redis %v, CACHE_TYPE %q, DATABASE_URL %q, INSTANCE_ID %q (want redis:6379, redis, SQLite, unique)", name, cfg.Redis, cfg.CacheType, cfg.DatabaseURL, cfg.InstanceID)
		}
		ids[cfg.InstanceID] = true
		if !slices.ContainsFunc(app.Volumes, func(v types.ServiceVolumeConfig) bool {
			return v.Source == "app-data" && strings.HasPrefix(cfg.SQLitePath, v.Target+"/")
		}) {
			t.Errorf("%s: SQLITE_PATH %s is not on the shared app-data volume (%+v)", name, cfg.SQLitePath, app.Volumes)
		}
		if len(app.Ports) != 1 || app.Ports[0].Target != uint32(cfg.Port) {
			t.Errorf("%s: ports %+v, want one, to PORT %d", name, app.Ports, cfg.Port)
		}
		targets = append(targets, "http://"+name+":"+env["PORT"])
	}

	// The load generator, under the load profile, once every app is healthy,
	// against all three.
	lg := svc("loadgen")
	if !slices.Equal(lg.Profiles, []string{"load"}) || !slices.Equal([]string(lg.Entrypoint), []string{"/usr/local/bin/loadgen"}) {
		t.Errorf("loadgen: profiles %v, entrypoint %v", lg.Profiles, lg.Entrypoint)
	}
	for _, name := range []string{"app-1", "app-2", "app-3"} {
		if dep, ok := lg.DependsOn[name]; !ok || dep.Condition != types.ServiceConditionHealthy {
			t.Errorf("loadgen depends_on %s = %+v, want service_healthy", name, dep)
		}
	}
	if i := slices.Index(lg.Command, "-targets"); i < 0 || i+1 >= len(lg.Command) || lg.Command[i+1] != strings.Join(targets, ",") {
		t.Errorf("loadgen command %v, want -targets %s", lg.Command, strings.Join(targets, ","))
	}
	if i := slices.Index(lg.Command, "-duration"); i < 0 || lg.Command[i+1] != "20s" {
		t.Errorf("loadgen command %v: -duration should default to 20s", lg.Command)
	}

	// The observe profile: collector, Jaeger and Prometheus, with config
	// files that exist and point at each other.
	for _, name := range []string{"otel-collector", "jaeger", "prometheus"} {
		if s := svc(name); !slices.Equal(s.Profiles, []string{"observe"}) {
			t.Errorf("%s: profiles %v, want [observe]", name, s.Profiles)
		}
	}
	var prom struct {
		ScrapeConfigs []struct {
			MetricsPath   string `yaml:"metrics_path"`
			StaticConfigs []struct {
				Targets []string `yaml:"targets"`
			} `yaml:"static_configs"`
		} `yaml:"scrape_configs"`
	}
	mountedYAML(t, root, svc("prometheus"), "/etc/prometheus/prometheus.yml", &prom)
	if len(prom.ScrapeConfigs) != 1 || prom.ScrapeConfigs[0].MetricsPath != "/metrics" || len(prom.ScrapeConfigs[0].StaticConfigs) != 1 ||
		!slices.Equal(prom.ScrapeConfigs[0].StaticConfigs[0].Targets, []string{"app-1:8080", "app-2:8080", "app-3:8080"}) {
		t.Errorf("prometheus.yml scrape configs = %+v, want /metrics of app-1..3:8080", prom.ScrapeConfigs)
	}
	var otel struct {
		Exporters map[string]struct {
			Endpoint string `yaml:"endpoint"`
		} `yaml:"exporters"`
		Service struct {
			Pipelines map[string]struct {
				Receivers []string `yaml:"receivers"`
				Exporters []string `yaml:"exporters"`
			} `yaml:"pipelines"`
		} `yaml:"service"`
	}
	col := svc("otel-collector")
	mountedYAML(t, root, col, "/etc/otelcol-contrib/config.yaml", &otel)
	tr := otel.Service.Pipelines["traces"]
	if !slices.Equal(tr.Receivers, []string{"otlp"}) || len(tr.Exporters) != 1 || otel.Exporters[tr.Exporters[0]].Endpoint != "jaeger:4317" {
		t.Errorf("otel-collector traces pipeline = %+v, exporters %+v; want otlp to jaeger:4317", tr, otel.Exporters)
	}
	if !slices.ContainsFunc(col.Ports, func(p types.ServicePortConfig) bool { return p.Target == 4318 }) {
		t.Errorf("otel-collector does not publish OTLP/HTTP (4318): %+v", col.Ports)
	}

	// The Dockerfile builds both binaries where the services run them.
	df, err := os.ReadFile(filepath.Join(root, "example", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"./example/app ./example/loadgen", "/usr/local/bin/", "CGO_ENABLED=0"} {
		if !strings.Contains(string(df), want) {
			t.Errorf("example/Dockerfile lacks %q", want)
		}
	}
}

// mountedYAML decodes the file the service mounts at target.
func mountedYAML(t *testing.T, root string, s types.ServiceConfig, target string, out any) {
	t.Helper()
	i := slices.IndexFunc(s.Volumes, func(v types.ServiceVolumeConfig) bool { return v.Target == target })
	if i < 0 {
		t.Fatalf("%s mounts nothing at %s", s.Name, target)
	}
	src := s.Volumes[i].Source
	if !filepath.IsAbs(src) {
		src = filepath.Join(root, src)
	}
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatalf("%s: %v", s.Name, err)
	}
	if err := yaml.Unmarshal(b, out); err != nil {
		t.Fatalf("%s: %v", src, err)
	}
}
