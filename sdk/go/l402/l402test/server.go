// Package l402test is a toy L402 API and a wallet that pays it, for tests and examples of code
// that uses the l402 package. Its invoices carry no valid signature and its wallet moves no
// money: nothing here talks to Lightning.
package l402test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"time"

	"l402proxy/sdk/go/l402"
)

// Config describes what a Server charges.
type Config struct {
	// PriceSat is the price of a token (21 if 0).
	PriceSat int64
	// Service is written into every token as "services=<Service>:0" ("api" if empty); tokens
	// are per service, so every path of the server shares one.
	Service string
	// ValidFor adds "<Service>_valid_until" that far after minting; 0: tokens never expire.
	ValidFor time.Duration
	// InvoiceExpiry is how long an invoice may be paid (10 minutes if 0).
	InvoiceExpiry time.Duration
	// Network of the invoices (regtest if empty).
	Network string
	// Challenge writes the WWW-Authenticate lines for a macaroon and an invoice; default
	// Aperture's two lines, LSAT first.
	Challenge func(macaroon, invoice string) []string
}

// Server is a toy L402 API: a request without a valid token gets a 402 with a fresh invoice,
// one with a valid token reaches the handler. Wallet() pays its invoices.
type Server struct {
	*httptest.Server
	config  Config
	handler http.Handler
	rootKey []byte

	mu       sync.Mutex
	invoices map[[32]byte]*issued
	revoked  map[[32]byte]bool
	stats    Stats
}

type issued struct {
	preimage   l402.Preimage
	macaroon   []byte // decoded
	validUntil time.Time
	paid       bool
}

// Stats counts what the server saw.
type Stats struct {
	Requests   int // every request
	Challenges int // 402s and 401s sent, each with a fresh invoice
	Granted    int // requests a token let through
	Rejected   int // requests whose token was refused
	Paid       int // invoices paid by Wallet()
	// Authorizations are the Authorization values received, in order.
	Authorizations []string
}

// NewServer starts a Server in front of handler (a handler answering "paid" if nil). Close it
// when done.
func NewServer(config Config, handler http.Handler) *Server {
	if config.PriceSat == 0 {
		config.PriceSat = 21
	}
	if config.Service == "" {
		config.Service = "api"
	}
	if config.InvoiceExpiry == 0 {
		config.InvoiceExpiry = 10 * time.Minute
	}
	if config.Network == "" {
		config.Network = "regtest"
	}
	if config.Challenge == nil {
		config.Challenge = func(macaroon, invoice string) []string {
			return []string{
				fmt.Sprintf("LSAT macaroon=%q, invoice=%q", macaroon, invoice),
				fmt.Sprintf("L402 macaroon=%q, invoice=%q", macaroon, invoice),
			}
		}
	}
	if handler == nil {
		handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = w.Write([]byte("paid"))
		})
	}
	key := random32()
	s := &Server{
		config:   config,
		handler:  handler,
		rootKey:  key[:],
		invoices: map[[32]byte]*issued{},
		revoked:  map[[32]byte]bool{},
	}
	s.Server = httptest.NewServer(http.HandlerFunc(s.serve))
	return s
}

func random32() [32]byte {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err)
	}
	return b
}

// Stats returns what the server saw so far.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	stats := s.stats
	stats.Authorizations = append([]string(nil), s.stats.Authorizations...)
	return stats
}

// Revoke makes the server answer 401 to the token of paymentHash from now on.
func (s *Server) Revoke(paymentHash [32]byte) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.revoked[paymentHash] = true
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	authorization := r.Header.Get("Authorization")
	s.mu.Lock()
	s.stats.Requests++
	if authorization != "" {
		s.stats.Authorizations = append(s.stats.Authorizations, authorization)
	}
	s.mu.Unlock()
	status := http.StatusPaymentRequired
	if authorization != "" {
		status = s.check(authorization)
		s.mu.Lock()
		if status == http.StatusOK {
			s.stats.Granted++
		} else {
			s.stats.Rejected++
		}
		s.mu.Unlock()
		if status == http.StatusOK {
			s.handler.ServeHTTP(w, r)
			return
		}
	}
	macaroon, invoice := s.mint()
	for _, line := range s.config.Challenge(macaroon, invoice) {
		w.Header().Add("WWW-Authenticate", line)
	}
	w.Header().Set("Cache-Control", "no-store")
	s.mu.Lock()
	s.stats.Challenges++
	s.mu.Unlock()
	w.WriteHeader(status)
	_, _ = w.Write([]byte("payment required\n"))
}

// mint makes a fresh invoice and the macaroon that names its payment hash.
func (s *Server) mint() (string, string) {
	preimage := l402.Preimage(random32())
	hash := preimage.Hash()
	now := time.Now()
	caveats := []string{"services=" + s.config.Service + ":0"}
	var validUntil time.Time
	if s.config.ValidFor > 0 {
		validUntil = now.Add(s.config.ValidFor)
		caveats = append(caveats, s.config.Service+"_valid_until="+strconv.FormatInt(validUntil.Unix(), 10))
	}
	macaroon := Macaroon(s.rootKey, hash, random32(), caveats...)
	invoice := Invoice(InvoiceParams{
		Network:     s.config.Network,
		PaymentHash: hash,
		AmountMsat:  s.config.PriceSat * 1000,
		CreatedAt:   now,
		Expiry:      s.config.InvoiceExpiry,
		Description: s.config.Service,
	})
	raw, _ := base64.StdEncoding.DecodeString(macaroon)
	s.mu.Lock()
	s.invoices[hash] = &issued{preimage: preimage, macaroon: raw, validUntil: validUntil}
	s.mu.Unlock()
	return macaroon, invoice
}

