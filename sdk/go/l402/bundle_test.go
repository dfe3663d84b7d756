package l402_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"l402proxy/sdk/go/l402"
)

// Issue 14's wire facts 1-3, client side: bundles and single use (X-L402-Balance) and passes.

func TestParseBalance(t *testing.T) {
	good := map[string]l402.Balance{
		"99 requests":               {Remaining: 99, Unit: "requests"},
		"0 requests":                {Remaining: 0, Unit: "requests"},
		"500000000 bytes":           {Remaining: 500000000, Unit: "bytes"},
		"  7\tUnits ":               {Remaining: 7, Unit: "units"},
		"7 \t requests":             {Remaining: 7, Unit: "requests"},
		"007 REQUESTS":              {Remaining: 7, Unit: "requests"},
		"9223372036854775807 bytes": {Remaining: 9223372036854775807, Unit: "bytes"},
	}
	for text, want := range good {
		got, err := l402.ParseBalance([]string{text})
		if err != nil || got == nil || *got != want {
			t.Errorf("%q: %+v %v", text, got, err)
		}
	}
	if got, err := l402.ParseBalance([]string{"5 requests", "5 requests"}); err != nil || got.Remaining != 5 {
		t.Errorf("two equal lines: %+v %v", got, err)
	}
	if got, err := l402.ParseBalance(nil); got != nil || err != nil {
		t.Errorf("none: %+v %v", got, err)
	}
	for _, values := range [][]string{
		{""}, {"lots"}, {"requests"}, {"5"}, {"-1 requests"}, {"+1 requests"}, {"1.5 requests"},
		{"1e3 requests"}, {"0x10 requests"}, {"5requests"}, {"5 apples"}, {"5 requests extra"},
		{"5 requests, 4 requests"}, {"\u0663 requests"}, {"5 r\u00e9quests"}, {"5 requests", "4 requests"},
		{"9223372036854775808 bytes"}, {strings.Repeat("9", 5000) + " bytes"},
	} {
		got, err := l402.ParseBalance(values)
		if err == nil || got != nil {
			t.Errorf("%q: %+v", values, got)
			continue
		}
		if !strings.Contains(err.Error(), l402.HeaderBalance) || strings.Contains(err.Error(), "\n") || len(err.Error()) > 300 {
			t.Errorf("%q: message %q", values, err)
		}
	}
}

// contract is a paywall speaking the contract: per service a bundle (requests a token is good
// for; 0: none), what its 402 sells (a pass: several services), whether it takes only tokens
// minted for itself, and a balance header to send instead of the real one.
type contract struct {
	*origin
	wallet   *fakeWallet
	services map[string]service
	mu       sync.Mutex
	grants   map[string]*grant   // credential -> what it opens
	auth     map[string][]string // service -> Authorization of each request ("" for none)
	race     *race               // if set: requests carrying one token held and answered in turn
	price    int64               // msat asked by each 402 (0: the fake wallet's 21 sat)
}

type service struct {
	bundle        int
	sells         []string
	ownOnly       bool
	balanceHeader string
	spendOnSight  bool     // every token, even one just paid, gets a fresh 402 and "0 requests"
	also          []string // other first path segments it answers for
}

type grant struct {
	services []string
	left     int
}

func newContract(t *testing.T, services map[string]service) *contract {
	c := &contract{wallet: newFakeWallet(), services: services, grants: map[string]*grant{}, auth: map[string][]string{}}
	c.origin = newOrigin(t, c.serve)
	return c
}

