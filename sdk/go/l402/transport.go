package l402

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"math"
	"net/http"
	"strings"
	"sync"
	"time"
)

const (
	// HeaderPaid is added to a response the transport paid for: "21 sat (fee at most 10 sat)
	// for podcast". Only the request that paid gets it; one that reused a token does not. A
	// request refused after it paid (its token refused, or a second payment it needed refused)
	// gets it beside HeaderRefused; one that paid twice says the sum.
	HeaderPaid = "X-L402-Paid"
	// HeaderRefused is added to a 402 (or 401) the transport did not pay: "<code>; <message>",
	// the code one of the refusal codes listed at Refusal.
	HeaderRefused = "X-L402-Refused"

	// DefaultPayTimeout bounds one payment, as the Python client's pay_timeout (60 s).
	DefaultPayTimeout = 60 * time.Second
	// DefaultLookupTimeout bounds asking the wallet about a pending payment.
	DefaultLookupTimeout = 30 * time.Second
	// DefaultMaxBufferedBody is how much of a request body without GetBody the transport
	// reads into memory so it can send it again after paying.
	DefaultMaxBufferedBody = 32 << 20

	// balanceWarningEvery: a malformed X-L402-Balance is logged at most this often per origin.
	balanceWarningEvery = time.Minute
	// memoryLimit bounds bookkeeping anyone can grow (a server answering with new tokens);
	// forgetting it costs a round trip, never a payment.
	memoryLimit = 10000
)

// Refusal says why the transport did not pay a challenge. Code is one of: not_allowed,
// max_price, budget_daily, budget_total, no_amount, hash_mismatch, invoice_expired,
// bad_challenge, payment_failed, payment_pending, rejected_after_payment, wrong_network
// (the Python client's codes). Message is for people.
type Refusal struct {
	Code    string
	Message string
}

func (r *Refusal) Error() string { return "l402: not paid: " + r.Code + ": " + r.Message }

func (r *Refusal) header() string { return headerSafe(r.Code + "; " + r.Message) }

// RefusalOf returns the refusal the transport attached to resp (X-L402-Refused), or nil.
func RefusalOf(resp *http.Response) *Refusal {
	if resp == nil {
		return nil
	}
	value := resp.Header.Get(HeaderRefused)
	if value == "" {
		return nil
	}
	code, message, _ := strings.Cut(value, ";")
	return &Refusal{strings.TrimSpace(code), strings.TrimSpace(message)}
}

// Option configures a Transport.
type Option func(*Transport)

// WithStore keeps payments and tokens in store (see OpenFileStore) instead of a memory store of
// the transport's own. Several transports may share one store.
func WithStore(store *Store) Option { return func(t *Transport) { t.store = store } }

// WithPayTimeout bounds each payment (DefaultPayTimeout). A payment that takes longer stays
// pending, and is asked about again before its scope is paid again.
func WithPayTimeout(d time.Duration) Option { return func(t *Transport) { t.payTimeout = d } }

// WithLookupTimeout bounds asking the wallet about a pending payment (DefaultLookupTimeout).
func WithLookupTimeout(d time.Duration) Option { return func(t *Transport) { t.lookupTimeout = d } }

// WithMaxBufferedBody sets how much of a body without GetBody may be read into memory
// (DefaultMaxBufferedBody); a larger one fails the request before anything is sent.
func WithMaxBufferedBody(n int64) Option { return func(t *Transport) { t.maxBufferedBody = n } }

// WithLogger logs payments, refusals and recoveries (never a preimage or a credential).
func WithLogger(logger *log.Logger) Option { return func(t *Transport) { t.logger = logger } }

// WithClock replaces time.Now (for tests).
func WithClock(now func() time.Time) Option { return func(t *Transport) { t.now = now } }

// Transport is an http.RoundTripper that pays L402 (and LSAT) challenges from a Wallet within
// Limits, keeps the tokens it bought, and sends the request again with the token.
//
// Every request to an allowed host says `Accept-Authenticate: L402` and carries the token of
// its scope when one is known (the server's services= caveat, else the directory). A 402 with a
// challenge is checked before anything is paid: the invoice's payment hash must be the one
// the macaroon names, the invoice must carry an amount, not be expired, be for the wallet's
// network, ask at most MaxPriceSat, and fit the daily and total budgets; the host must be
// allowed. Concurrent requests for one scope share one payment. A refused challenge comes back
// as the server's response with an X-L402-Refused header; a paid one as the retried response
// with X-L402-Paid. Payment is made only on 402, never on 401: a 401 to a token drops it.
//
// Bundles and single use: every answer's X-L402-Balance is noted for the token the request
// carried; a token with 0 left is spent and never sent again, so the next request meets the
// 402 and pays within the Limits (a malformed value is ignored and logged). Passes: when a 402
// names services a live token held for the same origin names too, that token is tried once
// before paying; refused, it is not tried for those services again.
//
// Requests at once: those that meet a 402 for one scope together share one payment and all
// retry with its token, which a bundle (a single-use token above all) may not last. A request
// whose token bought for it the server then calls spent (X-L402-Balance: 0) while another
// request that carried it too was granted with it lost a race among our own requests, not a
// refusal: it pays once more, within the Limits, for itself alone (a token no other request is
// given before it has used it). It waits for the answers of the others that carried the token,
// at most the pay timeout: none granted, "spent" is the server's refusal, so a server calling
// every token spent takes at most one payment per request. At most two payments per request,
// and only in that race.
type Transport struct {
	base            http.RoundTripper
	wallet          Wallet
	limits          Limits
	hosts           []hostPattern
	config          error
	store           *Store
	payTimeout      time.Duration
	lookupTimeout   time.Duration
	maxBufferedBody int64
	logger          *log.Logger
	now             func() time.Time

	startOnce sync.Once
	started   chan struct{} // closed when the recovery at start is over
	mu        sync.Mutex
	flights   map[string]*flight
	network   string
	// aliases: scope key -> the pass tried and taken for that scope, sent up front there.
	aliases map[string][32]byte
	// passesRefused: scope key -> passes the server refused there; not tried there again.
	passesRefused map[string]map[[32]byte]bool
	refusedCount  int
	// balanceWarned: origin -> when a malformed X-L402-Balance from it was last logged.
	balanceWarned map[string]time.Time
}

