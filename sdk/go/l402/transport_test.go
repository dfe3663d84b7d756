package l402_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"l402proxy/sdk/go/l402"
	"l402proxy/sdk/go/l402/l402test"
)

func TestPaysOnceAndReusesTheToken(t *testing.T) {
	var mu sync.Mutex
	var accepts []string
	server := l402test.NewServer(l402test.Config{}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		accepts = append(accepts, r.Header.Get("Accept-Authenticate"))
		mu.Unlock()
		_, _ = w.Write([]byte("paid " + r.URL.Path))
	}))
	defer server.Close()
	c := client(l402.NewTransport(nil, server.Wallet(), limits))

	first, body := get(t, c, server.URL+"/reports/1")
	if first.StatusCode != 200 || body != "paid /reports/1" {
		t.Fatalf("%d %q %q", first.StatusCode, body, first.Header.Get(l402.HeaderRefused))
	}
	if got := first.Header.Get(l402.HeaderPaid); got != "21 sat (fee at most 10 sat) for api" {
		t.Fatalf("X-L402-Paid %q", got)
	}
	second, body := get(t, c, server.URL+"/reports/1")
	if second.StatusCode != 200 || second.Header.Get(l402.HeaderPaid) != "" {
		t.Fatalf("second: %d %q", second.StatusCode, second.Header.Get(l402.HeaderPaid))
	}
	// Another path of the same service: its token goes along up front (learned: "/reports/").
	third, _ := get(t, c, server.URL+"/reports/2")
	if third.StatusCode != 200 || third.Header.Get(l402.HeaderPaid) != "" {
		t.Fatalf("third: %d", third.StatusCode)
	}
	stats := server.Stats()
	if stats.Paid != 1 || stats.Challenges != 1 || stats.Granted != 3 || stats.Rejected != 0 {
		t.Fatalf("%+v", stats)
	}
	for _, a := range stats.Authorizations {
		if a != stats.Authorizations[0] || !strings.HasPrefix(a, "LSAT ") {
			t.Fatalf("authorizations %q", stats.Authorizations)
		}
	}
	for _, a := range accepts {
		if a != "L402" {
			t.Fatalf("Accept-Authenticate %q", accepts)
		}
	}
}

func TestConcurrentRequestsShareOnePayment(t *testing.T) {
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	wallet := server.Wallet()
	started := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	wallet.Before = func(ctx context.Context, _ string) error {
		// Hold the payment until every request has had its 402, so all of them meet it.
		once.Do(func() { close(started) })
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	}
	c := client(l402.NewTransport(nil, wallet, limits))
	const n = 16
	var wg sync.WaitGroup
	results := make(chan *http.Response, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := c.Get(server.URL + "/data")
			if err != nil {
				t.Error(err)
				return
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			results <- resp
		}()
	}
	<-started
	deadline := time.Now().Add(testTimeout)
	for server.Stats().Challenges < n && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	close(release)
	wg.Wait()
	close(results)
	paidHeaders := 0
	for resp := range results {
		if resp.StatusCode != 200 {
			t.Errorf("status %d %q", resp.StatusCode, resp.Header.Get(l402.HeaderRefused))
		}
		if resp.Header.Get(l402.HeaderPaid) != "" {
			paidHeaders++
		}
	}
	if stats := server.Stats(); stats.Paid != 1 || stats.Granted != n {
		t.Fatalf("%+v", stats)
	}
	if paidHeaders != 1 {
		t.Fatalf("%d responses say they paid", paidHeaders)
	}
}

