package load

import (
	"fmt"
	"html"
	"html/template"
	"io"
	"math"
	"os"
	"strconv"
	"strings"
	"time"
)

// WriteHTML writes a self-contained HTML report to path: the summary, the
// coherence verdict and charts (inline SVG, no script, nothing fetched) of
// throughput, latency percentiles, hit ratio per tier and database queries
// per request over time.
func (res *Result) WriteHTML(path string) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := res.RenderHTML(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// RenderHTML writes the report WriteHTML writes.
func (res *Result) RenderHTML(w io.Writer) error {
	return reportTmpl.Execute(w, res.view())
}

type reportView struct {
	R        *Result
	Title    string
	Describe string
	Started  string
	Stale    bool
	Errors   int64
	Charts   []template.HTML
	Ops      []opRow
	Errs     []errRow
}

type opRow struct {
	Name string
	Op   Op
}

type errRow struct {
	Kind    string
	Count   int64
	Example string
}

func (res *Result) view() reportView {
	v := reportView{
		R:        res,
		Title:    fmt.Sprintf("tiercache load report: cache %s, %d instances", res.CacheType, len(res.Targets)),
		Describe: res.Describe(),
		Started:  res.Started.Format(time.RFC1123),
		Stale:    res.Coherence.Stale(),
	}
	for _, n := range opNames {
		v.Ops = append(v.Ops, opRow{n, res.Ops[n]})
	}
	for k, n := range res.ErrorKinds {
		v.Errors += n
		v.Errs = append(v.Errs, errRow{k, n, res.ErrorExamples[k]})
	}
	interval, _ := time.ParseDuration(res.Settings.Interval)
	xs := make([]float64, len(res.Series))
	var xmax float64
	for i, p := range res.Series {
		xs[i] = p.T + interval.Seconds()/2
		xmax = p.T + interval.Seconds()
	}
	col := func(f func(Point) *float64) []*float64 {
		out := make([]*float64, len(res.Series))
		for i, p := range res.Series {
			out[i] = f(p)
		}
		return out
	}
	scale := func(ps []*float64, k float64) []*float64 {
		for i, p := range ps {
			if p != nil {
				ps[i] = ptr(*p * k)
			}
		}
		return ps
	}
	base := chart{X: xs, XMax: xmax, Shade: res.WarmupSeconds}
	c := base
	c.Title, c.Unit = "Throughput", "requests/s"
	c.Series = []series{
		{"requests/s", "#1f6feb", col(func(p Point) *float64 { return ptr(p.RPS) })},
		{"errors/s", "#d1242f", col(func(p Point) *float64 { return ptr(float64(p.Errors) / interval.Seconds()) })},
	}
	v.Charts = append(v.Charts, c.svg())
	c = base
	c.Title, c.Unit = "Latency per interval", "ms"
	c.Series = []series{
		{"p50", "#2da44e", col(func(p Point) *float64 { return p.P50 })},
		{"p95", "#bf8700", col(func(p Point) *float64 { return p.P95 })},
		{"p99", "#d1242f", col(func(p Point) *float64 { return p.P99 })},
	}
	v.Charts = append(v.Charts, c.svg())
	c = base
	c.Title, c.Unit, c.YMax = "Cache hit ratio per tier (scraped from the instances)", "%", 100
	c.Series = []series{
		{"L1 (process memory)", "#8250df", scale(col(func(p Point) *float64 { return p.L1HitRatio }), 100)},
		{"L2 (Redis)", "#1f6feb", scale(col(func(p Point) *float64 { return p.L2HitRatio }), 100)},
	}
	v.Charts = append(v.Charts, c.svg())
	c = base
	c.Title, c.Unit = "Database queries per request", "queries"
	c.Series = []series{{"queries/request", "#bc4c00", col(func(p Point) *float64 { return p.DBQueriesPerRequest })}}
	v.Charts = append(v.Charts, c.svg())
	return v
}

// series is one line of a chart; nil values leave a gap.
type series struct {
	Name, Color string
	Y           []*float64
}

// chart is a line chart over time, rendered as inline SVG.
type chart struct {
	Title, Unit string
	X           []float64 // seconds
	XMax        float64
	YMax        float64 // 0: from the data
	Shade       float64 // the warm-up's end, shaded from 0
	Series      []series
}

const (
	chartW, chartH               = 920, 260
	padL, padR, padT, padB       = 64, 16, 40, 36
	plotW, plotH                 = chartW - padL - padR, chartH - padT - padB
	maxPointsWithMarkers         = 90
	axisColor, gridColor, txtCol = "#57606a", "#d0d7de", "#24292f"
)

// niceStep is a step of 1, 2 or 5 times a power of ten near span/n.
func niceStep(span float64, n int) float64 {
	raw := span / float64(n)
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*mag >= raw {
			return m * mag
		}
	}
	return 10 * mag
}

