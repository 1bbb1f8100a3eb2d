// Package pgtest gives tests of the example a PostgreSQL schema of their
// own.
package pgtest

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"fmt"
	"net/url"
	"os"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"
)

// DefaultURL is the server the tests use unless TIERCACHE_TEST_DATABASE_URL
// names another: the local one, trust auth, database "test".
const DefaultURL = "postgres://postgres@127.0.0.1:5432/test?sslmode=disable"

// URL creates a schema of the test's own and returns a database URL whose
// connections use it (search_path); the schema is dropped when the test
// ends. When no server answers, URL fails the test under CI (CI set) and
// otherwise returns ok == false with the reason logged, so a developer
// without PostgreSQL can run the rest.
func URL(t testing.TB) (_ string, ok bool) {
	t.Helper()
	base := os.Getenv("TIERCACHE_TEST_DATABASE_URL")
	if base == "" {
		base = DefaultURL
	}
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal("TIERCACHE_TEST_DATABASE_URL is not a URL")
	}
	admin, err := sql.Open("pgx", base)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		err = admin.PingContext(ctx)
		cancel()
		if err != nil {
			admin.Close()
		}
	}
	if err != nil {
		msg := fmt.Sprintf("PostgreSQL at %s: %v (start one, or set TIERCACHE_TEST_DATABASE_URL)", u.Redacted(), err)
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Log("no PostgreSQL case: " + msg)
		return "", false
	}
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	schema := "tc_example_" + hex.EncodeToString(b)
	if _, err := admin.Exec("CREATE SCHEMA " + schema); err != nil {
		admin.Close()
		t.Fatalf("create schema: %v", err)
	}
	t.Cleanup(func() {
		if _, err := admin.Exec("DROP SCHEMA " + schema + " CASCADE"); err != nil {
			t.Errorf("drop schema %s: %v", schema, err)
		}
		admin.Close()
	})
	q := u.Query()
	q.Set("search_path", schema)
	u.RawQuery = q.Encode()
	return u.String(), true
}
