package l402_test

import (
	"bytes"
	"fmt"
	"log"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"l402proxy/sdk/go/l402"
)

// Requests at once: one payment shared by requests for one scope, a bundle too small for them
// all. The server grants some and answers the others "spent"; those lost the token to a
// request of ours, and each pays once more, for itself alone.

// race holds every request carrying the first token the contract sees until want of them have
// come; then the winner is answered first (the winner-th to arrive, -1 the last; or the request
// for winnerPath), the others after it. Requests with other tokens pass straight through.
type race struct {
	want       int
	winner     int
	winnerPath string
	then       func() // called once all have come, before any is answered
	afterWin   func() // called once the winner was answered, before the others are

	mu      sync.Mutex
	raced   string
	arrived []string
	allIn   chan struct{}
	won     chan struct{}
}

func newRace(want, winner int) *race {
	return &race{want: want, winner: winner, allIn: make(chan struct{}), won: make(chan struct{})}
}

// enter waits for the request's turn; the function it returns ends the winner's answer.
func (r *race) enter(authorization, path string) func() {
	r.mu.Lock()
	if r.raced == "" {
		r.raced = authorization
	}
	if authorization != r.raced || len(r.arrived) >= r.want {
		r.mu.Unlock()
		return func() {}
	}
	r.arrived = append(r.arrived, path)
	if len(r.arrived) == r.want {
		if r.then != nil {
			r.then()
		}
		close(r.allIn)
	}
	r.mu.Unlock()
	select {
	case <-r.allIn:
	case <-time.After(testTimeout):
		return func() {} // the test fails on what it got
	}
	r.mu.Lock()
	winner := r.winnerPath
	if winner == "" {
		index := r.winner
		if index < 0 {
			index += r.want
		}
		winner = r.arrived[index]
	}
	r.mu.Unlock()
	if path == winner {
		return func() {
			if r.afterWin != nil {
				r.afterWin()
			}
			close(r.won)
		}
	}
	select {
	case <-r.won:
	case <-time.After(testTimeout):
	}
	return func() {}
}

func (r *race) token() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.raced
}

type answer struct {
	status  int
	balance string
	paid    string
	refused string
}

// atOnce gets every path at the same time, each on a goroutine of its own; answers in order.
func atOnce(t *testing.T, cl *http.Client, base string, paths ...string) []answer {
	t.Helper()
	out := make([]answer, len(paths))
	var wg sync.WaitGroup
	for i, path := range paths {
		wg.Add(1)
		go func(i int, path string) {
			defer wg.Done()
			resp, err := cl.Get(base + path)
			if err != nil {
				t.Error(err)
				return
			}
			resp.Body.Close()
			out[i] = answer{resp.StatusCode, resp.Header.Get(l402.HeaderBalance), resp.Header.Get(l402.HeaderPaid),
				resp.Header.Get(l402.HeaderRefused)}
		}(i, path)
	}
	wg.Wait()
	return out
}

// paidSat is what an X-L402-Paid says was paid ("21 sat (fee at most 0 sat) for api"), 0 for none.
func paidSat(t *testing.T, header string) int {
	if header == "" {
		return 0
	}
	n, err := strconv.Atoi(strings.SplitN(header, " ", 2)[0])
	if err != nil {
		t.Fatalf("X-L402-Paid %q", header)
	}
	return n
}

func refusalCodes(answers []answer) []string {
	var codes []string
	for _, a := range answers {
		code, _, _ := strings.Cut(a.refused, ";")
		codes = append(codes, code)
	}
	sort.Strings(codes)
	return codes
}

var noFee = l402.Limits{MaxPriceSat: 100, MaxFeeSat: 0, DailyBudgetSat: 1000}

// syncLog is a logger's output that tests read while requests write it.
type syncLog struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *syncLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *syncLog) count(text string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.buf.String(), text)
}

