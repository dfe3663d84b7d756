package l402

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
)

// Preimage is the 32-byte secret a paid invoice reveals: sha256(preimage) is its payment hash,
// and together with the macaroon it is the token (a bearer secret: never log it).
type Preimage [32]byte

// Hex is the preimage as 64 lower-case hex characters, as an Authorization header carries it.
func (p Preimage) Hex() string { return hex.EncodeToString(p[:]) }

// Hash is sha256(preimage): the payment hash it proves was paid.
func (p Preimage) Hash() [32]byte { return sha256.Sum256(p[:]) }

// String never shows the secret, so a preimage that ends up in a log line leaks nothing.
func (p Preimage) String() string { return "Preimage(***)" }

// GoString hides the secret from %#v too.
func (p Preimage) GoString() string { return "l402.Preimage(***)" }

// ErrPaymentFailed marks a payment the wallet knows did not and will not happen (no route, no
// balance, refused invoice): the reservation is released and the scope may be paid again.
// A wallet wraps it (fmt.Errorf("...: %w", l402.ErrPaymentFailed)) only when it is sure; any
// other error leaves the payment pending, to be settled by Wallet.Lookup before that scope
// is paid again.
var ErrPaymentFailed = errors.New("payment failed")

// PaymentStatus is what a wallet knows of a payment it was asked about.
type PaymentStatus int

const (
	// StatusNotFound: the wallet never sent this payment, and never will (it was not
	// reached, or refused before sending). The payment is released.
	StatusNotFound PaymentStatus = iota
	// StatusInFlight: the payment is still under way; the scope stays blocked.
	StatusInFlight
	// StatusSucceeded: paid; the preimage comes with it.
	StatusSucceeded
	// StatusFailed: it failed for good; the payment is released.
	StatusFailed
)

func (s PaymentStatus) String() string {
	switch s {
	case StatusNotFound:
		return "not_found"
	case StatusInFlight:
		return "in_flight"
	case StatusSucceeded:
		return "succeeded"
	case StatusFailed:
		return "failed"
	}
	return fmt.Sprintf("PaymentStatus(%d)", int(s))
}

// PaymentState is a wallet's answer to Lookup.
type PaymentState struct {
	Status PaymentStatus
	// Preimage is set when Status is StatusSucceeded.
	Preimage Preimage
}

// Wallet pays invoices. Implementations must be safe for concurrent use.
//
// Pay pays a BOLT11 invoice with at most maxFeeSat in routing fees and returns the preimage.
// Its error wraps ErrPaymentFailed only when nothing was paid and nothing will be; any other
// error means "not known", and the payment is asked about again with Lookup.
//
// Lookup says what became of the payment of paymentHash; StatusNotFound only when the wallet
// is sure it never sent it. An error means the wallet cannot tell now.
type Wallet interface {
	Pay(ctx context.Context, bolt11 string, maxFeeSat int64) (Preimage, error)
	Lookup(ctx context.Context, paymentHash [32]byte) (PaymentState, error)
}

// NetworkWallet is a Wallet that can say which Bitcoin network it pays on ("mainnet",
// "testnet", "signet", "regtest"). The transport then refuses invoices for another network
// (wrong_network) instead of leaving that to the wallet.
type NetworkWallet interface {
	Wallet
	Network(ctx context.Context) (string, error)
}

// IdentifiedWallet is a Wallet that names itself precisely enough to be found again after a
// restart ("lnd:host:port"). A file store records it with each payment, and a pending payment
// made by another wallet is never resolved by asking this one (which would wrongly say "never
// sent").
type IdentifiedWallet interface {
	Wallet
	Identity() string
}

func walletIdentity(w Wallet) string {
	if named, ok := w.(IdentifiedWallet); ok {
		return named.Identity()
	}
	return ""
}
