package l402_test

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"l402proxy/sdk/go/l402"
	"l402proxy/sdk/go/l402/l402test"
)

type fileEntry struct {
	PaymentHash string `json:"payment_hash"`
	Status      string `json:"status"`
	Preimage    string `json:"preimage"`
}

func readLedger(t *testing.T, path string) []fileEntry {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var file struct {
		Payments []fileEntry `json:"payments"`
	}
	if err := json.Unmarshal(data, &file); err != nil {
		t.Fatal(err)
	}
	return file.Payments
}

func openStore(t *testing.T, path string) *l402.Store {
	t.Helper()
	store, err := l402.OpenFileStore(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close() })
	return store
}

// The crash-safe order, read from the file itself: the pending entry is on disk before the
// wallet is asked to pay, and the token (preimage) before the request is sent again.
func TestFileStoreWritesPendingBeforePayingAndTokenBeforeRetrying(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ledger", "client.json")
	var onDiskWhenRetried []fileEntry
	server := l402test.NewServer(l402test.Config{}, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		onDiskWhenRetried = readLedger(t, path)
	}))
	defer server.Close()
	wallet := server.Wallet()
	var onDiskWhenPaying []fileEntry
	var paying [32]byte
	wallet.Before = func(_ context.Context, bolt11 string) error {
		invoice, err := l402.DecodeInvoice(bolt11)
		if err != nil {
			return err
		}
		paying = invoice.PaymentHash
		onDiskWhenPaying = readLedger(t, path)
		return nil
	}
	store := openStore(t, path)
	c := client(l402.NewTransport(nil, wallet, limits, l402.WithStore(store)))
	if resp, _ := get(t, c, server.URL+"/a"); resp.StatusCode != 200 {
		t.Fatal(resp.StatusCode)
	}
	hash := hex.EncodeToString(paying[:])
	if len(onDiskWhenPaying) != 1 || onDiskWhenPaying[0].PaymentHash != hash || onDiskWhenPaying[0].Status != "pending" {
		t.Fatalf("when paying: %+v", onDiskWhenPaying)
	}
	if len(onDiskWhenRetried) != 1 || onDiskWhenRetried[0].Status != "paid" || len(onDiskWhenRetried[0].Preimage) != 64 {
		t.Fatalf("when retried: %+v", onDiskWhenRetried)
	}
	info, err := os.Stat(path)
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("%v %v", info.Mode(), err)
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp") {
			t.Fatalf("temporary file left: %s", e.Name())
		}
	}

	// A restart: the token and the learned path come back; nothing is paid, the token goes
	// along with the first request.
	if err := store.Close(); err != nil {
		t.Fatal(err)
	}
	again := openStore(t, path)
	c = client(l402.NewTransport(nil, wallet, limits, l402.WithStore(again)))
	if resp, _ := get(t, c, server.URL+"/a"); resp.StatusCode != 200 {
		t.Fatal(resp.StatusCode)
	}
	if stats := server.Stats(); stats.Paid != 1 || stats.Challenges != 1 {
		t.Fatalf("%+v", stats)
	}
}

// A crash between paying and storing the token leaves a pending entry: the next start asks the
// wallet, stores the token it reports, and pays nothing more.
func TestPendingEntryFromACrashIsRecoveredAtStart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.json")
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	crashed := server.Wallet()
	crashed.After = func(string) error { return l402test.ErrDown } // paid; the answer never came
	store := openStore(t, path)
	resp, _ := get(t, client(l402.NewTransport(nil, crashed, limits, l402.WithStore(store))), server.URL+"/a")
	if r := l402.RefusalOf(resp); r == nil || r.Code != "payment_pending" {
		t.Fatalf("%+v", r)
	}
	if entries := readLedger(t, path); len(entries) != 1 || entries[0].Status != "pending" {
		t.Fatalf("%+v", entries)
	}
	_ = store.Close()

	store = openStore(t, path)
	transport := l402.NewTransport(nil, server.Wallet(), limits, l402.WithStore(store))
	if n := transport.Recover(context.Background()); n != 1 {
		t.Fatalf("recovered %d", n)
	}
	if entries := readLedger(t, path); entries[0].Status != "paid" {
		t.Fatalf("%+v", entries)
	}
	resp, _ = get(t, client(transport), server.URL+"/a")
	if resp.StatusCode != 200 || server.Stats().Paid != 1 || server.Stats().Challenges != 1 {
		t.Fatalf("%d %+v", resp.StatusCode, server.Stats())
	}
}

