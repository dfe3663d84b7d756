package l402

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"
)

const (
	statusPending = "pending"
	statusPaid    = "paid"
	statusFailed  = "failed"
	day           = 24 * time.Hour
	// storeVersion 2 added the balance of bundles (balance, balance_unit, balance_at); a
	// version 1 file reads as one whose tokens have no balance.
	storeVersion = 2
)

// Store is the transport's ledger of payments, which is also its token store, and the URL
// paths it learned belong to a scope. NewMemoryStore keeps them for the life of the process;
// OpenFileStore keeps them in a JSON file that survives restarts and crashes.
//
// The order on disk is what makes a crash safe: a payment is written as "pending" before the
// wallet is asked to pay, and turns "paid", with its preimage, before the request is retried.
// A pending payment found at start is settled by asking the wallet (Wallet.Lookup); until it is
// settled its scope is never paid again. Budgets are sums over the ledger, checked and reserved
// in one step under the store's lock.
//
// A token sold as a bundle (or for single use) has a balance: what the server's last
// X-L402-Balance said is left of it. A token with 0 left is spent: never sent again, and its
// scope may be paid again. Spent is written to the file at once; a balance above 0 is kept in
// memory and written with the ledger's next write (it only informs).
//
// A Store may be shared by several Transports in one process. A file store takes an exclusive
// lock on "<file>.lock" (on Unix systems), so a second process opening the same file gets an
// error instead of a ledger that two processes would overwrite.
type Store struct {
	mu      sync.Mutex
	path    string // "" for a memory store
	unlock  func() error
	closed  bool
	records []*record
	byHash  map[[32]byte]*record
	paths   map[string]map[string]string // origin -> path -> scope
	// inFlight: payments a transport is paying or settling now; the channel closes when that
	// ends, so another transport sharing the store can wait for the outcome.
	inFlight map[[32]byte]chan struct{}
	// current: the newest paid, not dropped token of each (origin, scope).
	current map[string]*record
}

func scopeKey(origin, scope string) string { return origin + "\x00" + scope }

// record is one payment as the file stores it.
type record struct {
	PaymentHash  string   `json:"payment_hash"`
	Origin       string   `json:"origin"`
	URL          string   `json:"url"`
	Scope        string   `json:"scope"`
	Services     []string `json:"services"`
	Scheme       string   `json:"scheme"`
	Macaroon     string   `json:"macaroon"`
	Bolt11       string   `json:"bolt11"`
	AmountMsat   int64    `json:"amount_msat"`
	FeeLimitMsat int64    `json:"fee_limit_msat"`
	Status       string   `json:"status"`
	Preimage     string   `json:"preimage,omitempty"`
	ValidUntil   *float64 `json:"valid_until"`
	Wallet       string   `json:"wallet"`
	Error        string   `json:"error,omitempty"`
	CreatedAt    float64  `json:"created_at"`
	UpdatedAt    float64  `json:"updated_at"`
	DroppedAt    *float64 `json:"dropped_at,omitempty"`
	DropReason   string   `json:"drop_reason,omitempty"`
	// What the server last said is left of the token (X-L402-Balance), in which unit, when.
	Balance     *int64   `json:"balance,omitempty"`
	BalanceUnit string   `json:"balance_unit,omitempty"`
	BalanceAt   *float64 `json:"balance_at,omitempty"`

	hash     [32]byte
	preimage Preimage
	// carried: how many requests were given the token to send (up front or to retry with);
	// answered: how many of them got their answer with it (or went away without one);
	// granted: how many of those the server granted with it (it used the token). A request
	// told "spent" pays again alone only on a grant to another (lostToOurs). changed closes
	// when one of them answers (then a new one is made). Not kept in the file.
	carried  int
	answered int
	granted  int
	changed  chan struct{}
	// heldUntil: a payment made for one request alone (its token from a shared payment went
	// to another request first) is held back from every other request until then, or until
	// releaseHeld: neither waited for nor taken. holdFor is how long a hold lasts.
	heldUntil time.Time
	holdFor   time.Duration
}

// heldBack: the record is a payment made for one request alone that no other may use yet.
func (r *record) heldBack(now time.Time) bool { return now.Before(r.heldUntil) }

type learnedPath struct {
	Origin string `json:"origin"`
	Path   string `json:"path"`
	Scope  string `json:"scope"`
}

type storeFile struct {
	Version  int           `json:"version"`
	Payments []*record     `json:"payments"`
	Paths    []learnedPath `json:"paths"`
}

