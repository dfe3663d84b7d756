package l402

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strings"
)

// DevWallet pays from a wallet of l402proxy's embedded dev ledger: a fake Lightning node in one
// SQLite file, with regtest invoices and no real bitcoin. It is for examples and tests only,
// next to a server proxy started with the dev backend on the same ledger file.
//
// The ledger is SQLite, which the Go standard library cannot open, so each call runs the
// l402proxy Python package (the same DevLedger class the proxies use) in a short-lived
// process: Python must be an interpreter that can import l402proxy (the repository's .venv).
type DevWallet struct {
	// Python is the interpreter to run ("python3" if empty).
	Python string
	// Ledger is the dev ledger file (l402_dev_ledger of the server proxy).
	Ledger string
	// Wallet is the dev wallet to pay from ("listener" if empty, as the client proxy's default).
	Wallet string
}

// devScript runs one DevLedger call and prints its outcome as JSON. A PaymentFailed is a final
// failure ({"status": "failed"}); any other error exits non-zero: the outcome is not known.
const devScript = `
import asyncio, json, sys
from l402proxy.lightning.base import LightningError, PaymentFailed
from l402proxy.lightning.dev import DevLedger

async def main(op, path, wallet, arg, fee="0"):
    ledger = DevLedger(path)
    try:
        if op == "pay":
            try:
                result = await ledger.pay(wallet, arg, int(fee))
            except PaymentFailed as exc:
                return {"status": "failed", "error": str(exc)}
            return {"status": "succeeded", "preimage": result.preimage.hex()}
        state = await ledger.lookup_payment(wallet, bytes.fromhex(arg))
        preimage = state.preimage.hex() if state.preimage else None
        return {"status": state.status, "preimage": preimage}
    finally:
        await ledger.close()

try:
    print(json.dumps(asyncio.run(main(*sys.argv[1:]))))
except LightningError as exc:
    sys.exit(f"dev ledger: {exc}")
`

func (w *DevWallet) wallet() string {
	if w.Wallet == "" {
		return "listener"
	}
	return w.Wallet
}

type devAnswer struct {
	Status   string  `json:"status"`
	Preimage *string `json:"preimage"`
	Error    string  `json:"error"`
}

func (w *DevWallet) run(ctx context.Context, args ...string) (*devAnswer, error) {
	if w.Ledger == "" {
		return nil, errors.New("dev wallet: no Ledger file given")
	}
	python := w.Python
	if python == "" {
		python = "python3"
	}
	cmd := exec.CommandContext(ctx, python, append([]string{"-c", devScript, args[0], w.Ledger, w.wallet()}, args[1:]...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
		return nil, fmt.Errorf("dev wallet (%s): %v: %s", w.Ledger, err, lines[len(lines)-1])
	}
	var answer devAnswer
	if err := json.Unmarshal(stdout.Bytes(), &answer); err != nil {
		return nil, fmt.Errorf("dev wallet (%s): unreadable answer: %v", w.Ledger, err)
	}
	return &answer, nil
}

func (w *DevWallet) preimage(answer *devAnswer) (Preimage, error) {
	var p Preimage
	if answer.Preimage == nil {
		return p, errors.New("dev wallet: succeeded without a preimage")
	}
	raw, err := hex.DecodeString(*answer.Preimage)
	if err != nil || len(raw) != 32 {
		return p, errors.New("dev wallet: the preimage is not 32 bytes of hex")
	}
	copy(p[:], raw)
	return p, nil
}

// Pay pays bolt11 from the dev wallet; the dev ledger charges no fee.
func (w *DevWallet) Pay(ctx context.Context, bolt11 string, maxFeeSat int64) (Preimage, error) {
	answer, err := w.run(ctx, "pay", bolt11, fmt.Sprint(maxFeeSat*1000))
	if err != nil {
		return Preimage{}, err
	}
	switch answer.Status {
	case "succeeded":
		return w.preimage(answer)
	case "failed":
		return Preimage{}, fmt.Errorf("dev wallet: %w: %s", ErrPaymentFailed, answer.Error)
	}
	return Preimage{}, fmt.Errorf("dev wallet: unexpected status %q", answer.Status)
}

// Lookup asks the dev ledger what became of the wallet's payment of paymentHash. The ledger
// pays in one transaction, so "never attempted" is final.
func (w *DevWallet) Lookup(ctx context.Context, paymentHash [32]byte) (PaymentState, error) {
	answer, err := w.run(ctx, "lookup", hex.EncodeToString(paymentHash[:]))
	if err != nil {
		return PaymentState{}, err
	}
	switch answer.Status {
	case "succeeded":
		p, err := w.preimage(answer)
		return PaymentState{Status: StatusSucceeded, Preimage: p}, err
	case "failed":
		return PaymentState{Status: StatusFailed}, nil
	case "pending":
		return PaymentState{Status: StatusInFlight}, nil
	case "unknown":
		return PaymentState{Status: StatusNotFound}, nil
	}
	return PaymentState{}, fmt.Errorf("dev wallet: unexpected status %q", answer.Status)
}

// Network is regtest: the dev ledger's invoices can never be mistaken for real money.
func (w *DevWallet) Network(context.Context) (string, error) { return "regtest", nil }

// Identity names the wallet and its ledger file, as the Python dev wallet does.
func (w *DevWallet) Identity() string {
	path, err := filepath.Abs(w.Ledger)
	if err != nil {
		path = w.Ledger
	}
	return "dev:" + w.wallet() + "@" + path
}
