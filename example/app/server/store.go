package server

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	_ "modernc.org/sqlite" // database/sql driver "sqlite", pure Go
)

// ErrNotFound is what the Store returns for a row that does not exist.
var ErrNotFound = errors.New("not found")

// User is a row of the users table, as the API returns it. Version starts
// at 1 and grows by one with every update: readers (the load generator)
// use it to tell a stale read.
type User struct {
	ID        int64     `json:"id"`
	Name      string    `json:"name"`
	Email     string    `json:"email"`
	Plan      string    `json:"plan"`
	Version   int64     `json:"version"`
	UpdatedAt time.Time `json:"updatedAt"`
}

// UserPatch is the body of PUT /api/v1/users/{id}: the fields to change.
type UserPatch struct {
	Name  *string `json:"name"`
	Email *string `json:"email"`
	Plan  *string `json:"plan"`
}

// License is a row of the licenses table.
type License struct {
	ID        int64     `json:"id"`
	Key       string    `json:"key"`
	Product   string    `json:"product"`
	Seats     int       `json:"seats"`
	OwnerID   int64     `json:"ownerId"`
	ExpiresAt time.Time `json:"expiresAt"`
}

// LicensePage is one page of GET /api/v1/licenses.
type LicensePage struct {
	Page  int       `json:"page"`
	Limit int       `json:"limit"`
	Total int       `json:"total"`
	Items []License `json:"items"`
}

// Store is the app's database: SQLite (pure Go) or PostgreSQL through
// database/sql. It counts every query it makes. Safe for concurrent use.
type Store struct {
	db      *sql.DB
	driver  string // "sqlite" or "postgres"
	latency time.Duration
	queries atomic.Uint64

	qCount metric.Int64Counter
	qTime  metric.Float64Histogram
}