// Payment is one payment of the ledger as Store.Payments shows it; never its preimage.
type Payment struct {
	PaymentHash  [32]byte
	Origin       string
	URL          string
	Scope        string
	Services     []string
	AmountMsat   int64
	FeeLimitMsat int64
	// Status is "pending", "paid" or "failed".
	Status string
	// ValidUntil is the token's expiry; zero if it names none.
	ValidUntil time.Time
	CreatedAt  time.Time
	Dropped    bool
	Error      string
	// BalanceUnit is "" when the server never stated a balance for the token; else Balance is
	// what it last said is left, in that unit. Spent: nothing is left; never sent again.
	Balance     int64
	BalanceUnit string
	Spent       bool
}

func unix(t time.Time) float64 { return float64(t.UnixNano()) / 1e9 }

// maxUnix is the last second of the year 9999: later expiries are "never" for any purpose.
const maxUnix = 253402300799

func fromUnix(seconds float64) time.Time {
	if seconds > maxUnix {
		seconds = maxUnix
	}
	whole := math.Floor(seconds)
	return time.Unix(int64(whole), int64((seconds-whole)*1e9))
}

func (r *record) cost() int64 { return r.AmountMsat + r.FeeLimitMsat }

// spent: the server said nothing is left of this token's bundle.
func (r *record) spent() bool { return r.Balance != nil && *r.Balance == 0 }

// live: a token that may be sent, expiry aside.
func (r *record) live() bool { return r.Status == statusPaid && r.DroppedAt == nil && !r.spent() }

func (r *record) usable(now time.Time) bool {
	return r.live() && (r.ValidUntil == nil || *r.ValidUntil > unix(now))
}

// usableFor: usable for these services, each by its own <service>_valid_until (a pass may end
// at different times per service); r.ValidUntil (the earliest) when the macaroon cannot say.
func (r *record) usableFor(services []string, now time.Time) bool {
	if !r.live() {
		return false
	}
	until, ok := expiryFor(r.Macaroon, services)
	if !ok {
		return r.usable(now)
	}
	return until == nil || *until > unix(now)
}

// expiryFor is when a macaroon stops opening every one of services: the earliest of its
// lsat-js expiration= and <service>_valid_until= caveats for them (nil: none applies). ok is
// false when the macaroon cannot be read.
func expiryFor(macaroon string, services []string) (*float64, bool) {
	info, err := InspectMacaroon(macaroon)
	if err != nil {
		return nil, false
	}
	wanted := map[string]bool{}
	for _, s := range services {
		wanted[s] = true
	}
	var earliest *float64
	for _, text := range info.Caveats {
		condition, value, err := parseCaveat(text)
		if err != nil {
			return nil, false
		}
		var at float64
		switch {
		case condition == "expiration":
			ms, err := parseUint(value, text)
			if err != nil {
				return nil, false
			}
			at = ms / 1000
		case strings.HasSuffix(condition, "_valid_until") && wanted[strings.TrimSuffix(condition, "_valid_until")]:
			if at, err = parseUint(value, text); err != nil {
				return nil, false
			}
		default:
			continue
		}
		if earliest == nil || at < *earliest {
			earliest = &at
		}
	}
	return earliest, true
}

// covers: the record names every one of services (and they are some).
func (r *record) covers(services []string) bool {
	if len(services) == 0 {
		return false
	}
	for _, wanted := range services {
		found := false
		for _, held := range r.Services {
			found = found || held == wanted
		}
		if !found {
			return false
		}
	}
	return true
}

func (r *record) payment() Payment {
	p := Payment{
		PaymentHash:  r.hash,
		Origin:       r.Origin,
		URL:          r.URL,
		Scope:        r.Scope,
		Services:     append([]string(nil), r.Services...),
		AmountMsat:   r.AmountMsat,
		FeeLimitMsat: r.FeeLimitMsat,
		Status:       r.Status,
		CreatedAt:    fromUnix(r.CreatedAt),
		Dropped:      r.DroppedAt != nil,
		Error:        r.Error,
		BalanceUnit:  r.BalanceUnit,
		Spent:        r.spent(),
	}
	if r.Balance != nil {
		p.Balance = *r.Balance
	}
	if r.ValidUntil != nil {
		p.ValidUntil = fromUnix(*r.ValidUntil)
	}
	return p
}