// Every refusal: the server's own 402 comes back with X-L402-Refused, nothing is paid, and the
// request is not sent again.
func TestRefusals(t *testing.T) {
	hour := time.Hour
	cases := []struct {
		name   string
		limits l402.Limits
		issue  issueParams
		lines  func(macaroon, invoice string) []string
		code   string
	}{
		{name: "host not allowed", limits: l402.Limits{MaxPriceSat: 100, DailyBudgetSat: 1000, Allow: []string{"*.example.com"}}, code: "not_allowed"},
		{name: "over max price", issue: issueParams{amountMsat: 101_000}, code: "max_price"},
		{name: "over daily budget", limits: l402.Limits{MaxPriceSat: 100, MaxFeeSat: 10, DailyBudgetSat: 30}, code: "budget_daily"},
		{name: "over total budget", limits: l402.Limits{MaxPriceSat: 100, MaxFeeSat: 10, DailyBudgetSat: 1000, TotalBudgetSat: 30}, code: "budget_total"},
		{name: "no amount", issue: issueParams{amountMsat: -1}, code: "no_amount"},
		{name: "hash mismatch", issue: issueParams{macaroonHash: func() *[32]byte { h := randomHash(); return &h }()}, code: "hash_mismatch"},
		{name: "invoice expired", issue: issueParams{createdAt: time.Now().Add(-hour), expiry: time.Minute}, code: "invoice_expired"},
		{name: "wrong network", issue: issueParams{network: "testnet"}, code: "wrong_network"},
		{name: "garbled macaroon", lines: func(_, invoice string) []string { return []string{l402Line("AgJub3RoaW5n", invoice)} }, code: "bad_challenge"},
		{name: "macaroon not base64", lines: func(_, invoice string) []string { return []string{l402Line("%%not*base64!!", invoice)} }, code: "bad_challenge"},
		{name: "garbled invoice", lines: func(macaroon, _ string) []string { return []string{l402Line(macaroon, "lnbcrt210n1garbage")} }, code: "bad_challenge"},
		{name: "control characters in the service", issue: issueParams{caveats: []string{"services=evil\r\nX: 1:0"}}, code: "bad_challenge"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			wallet := newFakeWallet()
			o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
				p := c.issue
				if p.service == "" && p.caveats == nil {
					p.service = "api"
				}
				macaroon, invoice, _ := wallet.issue(p)
				lines := []string{l402Line(macaroon, invoice)}
				if c.lines != nil {
					lines = c.lines(macaroon, invoice)
				}
				challenge(w, http.StatusPaymentRequired, lines...)
			})
			l := c.limits
			if l.MaxPriceSat == 0 {
				l = limits
			}
			resp, body := get(t, client(l402.NewTransport(nil, wallet, l)), o.URL+"/x")
			refusal := l402.RefusalOf(resp)
			if resp.StatusCode != 402 || body != "payment required\n" || refusal == nil || refusal.Code != c.code || refusal.Message == "" {
				t.Fatalf("%d %q %+v", resp.StatusCode, body, refusal)
			}
			if wallet.payments() != 0 || len(o.seen()) != 1 {
				t.Fatalf("paid %d, %d requests", wallet.payments(), len(o.seen()))
			}
			if strings.ContainsAny(resp.Header.Get(l402.HeaderRefused), "\r\n") {
				t.Fatal("header injection")
			}
			if c.code == "not_allowed" && o.seen()[0].Header.Get("Accept-Authenticate") != "" {
				t.Fatal("a host that may not be paid is told the client can pay")
			}
		})
	}
}

func TestNonL402ResponsesPassUntouched(t *testing.T) {
	wallet := newFakeWallet()
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/bearer":
			challenge(w, 402, `Bearer realm="api"`)
		case "/401":
			macaroon, invoice, _ := wallet.issue(issueParams{service: "api"})
			challenge(w, 401, l402Line(macaroon, invoice))
		default:
			challenge(w, 403)
		}
	})
	c := client(l402.NewTransport(nil, wallet, limits))
	for path, status := range map[string]int{"/bearer": 402, "/401": 401, "/403": 403} {
		resp, _ := get(t, c, o.URL+path)
		if resp.StatusCode != status || resp.Header.Get(l402.HeaderRefused) != "" || resp.Header.Get(l402.HeaderPaid) != "" {
			t.Errorf("%s: %d %v", path, resp.StatusCode, resp.Header)
		}
	}
	if wallet.payments() != 0 || len(o.seen()) != 3 {
		t.Fatalf("paid %d, %d requests", wallet.payments(), len(o.seen()))
	}
}