// NewTransport wraps base (http.DefaultTransport if nil). Bad limits, or a nil wallet, make
// every request fail with an error saying what is wrong: nothing is ever paid with them.
func NewTransport(base http.RoundTripper, wallet Wallet, limits Limits, options ...Option) *Transport {
	t := &Transport{
		base:            base,
		wallet:          wallet,
		limits:          limits,
		payTimeout:      DefaultPayTimeout,
		lookupTimeout:   DefaultLookupTimeout,
		maxBufferedBody: DefaultMaxBufferedBody,
		now:             time.Now,
		flights:         map[string]*flight{},
		aliases:         map[string][32]byte{},
		passesRefused:   map[string]map[[32]byte]bool{},
		balanceWarned:   map[string]time.Time{},
	}
	if t.base == nil {
		t.base = http.DefaultTransport
	}
	limits.Allow = append([]string(nil), limits.Allow...)
	t.limits = limits
	for _, option := range options {
		option(t)
	}
	if t.store == nil {
		t.store = NewMemoryStore()
	}
	switch {
	case wallet == nil:
		t.config = errors.New("l402: NewTransport needs a wallet")
	case t.payTimeout <= 0 || t.lookupTimeout <= 0 || t.maxBufferedBody < 0:
		t.config = errors.New("l402: timeouts must be positive and the body limit not negative")
	default:
		if t.config = limits.Validate(); t.config == nil {
			t.hosts, _ = parseHostPatterns(limits.Allow)
		}
	}
	return t
}

func (t *Transport) logf(format string, args ...interface{}) {
	if t.logger != nil {
		t.logger.Printf("l402: "+format, args...)
	}
}

// token is a paid token as it is sent.
type token struct {
	origin, scope string
	services      []string
	hash          [32]byte
	credential    string
}

func (k *token) label() string {
	if len(k.services) > 0 {
		return strings.Join(k.services, ",")
	}
	return k.scope
}

func tokenOf(r *record) *token {
	credential, err := FormatCredential(r.Scheme, r.Macaroon, r.preimage)
	if err != nil {
		return nil // never stored: the challenge's scheme and macaroon were read before paying
	}
	return &token{r.Origin, r.Scope, r.Services, r.hash, credential}
}

// outcome of a challenge: a token to retry with (paidHere: bought for this request; borrowed:
// a pass held for other services too; waited: bought by another request while this one waited
// for that payment), or why not.
type outcome struct {
	token        *token
	amountMsat   int64
	feeLimitMsat int64
	paidHere     bool
	borrowed     bool
	waited       bool
	refusal      *Refusal
}

func refused(code, format string, args ...interface{}) *outcome {
	return &outcome{refusal: &Refusal{code, fmt.Sprintf(format, args...)}}
}

type flight struct {
	done    chan struct{}
	outcome *outcome
}

