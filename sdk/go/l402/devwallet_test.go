package l402

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// devInvoice has the dev ledger issue an invoice to its "merchant" wallet (as the server proxy's
// dev backend does) and returns it.
func devInvoice(t *testing.T, python, ledger string, amountMsat int) string {
	t.Helper()
	script := `
import asyncio, sys
from l402proxy.lightning.dev import DevLedger
async def main():
    ledger = DevLedger(sys.argv[1])
    try:
        print((await ledger.create_invoice("merchant", int(sys.argv[2]), "go test", 600)).bolt11)
    finally:
        await ledger.close()
asyncio.run(main())
`
	out, err := exec.Command(python, "-c", script, ledger, strconv.Itoa(amountMsat)).Output()
	if err != nil {
		t.Fatalf("create_invoice: %v", err)
	}
	return strings.TrimSpace(string(out))
}

func TestDevWalletPaysTheDevLedger(t *testing.T) {
	python := pythonWithL402proxy(t)
	ledger := filepath.Join(t.TempDir(), "devledger.sqlite")
	wallet := &DevWallet{Python: python, Ledger: ledger}
	ctx := context.Background()
	bolt11 := devInvoice(t, python, ledger, 21000)
	invoice, err := DecodeInvoice(bolt11)
	if err != nil || invoice.Network != "regtest" || invoice.AmountMsat != 21000 {
		t.Fatalf("%+v %v", invoice, err)
	}
	preimage, err := wallet.Pay(ctx, bolt11, 0)
	if err != nil || preimage.Hash() != invoice.PaymentHash {
		t.Fatalf("pay: %v", err)
	}
	if state, err := wallet.Lookup(ctx, invoice.PaymentHash); err != nil || state.Status != StatusSucceeded || state.Preimage != preimage {
		t.Fatalf("lookup: %+v %v", state, err)
	}
	if state, err := wallet.Lookup(ctx, [32]byte{1}); err != nil || state.Status != StatusNotFound {
		t.Fatalf("unknown: %+v %v", state, err)
	}
	if _, err := wallet.Pay(ctx, bolt11, 0); !errors.Is(err, ErrPaymentFailed) || !strings.Contains(err.Error(), "already paid") {
		t.Fatalf("paid twice: %v", err)
	}
	if _, err := wallet.Pay(ctx, "lnbcrt1garbage", 0); !errors.Is(err, ErrPaymentFailed) {
		t.Fatalf("garbage: %v", err)
	}
	if network, _ := wallet.Network(ctx); network != "regtest" {
		t.Fatal(network)
	}
	if !strings.HasPrefix(wallet.Identity(), "dev:listener@/") {
		t.Fatal(wallet.Identity())
	}
	// An interpreter without l402proxy: an error, not a definite failure (nothing known).
	broken := &DevWallet{Python: "/nonexistent/python", Ledger: ledger}
	if _, err := broken.Pay(ctx, bolt11, 0); err == nil || errors.Is(err, ErrPaymentFailed) {
		t.Fatalf("broken: %v", err)
	}
	if _, err := (&DevWallet{Python: python}).Pay(ctx, bolt11, 0); err == nil {
		t.Fatal("no ledger")
	}
}