func (c *contract) serve(w http.ResponseWriter, r *http.Request) {
	name := strings.SplitN(strings.TrimPrefix(r.URL.Path, "/"), "/", 2)[0]
	for other, s := range c.services {
		if contains(s.also, name) {
			name = other
		}
	}
	svc, ok := c.services[name]
	if !ok {
		http.NotFound(w, r)
		return
	}
	authorization := r.Header.Get("Authorization")
	c.mu.Lock()
	c.auth[name] = append(c.auth[name], authorization)
	g := c.grants[authorization]
	c.mu.Unlock()
	if c.race != nil && authorization != "" {
		defer c.race.enter(authorization, r.URL.Path)()
	}
	status, spent := 402, false
	if g != nil && contains(g.services, name) && (!svc.ownOnly || len(g.services) == 1) {
		c.mu.Lock()
		switch {
		case svc.spendOnSight:
			spent = true
		case svc.bundle > 0 && g.left == 0:
			spent = true
		case svc.bundle > 0:
			g.left--
			status = 200
			w.Header().Set(l402.HeaderBalance, fmt.Sprintf("%d requests", g.left))
		default:
			status = 200
		}
		c.mu.Unlock()
		if status == 200 {
			if svc.balanceHeader != "" {
				w.Header().Set(l402.HeaderBalance, svc.balanceHeader)
			}
			_, _ = w.Write([]byte("paid " + r.URL.Path))
			return
		}
	}
	sold := svc.sells
	if len(sold) == 0 {
		sold = []string{name}
	}
	var parts []string
	caveats := []string{}
	for _, s := range sold {
		parts = append(parts, s+":0")
		caveats = append(caveats, fmt.Sprintf("%s_valid_until=%d", s, time.Now().Add(time.Hour).Unix()))
	}
	caveats = append([]string{"services=" + strings.Join(parts, ",")}, caveats...)
	c.mu.Lock()
	price := c.price
	c.mu.Unlock()
	macaroon, invoice, hash := c.wallet.issue(issueParams{caveats: caveats, amountMsat: price})
	c.wallet.mu.Lock()
	credential := "L402 " + macaroon + ":" + c.wallet.preimages[hash].Hex()
	c.wallet.mu.Unlock()
	c.mu.Lock()
	c.grants[credential] = &grant{services: sold, left: svc.bundle}
	c.mu.Unlock()
	if spent {
		w.Header().Set(l402.HeaderBalance, "0 requests")
	}
	challenge(w, status, l402Line(macaroon, invoice))
}

func (c *contract) sent(name string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.auth[name]...)
}

func contains(list []string, s string) bool {
	for _, item := range list {
		if item == s {
			return true
		}
	}
	return false
}

func TestBundleIsUsedUpThenPaidAgain(t *testing.T) {
	c := newContract(t, map[string]service{"podcast": {bundle: 3}})
	store := l402.NewMemoryStore()
	cl := client(l402.NewTransport(nil, c.wallet, limits, l402.WithStore(store)))
	var balances, paid []string
	for n := 0; n < 4; n++ {
		resp, _ := get(t, cl, fmt.Sprintf("%s/podcast/ep%d", c.URL, n))
		if resp.StatusCode != 200 {
			t.Fatalf("%d: %d %q", n, resp.StatusCode, resp.Header.Get(l402.HeaderRefused))
		}
		balances = append(balances, resp.Header.Get(l402.HeaderBalance))
		paid = append(paid, fmt.Sprint(resp.Header.Get(l402.HeaderPaid) != ""))
	}
	if got := strings.Join(balances, "|"); got != "2 requests|1 requests|0 requests|2 requests" {
		t.Fatalf("balances %s", got)
	}
	if got := strings.Join(paid, " "); got != "true false false true" || c.wallet.payments() != 2 {
		t.Fatalf("paid %s, %d payments", got, c.wallet.payments())
	}
	sent := c.sent("podcast")
	if len(sent) != 6 || sent[0] != "" || sent[1] == "" || sent[2] != sent[1] || sent[3] != sent[1] ||
		sent[4] != "" || sent[5] == "" || sent[5] == sent[1] {
		t.Fatalf("the spent token went out again, or the new one did not: %q", sent)
	}
	p := store.Payments()
	if len(p) != 2 || !p[0].Spent || p[0].Balance != 0 || p[0].BalanceUnit != "requests" ||
		p[0].Dropped || p[1].Spent || p[1].Balance != 2 {
		t.Fatalf("%+v", p)
	}
}

func TestSingleUsePaysEachCallWithinTheBudgetAndStopsAtIt(t *testing.T) {
	c := newContract(t, map[string]service{"api": {bundle: 1}})
	budget := l402.Limits{MaxPriceSat: 100, MaxFeeSat: 0, DailyBudgetSat: 42}
	cl := client(l402.NewTransport(nil, c.wallet, budget))
	var statuses []int
	for n := 0; n < 3; n++ {
		resp, _ := get(t, cl, fmt.Sprintf("%s/api/call%d", c.URL, n))
		statuses = append(statuses, resp.StatusCode)
		if n == 2 {
			if r := l402.RefusalOf(resp); r == nil || r.Code != "budget_daily" {
				t.Fatalf("%+v", r)
			}
		}
	}
	if fmt.Sprint(statuses) != "[200 200 402]" || c.wallet.payments() != 2 {
		t.Fatalf("%v, %d payments", statuses, c.wallet.payments())
	}
	seen := map[string]int{}
	for _, a := range c.sent("api") {
		if a != "" {
			seen[a]++
		}
	}
	for a, n := range seen {
		if n != 1 {
			t.Fatalf("a single-use token went out %d times: %q", n, a)
		}
	}
}