// start settles, once, what a crash (or a wallet that could not answer) left pending. The
// recovery runs on its own, bounded by the lookup timeout; a request waits for it only as
// long as its context lets it (skipping the wait is safe: a pending payment's scope is never
// paid again before it is settled).
func (t *Transport) start(ctx context.Context) error {
	t.startOnce.Do(func() {
		t.started = make(chan struct{})
		go func() {
			defer close(t.started)
			ctx, cancel := context.WithTimeout(context.Background(), t.lookupTimeout)
			defer cancel()
			t.recover(ctx, nil)
		}()
	})
	select {
	case <-t.started:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Recover asks the wallet about every pending payment no transport is paying now: succeeded,
// the token is stored; failed, or never sent, it is released; still in flight, or the wallet
// cannot tell, it stays pending and its scope is not paid again. The first request does this
// by itself; call Recover to do it earlier or again. It returns how many were settled either way.
func (t *Transport) Recover(ctx context.Context) int {
	if t.config != nil {
		return 0
	}
	return t.recover(ctx, nil)
}

func (t *Transport) recover(ctx context.Context, only func(*record) bool) int {
	identity := walletIdentity(t.wallet)
	settled := 0
	claimed := t.store.claimPending(func(r *record) bool {
		if only != nil && !only(r) {
			return false
		}
		if r.Wallet != identity {
			// Another wallet may have paid it: asking this one would wrongly say "never sent".
			t.logf("payment %s (%s) was made with wallet %q; use that wallet to settle it", r.PaymentHash, r.URL, r.Wallet)
			return false
		}
		return true
	})
	for _, r := range claimed {
		state, err := t.wallet.Lookup(ctx, r.hash)
		now := t.now()
		switch {
		case err != nil:
			t.store.release(r.hash)
			t.logf("payment %s is still unresolved: cannot ask the wallet (%v)", r.PaymentHash, err)
		case state.Status == StatusSucceeded:
			if state.Preimage.Hash() != r.hash {
				t.store.release(r.hash)
				t.logf("the wallet says payment %s succeeded with a preimage that does not match; left pending", r.PaymentHash)
				continue
			}
			if _, err := t.store.settle(r.hash, state.Preimage, now); err != nil {
				t.logf("%v", err)
			}
			if target, ok := parseTarget(r.URL); ok {
				t.learn(target, r.Scope)
			}
			settled++
			t.logf("recovered the token of an interrupted payment: %s sat to %s (%s)", satText(r.AmountMsat), r.Origin, r.URL)
		case state.Status == StatusFailed || state.Status == StatusNotFound:
			why := "the payment failed"
			if state.Status == StatusNotFound {
				why = "the payment was never sent"
			}
			if err := t.store.fail(r.hash, why, now); err != nil {
				t.logf("cannot write to the store: %v", err)
			}
			settled++
			t.logf("interrupted payment %s: %s", r.PaymentHash, why)
		default:
			t.store.release(r.hash)
		}
	}
	return settled
}

// RoundTrip sends req, paying an L402 challenge if it gets one (see Transport).
func (t *Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	if t.config != nil {
		closeBody(req)
		return nil, t.config
	}
	target, ok := splitURL(req.URL)
	if !ok {
		return t.base.RoundTrip(req)
	}
	ctx := req.Context()
	if err := t.start(ctx); err != nil {
		closeBody(req)
		return nil, err
	}
	body, err := newReplay(req, t.maxBufferedBody)
	if err != nil {
		return nil, err
	}
	out := req.Clone(ctx)
	out.Body, out.GetBody = body.first, body.getBody
	var sent *token
	if hostAllowed(t.hosts, target.host, target.port) {
		if out.Header.Get("Accept-Authenticate") == "" {
			out.Header.Set("Accept-Authenticate", "L402")
		}
		if out.Header.Get("Authorization") == "" { // the caller's own credentials win
			t.waitForFlight(ctx, target)
			if sent = t.tokenFor(target); sent != nil {
				t.store.carry(sent.hash)
				out.Header.Set("Authorization", sent.credential)
			}
		}
	}
	resp, err := t.base.RoundTrip(out)
	if err != nil {
		if sent != nil {
			t.store.answered(sent.hash, false) // gone without an answer: nobody waits for it
		}
		return resp, err
	}
	if resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusPaymentRequired {
		if sent != nil {
			// Granted with it: a request of ours that lost this token to this one (a bundle
			// too small for both) may pay once more, alone.
			t.store.answered(sent.hash, true)
			t.noteBalance(sent, resp, target)
		}
		return resp, nil
	}
	if sent != nil {
		t.store.answered(sent.hash, false) // a 401 or 402: not granted
	}
	return t.exchange(ctx, out, body, target, resp, sent)
}

// noteBalance records what an answer to a request that carried tok says is left of it. 0: the
// token is spent, never sent again; noteBalance then returns true. A malformed X-L402-Balance
// (or a 402 saying more than 0 is left) is ignored and logged once a minute per origin: it
// neither makes the transport pay nor stops it using the token.
func (t *Transport) noteBalance(tok *token, resp *http.Response, target target) bool {
	values := resp.Header.Values(HeaderBalance)
	if len(values) == 0 || resp.StatusCode == http.StatusUnauthorized {
		return false // a 401 says the token is invalid: dropped, whatever it had left
	}
	balance, err := ParseBalance(values)
	if err == nil && resp.StatusCode == http.StatusPaymentRequired && balance.Remaining > 0 {
		err = fmt.Errorf("a 402 says %s are left; a 402 grants nothing", balance)
	}
	if err != nil {
		t.warnBalance(target.origin, fmt.Sprintf("ignored from %s%s: %v", target.origin, target.path, err))
		return false
	}
	spent, err := t.store.noteBalance(tok.hash, *balance, t.now())
	if err != nil {
		t.logf("cannot write to the store: %v", err)
	}
	if spent {
		t.forgetAliases(tok.hash)
		t.logf("the token for %s %s is used up (0 %s left); the next request there pays again",
			tok.origin, tok.label(), balance.Unit)
	}
	return balance.Remaining == 0
}

func (t *Transport) warnBalance(origin, message string) {
	now := t.now()
	t.mu.Lock()
	last, seen := t.balanceWarned[origin]
	quiet := seen && now.Sub(last) < balanceWarningEvery
	if !quiet {
		if len(t.balanceWarned) >= memoryLimit {
			t.balanceWarned = map[string]time.Time{}
		}
		t.balanceWarned[origin] = now
	}
	t.mu.Unlock()
	if !quiet {
		t.logf("%s", message)
	}
}

// forgetAliases: a token no longer sent (dropped, spent) is not sent for a pass's scopes either.
func (t *Transport) forgetAliases(hash [32]byte) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for key, held := range t.aliases {
		if held == hash {
			delete(t.aliases, key)
		}
	}
}

// refusePass: the server refused the pass tok for the scope key; it is not tried there again.
func (t *Transport) refusePass(tok *token, key string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.refusedCount >= memoryLimit {
		t.passesRefused, t.refusedCount = map[string]map[[32]byte]bool{}, 0
	}
	refused := t.passesRefused[key]
	if refused == nil {
		refused = map[[32]byte]bool{}
		t.passesRefused[key] = refused
	}
	if !refused[tok.hash] {
		refused[tok.hash] = true
		t.refusedCount++
		origin, scope, _ := strings.Cut(key, "\x00")
		t.logf("%s refused the token for %s for %s; not trying it there again", origin, tok.label(), scope)
	}
	if held, ok := t.aliases[key]; ok && held == tok.hash {
		delete(t.aliases, key)
	}
}

// refusedPasses are the passes refused for the scope key (taken under t.mu, so that the store's
// lock is never waited for while holding it).
func (t *Transport) refusedPasses(key string) map[[32]byte]bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := map[[32]byte]bool{}
	for hash := range t.passesRefused[key] {
		out[hash] = true
	}
	return out
}