func decodeAny(text string) ([]byte, error) {
	text = strings.NewReplacer("-", "+", "_", "/").Replace(strings.TrimRight(strings.TrimSpace(text), "="))
	return base64.RawStdEncoding.DecodeString(text)
}

// check: 200 for a token this server minted, paid and not expired; 401 for a forged, garbled
// or revoked one; 402 for an expired one (as the l402proxy server answers).
func (s *Server) check(authorization string) int {
	scheme, rest, _ := strings.Cut(strings.TrimSpace(authorization), " ")
	if upper := strings.ToUpper(scheme); upper != "L402" && upper != "LSAT" {
		return http.StatusUnauthorized
	}
	i := strings.LastIndexByte(rest, ':')
	if i < 0 {
		return http.StatusUnauthorized
	}
	raw, err := decodeAny(rest[:i])
	if err != nil {
		return http.StatusUnauthorized
	}
	info, err := l402.InspectMacaroon(rest[:i])
	if err != nil {
		return http.StatusUnauthorized
	}
	secret, err := hex.DecodeString(strings.TrimSpace(rest[i+1:]))
	if err != nil || len(secret) != 32 {
		return http.StatusUnauthorized
	}
	var preimage l402.Preimage
	copy(preimage[:], secret)
	hash := info.Identifier.PaymentHash
	s.mu.Lock()
	defer s.mu.Unlock()
	token := s.invoices[hash]
	switch {
	case token == nil || string(token.macaroon) != string(raw) || preimage.Hash() != hash || s.revoked[hash]:
		return http.StatusUnauthorized
	case !token.validUntil.IsZero() && !time.Now().Before(token.validUntil):
		return http.StatusPaymentRequired
	}
	return http.StatusOK
}

// Wallet pays the invoices of the server it came from. Before and After let a test make it
// misbehave.
type Wallet struct {
	server *Server
	// Before, if set, runs before each payment; an error stops it: nothing is paid.
	Before func(ctx context.Context, bolt11 string) error
	// After, if set, runs once a payment is made; an error replaces the answer (the payment
	// stays made), like a wallet whose answer got lost.
	After func(bolt11 string) error
}

// Wallet returns a wallet that pays this server's invoices.
func (s *Server) Wallet() *Wallet { return &Wallet{server: s} }

// Pay pays an invoice of the server; it fails (l402.ErrPaymentFailed) for any other invoice,
// and for one paid already.
func (w *Wallet) Pay(ctx context.Context, bolt11 string, maxFeeSat int64) (l402.Preimage, error) {
	if w.Before != nil {
		if err := w.Before(ctx, bolt11); err != nil {
			return l402.Preimage{}, err
		}
	}
	invoice, err := l402.DecodeInvoice(bolt11)
	if err != nil {
		return l402.Preimage{}, fmt.Errorf("l402test: %w: %v", l402.ErrPaymentFailed, err)
	}
	s := w.server
	s.mu.Lock()
	token := s.invoices[invoice.PaymentHash]
	if token == nil || token.paid {
		s.mu.Unlock()
		return l402.Preimage{}, fmt.Errorf("l402test: %w: unknown or already paid invoice", l402.ErrPaymentFailed)
	}
	token.paid = true
	s.stats.Paid++
	preimage := token.preimage
	s.mu.Unlock()
	if w.After != nil {
		if err := w.After(bolt11); err != nil {
			return l402.Preimage{}, err
		}
	}
	return preimage, nil
}

// Lookup says whether the server's invoice of paymentHash was paid.
func (w *Wallet) Lookup(ctx context.Context, paymentHash [32]byte) (l402.PaymentState, error) {
	s := w.server
	s.mu.Lock()
	defer s.mu.Unlock()
	if token := s.invoices[paymentHash]; token != nil && token.paid {
		return l402.PaymentState{Status: l402.StatusSucceeded, Preimage: token.preimage}, nil
	}
	return l402.PaymentState{Status: l402.StatusNotFound}, nil
}

// Network is the network of the server's invoices.
func (w *Wallet) Network(context.Context) (string, error) { return w.server.config.Network, nil }

// Identity names the wallet after its server.
func (w *Wallet) Identity() string { return "l402test:" + w.server.URL }

var _ l402.NetworkWallet = (*Wallet)(nil)
var _ l402.IdentifiedWallet = (*Wallet)(nil)

// ErrDown is what a wallet that cannot be reached might answer (not a definite failure).
var ErrDown = errors.New("l402test: wallet unreachable")

// Sha256 is a convenience for tests: sha256 of data as a payment hash.
func Sha256(data []byte) [32]byte { return sha256.Sum256(data) }