func TestAServerRefusingEveryFreshTokenCostsOnePaymentPerRequest(t *testing.T) {
	c := newContract(t, map[string]service{"api": {bundle: 1, spendOnSight: true}})
	budget := l402.Limits{MaxPriceSat: 100, MaxFeeSat: 0, DailyBudgetSat: 42}
	cl := client(l402.NewTransport(nil, c.wallet, budget))
	var codes []string
	for n := 0; n < 3; n++ {
		resp, _ := get(t, cl, fmt.Sprintf("%s/api/call%d", c.URL, n))
		if r := l402.RefusalOf(resp); r != nil {
			codes = append(codes, r.Code)
		}
	}
	if fmt.Sprint(codes) != "[rejected_after_payment rejected_after_payment budget_daily]" || c.wallet.payments() != 2 {
		t.Fatalf("%v, %d payments", codes, c.wallet.payments())
	}
}

func TestA402SayingTheBundleIsSpentIsPaidOnce(t *testing.T) {
	c := newContract(t, map[string]service{"podcast": {bundle: 3}})
	store := l402.NewMemoryStore()
	cl := client(l402.NewTransport(nil, c.wallet, limits, l402.WithStore(store)))
	get(t, cl, c.URL+"/podcast/ep1")
	c.mu.Lock()
	for _, g := range c.grants {
		g.left = 0 // used up elsewhere (a copy of the token, another process)
	}
	c.mu.Unlock()
	resp, _ := get(t, cl, c.URL+"/podcast/ep2")
	if resp.StatusCode != 200 || resp.Header.Get(l402.HeaderPaid) == "" || c.wallet.payments() != 2 {
		t.Fatalf("%d %d payments", resp.StatusCode, c.wallet.payments())
	}
	if p := store.Payments(); !p[0].Spent || p[1].Spent {
		t.Fatalf("%+v", p)
	}
}