// overlaps: the token names one of services.
func (k *token) overlaps(services []string) bool {
	for _, held := range k.services {
		for _, s := range services {
			if held == s {
				return true
			}
		}
	}
	return false
}

// turnedDown: the server answered 401 to tok. A pass tried for another scope is not tried
// there again; any other token is dropped.
func (t *Transport) turnedDown(tok *token, values []string, target target) {
	offer, _ := pickChallenge(values, target.path)
	if offer != nil && tok.origin == target.origin && offer.scope != tok.scope && tok.overlaps(offer.info.Services) {
		t.refusePass(tok, scopeKey(target.origin, offer.scope))
		return
	}
	t.drop(tok, "the server answered 401 (invalid token)")
}

// exchange follows a 401 or 402: at most one payment per request. A token held from before
// that the server refuses is dropped and paid afresh once; a token just bought that it refuses
// is not paid again. A pass is tried at most once per request, before paying; refused, it is
// not tried for that scope again. Every answer's X-L402-Balance is noted for the token sent.
//
// One exception, a race among our own requests: a token bought for this request (by it, or by
// another it waited for) that the server answers with a 402 saying it is spent, while another
// request that carried it too was granted with it, was used up by them, not refused: this
// request pays once more, alone, within the same Limits. Whatever happens to that token,
// nothing more is paid for it. A refused request that paid says so too (X-L402-Paid beside
// X-L402-Refused): its payments summed.
func (t *Transport) exchange(ctx context.Context, sentReq *http.Request, body *replay, target target,
	resp *http.Response, sent *token) (*http.Response, error) {
	url := sentReq.URL.Redacted()
	resend := func(authorization string) (*http.Response, error) {
		discard(resp)
		next := sentReq.Clone(ctx)
		if authorization == "" {
			next.Header.Del("Authorization")
		} else {
			next.Header.Set("Authorization", authorization)
		}
		var err error
		if next.Body, err = body.again(); err != nil {
			return nil, err
		}
		return t.base.RoundTrip(next)
	}
	if sent != nil {
		t.noteBalance(sent, resp, target) // "0 left" on the 402: spent, not sent again
	}
	heldRefused := false // a token held from before (or another request's) was refused
	passTried := false
	alone := false // the token bought for it went to another request first
	// What this request paid so far (its payments summed) and for what, for X-L402-Paid.
	var paidMsat, paidFeeMsat int64
	paidFor := ""
	refuse := func(resp *http.Response, refusal *Refusal) {
		resp.Header.Set(HeaderRefused, refusal.header())
		if paidFor != "" { // paid all the same: said beside the refusal
			resp.Header.Set(HeaderPaid, paidHeader(paidMsat, paidFeeMsat, paidFor))
		}
	}
	// Four rounds at most: a held token refused, a pass refused, one payment (or the token of
	// another request's), then one alone if that token went to another request.
	for round := 0; round < 4; round++ {
		var err error
		if resp.StatusCode == http.StatusUnauthorized {
			if sent == nil || len(ParseChallenges(resp.Header.Values("WWW-Authenticate"))) == 0 {
				return resp, nil // the origin's own 401: not ours
			}
			// Paid only on 402: drop the refused token and ask again without it.
			t.turnedDown(sent, resp.Header.Values("WWW-Authenticate"), target)
			sent = nil
			if resp, err = resend(""); err != nil {
				return nil, err
			}
		}
		if resp.StatusCode != http.StatusPaymentRequired {
			return resp, nil
		}
		got, err := t.handleChallenge(ctx, target, url, resp.Header.Values("WWW-Authenticate"), sent, !passTried, alone)
		if err != nil {
			discard(resp)
			return nil, err
		}
		if got == nil {
			return resp, nil // no L402 challenge: not ours to handle
		}
		if got.refusal != nil {
			refuse(resp, got.refusal)
			return resp, nil
		}
		if got.paidHere {
			paidMsat, paidFeeMsat, paidFor = paidMsat+got.amountMsat, paidFeeMsat+got.feeLimitMsat, got.token.label()
		}
		if resp, err = resend(got.token.credential); err != nil {
			t.store.answered(got.token.hash, false)
			if alone {
				// Paid and never used: the next request sends it instead of paying again.
				t.store.releaseHeld(got.token.hash, true)
			}
			return nil, err
		}
		granted := (resp.StatusCode != http.StatusUnauthorized && resp.StatusCode != http.StatusPaymentRequired) ||
			!t.aboutToken(resp.Header.Values("WWW-Authenticate"), got.token, target)
		t.store.answered(got.token.hash, granted)
		saidSpent := t.noteBalance(got.token, resp, target)
		if alone {
			t.store.releaseHeld(got.token.hash, granted)
		}
		if granted {
			if got.paidHere {
				// A request that paid twice says both (its first token went to another).
				resp.Header.Set(HeaderPaid, paidHeader(paidMsat, paidFeeMsat, paidFor))
			}
			return resp, nil
		}
		if !alone && (got.paidHere || got.waited) && resp.StatusCode == http.StatusPaymentRequired && saidSpent &&
			t.lostToOurs(ctx, got.token, url) {
			alone = true
			sent = got.token
			continue
		}
		if got.paidHere || alone || (heldRefused && !got.borrowed) {
			t.drop(got.token, "refused by the server right after payment")
			refusal := &Refusal{"rejected_after_payment", fmt.Sprintf(
				"%s refused the token just paid for %s; not paying again for this request", got.token.origin, got.token.label())}
			t.logf("not paying %s: %s: %s", url, refusal.Code, refusal.Message)
			refuse(resp, refusal)
			return resp, nil
		}
		// A token not bought for this request (held from before, another request's, or a
		// pass) was refused: once more, and handleChallenge takes it out of the way.
		if got.borrowed {
			passTried = true
		} else {
			heldRefused = true
		}
		sent = got.token
	}
	return resp, nil // not reached: the fourth round always returns
}

