package l402_test

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"path/filepath"

	"l402proxy/sdk/go/l402"
	"l402proxy/sdk/go/l402/l402test"
)

// A client that pays for what it fetches: the first request pays, later ones reuse the token.
func ExampleNewTransport() {
	// A toy L402 API and a wallet that pays it; use l402.NewLNDWallet for real money.
	api := l402test.NewServer(l402test.Config{PriceSat: 21, Service: "reports"},
		http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "premium report") }))
	defer api.Close()
	wallet := api.Wallet()

	client := &http.Client{Transport: l402.NewTransport(http.DefaultTransport, wallet,
		l402.Limits{MaxPriceSat: 100, DailyBudgetSat: 1000})}
	for i := 0; i < 2; i++ {
		resp, err := client.Get(api.URL + "/premium/report")
		if err != nil {
			log.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		fmt.Printf("%d %s; paid: %q\n", resp.StatusCode, body, resp.Header.Get(l402.HeaderPaid))
	}
	fmt.Println("payments:", api.Stats().Paid)
	// Output:
	// 200 premium report; paid: "21 sat (fee at most 0 sat) for reports"
	// 200 premium report; paid: ""
	// payments: 1
}

// Nothing is paid beyond the limits: the server's 402 comes back with the reason.
func ExampleRefusalOf() {
	api := l402test.NewServer(l402test.Config{PriceSat: 250}, nil)
	defer api.Close()
	client := &http.Client{Transport: l402.NewTransport(nil, api.Wallet(), l402.Limits{MaxPriceSat: 100, DailyBudgetSat: 1000})}
	resp, err := client.Get(api.URL + "/expensive")
	if err != nil {
		log.Fatal(err)
	}
	resp.Body.Close()
	refusal := l402.RefusalOf(resp)
	fmt.Println(resp.StatusCode, refusal.Code)
	fmt.Println(refusal.Message)
	// Output:
	// 402 max_price
	// the invoice asks 250 sat, more than MaxPriceSat 100
}

// Tokens and the ledger (budgets included) survive a restart in a file store.
func ExampleOpenFileStore() {
	dir, err := os.MkdirTemp("", "l402-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	api := l402test.NewServer(l402test.Config{}, nil)
	defer api.Close()

	for run := 1; run <= 2; run++ { // two runs of a program, one after the other
		store, err := l402.OpenFileStore(filepath.Join(dir, "l402-client.json"))
		if err != nil {
			log.Fatal(err)
		}
		client := &http.Client{Transport: l402.NewTransport(nil, api.Wallet(),
			l402.Limits{MaxPriceSat: 100, DailyBudgetSat: 1000}, l402.WithStore(store))}
		resp, err := client.Get(api.URL + "/data")
		if err != nil {
			log.Fatal(err)
		}
		resp.Body.Close()
		fmt.Printf("run %d: %d, %d payment(s) in the ledger, %d paid in all\n",
			run, resp.StatusCode, len(store.Payments()), api.Stats().Paid)
		store.Close()
	}
	// Output:
	// run 1: 200, 1 payment(s) in the ledger, 1 paid in all
	// run 2: 200, 1 payment(s) in the ledger, 1 paid in all
}

func ExampleParseChallenges() {
	challenges := l402.ParseChallenges([]string{
		`Bearer realm="api", L402 version="0", token="AgEEbHNhdA==", invoice="lnbc1..."`,
	})
	for _, c := range challenges {
		fmt.Println(c.Scheme, c.Version, c.Macaroon, c.Invoice)
	}
	// Output:
	// L402 0 AgEEbHNhdA== lnbc1...
}

func ExampleDecodeInvoice() {
	// From BOLT 11's examples: "Please send $3 for a cup of coffee to the same peer, within one minute".
	invoice, err := l402.DecodeInvoice("lnbc2500u1pvjluezsp5zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zyg3zygspp5qqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqqqsyqcyq5rqwzqfqypqdq5xysxxatsyp3k7enxv4jsxqzpu9qrsgquk0rl77nj30yxdy8j9vdx85fkpmdla2087ne0xh8nhedh8w27kyke0lp53ut353s06fv3qfegext0eh0ymjpf39tuven09sam30g4vgpfna3rh")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(invoice.Network, invoice.AmountMsat, "msat, expires after", invoice.Expiry)
	// Output:
	// mainnet 250000000 msat, expires after 1m0s
}

// Paying from an LND node through its REST API (not run: it needs a node).
func ExampleNewLNDWalletFromFiles() {
	wallet, err := l402.NewLNDWalletFromFiles("127.0.0.1:8080",
		os.ExpandEnv("$HOME/.lnd/tls.cert"),
		os.ExpandEnv("$HOME/.lnd/data/chain/bitcoin/mainnet/admin.macaroon"))
	if err != nil {
		log.Fatal(err)
	}
	store, err := l402.OpenFileStore(os.ExpandEnv("$HOME/.l402proxy/go-client.json"))
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	client := &http.Client{Transport: l402.NewTransport(http.DefaultTransport, wallet,
		l402.Limits{MaxPriceSat: 100, MaxFeeSat: 10, DailyBudgetSat: 1000, Allow: []string{"api.example.com"}},
		l402.WithStore(store))}
	_, _ = client.Get("https://api.example.com/premium/report")
}