func TestPendingEntryNeverSentIsReleasedAtStart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.json")
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	down := server.Wallet()
	down.Before = func(context.Context, string) error { return l402test.ErrDown }
	store := openStore(t, path)
	get(t, client(l402.NewTransport(nil, down, limits, l402.WithStore(store))), server.URL+"/a")
	_ = store.Close()

	store = openStore(t, path)
	resp, _ := get(t, client(l402.NewTransport(nil, server.Wallet(), limits, l402.WithStore(store))), server.URL+"/a")
	if resp.StatusCode != 200 || server.Stats().Paid != 1 {
		t.Fatalf("%d %+v", resp.StatusCode, server.Stats())
	}
	entries := readLedger(t, path)
	if len(entries) != 2 || entries[0].Status != "failed" || entries[1].Status != "paid" {
		t.Fatalf("%+v", entries)
	}
}

type otherWallet struct{ *l402test.Wallet }

func (otherWallet) Identity() string { return "lnd:elsewhere:8080" }

// A pending payment made by another wallet is never settled by asking this one (it would say
// "never sent" and the scope would be paid twice).
func TestPendingEntryOfAnotherWalletStaysPending(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.json")
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	crashed := server.Wallet()
	crashed.After = func(string) error { return l402test.ErrDown }
	store := openStore(t, path)
	get(t, client(l402.NewTransport(nil, otherWallet{crashed}, limits, l402.WithStore(store))), server.URL+"/a")
	_ = store.Close()

	store = openStore(t, path)
	resp, _ := get(t, client(l402.NewTransport(nil, server.Wallet(), limits, l402.WithStore(store))), server.URL+"/a")
	if r := l402.RefusalOf(resp); r == nil || r.Code != "payment_pending" || server.Stats().Paid != 1 {
		t.Fatalf("%+v %+v", r, server.Stats())
	}
}

func TestFileStoreIsLockedAgainstASecondOpener(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.json")
	store := openStore(t, path)
	if second, err := l402.OpenFileStore(path); err == nil {
		_ = second.Close()
		t.Fatal("opened twice")
	} else if !strings.Contains(err.Error(), "in use") {
		t.Fatal(err)
	}
	_ = store.Close()
	openStore(t, path)
}

func TestUnreadableStoreIsAnErrorNotAFreshLedger(t *testing.T) {
	dir := t.TempDir()
	preimage := l402.Preimage{1}
	hash := preimage.Hash()
	goodHash := hex.EncodeToString(hash[:])
	for name, content := range map[string]string{
		"garbage":        "{not json",
		"future version": `{"version": 99, "payments": []}`,
		"bad hash":       `{"version": 1, "payments": [{"payment_hash": "zz", "status": "pending", "amount_msat": 1}]}`,
		"wrong preimage": `{"version": 1, "payments": [{"payment_hash": "` + goodHash + `", "status": "paid", "preimage": "` + strings.Repeat("00", 32) + `", "amount_msat": 1}]}`,
		"unknown status": `{"version": 1, "payments": [{"payment_hash": "` + goodHash + `", "status": "maybe", "amount_msat": 1}]}`,
	} {
		path := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".json")
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if store, err := l402.OpenFileStore(path); err == nil {
			_ = store.Close()
			t.Errorf("%s: opened", name)
		}
	}
	path := filepath.Join(dir, "good.json")
	good := `{"version": 1, "payments": [{"payment_hash": "` + goodHash + `", "status": "paid", "preimage": "` +
		preimage.Hex() + `", "amount_msat": 21000, "fee_limit_msat": 0, "origin": "http://x:80", "scope": "path:/"}]}`
	if err := os.WriteFile(path, []byte(good), 0o600); err != nil {
		t.Fatal(err)
	}
	store := openStore(t, path)
	if p := store.Payments(); len(p) != 1 || p[0].Status != "paid" || p[0].PaymentHash != hash {
		t.Fatalf("%+v", p)
	}
}