// paidHeader is X-L402-Paid: what a request paid (its payments summed) for label.
func paidHeader(amountMsat, feeMsat int64, label string) string {
	return headerSafe(fmt.Sprintf("%s sat (fee at most %s sat) for %s", satText(amountMsat), satText(feeMsat), label))
}

// lostToOurs: the server said tok, bought for a request to url, is spent. Whether another
// request of ours that sent it was granted with it (so ours used it up), waiting for the
// answers of the others that carried it at most the pay timeout: none granted, "spent" is
// the server's refusal, and a server calling every token spent gets no second payment.
func (t *Transport) lostToOurs(ctx context.Context, tok *token, url string) bool {
	if !t.store.grantedToAnother(ctx, tok.hash, time.Now().Add(t.payTimeout)) {
		t.logf("%s called the token for %s spent, and no request of ours was granted with it; not paying again for %s",
			tok.origin, tok.label(), url)
		return false
	}
	t.logf("other requests used up the token for %s %s first; paying once more for %s, for it alone",
		tok.origin, tok.label(), url)
	return true
}

// aboutToken: does a 401/402 answered to token concern it (not another service)? The challenge
// is for its scope, or names a service it names (a pass tried for one of its services).
func (t *Transport) aboutToken(values []string, tok *token, target target) bool {
	offer, refusal := pickChallenge(values, target.path)
	if refusal != nil {
		return true
	}
	return offer != nil && (offer.scope == tok.scope || tok.overlaps(offer.info.Services))
}

// offer is the challenge picked from a 402, read and ready to check.
type offer struct {
	challenge Challenge
	info      *TokenInfo
	scope     string
}

// pickChallenge takes the first readable L402/LSAT challenge, in the server's order (its
// preferred scheme). Both nil: the response carries no L402/LSAT challenge at all.
func pickChallenge(values []string, path string) (*offer, *Refusal) {
	challenges := ParseChallenges(values)
	if len(challenges) == 0 {
		return nil, nil
	}
	var problems []string
	for _, challenge := range challenges {
		challenge.Macaroon = strings.TrimSpace(challenge.Macaroon)
		info, err := InspectMacaroon(challenge.Macaroon)
		if err != nil {
			problems = append(problems, challenge.Scheme+": "+err.Error())
			continue
		}
		return &offer{challenge, info, scopeOf(info, path)}, nil
	}
	return nil, &Refusal{"bad_challenge", "no usable macaroon in the challenge: " + strings.Join(problems, "; ")}
}