// check reads the hex fields of a record loaded from a file.
func (r *record) check() error {
	raw, err := hex.DecodeString(r.PaymentHash)
	if err != nil || len(raw) != 32 {
		return fmt.Errorf("payment_hash %q is not 64 hex characters", r.PaymentHash)
	}
	copy(r.hash[:], raw)
	switch r.Status {
	case statusPending, statusFailed:
	case statusPaid:
		raw, err := hex.DecodeString(r.Preimage)
		if err != nil || len(raw) != 32 {
			return fmt.Errorf("payment %s is paid but has no 32-byte preimage", r.PaymentHash)
		}
		copy(r.preimage[:], raw)
		if r.preimage.Hash() != r.hash {
			return fmt.Errorf("payment %s: the preimage does not match the payment hash", r.PaymentHash)
		}
	default:
		return fmt.Errorf("payment %s has unknown status %q", r.PaymentHash, r.Status)
	}
	if r.AmountMsat <= 0 || r.FeeLimitMsat < 0 {
		return fmt.Errorf("payment %s has a bad amount or fee limit", r.PaymentHash)
	}
	if r.Balance != nil && (*r.Balance < 0 || !knownUnit(r.BalanceUnit)) {
		return fmt.Errorf("payment %s has a bad balance", r.PaymentHash)
	}
	return nil
}

func knownUnit(unit string) bool {
	for _, u := range balanceUnits {
		if unit == u {
			return true
		}
	}
	return false
}

// NewMemoryStore is a ledger kept in memory: tokens and budgets last as long as the process.
func NewMemoryStore() *Store {
	return &Store{
		byHash:   map[[32]byte]*record{},
		paths:    map[string]map[string]string{},
		inFlight: map[[32]byte]chan struct{}{},
		current:  map[string]*record{},
	}
}

// OpenFileStore opens (or creates) the JSON ledger at path. A file that cannot be read is an
// error, never an empty ledger: starting afresh would forget pending payments and budgets.
// Close releases it.
func OpenFileStore(path string) (*Store, error) {
	if path == "" {
		return nil, errors.New("l402: OpenFileStore needs a file path")
	}
	path = filepath.Clean(path)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("l402: store %s: %w", path, err)
	}
	unlock, err := lockFile(path + ".lock")
	if err != nil {
		return nil, fmt.Errorf("l402: store %s: %w", path, err)
	}
	s := NewMemoryStore()
	s.path, s.unlock = path, unlock
	if err := s.load(); err != nil {
		_ = unlock()
		return nil, fmt.Errorf("l402: store %s: %w", path, err)
	}
	return s, nil
}

func (s *Store) load() error {
	data, err := os.ReadFile(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var file storeFile
	if err := json.Unmarshal(data, &file); err != nil {
		return fmt.Errorf("not a ledger file (%v)", err)
	}
	if file.Version < 1 || file.Version > storeVersion {
		return fmt.Errorf("ledger version %d; this SDK reads versions 1 to %d", file.Version, storeVersion)
	}
	for _, r := range file.Payments {
		if r == nil {
			return errors.New("empty payment entry")
		}
		if err := r.check(); err != nil {
			return err
		}
		if s.byHash[r.hash] != nil {
			return fmt.Errorf("payment %s is in the ledger twice", r.PaymentHash)
		}
		s.records = append(s.records, r)
		s.byHash[r.hash] = r
		if r.live() {
			s.current[scopeKey(r.Origin, r.Scope)] = r // oldest first: the newest wins
		}
	}
	for _, p := range file.Paths {
		s.learn(p.Origin, p.Path, p.Scope)
	}
	return nil
}

// save writes the ledger atomically: a temporary file in the same directory, synced, then
// renamed over the old one, then the directory synced. A crash leaves the old or the new file.
func (s *Store) save(now time.Time) error {
	if s.path == "" {
		return nil
	}
	if s.closed {
		// The lock is released: the file may be another Store's now, and writing this one's
		// ledger over it would lose that one's pending payments.
		return errStoreClosed
	}
	file := storeFile{Version: storeVersion, Payments: make([]*record, 0, len(s.records))}
	for _, r := range s.records {
		// Failed payments count against nothing: a day later they are history no one needs.
		if r.Status == statusFailed && r.UpdatedAt < unix(now.Add(-day)) {
			continue
		}
		file.Payments = append(file.Payments, r)
	}
	for origin, paths := range s.paths {
		for path, scope := range paths {
			file.Paths = append(file.Paths, learnedPath{origin, path, scope})
		}
	}
	sort.Slice(file.Paths, func(i, j int) bool {
		a, b := file.Paths[i], file.Paths[j]
		return a.Origin < b.Origin || a.Origin == b.Origin && a.Path < b.Path
	})
	data, err := json.MarshalIndent(file, "", " ")
	if err != nil {
		return err
	}
	dir, base := filepath.Split(s.path)
	if dir == "" {
		// A bare file name: the temporary file must still be made next to it, not in
		// CreateTemp's default $TMPDIR, from where the rename fails on another file system
		// (tmpfs) and which is no place for a file of preimages.
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, base+".tmp*")
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	// The file holds preimages: bearer secrets.
	if err := tmp.Chmod(0o600); err != nil {
		return err
	}
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		return err
	}
	if err := tmp.Sync(); err != nil {
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), s.path); err != nil {
		return err
	}
	ok = true
	syncDir(dir)
	return nil
}