func TestPaymentFailedReleasesTheScope(t *testing.T) {
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	wallet := server.Wallet()
	fail := true
	wallet.Before = func(context.Context, string) error {
		if fail {
			return fmt.Errorf("no route: %w", l402.ErrPaymentFailed)
		}
		return nil
	}
	store := l402.NewMemoryStore()
	c := client(l402.NewTransport(nil, wallet, limits, l402.WithStore(store)))
	resp, _ := get(t, c, server.URL+"/a")
	if r := l402.RefusalOf(resp); resp.StatusCode != 402 || r == nil || r.Code != "payment_failed" {
		t.Fatalf("%d %+v", resp.StatusCode, r)
	}
	if p := store.Payments(); len(p) != 1 || p[0].Status != "failed" || store.SpentMsat(time.Time{}) != 0 {
		t.Fatalf("%+v", p)
	}
	fail = false
	if resp, _ := get(t, c, server.URL+"/a"); resp.StatusCode != 200 || server.Stats().Paid != 1 {
		t.Fatalf("%d %+v", resp.StatusCode, server.Stats())
	}
}

// A wallet that cannot say what happened: the payment stays pending and blocks its scope
// until the wallet is asked (Lookup); never sent, it is released and paid once.
func TestUnknownOutcomeIsSettledBeforePayingAgain(t *testing.T) {
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	wallet := server.Wallet()
	down := true
	wallet.Before = func(context.Context, string) error {
		if down {
			return l402test.ErrDown
		}
		return nil
	}
	store := l402.NewMemoryStore()
	c := client(l402.NewTransport(nil, wallet, limits, l402.WithStore(store)))
	resp, _ := get(t, c, server.URL+"/a")
	if r := l402.RefusalOf(resp); r == nil || r.Code != "payment_pending" {
		t.Fatalf("%+v", r)
	}
	if p := store.Payments(); len(p) != 1 || p[0].Status != "pending" {
		t.Fatalf("%+v", p)
	}
	down = false
	resp, _ = get(t, c, server.URL+"/a")
	if resp.StatusCode != 200 || server.Stats().Paid != 1 {
		t.Fatalf("%d %+v", resp.StatusCode, server.Stats())
	}
	statuses := []string{}
	for _, p := range store.Payments() {
		statuses = append(statuses, p.Status)
	}
	if strings.Join(statuses, ",") != "failed,paid" {
		t.Fatal(statuses)
	}
}

// The wallet paid but its answer was lost: asked again, it gives the preimage, and the token
// is used without a second payment.
func TestLostAnswerIsRecoveredNotPaidTwice(t *testing.T) {
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	wallet := server.Wallet()
	lose := true
	wallet.After = func(string) error {
		if lose {
			lose = false
			return l402test.ErrDown
		}
		return nil
	}
	c := client(l402.NewTransport(nil, wallet, limits))
	if resp, _ := get(t, c, server.URL+"/a"); l402.RefusalOf(resp) == nil || l402.RefusalOf(resp).Code != "payment_pending" {
		t.Fatalf("%d", resp.StatusCode)
	}
	resp, body := get(t, c, server.URL+"/a")
	if resp.StatusCode != 200 || body != "paid" || resp.Header.Get(l402.HeaderPaid) != "" || server.Stats().Paid != 1 {
		t.Fatalf("%d %q %+v", resp.StatusCode, body, server.Stats())
	}
}

type lookupDown struct{ *l402test.Wallet }

func (lookupDown) Lookup(context.Context, [32]byte) (l402.PaymentState, error) {
	return l402.PaymentState{}, l402test.ErrDown
}

func TestPendingScopeIsNeverPaidTwiceWhileTheWalletCannotTell(t *testing.T) {
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	inner := server.Wallet()
	inner.After = func(string) error { return l402test.ErrDown }
	c := client(l402.NewTransport(nil, lookupDown{inner}, limits))
	for i := 0; i < 3; i++ {
		resp, _ := get(t, c, server.URL+"/a")
		if r := l402.RefusalOf(resp); r == nil || r.Code != "payment_pending" {
			t.Fatalf("round %d: %+v", i, r)
		}
	}
	if server.Stats().Paid != 1 {
		t.Fatalf("%+v", server.Stats())
	}
}