func (t *Transport) tokenFor(target target) *token {
	scope, ok := t.store.scopeFor(target.origin, target.path)
	if !ok {
		return nil
	}
	if r := t.store.currentToken(target.origin, scope, t.now()); r != nil {
		return tokenOf(r) // nil for an entry whose token cannot be sent (a hand-edited file)
	}
	t.mu.Lock()
	hash, aliased := t.aliases[scopeKey(target.origin, scope)]
	t.mu.Unlock()
	if aliased {
		if r := t.store.tokenUsableFor(hash, scopeServices(scope), t.now()); r != nil {
			return tokenOf(r)
		}
	}
	return nil
}

// scopeServices are the services a scope names ("services:a,b"); none for a path scope.
func scopeServices(scope string) []string {
	if !strings.HasPrefix(scope, "services:") || scope == "services:" {
		return nil
	}
	return strings.Split(strings.TrimPrefix(scope, "services:"), ",")
}

// tokenOutcome: the token of a paid entry, to retry with (bought earlier, not for this request).
func tokenOutcome(r *record) *outcome {
	if tok := tokenOf(r); tok != nil {
		return &outcome{token: tok}
	}
	return refused("bad_challenge", "the stored token for this scope cannot be sent (scheme %q)", r.Scheme)
}

// waitForFlight: a payment under way for this URL's scope is better waited for than a 402.
func (t *Transport) waitForFlight(ctx context.Context, target target) {
	scope, ok := t.store.scopeFor(target.origin, target.path)
	if !ok {
		return
	}
	t.mu.Lock()
	f := t.flights[scopeKey(target.origin, scope)]
	t.mu.Unlock()
	if f == nil {
		return
	}
	timer := time.NewTimer(t.payTimeout)
	defer timer.Stop()
	select {
	case <-f.done:
	case <-ctx.Done():
	case <-timer.C:
	}
}

func (t *Transport) learn(target target, scope string) {
	paths := []string{target.path, directoryOf(target.path)}
	if err := t.store.learnPaths(target.origin, paths, scope, t.now()); err != nil {
		t.logf("cannot write to the store: %v", err)
	}
}

func (t *Transport) drop(tok *token, reason string) {
	t.forgetAliases(tok.hash)
	if err := t.store.drop(tok.hash, reason, t.now()); err != nil {
		t.logf("cannot write to the store: %v", err)
	}
	t.logf("dropped the token for %s %s: %s", tok.origin, tok.label(), reason)
}

