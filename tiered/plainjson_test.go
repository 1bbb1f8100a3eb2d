package tiered

import (
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
