package l402_test

import (
	"context"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"l402proxy/sdk/go/l402"
)

// countingWallet counts the payments its wallet makes.
type countingWallet struct {
	*l402.DevWallet
	pays int32
}

func (w *countingWallet) Pay(ctx context.Context, bolt11 string, maxFeeSat int64) (l402.Preimage, error) {
	atomic.AddInt32(&w.pays, 1)
	return w.DevWallet.Pay(ctx, bolt11, maxFeeSat)
}

// countingTransport counts the requests that reach the network.
type countingTransport struct{ sent int32 }

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	atomic.AddInt32(&c.sent, 1)
	return http.DefaultTransport.RoundTrip(r)
}

// TestE2EServerProxy pays the real l402proxy server proxy (mitmdump with rules/podcast.yaml
// and the dev backend) through the dev ledger. tests/e2e/test_go_sdk_e2e.py starts the proxy,
// runs this test and checks the ledger; run alone it is skipped.
func TestE2EServerProxy(t *testing.T) {
	proxy := os.Getenv("L402PROXY_E2E_PROXY")
	if proxy == "" {
		t.Skip("set by tests/e2e/test_go_sdk_e2e.py (L402PROXY_E2E_PROXY, _LEDGER, _STORE, L402PROXY_PYTHON)")
	}
	ledger, storePath, python := os.Getenv("L402PROXY_E2E_LEDGER"), os.Getenv("L402PROXY_E2E_STORE"), os.Getenv("L402PROXY_PYTHON")
	limits := l402.Limits{MaxPriceSat: 100, MaxFeeSat: 10, DailyBudgetSat: 1000}
	open := func() (*l402.Store, *countingWallet, *countingTransport, *http.Client) {
		store, err := l402.OpenFileStore(storePath)
		if err != nil {
			t.Fatal(err)
		}
		wallet := &countingWallet{DevWallet: &l402.DevWallet{Python: python, Ledger: ledger}}
		base := &countingTransport{}
		return store, wallet, base, client(l402.NewTransport(base, wallet, limits, l402.WithStore(store)))
	}
	fetch := func(c *http.Client, path string) (*http.Response, string) {
		resp, err := c.Get(proxy + path)
		if err != nil {
			t.Error(err)
			return nil, ""
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp, string(body)
	}

	// 16 requests at once for an episode: one payment, every one gets the ad-free variant.
	store, wallet, base, c := open()
	const n = 16
	var wg sync.WaitGroup
	var mu sync.Mutex
	paidHeaders := []string{}
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, body := fetch(c, "/episodes/ep1.mp3")
			if resp == nil {
				return
			}
			if resp.StatusCode != 200 || body != "AD-FREE episode ep1\n" || resp.Header.Get("X-Origin-Path") != "/adfree/ep1.mp3" {
				t.Errorf("%d %q %q", resp.StatusCode, body, resp.Header.Get(l402.HeaderRefused))
			}
			if paid := resp.Header.Get(l402.HeaderPaid); paid != "" {
				mu.Lock()
				paidHeaders = append(paidHeaders, paid)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if wallet.pays != 1 || len(paidHeaders) != 1 || !strings.HasPrefix(paidHeaders[0], "21 sat") {
		t.Fatalf("%d payments, paid headers %q", wallet.pays, paidHeaders)
	}

	// Another episode of the same service: the token goes along at once (one request), unpaid.
	before := atomic.LoadInt32(&base.sent)
	resp, body := fetch(c, "/episodes/ep2.mp3")
	sent := atomic.LoadInt32(&base.sent) - before
	if resp == nil || resp.StatusCode != 200 || body != "AD-FREE episode ep2\n" || resp.Header.Get(l402.HeaderPaid) != "" || sent != 1 {
		t.Fatalf("reuse: %v %q, %d requests sent", resp, body, sent)
	}
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}

	// A restart: the token comes back from the file.
	store, wallet, base, c = open()
	defer store.Close()
	resp, body = fetch(c, "/episodes/ep3.mp3")
	if resp == nil || resp.StatusCode != 200 || body != "AD-FREE episode ep3\n" || wallet.pays != 0 || base.sent != 1 {
		t.Fatalf("after restart: %v %q, %d payments, %d requests", resp, body, wallet.pays, base.sent)
	}
	if p := store.Payments(); len(p) != 1 || p[0].Status != "paid" || p[0].Scope != "services:podcast" || p[0].AmountMsat != 21000 {
		t.Fatalf("%+v", p)
	}
}