func TestTokenRefusedRightAfterPaymentIsNotPaidAgain(t *testing.T) {
	wallet := newFakeWallet()
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		// Accepts nothing: every request gets a fresh challenge for the same service.
		macaroon, invoice, _ := wallet.issue(issueParams{service: "api"})
		challenge(w, 402, l402Line(macaroon, invoice))
	})
	resp, _ := get(t, client(l402.NewTransport(nil, wallet, limits)), o.URL+"/a")
	if r := l402.RefusalOf(resp); r == nil || r.Code != "rejected_after_payment" {
		t.Fatalf("%+v", r)
	}
	if wallet.payments() != 1 || len(o.seen()) != 2 {
		t.Fatalf("paid %d, %d requests", wallet.payments(), len(o.seen()))
	}
}

func TestRevokedTokenIsDroppedAndPaidAfreshOnlyOn402(t *testing.T) {
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	store := l402.NewMemoryStore()
	c := client(l402.NewTransport(nil, server.Wallet(), limits, l402.WithStore(store)))
	if resp, _ := get(t, c, server.URL+"/a"); resp.StatusCode != 200 {
		t.Fatal(resp.StatusCode)
	}
	server.Revoke(store.Payments()[0].PaymentHash)
	// 401 to the token: dropped, asked again without it, 402, paid once more.
	resp, _ := get(t, c, server.URL+"/a")
	if resp.StatusCode != 200 || resp.Header.Get(l402.HeaderPaid) == "" || server.Stats().Paid != 2 {
		t.Fatalf("%d %+v", resp.StatusCode, server.Stats())
	}
	if p := store.Payments(); !p[0].Dropped || p[1].Dropped {
		t.Fatalf("%+v", p)
	}
}

func TestExpiredTokenIsNotSentAndIsBoughtAgain(t *testing.T) {
	server := l402test.NewServer(l402test.Config{ValidFor: time.Hour, InvoiceExpiry: 24 * time.Hour}, nil)
	defer server.Close()
	later := time.Now()
	clock := func() time.Time { return later }
	c := client(l402.NewTransport(nil, server.Wallet(), limits, l402.WithClock(clock)))
	get(t, c, server.URL+"/a")
	later = later.Add(2 * time.Hour)
	resp, _ := get(t, c, server.URL+"/a")
	stats := server.Stats()
	if resp.StatusCode != 200 || stats.Paid != 2 || stats.Rejected != 0 {
		t.Fatalf("%d %+v", resp.StatusCode, stats)
	}
}

func TestSiblingServicesArePaidOnceEach(t *testing.T) {
	wallet := newFakeWallet()
	var mu sync.Mutex
	tokens := map[string]bool{}
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {
		service := strings.TrimPrefix(r.URL.Path, "/shows/")
		mu.Lock()
		granted := tokens[service+r.Header.Get("Authorization")]
		mu.Unlock()
		if granted {
			_, _ = w.Write([]byte(service))
			return
		}
		macaroon, invoice, hash := wallet.issue(issueParams{service: service})
		// The credential this challenge's payment makes is the one the origin accepts.
		wallet.mu.Lock()
		credential := "L402 " + macaroon + ":" + wallet.preimages[hash].Hex()
		wallet.mu.Unlock()
		mu.Lock()
		tokens[service+credential] = true
		mu.Unlock()
		challenge(w, 402, l402Line(macaroon, invoice))
	})
	c := client(l402.NewTransport(nil, wallet, limits))
	for round := 0; round < 3; round++ {
		for _, service := range []string{"a", "b"} {
			if resp, body := get(t, c, o.URL+"/shows/"+service); resp.StatusCode != 200 || body != service {
				t.Fatalf("round %d %s: %d %q", round, service, resp.StatusCode, resp.Header.Get(l402.HeaderRefused))
			}
		}
	}
	if wallet.payments() != 2 {
		t.Fatalf("paid %d times", wallet.payments())
	}
}