// until polls ready (bounded: a thousand times, 10 ms apart) and fails the test if it never is.
func until(t *testing.T, what string, ready func() bool) {
	t.Helper()
	for i := 0; i < 1000; i++ {
		if ready() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("never: %s", what)
}

// payerFirst gets paths at once, the first one paying: its payment is held at the wallet's gate
// until each of the others met its 402 and waited for that payment. Answers in order.
func payerFirst(t *testing.T, c *contract, cl *http.Client, logs *syncLog, paths ...string) []answer {
	t.Helper()
	gate := make(chan struct{})
	c.wallet.mu.Lock()
	c.wallet.gate, c.wallet.payErr = gate, nil
	before := c.wallet.entered
	c.wallet.mu.Unlock()
	waiting := logs.count("waiting for the payment under way")
	out := make([]answer, len(paths))
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		out[0] = atOnce(t, cl, c.URL, paths[0])[0]
	}()
	until(t, "the first request pays", func() bool {
		c.wallet.mu.Lock()
		defer c.wallet.mu.Unlock()
		return c.wallet.entered > before
	})
	go func() {
		defer wg.Done()
		copy(out[1:], atOnce(t, cl, c.URL, paths[1:]...))
	}()
	until(t, "the others wait for its payment", func() bool {
		return logs.count("waiting for the payment under way") == waiting+len(paths)-1
	})
	close(gate)
	wg.Wait()
	return out
}

func newRacer(t *testing.T, c *contract, lim l402.Limits, options ...l402.Option) (*http.Client, *syncLog) {
	logs := &syncLog{}
	options = append(options, l402.WithLogger(log.New(logs, "", 0)))
	return client(l402.NewTransport(nil, c.wallet, lim, options...)), logs
}

func TestSingleUseCallsAtOnceEachPayForTheirOwnCall(t *testing.T) {
	// The request that paid wins the token, or one that waited for it does.
	for _, winner := range []string{"/api/call0", "/api/call2"} {
		t.Run(strings.TrimPrefix(winner, "/api/"), func(t *testing.T) {
			c := newContract(t, map[string]service{"api": {bundle: 1}})
			c.race = &race{want: 3, winnerPath: winner, allIn: make(chan struct{}), won: make(chan struct{})}
			store := l402.NewMemoryStore()
			cl, logs := newRacer(t, c, noFee, l402.WithStore(store))
			got := payerFirst(t, c, cl, logs, "/api/call0", "/api/call1", "/api/call2")
			var paid []int
			for _, a := range got {
				if a.status != 200 || a.refused != "" || a.balance != "0 requests" {
					t.Fatalf("%+v", got)
				}
				paid = append(paid, paidSat(t, a.paid))
			}
			// What X-L402-Paid says adds up to what was paid: the request that paid the token
			// another request used, and then its own, says both.
			want := "[21 21 21]"
			if winner != "/api/call0" {
				want = "[42 21 0]"
			}
			if c.wallet.payments() != 3 || fmt.Sprint(paid) != want {
				t.Fatalf("%d payments, X-L402-Paid says %v", c.wallet.payments(), paid)
			}
			seen := map[string]int{}
			for _, a := range c.sent("api") {
				seen[a]++
			}
			if seen[""] != 3 || seen[c.race.token()] != 3 || len(seen) != 4 {
				t.Fatalf("sent %q", c.sent("api"))
			}
			for _, p := range store.Payments() {
				if p.Status != "paid" || !p.Spent || p.Dropped {
					t.Fatalf("%+v", store.Payments())
				}
			}
		})
	}
}

func TestATokenSentUpFrontByAnotherRequestThatWinsIsNoRefusal(t *testing.T) {
	c := newContract(t, map[string]service{"api": {bundle: 1}})
	cl, _ := newRacer(t, c, noFee)
	if resp, _ := get(t, cl, c.URL+"/api/first"); resp.StatusCode != 200 { // /api/ learnt
		t.Fatal(resp.StatusCode)
	}
	c.race = &race{want: 2, winnerPath: "/api/y", allIn: make(chan struct{}), won: make(chan struct{})}
	gate := make(chan struct{})
	c.wallet.mu.Lock()
	c.wallet.gate = gate
	c.wallet.mu.Unlock()
	var x, y answer
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		x = atOnce(t, cl, c.URL, "/api/x")[0]
	}()
	// x's payment under way (held at the gate): y waits for it and sends its token up front
	// (x's retry is held by the race until y's request came).
	until(t, "x pays", func() bool {
		c.wallet.mu.Lock()
		defer c.wallet.mu.Unlock()
		return c.wallet.entered == 2
	})
	go func() {
		defer wg.Done()
		y = atOnce(t, cl, c.URL, "/api/y")[0]
	}()
	close(gate)
	wg.Wait()
	if y.status != 200 || y.paid != "" || x.status != 200 || x.refused != "" || paidSat(t, x.paid) != 2*21 {
		t.Fatalf("x %+v, y %+v", x, y)
	}
	// x: no token, the token it paid (y's only request carried it too), its own.
	sent := c.sent("api")
	if c.wallet.payments() != 3 || len(sent) != 6 || sent[3] != c.race.token() || sent[4] != c.race.token() {
		t.Fatalf("%d payments, sent %q", c.wallet.payments(), sent)
	}
}