// Budgets count what the file remembers: a restart does not reset the daily budget.
func TestBudgetsSurviveARestart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.json")
	tight := l402.Limits{MaxPriceSat: 100, MaxFeeSat: 0, DailyBudgetSat: 40}
	first := l402test.NewServer(l402test.Config{}, nil)
	defer first.Close()
	store := openStore(t, path)
	if resp, _ := get(t, client(l402.NewTransport(nil, first.Wallet(), tight, l402.WithStore(store))), first.URL+"/a"); resp.StatusCode != 200 {
		t.Fatal(resp.StatusCode)
	}
	_ = store.Close()
	second := l402test.NewServer(l402test.Config{}, nil)
	defer second.Close()
	store = openStore(t, path)
	resp, _ := get(t, client(l402.NewTransport(nil, second.Wallet(), tight, l402.WithStore(store))), second.URL+"/a")
	if r := l402.RefusalOf(resp); r == nil || r.Code != "budget_daily" || second.Stats().Paid != 0 {
		t.Fatalf("%+v", r)
	}
}

// A bare file name is a file in the working directory: the temporary file of each write is
// made next to it, so the rename is atomic, not in $TMPDIR (often another file system).
func TestFileStoreWithABareFileName(t *testing.T) {
	dir := t.TempDir()
	was, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chdir(dir); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Chdir(was) })
	t.Setenv("TMPDIR", filepath.Join(dir, "no-such-dir")) // a write through $TMPDIR fails
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	store := openStore(t, "client.json")
	resp, _ := get(t, client(l402.NewTransport(nil, server.Wallet(), limits, l402.WithStore(store))), server.URL+"/a")
	if resp.StatusCode != 200 {
		t.Fatalf("%d %+v", resp.StatusCode, l402.RefusalOf(resp))
	}
	if entries := readLedger(t, filepath.Join(dir, "client.json")); len(entries) != 1 || entries[0].Status != "paid" {
		t.Fatalf("%+v", entries)
	}
}

// A closed store writes nothing more: the file (and its lock) may belong to the next opener,
// whose ledger a late write of the old one would replace, pending payments included.
func TestClosedStoreNeverWritesOverTheNextOpener(t *testing.T) {
	path := filepath.Join(t.TempDir(), "client.json")
	server := l402test.NewServer(l402test.Config{}, nil)
	defer server.Close()
	first := openStore(t, path)
	old := client(l402.NewTransport(nil, server.Wallet(), limits, l402.WithStore(first)))
	if resp, _ := get(t, old, server.URL+"/a"); resp.StatusCode != 200 {
		t.Fatal(resp.StatusCode)
	}
	if err := first.Close(); err != nil {
		t.Fatal(err)
	}
	other := l402test.NewServer(l402test.Config{}, nil)
	defer other.Close()
	second := openStore(t, path)
	if resp, _ := get(t, client(l402.NewTransport(nil, other.Wallet(), limits, l402.WithStore(second))), other.URL+"/x"); resp.StatusCode != 200 {
		t.Fatal(resp.StatusCode)
	}
	// The server refuses the old transport's token, which it drops: a write it must not make
	// (nor may it pay: its store is closed).
	server.Revoke(first.Payments()[0].PaymentHash)
	if resp, _ := get(t, old, server.URL+"/a"); l402.RefusalOf(resp) == nil || server.Stats().Paid != 1 {
		t.Fatalf("%d %+v", resp.StatusCode, server.Stats())
	}
	if entries := readLedger(t, path); len(entries) != 2 {
		t.Fatalf("the closed store wrote over the file: %+v", entries)
	}
}