func TestBodiesAreSentAgain(t *testing.T) {
	var mu sync.Mutex
	var bodies []string
	server := l402test.NewServer(l402test.Config{}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		bodies = append(bodies, string(body))
		mu.Unlock()
	}))
	defer server.Close()
	c := client(l402.NewTransport(nil, server.Wallet(), limits))
	// With GetBody (strings.Reader), then without it (a reader only readable once).
	for _, body := range []io.Reader{strings.NewReader("one"), io.MultiReader(strings.NewReader("two"))} {
		req, _ := http.NewRequest(http.MethodPost, server.URL+"/upload", body)
		resp, err := c.Do(req)
		if err != nil || resp.StatusCode != 200 {
			t.Fatal(err, resp)
		}
		resp.Body.Close()
	}
	if strings.Join(bodies, ",") != "one,two" {
		t.Fatalf("%q", bodies)
	}
	big := io.MultiReader(strings.NewReader(strings.Repeat("x", 2048)))
	req, _ := http.NewRequest(http.MethodPost, server.URL+"/upload", big)
	c = client(l402.NewTransport(nil, server.Wallet(), limits, l402.WithMaxBufferedBody(1024)))
	if _, err := c.Do(req); err == nil || !strings.Contains(err.Error(), "GetBody") {
		t.Fatalf("%v", err)
	}
}

func TestBadConfigurationSendsNothing(t *testing.T) {
	o := newOrigin(t, func(w http.ResponseWriter, r *http.Request) {})
	for name, transport := range map[string]*l402.Transport{
		"no wallet":      l402.NewTransport(nil, nil, limits),
		"negative price": l402.NewTransport(nil, newFakeWallet(), l402.Limits{MaxPriceSat: -1}),
		"bad pattern":    l402.NewTransport(nil, newFakeWallet(), l402.Limits{Allow: []string{"https://x/"}}),
	} {
		if _, err := client(transport).Get(o.URL); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if len(o.seen()) != 0 {
		t.Fatal("sent anyway")
	}
}

func TestCallerCancellationLeavesThePaymentToFinish(t *testing.T) {
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	wallet := server.Wallet()
	release := make(chan struct{})
	paying := make(chan struct{})
	wallet.Before = func(context.Context, string) error {
		close(paying)
		<-release
		return nil
	}
	store := l402.NewMemoryStore()
	c := client(l402.NewTransport(nil, wallet, limits, l402.WithStore(store)))
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, server.URL+"/a", nil)
	done := make(chan error, 1)
	go func() {
		resp, err := c.Do(req)
		if resp != nil {
			resp.Body.Close()
		}
		done <- err
	}()
	<-paying
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("%v", err)
	}
	close(release)
	// The payment went on without the request that started it; the next request uses it.
	resp, _ := get(t, c, server.URL+"/a")
	if resp.StatusCode != 200 || server.Stats().Paid != 1 {
		t.Fatalf("%d %+v", resp.StatusCode, server.Stats())
	}
}

// hangingLookup is a wallet whose Lookup does not answer until released.
type hangingLookup struct {
	*l402test.Wallet
	entered chan struct{}
	release chan struct{}
}

func (w hangingLookup) Lookup(ctx context.Context, hash [32]byte) (l402.PaymentState, error) {
	w.entered <- struct{}{}
	<-w.release
	return l402.PaymentState{Status: l402.StatusInFlight}, nil
}

// The recovery at start asks the wallet about what was left pending; a request does not wait
// for it past its own context (the wallet may take up to the lookup timeout to answer).
func TestRecoveryAtStartHonorsTheRequestContext(t *testing.T) {
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	wallet := server.Wallet()
	wallet.Before = func(context.Context, string) error { return l402test.ErrDown }
	store := l402.NewMemoryStore()
	if resp, _ := get(t, client(l402.NewTransport(nil, wallet, limits, l402.WithStore(store))), server.URL+"/a"); l402.RefusalOf(resp) == nil {
		t.Fatal(resp.StatusCode)
	}
	hanging := hangingLookup{wallet, make(chan struct{}, 1), make(chan struct{})}
	defer close(hanging.release)
	transport := l402.NewTransport(nil, hanging, limits, l402.WithStore(store), l402.WithLookupTimeout(time.Hour))
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, server.URL+"/a", nil)
	done := make(chan error, 1)
	go func() {
		resp, err := transport.RoundTrip(req)
		if resp != nil {
			resp.Body.Close()
		}
		done <- err
	}()
	<-hanging.entered
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("got %v, want the request's context error", err)
		}
	case <-time.After(testTimeout):
		t.Fatal("the request waited for the wallet past its context")
	}
}