func TestTheExtraPaymentIsWithinTheBudget(t *testing.T) {
	c := newContract(t, map[string]service{"api": {bundle: 1}})
	c.race = &race{want: 3, winnerPath: "/api/b0", allIn: make(chan struct{}), won: make(chan struct{})}
	cl, logs := newRacer(t, c, l402.Limits{MaxPriceSat: 100, MaxFeeSat: 0, DailyBudgetSat: 42})
	got := payerFirst(t, c, cl, logs, "/api/b0", "/api/b1", "/api/b2")
	if codes := refusalCodes(got); fmt.Sprint(codes) != "[  budget_daily]" || c.wallet.payments() != 2 {
		t.Fatalf("%q, %d payments", codes, c.wallet.payments())
	}
}

func TestTheExtraPaymentIsWithinThePriceLimit(t *testing.T) {
	c := newContract(t, map[string]service{"api": {bundle: 1}})
	// The request that paid loses, and the price went up after its payment.
	c.race = &race{want: 3, winnerPath: "/api/p2", allIn: make(chan struct{}), won: make(chan struct{})}
	c.race.then = func() {
		c.mu.Lock()
		c.price = 500000
		c.mu.Unlock()
	}
	cl, logs := newRacer(t, c, noFee)
	got := payerFirst(t, c, cl, logs, "/api/p0", "/api/p1", "/api/p2")
	if codes := refusalCodes(got); fmt.Sprint(codes) != "[ max_price max_price]" || c.wallet.payments() != 1 {
		t.Fatalf("%q, %d payments", codes, c.wallet.payments())
	}
}

func TestARequestThatLosesTwiceDoesNotPayAThirdTime(t *testing.T) {
	// A real race (one request granted with the shared token), then the server calls every
	// token spent, even one just paid: each loser pays once more alone, and is refused then.
	c := newContract(t, map[string]service{"api": {bundle: 1}})
	c.race = newRace(3, 0)
	c.race.afterWin = func() {
		c.mu.Lock()
		c.services = map[string]service{"api": {bundle: 1, spendOnSight: true}}
		c.mu.Unlock()
	}
	cl, logs := newRacer(t, c, noFee)
	got := payerFirst(t, c, cl, logs, "/api/s0", "/api/s1", "/api/s2")
	codes := refusalCodes(got)
	if fmt.Sprint(codes) != "[ rejected_after_payment rejected_after_payment]" {
		t.Fatalf("%q", codes)
	}
	// One shared payment and one more for each loser: three, never a third for any request;
	// what X-L402-Paid says (beside the refusals too) adds up to it.
	said := 0
	for _, a := range got {
		said += paidSat(t, a.paid)
	}
	if c.wallet.payments() != 3 || said != 3*21 {
		t.Fatalf("%d payments, X-L402-Paid says %d sat: %+v", c.wallet.payments(), said, got)
	}
	seen := map[string]int{}
	for _, a := range c.sent("api") {
		seen[a]++
	}
	if seen[""] != 3 || seen[c.race.token()] != 3 || len(seen) != 4 {
		t.Fatalf("sent %q", c.sent("api"))
	}
	for a, n := range seen {
		if a != "" && a != c.race.token() && n != 1 {
			t.Fatalf("a token bought alone went out %d times", n)
		}
	}
}

