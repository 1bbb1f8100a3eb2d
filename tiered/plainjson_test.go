package tiered

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// nodeVector is JSON.stringify's output (Node.js 20) for the value below,
// produced with:
//
//	node -e 'process.stdout.write(JSON.stringify({id:42,name:"Ada <ada@example.com> & co",
//	  tags:["a","b"],score:1.5,big:1e21,small:1e-7,uni:"é✓",nested:{ok:true,none:null}}))'
const nodeVector = `{"id":42,"name":"Ada <ada@example.com> & co","tags":["a","b"],"score":1.5,"big":1e+21,"small":1e-7,"uni":"é✓","nested":{"ok":true,"none":null}}`

type nodeValue struct {
	ID     int      `json:"id"`
	Name   string   `json:"name"`
	Tags   []string `json:"tags"`
	Score  float64  `json:"score"`
	Big    float64  `json:"big"`
	Small  float64  `json:"small"`
	Uni    string   `json:"uni"`
	Nested struct {
		OK   bool  `json:"ok"`
		None *bool `json:"none"`
	} `json:"nested"`
}

// TestPlainJSON_SharesL2WithNode: in plain-JSON mode the cache stores the
// exact bytes a Node.js service's JSON.stringify stores, at exactly
// KeyPrefix+key, and reads what that service wrote.
func TestPlainJSON_SharesL2WithNode(t *testing.T) {
	prefix := srv.Prefix() + "node:"
	c := newCache[nodeValue](t, Options{PlainJSON: true, KeyPrefix: prefix})
	ctx := ctxT(t)
	v := nodeValue{ID: 42, Name: "Ada <ada@example.com> & co", Tags: []string{"a", "b"}, Score: 1.5, Big: 1e21, Small: 1e-7, Uni: "é✓"}
	v.Nested.OK = true
	if err := c.Set(ctx, "user:42", v, time.Minute); err != nil {
		t.Fatal(err)
	}
	raw, err := c.rdb.Get(ctx, prefix+"user:42").Result()
	if err != nil {
		t.Fatalf("GET %q: %v", prefix+"user:42", err)
	}
	if raw != nodeVector {
		t.Fatalf("stored bytes differ from JSON.stringify:\n got %s\nwant %s", raw, nodeVector)
	}
	// What the Node.js service wrote, read by the cache.
	if err := c.rdb.Set(ctx, prefix+"user:7", `{"id":7,"name":"from node","tags":[],"score":0,"big":0,"small":0,"uni":"","nested":{"ok":false,"none":null}}`, time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	got, ok, err := c.Get(ctx, "user:7")
	if err != nil || !ok || got.ID != 7 || got.Name != "from node" {
		t.Fatalf("Get(node-written) = %+v, %v, %v", got, ok, err)
	}
}

// TestJSONCodec_PooledEncoder: the JSON codec reuses encoders, so a failed
// encode must not leak into the next one, results must not share a buffer,
// and concurrent encodes must not see each other's bytes. Output is what
// JSON.stringify writes (no HTML escaping, no trailing newline).
func TestJSONCodec_PooledEncoder(t *testing.T) {
	if _, err := JSON.Marshal(map[string]any{"f": func() {}}); err == nil {
		t.Fatal("Marshal of a func: no error")
	}
	first, err := JSON.Marshal(map[string]string{"a": "<b>&"})
	if err != nil {
		t.Fatal(err)
	}
	second, err := JSON.Marshal(map[string]string{"z": "y"})
	if err != nil {
		t.Fatal(err)
	}
	if string(first) != `{"a":"<b>&"}` || string(second) != `{"z":"y"}` {
		t.Fatalf("Marshal = %s, %s; want {\"a\":\"<b>&\"}, {\"z\":\"y\"} (the first must not change when the encoder is reused)", first, second)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 300 {
				got, err := JSON.Marshal(user{ID: g*1000 + i, Name: strings.Repeat("x", i%50)})
				want := fmt.Sprintf(`{"id":%d,"name":%q,"roles":null}`, g*1000+i, strings.Repeat("x", i%50))
				if err != nil || string(got) != want {
					t.Errorf("Marshal = %s, %v; want %s", got, err, want)
					return
				}
			}
		})
	}
	wg.Wait()
}