// OpenStore opens the database the Config names, creates its tables and
// seeds them if they are empty. Several instances may open the same
// database at once: one of them seeds it, the others wait for it.
func OpenStore(ctx context.Context, cfg Config, mp metric.MeterProvider) (*Store, error) {
	s := &Store{latency: cfg.DBLatency}
	var err error
	if cfg.DatabaseURL != "" {
		s.driver = "postgres"
		s.db, err = sql.Open("pgx", cfg.DatabaseURL)
		if err == nil {
			s.db.SetMaxOpenConns(16)
			s.db.SetMaxIdleConns(16)
		}
	} else {
		s.driver = "sqlite"
		// WAL lets readers run beside the one writer, across processes;
		// busy_timeout makes a writer wait for the lock instead of failing;
		// _txlock=immediate takes the write lock when a transaction begins,
		// so two seeding instances queue instead of deadlocking.
		q := url.Values{"_txlock": {"immediate"}}
		q.Add("_pragma", "busy_timeout(10000)")
		q.Add("_pragma", "journal_mode(WAL)")
		q.Add("_pragma", "synchronous(NORMAL)")
		q.Add("_pragma", "foreign_keys(ON)")
		s.db, err = sql.Open("sqlite", "file:"+cfg.SQLitePath+"?"+q.Encode())
		if err == nil {
			s.db.SetMaxOpenConns(8)
			s.db.SetMaxIdleConns(8)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("open %s database: %w", s.driver, err)
	}
	meter := mp.Meter("github.com/tiercache/tiercache/example/app")
	s.qCount, err = meter.Int64Counter("app.db.queries", metric.WithUnit("{query}"),
		metric.WithDescription("Database queries made by the app."))
	if err == nil {
		s.qTime, err = meter.Float64Histogram("app.db.query.duration", metric.WithUnit("s"),
			metric.WithDescription("Duration of database queries, artificial latency included."),
			metric.WithExplicitBucketBoundaries(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
	}
	if err != nil {
		s.db.Close()
		return nil, err
	}
	for attempt := 1; ; attempt++ {
		err := s.migrate(ctx, cfg.SeedUsers, cfg.SeedLicenses)
		if err == nil {
			return s, nil
		}
		// Several instances opening a new SQLite file at once can deadlock
		// switching it to WAL (each holds a shared lock and wants the
		// exclusive one); SQLite then fails one at once, without waiting
		// busy_timeout. The file is in WAL mode by then: try again.
		if !isBusy(err) || attempt == 50 || ctx.Err() != nil {
			s.db.Close()
			return nil, fmt.Errorf("prepare %s database: %w", s.driver, err)
		}
		time.Sleep(time.Duration(10+rand.IntN(40)) * time.Millisecond)
	}
}

// isBusy reports whether err is SQLite's SQLITE_BUSY (or one of its
// extended codes).
func isBusy(err error) bool {
	const sqliteBusy = 5
	var e interface{ Code() int }
	return errors.As(err, &e) && e.Code()&0xff == sqliteBusy
}

// Driver is "sqlite" or "postgres".
func (s *Store) Driver() string { return s.driver }

// Queries is how many queries the Store has made since it was opened.
func (s *Store) Queries() uint64 { return s.queries.Load() }

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// Ping checks that the database answers.
func (s *Store) Ping(ctx context.Context) error { return s.db.PingContext(ctx) }

// q rewrites ? placeholders as $1, $2... for PostgreSQL.
func (s *Store) q(query string) string {
	if s.driver != "postgres" {
		return query
	}
	var b strings.Builder
	n := 0
	for _, r := range query {
		if r == '?' {
			n++
			b.WriteString("$" + strconv.Itoa(n))
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// begin counts a query, waits for the artificial latency and returns a
// function that records the query's duration.
func (s *Store) begin(ctx context.Context, op string) (func(), error) {
	s.queries.Add(1)
	start := time.Now()
	attrs := metric.WithAttributes(attribute.String("db.operation.name", op))
	s.qCount.Add(ctx, 1, attrs)
	if s.latency > 0 {
		t := time.NewTimer(s.latency)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
	return func() { s.qTime.Record(ctx, time.Since(start).Seconds(), attrs) }, nil
}

const userColumns = "id, name, email, plan, version, updated_at"

func scanUser(row interface{ Scan(...any) error }) (User, error) {
	var u User
	var updated int64
	if err := row.Scan(&u.ID, &u.Name, &u.Email, &u.Plan, &u.Version, &updated); err != nil {
		if errors.Is(err, sql.ErrNoRows) {
			return u, ErrNotFound
		}
		return u, err
	}
	u.UpdatedAt = time.UnixMilli(updated).UTC()
	return u, nil
}

// User reads one user.
func (s *Store) User(ctx context.Context, id int64) (User, error) {
	done, err := s.begin(ctx, "select_user")
	if err != nil {
		return User{}, err
	}
	defer done()
	return scanUser(s.db.QueryRowContext(ctx, s.q("SELECT "+userColumns+" FROM users WHERE id = ?"), id))
}

// UpdateUser applies p to user id and returns the row as it now is, its
// version one higher: the database assigns versions, so two concurrent
// updates of one user get two different ones, in commit order.
func (s *Store) UpdateUser(ctx context.Context, id int64, p UserPatch) (User, error) {
	done, err := s.begin(ctx, "update_user")
	if err != nil {
		return User{}, err
	}
	defer done()
	return scanUser(s.db.QueryRowContext(ctx, s.q(`UPDATE users SET
		name = COALESCE(?, name), email = COALESCE(?, email), plan = COALESCE(?, plan),
		version = version + 1, updated_at = ?
		WHERE id = ? RETURNING `+userColumns), p.Name, p.Email, p.Plan, time.Now().UnixMilli(), id))
}

// Licenses reads one page of licenses, ordered by id, with the total count.
// It is one query, or two for a page past the end.
func (s *Store) Licenses(ctx context.Context, page, limit int) (LicensePage, error) {
	lp := LicensePage{Page: page, Limit: limit, Items: []License{}}
	done, err := s.begin(ctx, "select_licenses")
	if err != nil {
		return lp, err
	}
	rows, err := s.db.QueryContext(ctx, s.q(`SELECT id, license_key, product, seats, owner_id, expires_at, COUNT(*) OVER ()
		FROM licenses ORDER BY id LIMIT ? OFFSET ?`), limit, (page-1)*limit)
	if err != nil {
		done()
		return lp, err
	}
	for rows.Next() {
		var l License
		var expires int64
		if err := rows.Scan(&l.ID, &l.Key, &l.Product, &l.Seats, &l.OwnerID, &expires, &lp.Total); err != nil {
			rows.Close()
			done()
			return lp, err
		}
		l.ExpiresAt = time.UnixMilli(expires).UTC()
		lp.Items = append(lp.Items, l)
	}
	err = errors.Join(rows.Err(), rows.Close())
	done()
	if err != nil || len(lp.Items) > 0 {
		return lp, err
	}
	if done, err = s.begin(ctx, "count_licenses"); err != nil {
		return lp, err
	}
	defer done()
	err = s.db.QueryRowContext(ctx, "SELECT COUNT(*) FROM licenses").Scan(&lp.Total)
	return lp, err
}

// Count returns how many users and licenses the database holds.
func (s *Store) Count(ctx context.Context) (users, licenses int, err error) {
	err = s.db.QueryRowContext(ctx, "SELECT (SELECT COUNT(*) FROM users), (SELECT COUNT(*) FROM licenses)").Scan(&users, &licenses)
	return users, licenses, err
}

// schema is the same for both databases: timestamps are Unix milliseconds.
var schema = []string{
	`CREATE TABLE IF NOT EXISTS users (
		id BIGINT PRIMARY KEY,
		name TEXT NOT NULL,
		email TEXT NOT NULL,
		plan TEXT NOT NULL,
		version BIGINT NOT NULL,
		updated_at BIGINT NOT NULL)`,
	`CREATE TABLE IF NOT EXISTS licenses (
		id BIGINT PRIMARY KEY,
		license_key TEXT NOT NULL UNIQUE,
		product TEXT NOT NULL,
		seats INTEGER NOT NULL,
		owner_id BIGINT NOT NULL REFERENCES users (id),
		expires_at BIGINT NOT NULL)`,
}

// migrate creates the tables and seeds them, once, in one transaction that
// excludes every other instance doing the same (SQLite: the write lock
// BEGIN IMMEDIATE takes; PostgreSQL: an advisory lock).
func (s *Store) migrate(ctx context.Context, users, licenses int) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer tx.Rollback()
	if s.driver == "postgres" {
		if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock(7202611)"); err != nil {
			return err
		}
	}
	for _, stmt := range schema {
		if _, err := tx.ExecContext(ctx, stmt); err != nil {
			return err
		}
	}
	var n int
	if err := tx.QueryRowContext(ctx, "SELECT COUNT(*) FROM users").Scan(&n); err != nil {
		return err
	}
	if n == 0 {
		if err := s.seed(ctx, tx, users, licenses); err != nil {
			return err
		}
	}
	return tx.Commit()
}

var (
	firstNames = []string{"Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret", "Dennis",
		"Radia", "Leslie", "Katherine", "John", "Hedy", "Tim", "Sophie", "Linus", "Shafi", "Niklaus", "Annie", "Bjarne",
		"Jean", "Guido", "Karen", "Robert", "Lynn", "Whitfield", "Mary", "Vint"}
	lastNames = []string{"Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Hamilton",
		"Ritchie", "Perlman", "Lamport", "Johnson", "McCarthy", "Lamarr", "Berners-Lee", "Wilson", "Torvalds",
		"Goldwasser", "Wirth", "Easley", "Stroustrup", "Sammet", "van Rossum", "Sparck Jones", "Kahn", "Conway",
		"Diffie", "Keller", "Cerf"}
	plans    = []string{"free", "free", "free", "pro", "pro", "team", "enterprise"}
	products = []string{"Analytics Suite", "Build Server", "Code Review", "Data Pipeline", "Edge Gateway",
		"Feature Flags", "Log Search", "Secrets Vault", "Status Page", "Test Grid"}
)

// seed inserts realistic rows, the same on every run (a fixed seed).
func (s *Store) seed(ctx context.Context, tx *sql.Tx, users, licenses int) error {
	rng := rand.New(rand.NewPCG(2026, 11))
	now := time.Now().UnixMilli()
	const batch = 500
	insert := func(table, cols string, n, width int, row func(i int) []any) error {
		for lo := 1; lo <= n; lo += batch {
			hi := min(lo+batch-1, n)
			ph := "(" + strings.TrimSuffix(strings.Repeat("?, ", width), ", ") + ")"
			args := make([]any, 0, (hi-lo+1)*width)
			tuples := make([]string, 0, hi-lo+1)
			for i := lo; i <= hi; i++ {
				args = append(args, row(i)...)
				tuples = append(tuples, ph)
			}
			if _, err := tx.ExecContext(ctx, s.q("INSERT INTO "+table+" ("+cols+") VALUES "+strings.Join(tuples, ", ")), args...); err != nil {
				return fmt.Errorf("seed %s: %w", table, err)
			}
		}
		return nil
	}
	err := insert("users", userColumns, users, 6, func(i int) []any {
		first, last := firstNames[rng.IntN(len(firstNames))], lastNames[rng.IntN(len(lastNames))]
		email := strings.ToLower(strings.ReplaceAll(first+"."+last, " ", "")) + strconv.Itoa(i) + "@example.com"
		return []any{i, first + " " + last, email, plans[rng.IntN(len(plans))], 1, now - rng.Int64N(365*24*3600*1000)}
	})
	if err != nil {
		return err
	}
	return insert("licenses", "id, license_key, product, seats, owner_id, expires_at", licenses, 6, func(i int) []any {
		key := fmt.Sprintf("TC-%04X-%04X-%04X", rng.IntN(1<<16), rng.IntN(1<<16), rng.IntN(1<<16))
		key += fmt.Sprintf("-%05d", i) // unique whatever the draw
		seats := []int{1, 5, 10, 25, 50, 100, 250}[rng.IntN(7)]
		return []any{i, key, products[rng.IntN(len(products))], seats, 1 + rng.IntN(users), now + rng.Int64N(2*365*24*3600*1000)}
	})
}