func syncDir(dir string) {
	if dir == "" {
		dir = "."
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync() // not every system can sync a directory; the rename is done either way
		_ = d.Close()
	}
}

// Close releases a file store's lock; the store must not be used afterwards.
func (s *Store) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if s.unlock != nil {
		return s.unlock()
	}
	return nil
}

// Path is the file a file store writes; "" for a memory store.
func (s *Store) Path() string { return s.path }

// Payments lists the ledger, oldest first, without preimages.
func (s *Store) Payments() []Payment {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Payment, 0, len(s.records))
	for _, r := range s.records {
		out = append(out, r.payment())
	}
	return out
}

// SpentMsat is what the ledger counts against the budgets since the given time (the zero time:
// in total): amounts plus fee limits of every payment that did not fail.
func (s *Store) SpentMsat(since time.Time) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.spent(since)
}

func (s *Store) spent(since time.Time) int64 {
	var total int64
	after := unix(since)
	for _, r := range s.records {
		if r.Status != statusFailed && (since.IsZero() || r.CreatedAt > after) {
			total += r.cost()
		}
	}
	return total
}

var errStoreClosed = errors.New("l402: the store is closed")

// reservation is the outcome of reserve: a new pending record to pay, a paid record that
// makes paying unnecessary, or a refusal (payment_pending with the pending record, or a budget).
type reservation struct {
	fresh   *record
	paid    *record
	pending *record
	refusal *Refusal
}

// reserve checks the scope and the budgets and writes the pending record, in one step. A
// payment held back for its request (see record.heldUntil) is passed over. alone: a payment
// for one request only (its token from a shared payment went to another request first): the
// scope is not checked, only the budgets, and the payment is held back for holdFor.
func (s *Store) reserve(r *record, dailyMsat, totalMsat int64, now time.Time, alone bool,
	holdFor time.Duration) (reservation, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return reservation{}, errStoreClosed
	}
	if held := s.byHash[r.hash]; held != nil {
		return reservation{}, fmt.Errorf("invoice %s... is already in the ledger (%s); it is never paid twice",
			r.PaymentHash[:16], held.Status)
	}
	for i := len(s.records) - 1; i >= 0 && !alone; i-- {
		held := s.records[i]
		if held.Origin != r.Origin || held.Scope != r.Scope || held.heldBack(now) {
			continue
		}
		if held.usable(now) {
			return reservation{paid: held}, nil
		}
		if held.Status == statusPending {
			return reservation{pending: held, refusal: &Refusal{"payment_pending", fmt.Sprintf(
				"a payment for this scope is still pending (%s..., %s); not paying a second one until it is settled",
				held.PaymentHash[:16], held.URL)}}, nil
		}
	}
	cost := r.cost()
	if spent := s.spent(now.Add(-day)); spent+cost > dailyMsat {
		return reservation{refusal: &Refusal{"budget_daily", fmt.Sprintf(
			"paying %s sat (+ up to %s sat fee) would exceed DailyBudgetSat %s sat: %s sat spent in the last 24 hours",
			satText(r.AmountMsat), satText(r.FeeLimitMsat), satText(dailyMsat), satText(spent))}}, nil
	}
	if totalMsat > 0 {
		if spent := s.spent(time.Time{}); spent+cost > totalMsat {
			return reservation{refusal: &Refusal{"budget_total", fmt.Sprintf(
				"paying %s sat (+ up to %s sat fee) would exceed TotalBudgetSat %s sat: %s sat spent so far",
				satText(r.AmountMsat), satText(r.FeeLimitMsat), satText(totalMsat), satText(spent))}}, nil
		}
	}
	r.Status = statusPending
	r.CreatedAt, r.UpdatedAt = unix(now), unix(now)
	if alone {
		r.heldUntil, r.holdFor = now.Add(holdFor), holdFor
	}
	s.records = append(s.records, r)
	s.byHash[r.hash] = r
	if err := s.save(now); err != nil {
		// Not on disk, so not paid: a crash now must not leave a payment nobody knows of.
		s.records = s.records[:len(s.records)-1]
		delete(s.byHash, r.hash)
		return reservation{}, fmt.Errorf("cannot write the pending payment to %s: %w", s.path, err)
	}
	s.inFlight[r.hash] = make(chan struct{})
	return reservation{fresh: r}, nil
}