func TestAServerCallingEveryTokenSpentGetsNoSecondPaymentFromAnyRequest(t *testing.T) {
	// Three requests share one payment; the server calls it spent to all of them and grants
	// none: no proof that ours used it, so none pays alone. Each request pays at most once
	// (a waiter whose shared token was refused pays for itself, as for any refused token),
	// nothing is served, and each refused request says what it paid.
	c := newContract(t, map[string]service{"api": {bundle: 1, spendOnSight: true}})
	c.race = newRace(3, 0)
	cl, logs := newRacer(t, c, noFee)
	got := payerFirst(t, c, cl, logs, "/api/s0", "/api/s1", "/api/s2")
	codes := refusalCodes(got)
	if fmt.Sprint(codes) != "[rejected_after_payment rejected_after_payment rejected_after_payment]" {
		t.Fatalf("%q", codes)
	}
	said := 0
	for _, a := range got {
		if paidSat(t, a.paid) > 21 {
			t.Fatalf("a request paid twice: %+v", got)
		}
		said += paidSat(t, a.paid)
	}
	if n := c.wallet.payments(); n < 1 || n > 3 || said != n*21 || logs.count("for it alone") != 0 {
		t.Fatalf("%d payments, X-L402-Paid says %d sat: %+v", n, said, got)
	}
}

func TestARequestRefusedByTheBudgetAfterPayingStillSaysWhatItPaid(t *testing.T) {
	// The request that paid the shared token loses it to the one that waited for it; the
	// budget holds that one payment only, so its extra payment is refused: it says both.
	c := newContract(t, map[string]service{"api": {bundle: 1}})
	c.race = &race{want: 2, winnerPath: "/api/c1", allIn: make(chan struct{}), won: make(chan struct{})}
	cl, logs := newRacer(t, c, l402.Limits{MaxPriceSat: 100, MaxFeeSat: 0, DailyBudgetSat: 21})
	got := payerFirst(t, c, cl, logs, "/api/c0", "/api/c1")
	payer, waiter := got[0], got[1]
	if !strings.HasPrefix(payer.refused, "budget_daily;") || payer.status != 402 || paidSat(t, payer.paid) != 21 {
		t.Fatalf("the request that paid: %+v", payer)
	}
	if waiter.status != 200 || waiter.paid != "" || waiter.refused != "" || c.wallet.payments() != 1 {
		t.Fatalf("the waiter: %+v, %d payments", waiter, c.wallet.payments())
	}
}

func TestAFreshTokenSaidSpentWithNoOtherRequestIsRefusedAsBefore(t *testing.T) {
	c := newContract(t, map[string]service{"api": {bundle: 1, spendOnSight: true}})
	cl := client(l402.NewTransport(nil, c.wallet, noFee))
	resp, _ := get(t, cl, c.URL+"/api/alone")
	if r := l402.RefusalOf(resp); r == nil || r.Code != "rejected_after_payment" || c.wallet.payments() != 1 {
		t.Fatalf("%+v, %d payments", r, c.wallet.payments())
	}
}

func TestABundleTokenBoughtAloneIsSharedOnceItsRequestUsedIt(t *testing.T) {
	c := newContract(t, map[string]service{"podcast": {bundle: 2}})
	c.race = newRace(3, 0)
	store := l402.NewMemoryStore()
	cl, logs := newRacer(t, c, limits, l402.WithStore(store))
	got := payerFirst(t, c, cl, logs, "/podcast/e0", "/podcast/e1", "/podcast/e2")
	var balances []string
	for _, a := range got {
		if a.status != 200 || a.refused != "" {
			t.Fatalf("%+v", got)
		}
		balances = append(balances, a.balance)
	}
	sort.Strings(balances)
	if fmt.Sprint(balances) != "[0 requests 1 requests 1 requests]" || c.wallet.payments() != 2 {
		t.Fatalf("%q, %d payments", balances, c.wallet.payments())
	}
	// What the token bought alone has left goes up front to the next request.
	resp, _ := get(t, cl, c.URL+"/podcast/e3")
	sent := c.sent("podcast")
	alone := sent[len(sent)-2]
	if resp.StatusCode != 200 || resp.Header.Get(l402.HeaderBalance) != "0 requests" || sent[len(sent)-1] != alone ||
		alone == c.race.token() || c.wallet.payments() != 2 {
		t.Fatalf("%d %q, sent %q", resp.StatusCode, resp.Header.Get(l402.HeaderBalance), sent)
	}
}