// handleChallenge answers a 402 to url: a token to retry with, a refusal, or nil (not L402).
// sent is the token the request carried: when the server refuses it for its own scope it is
// dropped (a pass tried for this scope is not tried there again). Concurrent requests for one
// scope share one payment (a flight). passes: a live token held for other services too that
// names the challenge's may be returned (borrowed) instead of paying. alone: paid for this
// request only, whatever is held or under way for the scope; its token is held back from
// every other request until releaseHeld. Every token returned is counted as carried.
func (t *Transport) handleChallenge(ctx context.Context, target target, url string, values []string,
	sent *token, passes, alone bool) (*outcome, error) {
	if !hostAllowed(t.hosts, target.host, target.port) {
		return t.refuse(url, refused("not_allowed", "%s:%d is not in Limits.Allow", target.host, target.port)), nil
	}
	offer, refusal := pickChallenge(values, target.path)
	if refusal != nil {
		return t.refuse(url, &outcome{refusal: refusal}), nil
	}
	if offer == nil {
		return nil, nil
	}
	key := scopeKey(target.origin, offer.scope)
	if sent != nil && sent.origin == target.origin {
		if sent.scope == offer.scope {
			if !t.store.isSpent(sent.hash) { // a spent one is out already
				t.drop(sent, "the server answered 402 to it")
			}
		} else if sent.overlaps(offer.info.Services) {
			t.refusePass(sent, key)
		}
	}
	if r := t.store.currentToken(target.origin, offer.scope, t.now()); !alone && r != nil && (sent == nil || r.hash != sent.hash) {
		got := tokenOutcome(r)
		if got.token != nil {
			t.learn(target, offer.scope)
			t.store.carry(got.token.hash)
		}
		return got, nil
	}
	if passes && !alone {
		refused := t.refusedPasses(key)
		held := t.store.passFor(target.origin, offer.info.Services, func(r *record) bool {
			return (sent != nil && r.hash == sent.hash) || refused[r.hash]
		}, t.now())
		if held != nil {
			if tok := tokenOf(held); tok != nil {
				t.mu.Lock()
				t.aliases[key] = held.hash // sent up front for this scope's URLs, until refused
				t.mu.Unlock()
				t.learn(target, offer.scope)
				t.logf("trying the token held for %s %s for %s before paying", tok.origin, tok.label(),
					strings.Join(offer.info.Services, ","))
				t.store.carry(tok.hash)
				return &outcome{token: tok, borrowed: true}, nil
			}
		}
	}
	t.mu.Lock()
	var f *flight
	if !alone {
		f = t.flights[key]
	}
	waiting := f != nil
	if f == nil {
		f = &flight{done: make(chan struct{})}
		if !alone { // a payment alone is nobody else's to wait for
			t.flights[key] = f
		}
		// The payment runs on its own: a request that goes away must not cancel a payment
		// under way (its own timeout bounds it).
		go t.fly(f, key, target, url, offer, alone)
	}
	t.mu.Unlock()
	if waiting {
		t.logf("waiting for the payment under way for %s %s", target.origin, offer.scope)
	}
	select {
	case <-f.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	got := *f.outcome
	if got.token != nil {
		// Learnt only with a token in hand: refused challenges leave no trace to grow on.
		t.learn(target, offer.scope)
		if sent != nil && got.token.hash == sent.hash {
			return refused("rejected_after_payment", "the server refused the token just paid"), nil
		}
		if waiting {
			got.paidHere, got.waited = false, true // the request that paid reports it
		}
		t.store.carry(got.token.hash)
	}
	return &got, nil
}

func (t *Transport) refuse(url string, o *outcome) *outcome {
	t.logf("not paying %s: %s: %s", url, o.refusal.Code, o.refusal.Message)
	return o
}

func (t *Transport) fly(f *flight, key string, target target, url string, offer *offer, alone bool) {
	defer func() {
		if !alone {
			t.mu.Lock()
			delete(t.flights, key)
			t.mu.Unlock()
		}
		close(f.done)
	}()
	f.outcome = t.pay(target, url, offer, alone)
	if f.outcome.refusal != nil {
		t.refuse(url, f.outcome)
	}
}

// checkInvoice returns the invoice amount in msat if it may be paid, or why not; in the Python
// payer's order.
func (t *Transport) checkInvoice(offer *offer) (int64, *outcome) {
	// Never pay for a token that could not be sent afterwards.
	if _, err := FormatCredential(offer.challenge.Scheme, offer.challenge.Macaroon, Preimage{}); err != nil {
		return 0, refused("bad_challenge", "%v", err)
	}
	invoice, err := DecodeInvoice(offer.challenge.Invoice)
	if err != nil {
		return 0, refused("bad_challenge", "%v", err)
	}
	macaroonHash := offer.info.Identifier.PaymentHash
	if invoice.PaymentHash != macaroonHash {
		return 0, refused("hash_mismatch", "the invoice pays for another payment hash than the macaroon names "+
			"(invoice %x..., macaroon %x...)", invoice.PaymentHash[:8], macaroonHash[:8])
	}
	if networked, ok := t.wallet.(NetworkWallet); ok {
		network, err := t.walletNetwork(networked)
		if err != nil {
			return 0, refused("payment_failed", "cannot ask the wallet which network it pays on: %v", err)
		}
		if invoice.Network != network {
			return 0, refused("wrong_network", "the invoice is for %s, the wallet is on %s", invoice.Network, network)
		}
	}
	if !invoice.HasAmount {
		return 0, refused("no_amount", "the invoice has no amount; it is never paid blindly")
	}
	if invoice.Expired(t.now()) {
		return 0, refused("invoice_expired", "the invoice expired at %d", invoice.ExpiresAt().Unix())
	}
	if invoice.AmountMsat > t.limits.MaxPriceSat*1000 {
		return 0, refused("max_price", "the invoice asks %s sat, more than MaxPriceSat %d",
			satText(invoice.AmountMsat), t.limits.MaxPriceSat)
	}
	return invoice.AmountMsat, nil
}

func (t *Transport) walletNetwork(wallet NetworkWallet) (string, error) {
	t.mu.Lock()
	known := t.network
	t.mu.Unlock()
	if known != "" {
		return known, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), t.lookupTimeout)
	defer cancel()
	network, err := wallet.Network(ctx)
	if err != nil {
		return "", err
	}
	if network == "" {
		return "", errors.New("the wallet names no network")
	}
	t.mu.Lock()
	t.network = network
	t.mu.Unlock()
	return network, nil
}

// pay reserves the payment in the store (budgets, one payment per scope), pays it, and
// stores the token before anyone retries with it. alone: for one request only (the scope is
// not checked, only the budgets), held back from the others until releaseHeld.
func (t *Transport) pay(target target, url string, offer *offer, alone bool) *outcome {
	amountMsat, refusal := t.checkInvoice(offer)
	if refusal != nil {
		return refusal
	}
	info := offer.info
	r := &record{
		PaymentHash:  fmt.Sprintf("%x", info.Identifier.PaymentHash),
		hash:         info.Identifier.PaymentHash,
		Origin:       target.origin,
		URL:          url,
		Scope:        offer.scope,
		Services:     append([]string{}, info.Services...),
		Scheme:       offer.challenge.Scheme,
		Macaroon:     offer.challenge.Macaroon,
		Bolt11:       offer.challenge.Invoice,
		AmountMsat:   amountMsat,
		FeeLimitMsat: t.limits.MaxFeeSat * 1000,
		Wallet:       walletIdentity(t.wallet),
	}
	if info.HasExpiry {
		validUntil := math.Min(info.ValidUntil, maxUnix)
		r.ValidUntil = &validUntil
	}
	var last reservation
	for try := 0; try < 2; try++ {
		reserved, err := t.store.reserve(r, t.limits.DailyBudgetSat*1000, t.limits.TotalBudgetSat*1000, t.now(),
			alone, t.payTimeout)
		if err != nil {
			return refused("payment_failed", "%v", err)
		}
		switch {
		case reserved.fresh != nil:
			paid := t.payReserved(reserved.fresh)
			if paid.refusal != nil && alone {
				// Not paid, or not known to be: a pending one is waited for like any other.
				t.store.releaseHeld(reserved.fresh.hash, false)
			}
			return paid
		case reserved.paid != nil:
			// Another transport sharing the store paid this scope already.
			return tokenOutcome(reserved.paid)
		case reserved.pending != nil && try == 0:
			t.settlePending(reserved.pending)
		}
		last = reserved
	}
	return &outcome{refusal: last.refusal}
}

