package server

import (
	"context"
	"errors"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/otlptranslator"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// Telemetry is the app's OpenTelemetry SDK: a MeterProvider exported to
// Prometheus (served by Metrics) and, when an OTLP endpoint is configured,
// a TracerProvider exporting spans over OTLP/HTTP.
type Telemetry struct {
	MeterProvider  *sdkmetric.MeterProvider
	TracerProvider trace.TracerProvider
	// Metrics serves the Prometheus text format: every instrument of the
	// MeterProvider (the app's, OpenTelemetry's HTTP ones, tiercache's)
	// plus the Go runtime's.
	Metrics http.Handler

	shutdown []func(context.Context) error
}

// NewTelemetry builds the SDK for cfg. The service name comes from
// OTEL_SERVICE_NAME (default "tiercache-example"); the resource also carries
// the instance ID.
func NewTelemetry(ctx context.Context, cfg Config) (*Telemetry, error) {
	res, err := resource.New(ctx,
		resource.WithAttributes(
			attribute.String("service.name", "tiercache-example"),
			attribute.String("service.instance.id", cfg.InstanceID),
		),
		resource.WithFromEnv(), // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
	)
	if err != nil {
		return nil, err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	exp, err := otelprom.New(
		otelprom.WithRegisterer(reg),
		otelprom.WithTranslationStrategy(otlptranslator.UnderscoreEscapingWithSuffixes), // tiercache.l1.hits -> tiercache_l1_hits_total
	)
	if err != nil {
		return nil, err
	}
	t := &Telemetry{
		MeterProvider: sdkmetric.NewMeterProvider(sdkmetric.WithReader(exp), sdkmetric.WithResource(res)),
		Metrics:       promhttp.HandlerFor(reg, promhttp.HandlerOpts{}),
	}
	t.shutdown = append(t.shutdown, t.MeterProvider.Shutdown)
	t.TracerProvider = noop.NewTracerProvider()
	if cfg.OTLPEndpoint != "" {
		// The exporter reads OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, headers,
		// timeouts and TLS settings itself.
		te, err := otlptracehttp.New(ctx)
		if err != nil {
			return nil, errors.Join(err, t.Shutdown(ctx))
		}
		tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(te), sdktrace.WithResource(res))
		t.TracerProvider = tp
		t.shutdown = append(t.shutdown, tp.Shutdown)
	}
	return t, nil
}

// Install makes t's providers the global ones, which tiercache's caches and
// Bus use; call it before creating them. It also installs the W3C trace
// context propagator.
func (t *Telemetry) Install() {
	otel.SetMeterProvider(t.MeterProvider)
	otel.SetTracerProvider(t.TracerProvider)
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
}

// Shutdown flushes and stops the exporters. Call it last, after the server
// has closed the caches.
func (t *Telemetry) Shutdown(ctx context.Context) error {
	var errs []error
	for i := len(t.shutdown) - 1; i >= 0; i-- {
		errs = append(errs, t.shutdown[i](ctx))
	}
	return errors.Join(errs...)
}