// label formats a tick value with as many decimals as its step needs.
func label(v, step float64) string {
	return strconv.FormatFloat(v, 'f', max(0, int(math.Ceil(-math.Log10(step)-1e-9))), 64)
}

func (c chart) svg() template.HTML {
	ymax := c.YMax
	if ymax == 0 {
		for _, s := range c.Series {
			for _, y := range s.Y {
				if y != nil && !math.IsInf(*y, 0) && !math.IsNaN(*y) {
					ymax = max(ymax, *y)
				}
			}
		}
		if ymax == 0 {
			ymax = 1
		}
		step := niceStep(ymax, 5)
		ymax = math.Ceil(ymax*1.05/step) * step
	}
	xmax := max(c.XMax, 1)
	px := func(x float64) float64 { return padL + x/xmax*plotW }
	py := func(y float64) float64 { return padT + plotH - math.Min(y, ymax)/ymax*plotH }

	var b strings.Builder
	fmt.Fprintf(&b, `<svg class="chart" viewBox="0 0 %d %d" width="%d" height="%d" role="img" aria-label="%s">`, chartW, chartH, chartW, chartH, html.EscapeString(c.Title))
	fmt.Fprintf(&b, `<text x="%d" y="18" font-size="15" font-weight="600" fill="%s">%s</text>`, padL, txtCol, html.EscapeString(c.Title))
	if c.Shade > 0 {
		fmt.Fprintf(&b, `<rect x="%.1f" y="%d" width="%.1f" height="%d" fill="#f6f8fa"/>`, px(0), padT, px(min(c.Shade, xmax))-px(0), plotH)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" font-size="11" fill="%s">warm-up</text>`, px(0)+4, padT+12, axisColor)
	}
	// Grid and y axis.
	ystep := niceStep(ymax, 5)
	for k := 0; float64(k)*ystep <= ymax*1.0001; k++ {
		y := float64(k) * ystep
		fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%.1f" y2="%.1f" stroke="%s" stroke-width="1"/>`, padL, padL+plotW, py(y), py(y), gridColor)
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" font-size="11" text-anchor="end" fill="%s">%s</text>`, padL-6, py(y)+4, axisColor, label(y, ystep))
	}
	fmt.Fprintf(&b, `<text x="14" y="%d" font-size="11" fill="%s" transform="rotate(-90 14 %d)" text-anchor="middle">%s</text>`, padT+plotH/2, axisColor, padT+plotH/2, html.EscapeString(c.Unit))
	// X axis, in seconds.
	xstep := niceStep(xmax, 10)
	for k := 0; float64(k)*xstep <= xmax*1.0001; k++ {
		x := float64(k) * xstep
		fmt.Fprintf(&b, `<line x1="%.1f" x2="%.1f" y1="%d" y2="%d" stroke="%s"/>`, px(x), px(x), padT+plotH, padT+plotH+4, axisColor)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" font-size="11" text-anchor="middle" fill="%s">%s</text>`, px(x), padT+plotH+17, axisColor, label(x, xstep))
	}
	fmt.Fprintf(&b, `<text x="%d" y="%d" font-size="11" text-anchor="middle" fill="%s">seconds since start</text>`, padL+plotW/2, chartH-3, axisColor)
	fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="%s"/>`, padL, padL+plotW, padT+plotH, padT+plotH, axisColor)
	fmt.Fprintf(&b, `<line x1="%d" x2="%d" y1="%d" y2="%d" stroke="%s"/>`, padL, padL, padT, padT+plotH, axisColor)
	// Lines, split at gaps.
	lx := float64(padL + plotW)
	for i := len(c.Series) - 1; i >= 0; i-- {
		s := c.Series[i]
		var seg []string
		flush := func() {
			if len(seg) > 1 {
				fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" stroke-linejoin="round" points="%s"/>`, s.Color, strings.Join(seg, " "))
			}
			seg = seg[:0]
		}
		n := 0
		for j, y := range s.Y {
			if y == nil || math.IsNaN(*y) || math.IsInf(*y, 0) {
				flush()
				continue
			}
			n++
			seg = append(seg, fmt.Sprintf("%.1f,%.1f", px(c.X[j]), py(*y)))
			if len(c.X) <= maxPointsWithMarkers {
				fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="2.5" fill="%s"><title>%s at %.1fs: %s</title></circle>`, px(c.X[j]), py(*y), s.Color, html.EscapeString(s.Name), c.X[j], strconv.FormatFloat(*y, 'f', 3, 64))
			}
		}
		flush()
		// Legend, right-aligned on the title's line.
		name := s.Name
		if n == 0 {
			name += " (no data)"
		}
		w := float64(len(name))*6.6 + 24
		lx -= w
		fmt.Fprintf(&b, `<rect x="%.1f" y="9" width="12" height="12" rx="2" fill="%s"/><text x="%.1f" y="19" font-size="12" fill="%s">%s</text>`, lx, s.Color, lx+16, txtCol, html.EscapeString(name))
	}
	b.WriteString(`</svg>`)
	return template.HTML(b.String()) // every text in it was escaped above
}

var reportTmpl = template.Must(template.New("report").Funcs(template.FuncMap{
	"pct": pct,
	"f1":  func(f float64) string { return strconv.FormatFloat(f, 'f', 1, 64) },
	"f2":  func(f float64) string { return strconv.FormatFloat(f, 'f', 2, 64) },
	"num": func(v any) string {
		s := fmt.Sprint(v)
		for i := len(s) - 3; i > 0 && s[i-1] != '-'; i -= 3 {
			s = s[:i] + "," + s[i:]
		}
		return s
	},
	"dbq": func(p *float64) string {
		if p == nil {
			return "n/a"
		}
		return strconv.FormatFloat(*p, 'f', 3, 64)
	},
}).Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{.Title}}</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #24292f; margin: 24px auto; max-width: 960px; padding: 0 16px; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
.sub { color: #57606a; margin: 0 0 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 12px; min-width: 120px; }
.card .v { font-size: 20px; font-weight: 600; }
.card .k { color: #57606a; font-size: 12px; }
.ok { border-color: #2da44e; background: #dafbe1; }
.bad { border-color: #d1242f; background: #ffebe9; }
table { border-collapse: collapse; margin: 6px 0; }
td, th { border-bottom: 1px solid #d0d7de; padding: 4px 12px 4px 0; text-align: right; }
td:first-child, th:first-child { text-align: left; }
th { color: #57606a; font-weight: 600; }
svg.chart { display: block; margin: 14px 0; max-width: 100%; height: auto; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; }
</style>
</head>
<body>
<h1>{{.Title}}</h1>
<p class="sub">{{.Describe}}.<br>Started {{.Started}}; measured for {{f1 .R.ElapsedSeconds}} s.</p>

<div class="cards">
 <div class="card {{if .Stale}}bad{{else}}ok{{end}}"><div class="v">{{num .R.Coherence.StaleReads}}</div><div class="k">stale reads (δ = {{.R.Settings.Delta}})</div></div>
 <div class="card {{if .Errors}}bad{{else}}ok{{end}}"><div class="v">{{num .Errors}}</div><div class="k">errors</div></div>
 <div class="card"><div class="v">{{num (printf "%.0f" .R.Throughput)}}</div><div class="k">requests/s</div></div>
 <div class="card"><div class="v">{{f2 .R.Latency.P50}} ms</div><div class="k">p50 latency</div></div>
 <div class="card"><div class="v">{{f2 .R.Latency.P99}} ms</div><div class="k">p99 latency</div></div>
 <div class="card"><div class="v">{{pct .R.Cache.L1HitRatio}}</div><div class="k">L1 hit ratio</div></div>
 <div class="card"><div class="v">{{pct .R.Cache.L2HitRatio}}</div><div class="k">L2 hit ratio</div></div>
 <div class="card"><div class="v">{{dbq .R.Cache.DBQueriesPerRequest}}</div><div class="k">DB queries/request</div></div>
</div>

<h2>Charts</h2>
{{range .Charts}}{{.}}
{{end}}

<h2>Requests</h2>
<table>
<tr><th>kind</th><th>requests</th><th>errors</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th><th>max ms</th></tr>
{{range .Ops}}<tr><td>{{.Name}}</td><td>{{num .Op.Requests}}</td><td>{{num .Op.Errors}}</td><td>{{f2 .Op.Latency.P50}}</td><td>{{f2 .Op.Latency.P95}}</td><td>{{f2 .Op.Latency.P99}}</td><td>{{f1 .Op.Latency.Max}}</td></tr>
{{end}}<tr><td><b>all</b></td><td><b>{{num .R.Requests}}</b></td><td>{{num .R.Errors}}</td><td>{{f2 .R.Latency.P50}}</td><td>{{f2 .R.Latency.P95}}</td><td>{{f2 .R.Latency.P99}}</td><td>{{f1 .R.Latency.Max}}</td></tr>
</table>
{{if .Errs}}<table><tr><th>error</th><th>count</th><th>last message</th></tr>
{{range .Errs}}<tr><td>{{.Kind}}</td><td>{{.Count}}</td><td style="text-align:left">{{.Example}}</td></tr>{{end}}
</table>{{end}}

<h2>Coherence</h2>
<p>Every read of a user returned the version it saw; every update, the version the database gave it.
A read is <b>stale</b> if an update that returned a newer version had returned more than δ = {{.R.Settings.Delta}} before the read began.</p>
<table>
<tr><td>reads checked</td><td>{{num .R.Coherence.Reads}}</td></tr>
<tr><td>writes (versions returned)</td><td>{{num .R.Coherence.Writes}}</td></tr>
<tr><td>stale reads</td><td><b>{{num .R.Coherence.StaleReads}}</b></td></tr>
<tr><td>stale in the read-back after the load</td><td><b>{{len .R.Coherence.FinalStale}}</b> of {{num .R.Coherence.FinalReads}}</td></tr>
<tr><td>late reads (older version, within δ)</td><td>{{num .R.Coherence.LateReads}}</td></tr>
<tr><td>worst lag</td><td>{{f1 .R.Coherence.WorstLagMs}} ms</td></tr>
</table>
{{with .R.Coherence.Examples}}<table><tr><th>user</th><th>instance</th><th>began at ms</th><th>saw</th><th>newer</th><th>lag ms</th></tr>
{{range .}}<tr><td>{{.User}}</td><td>{{.Instance}}</td><td>{{f1 .StartMs}}</td><td>v{{.Saw}}</td><td>v{{.Newer}}</td><td>{{f1 .LagMs}}</td></tr>{{end}}
</table>{{end}}

<h2>Instances</h2>
{{if .R.Cache.Available}}<table>
<tr><th>instance</th><th>API requests</th><th>DB queries</th><th>DB queries/request</th><th>L1 hit ratio</th><th>L2 hit ratio</th></tr>
{{range .R.Cache.PerInstance}}<tr><td>{{.Instance}}</td><td>{{num .Requests}}</td><td>{{num .DBQueries}}</td><td>{{dbq .DBQueriesPerRequest}}</td><td>{{pct .L1HitRatio}}</td><td>{{pct .L2HitRatio}}</td></tr>
{{end}}<tr><td><b>all</b></td><td>{{num .R.Cache.ServerRequests}}</td><td>{{num .R.Cache.DBQueries}}</td><td>{{dbq .R.Cache.DBQueriesPerRequest}}</td><td>{{pct .R.Cache.L1HitRatio}}</td><td>{{pct .R.Cache.L2HitRatio}}</td></tr>
</table>
<p class="sub">Hit ratios: L1 hits over L1 lookups; L2 hits over the reads L1 could not answer. Figures from each instance's <code>/api/v1/stats</code>, over the measured window.</p>
{{else}}<p>The instances' counters could not be scraped ({{.R.ScrapeErrors}} failures).</p>{{end}}
<p class="sub">Targets: {{range $i, $t := .R.Targets}}{{if $i}}, {{end}}<code>{{$t}}</code>{{end}}. Written by <code>example/loadgen</code>.</p>
</body>
</html>
`))