// settlePending waits for a payment another transport is paying, or asks the wallet about
// one nobody is (left by a crash, or by a wallet that could not say): its scope stays
// unpaid until it is settled.
func (t *Transport) settlePending(pending *record) {
	if busy := t.store.busy(pending.hash); busy != nil {
		timer := time.NewTimer(t.payTimeout)
		defer timer.Stop()
		select {
		case <-busy:
		case <-timer.C:
		}
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), t.lookupTimeout)
	defer cancel()
	t.recover(ctx, func(r *record) bool { return r.hash == pending.hash })
}

func (t *Transport) payReserved(r *record) *outcome {
	ctx, cancel := context.WithTimeout(context.Background(), t.payTimeout)
	defer cancel()
	preimage, err := t.wallet.Pay(ctx, r.Bolt11, t.limits.MaxFeeSat)
	if err != nil {
		if errors.Is(err, ErrPaymentFailed) {
			if err := t.store.fail(r.hash, err.Error(), t.now()); err != nil {
				t.logf("cannot write to the store: %v", err)
			}
			return refused("payment_failed", "%v", err)
		}
		// Not known to have failed: it may still go through. It stays pending, and the wallet
		// is asked about it before this scope is paid again.
		why := err.Error()
		if ctx.Err() != nil {
			why = fmt.Sprintf("no answer from the wallet within %s (%v)", t.payTimeout, err)
		}
		if err := t.store.unresolved(r.hash, why, t.now()); err != nil {
			t.logf("cannot write to the store: %v", err)
		}
		return refused("payment_pending", "%s; the payment stays pending and is checked again before this scope is paid again", why)
	}
	if preimage.Hash() != r.hash {
		if err := t.store.unresolved(r.hash, "the wallet returned a wrong preimage", t.now()); err != nil {
			t.logf("cannot write to the store: %v", err)
		}
		return refused("payment_failed", "the wallet returned a preimage that does not match")
	}
	done, err := t.store.settle(r.hash, preimage, t.now())
	if err != nil {
		// Paid, but not on disk: the token is used now; the wallet still knows the preimage,
		// so the next start writes it.
		t.logf("paid %s but: %v", r.URL, err)
	}
	tok := tokenOf(done) // not nil: checkInvoice made sure the credential can be written
	t.logf("paid %s sat (fee at most %s sat) to %s for %s (%s)", satText(r.AmountMsat), satText(r.FeeLimitMsat), r.Origin, tok.label(), r.URL)
	return &outcome{token: tok, amountMsat: r.AmountMsat, feeLimitMsat: r.FeeLimitMsat, paidHere: true}
}

// replay gives a request's body once per attempt.
type replay struct {
	first   io.ReadCloser
	getBody func() (io.ReadCloser, error)
}

func newReplay(req *http.Request, limit int64) (*replay, error) {
	if req.Body == nil || req.Body == http.NoBody {
		return &replay{first: req.Body}, nil
	}
	if req.GetBody != nil {
		return &replay{first: req.Body, getBody: req.GetBody}, nil
	}
	// A body that can be read only once is read into memory, so it can be sent again.
	data, err := io.ReadAll(io.LimitReader(req.Body, limit+1))
	_ = req.Body.Close()
	if err != nil {
		return nil, fmt.Errorf("l402: reading the request body: %w", err)
	}
	if int64(len(data)) > limit {
		return nil, fmt.Errorf("l402: the request body is over %d bytes and has no GetBody, so it "+
			"could not be sent again after paying; set Request.GetBody", limit)
	}
	get := func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil }
	first, _ := get()
	return &replay{first: first, getBody: get}, nil
}

func (b *replay) again() (io.ReadCloser, error) {
	if b.getBody == nil {
		return b.first, nil // nil or http.NoBody
	}
	body, err := b.getBody()
	if err != nil {
		return nil, fmt.Errorf("l402: cannot send the request body again: %w", err)
	}
	return body, nil
}

// discard reads a little of a response nobody will see (so its connection can be reused) and
// closes it.
func discard(resp *http.Response) {
	if resp != nil && resp.Body != nil {
		_, _ = io.CopyN(io.Discard, resp.Body, 64<<10)
		_ = resp.Body.Close()
	}
}

func closeBody(req *http.Request) {
	if req.Body != nil {
		_ = req.Body.Close()
	}
}