// settle turns a pending (or failed: a wallet may report a late success) payment into a paid
// one with its preimage. The record is returned even if the file could not be written: the
// wallet still knows the preimage, so the next start recovers it.
func (s *Store) settle(hash [32]byte, preimage Preimage, now time.Time) (*record, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.done(hash)
	r := s.byHash[hash]
	if r == nil {
		return nil, fmt.Errorf("no payment %x in the ledger", hash)
	}
	if r.Status == statusPaid {
		return r, nil
	}
	r.Status, r.preimage, r.Preimage = statusPaid, preimage, preimage.Hex()
	r.Error, r.UpdatedAt = "", unix(now)
	if r.heldBack(now) {
		// Paid for one request alone: held back for the time it takes to send it, and the
		// scope's current token only once that request has used it (releaseHeld).
		r.heldUntil = now.Add(r.holdFor)
	} else if r.DroppedAt == nil {
		s.current[scopeKey(r.Origin, r.Scope)] = r
	}
	if err := s.save(now); err != nil {
		return r, fmt.Errorf("paid, but cannot write the token to %s: %w", s.path, err)
	}
	return r, nil
}

// fail releases a pending payment: nothing was paid.
func (s *Store) fail(hash [32]byte, why string, now time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.done(hash)
	r := s.byHash[hash]
	if r == nil || r.Status != statusPending {
		return nil
	}
	r.Status, r.Error, r.UpdatedAt = statusFailed, why, unix(now)
	return s.save(now)
}

// unresolved keeps a payment pending (its outcome is not known) and says why.
func (s *Store) unresolved(hash [32]byte, why string, now time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	defer s.done(hash)
	r := s.byHash[hash]
	if r == nil {
		return nil
	}
	r.Error, r.UpdatedAt = why, unix(now)
	return s.save(now)
}

// drop marks a token the server no longer accepts: it is never sent again.
func (s *Store) drop(hash [32]byte, reason string, now time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.byHash[hash]
	if r == nil || r.DroppedAt != nil {
		return nil
	}
	at := unix(now)
	r.DroppedAt, r.DropReason = &at, reason
	if key := scopeKey(r.Origin, r.Scope); s.current[key] == r {
		delete(s.current, key)
	}
	return s.save(now)
}

// noteBalance records what the server said is left of a paid token. A balance only goes down
// (answers to concurrent requests may arrive out of order), 0 stays 0, and another unit
// replaces the old value. It returns whether the token is spent now. Spent is written to the
// file at once; a balance above 0 rides along the next write.
func (s *Store) noteBalance(hash [32]byte, balance Balance, now time.Time) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.byHash[hash]
	if r == nil || r.Status != statusPaid {
		return false, nil
	}
	at := unix(now)
	r.BalanceAt = &at
	if r.spent() {
		return true, nil
	}
	remaining := balance.Remaining
	if r.Balance != nil && r.BalanceUnit == balance.Unit && *r.Balance < remaining {
		remaining = *r.Balance
	}
	r.Balance, r.BalanceUnit = &remaining, balance.Unit
	if remaining > 0 {
		return false, nil
	}
	if key := scopeKey(r.Origin, r.Scope); s.current[key] == r {
		delete(s.current, key)
	}
	return true, s.save(now)
}

// releaseHeld ends the hold on a payment made for one request alone: that request has used
// its token, or will not. keep: what is left of it is the scope's current token now.
func (s *Store) releaseHeld(hash [32]byte, keep bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.byHash[hash]
	if r == nil {
		return
	}
	r.heldUntil = time.Time{}
	if keep && r.live() {
		s.current[scopeKey(r.Origin, r.Scope)] = r
	}
}

// carry counts one more request given the token hash to send.
func (s *Store) carry(hash [32]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r := s.byHash[hash]; r != nil {
		r.carried++
	}
}