func TestAMalformedBalanceIsIgnored(t *testing.T) {
	c := newContract(t, map[string]service{"junk": {bundle: 5, balanceHeader: "plenty"}})
	var logged bytes.Buffer
	var mu sync.Mutex
	logger := log.New(writerFunc(func(p []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return logged.Write(p)
	}), "", 0)
	store := l402.NewMemoryStore()
	cl := client(l402.NewTransport(nil, c.wallet, limits, l402.WithStore(store), l402.WithLogger(logger)))
	for n := 0; n < 3; n++ {
		if resp, _ := get(t, cl, fmt.Sprintf("%s/junk/x%d", c.URL, n)); resp.StatusCode != 200 {
			t.Fatal(resp.StatusCode)
		}
	}
	mu.Lock()
	text := logged.String()
	mu.Unlock()
	if c.wallet.payments() != 1 || strings.Count(text, "ignored from") != 1 || !strings.Contains(text, "'<remaining> <unit>'") {
		t.Fatalf("%d payments; log:\n%s", c.wallet.payments(), text)
	}
	if p := store.Payments(); p[0].BalanceUnit != "" || p[0].Spent {
		t.Fatalf("%+v", p)
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }

func TestAPassOpensItsOtherServiceWithoutPaying(t *testing.T) {
	c := newContract(t, map[string]service{
		"podcast":  {sells: []string{"podcast", "articles"}},
		"articles": {},
	})
	cl := client(l402.NewTransport(nil, c.wallet, limits))
	get(t, cl, c.URL+"/podcast/ep1")
	for n := 0; n < 2; n++ {
		resp, _ := get(t, cl, fmt.Sprintf("%s/articles/a%d", c.URL, n))
		if resp.StatusCode != 200 || resp.Header.Get(l402.HeaderPaid) != "" {
			t.Fatalf("%d %q", resp.StatusCode, resp.Header.Get(l402.HeaderRefused))
		}
	}
	pass := c.sent("podcast")[1]
	if got := c.sent("articles"); c.wallet.payments() != 1 || fmt.Sprint(got) != fmt.Sprint([]string{"", pass, pass}) {
		t.Fatalf("%d payments; articles saw %q", c.wallet.payments(), got)
	}
}

func TestARefusedPassIsTriedOnceThenPaidOnce(t *testing.T) {
	c := newContract(t, map[string]service{
		"passer": {sells: []string{"passer", "strict"}},
		"strict": {ownOnly: true},
	})
	store := l402.NewMemoryStore()
	cl := client(l402.NewTransport(nil, c.wallet, limits, l402.WithStore(store)))
	get(t, cl, c.URL+"/passer/p1")
	first, _ := get(t, cl, c.URL+"/strict/s1")
	second, _ := get(t, cl, c.URL+"/strict/s2")
	if first.StatusCode != 200 || first.Header.Get(l402.HeaderPaid) == "" || second.StatusCode != 200 ||
		second.Header.Get(l402.HeaderPaid) != "" || c.wallet.payments() != 2 {
		t.Fatalf("%d %d, %d payments", first.StatusCode, second.StatusCode, c.wallet.payments())
	}
	pass := c.sent("passer")[1]
	got := c.sent("strict")
	if len(got) != 4 || got[0] != "" || got[1] != pass || got[2] == "" || got[2] == pass || got[3] != got[2] {
		t.Fatalf("strict saw %q", got)
	}
	// The pass is kept: it still opens its own service.
	if resp, _ := get(t, cl, c.URL+"/passer/p2"); resp.StatusCode != 200 || c.wallet.payments() != 2 {
		t.Fatalf("%d", resp.StatusCode)
	}
	if p := store.Payments(); p[0].Dropped {
		t.Fatalf("%+v", p)
	}
}

// A spent token stays spent in the file: reopened, the store never hands it out; and the
// file says version 2 with the balance.
func TestASpentTokenStaysSpentInTheFileStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ledger.json")
	c := newContract(t, map[string]service{"api": {bundle: 1}})
	store := openStore(t, path)
	cl := client(l402.NewTransport(nil, c.wallet, limits, l402.WithStore(store)))
	get(t, cl, c.URL+"/api/a")
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		Version  int `json:"version"`
		Payments []struct {
			Balance     *int64 `json:"balance"`
			BalanceUnit string `json:"balance_unit"`
		} `json:"payments"`
	}
	if err := json.Unmarshal(data, &file); err != nil {
		t.Fatal(err)
	}
	if file.Version != 2 || len(file.Payments) != 1 || file.Payments[0].Balance == nil ||
		*file.Payments[0].Balance != 0 || file.Payments[0].BalanceUnit != "requests" {
		t.Fatalf("%s", data)
	}
	reopened := openStore(t, path)
	cl = client(l402.NewTransport(nil, c.wallet, limits, l402.WithStore(reopened)))
	if resp, _ := get(t, cl, c.URL+"/api/b"); resp.StatusCode != 200 || c.wallet.payments() != 2 {
		t.Fatalf("%d, %d payments", resp.StatusCode, c.wallet.payments())
	}
	if got := c.sent("api"); len(got) != 4 || got[2] != "" {
		t.Fatalf("the spent token went out after reopening: %q", got)
	}
}

// The three rounds of one request: the strict token held (not sent: the URL was not known to
// be strict's) is refused, the pass is refused, one payment; the pass is kept.
func TestAHeldTokenRefusedThenAPassRefusedThenOnePayment(t *testing.T) {
	c := newContract(t, map[string]service{
		"passer": {sells: []string{"passer", "strict"}},
		"strict": {ownOnly: true, also: []string{"news"}},
	})
	store := l402.NewMemoryStore()
	cl := client(l402.NewTransport(nil, c.wallet, limits, l402.WithStore(store)))
	get(t, cl, c.URL+"/passer/p1")
	get(t, cl, c.URL+"/strict/s1")
	held := c.sent("strict")[2]
	c.mu.Lock()
	delete(c.grants, held) // revoked
	c.mu.Unlock()
	// A new transport on the same store: it has not seen the pass refused.
	cl = client(l402.NewTransport(nil, c.wallet, limits, l402.WithStore(store)))
	resp, _ := get(t, cl, c.URL+"/news/n1")
	if resp.StatusCode != 200 || resp.Header.Get(l402.HeaderPaid) == "" || c.wallet.payments() != 3 {
		t.Fatalf("%d %q, %d payments", resp.StatusCode, resp.Header.Get(l402.HeaderRefused), c.wallet.payments())
	}
	pass := c.sent("passer")[1]
	got := c.sent("strict")[3:]
	if len(got) != 4 || got[0] != "" || got[1] != held || got[2] != pass || got[3] == "" || got[3] == held {
		t.Fatalf("strict saw %q", got)
	}
	if p := store.Payments(); p[0].Dropped || !p[1].Dropped {
		t.Fatalf("%+v", p)
	}
}
