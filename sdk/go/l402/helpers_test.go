package l402_test

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"l402proxy/sdk/go/l402"
	"l402proxy/sdk/go/l402/l402test"
)

const testTimeout = 10 * time.Second

func randomHash() [32]byte {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return b
}

// fakeWallet pays invoices it minted itself (issue), and counts what it paid.
type fakeWallet struct {
	mu        sync.Mutex
	preimages map[[32]byte]l402.Preimage
	paid      map[[32]byte]bool
	pays      int
	network   string
	payErr    error // returned by Pay before paying, if set
	// gate, if set, is waited for by Pay before paying (until it is closed); entered counts
	// the calls to Pay.
	gate    chan struct{}
	entered int
}

func newFakeWallet() *fakeWallet {
	return &fakeWallet{preimages: map[[32]byte]l402.Preimage{}, paid: map[[32]byte]bool{}, network: "regtest"}
}

type issueParams struct {
	service    string // "" for no services caveat
	amountMsat int64
	network    string
	createdAt  time.Time
	expiry     time.Duration
	caveats    []string
	// macaroonHash, if set, is named by the macaroon instead of the invoice's hash.
	macaroonHash *[32]byte
}

// issue mints a macaroon and an invoice for a fresh preimage the wallet can pay.
func (w *fakeWallet) issue(p issueParams) (macaroon, invoice string, hash [32]byte) {
	preimage := l402.Preimage(randomHash())
	hash = preimage.Hash()
	w.mu.Lock()
	w.preimages[hash] = preimage
	w.mu.Unlock()
	caveats := append([]string(nil), p.caveats...)
	if p.service != "" {
		caveats = append([]string{"services=" + p.service + ":0"}, caveats...)
	}
	named := hash
	if p.macaroonHash != nil {
		named = *p.macaroonHash
	}
	macaroon = l402test.Macaroon([]byte("key"), named, randomHash(), caveats...)
	if p.amountMsat == 0 {
		p.amountMsat = 21000
	}
	if p.amountMsat < 0 {
		p.amountMsat = 0
	}
	invoice = l402test.Invoice(l402test.InvoiceParams{
		Network: p.network, PaymentHash: hash, AmountMsat: p.amountMsat, CreatedAt: p.createdAt, Expiry: p.expiry,
	})
	return macaroon, invoice, hash
}

func (w *fakeWallet) Pay(ctx context.Context, bolt11 string, maxFeeSat int64) (l402.Preimage, error) {
	w.mu.Lock()
	gate := w.gate
	w.entered++
	w.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return l402.Preimage{}, ctx.Err()
		}
	}
	if w.payErr != nil {
		return l402.Preimage{}, w.payErr
	}
	invoice, err := l402.DecodeInvoice(bolt11)
	if err != nil {
		return l402.Preimage{}, fmt.Errorf("%w: %v", l402.ErrPaymentFailed, err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	preimage, ok := w.preimages[invoice.PaymentHash]
	if !ok || w.paid[invoice.PaymentHash] {
		return l402.Preimage{}, fmt.Errorf("%w: not mine or paid", l402.ErrPaymentFailed)
	}
	w.paid[invoice.PaymentHash] = true
	w.pays++
	return preimage, nil
}

func (w *fakeWallet) Lookup(ctx context.Context, hash [32]byte) (l402.PaymentState, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.paid[hash] {
		return l402.PaymentState{Status: l402.StatusSucceeded, Preimage: w.preimages[hash]}, nil
	}
	return l402.PaymentState{Status: l402.StatusNotFound}, nil
}

func (w *fakeWallet) Network(context.Context) (string, error) { return w.network, nil }

func (w *fakeWallet) payments() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.pays
}

// origin serves what answer returns, and records every request.
type origin struct {
	*httptest.Server
	mu       sync.Mutex
	requests []*http.Request
	bodies   []string
}

func newOrigin(t *testing.T, answer func(w http.ResponseWriter, r *http.Request)) *origin {
	o := &origin{}
	o.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		o.mu.Lock()
		o.requests = append(o.requests, r)
		o.bodies = append(o.bodies, string(body))
		o.mu.Unlock()
		answer(w, r)
	}))
	t.Cleanup(o.Close)
	return o
}

func (o *origin) seen() []*http.Request {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]*http.Request(nil), o.requests...)
}

func challenge(w http.ResponseWriter, status int, lines ...string) {
	for _, line := range lines {
		w.Header().Add("WWW-Authenticate", line)
	}
	w.WriteHeader(status)
	_, _ = w.Write([]byte("payment required\n"))
}

func l402Line(macaroon, invoice string) string {
	return fmt.Sprintf("L402 macaroon=%q, invoice=%q", macaroon, invoice)
}

func client(transport http.RoundTripper) *http.Client {
	return &http.Client{Transport: transport, Timeout: testTimeout}
}

func get(t *testing.T, c *http.Client, url string) (*http.Response, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(body)
}

var limits = l402.Limits{MaxPriceSat: 100, MaxFeeSat: 10, DailyBudgetSat: 1000}