// answered: a request that carried the token hash got its answer (granted: the server did
// not refuse it), or went away without one. Whoever waits in grantedToAnother wakes.
func (s *Store) answered(hash [32]byte, granted bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.byHash[hash]
	if r == nil {
		return
	}
	r.answered++
	if granted {
		r.granted++
	}
	if r.changed != nil {
		close(r.changed)
		r.changed = nil
	}
}

// grantedToAnother says whether another request that carried the token hash was granted
// with it, waiting (at most until deadline, or ctx) for the answers of the others that carried
// it: the first grant says yes; all answered without one, or none in time, says no.
func (s *Store) grantedToAnother(ctx context.Context, hash [32]byte, deadline time.Time) bool {
	timer := time.NewTimer(time.Until(deadline))
	defer timer.Stop()
	for {
		s.mu.Lock()
		r := s.byHash[hash]
		if r == nil || r.carried < 2 {
			s.mu.Unlock()
			return false // no other request sent it
		}
		if r.granted > 0 {
			s.mu.Unlock()
			return true
		}
		if r.answered >= r.carried {
			s.mu.Unlock()
			return false
		}
		if r.changed == nil {
			r.changed = make(chan struct{})
		}
		changed := r.changed
		s.mu.Unlock()
		select {
		case <-changed:
		case <-timer.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

// isSpent: the server said nothing is left of the paid token hash.
func (s *Store) isSpent(hash [32]byte) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := s.byHash[hash]
	return r != nil && r.spent()
}

// tokenUsableFor returns the record of hash if it is a token usable for services, or nil.
func (s *Store) tokenUsableFor(hash [32]byte, services []string, now time.Time) *record {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r := s.byHash[hash]; r != nil && r.usableFor(services, now) && !r.heldBack(now) {
		return r
	}
	return nil
}

// passFor is the newest live token of origin, other than the excluded ones, that names every
// one of services and is not expired for them: a pass worth one try before paying.
func (s *Store) passFor(origin string, services []string, exclude func(*record) bool, now time.Time) *record {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := len(s.records) - 1; i >= 0; i-- {
		r := s.records[i]
		if r.Origin == origin && r.covers(services) && !exclude(r) && r.usableFor(services, now) && !r.heldBack(now) {
			return r
		}
	}
	return nil
}

// currentToken is the newest usable token of (origin, scope), or nil.
func (s *Store) currentToken(origin, scope string, now time.Time) *record {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r := s.current[scopeKey(origin, scope)]; r != nil && r.usable(now) && !r.heldBack(now) {
		return r
	}
	return nil
}

// done ends a payment's time in flight and wakes whoever waits for it; s.mu is held.
func (s *Store) done(hash [32]byte) {
	if ch, ok := s.inFlight[hash]; ok {
		close(ch)
		delete(s.inFlight, hash)
	}
}

// busy returns a channel that closes when the payment stops being paid or settled by some
// transport, or nil if none is doing so.
func (s *Store) busy(hash [32]byte) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inFlight[hash]
}

// claimPending returns the pending payments no transport is paying or settling now, and marks
// them as being settled, so two transports never ask the wallet about one at once; each must
// end with settle, fail or release.
func (s *Store) claimPending(only func(*record) bool) []*record {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*record
	for _, r := range s.records {
		if _, busy := s.inFlight[r.hash]; r.Status == statusPending && !busy && (only == nil || only(r)) {
			s.inFlight[r.hash] = make(chan struct{})
			out = append(out, r)
		}
	}
	return out
}

// release ends a claim without changing the payment.
func (s *Store) release(hash [32]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.done(hash)
}

func (s *Store) learn(origin, path, scope string) bool {
	known := s.paths[origin]
	if known == nil {
		known = map[string]string{}
		s.paths[origin] = known
	}
	if known[path] == scope {
		return false
	}
	known[path] = scope
	return true
}

// learnPaths records that these paths of origin belong to scope.
func (s *Store) learnPaths(origin string, paths []string, scope string, now time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := false
	for _, path := range paths {
		changed = s.learn(origin, path, scope) || changed
	}
	if !changed {
		return nil
	}
	return s.save(now)
}

func (s *Store) scopeFor(origin, path string) (string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	known := s.paths[origin]
	if known == nil {
		return "", false
	}
	for _, candidate := range pathCandidates(path) {
		if scope, ok := known[candidate]; ok {
			return scope, true
		}
	}
	return "", false
}
