package l402

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"
)

// LNDWallet pays through LND's REST API (the grpc-gateway in front of its gRPC services):
// POST /v2/router/send (SendPaymentV2) and GET /v2/router/track/{hash} (TrackPaymentV2),
// with the macaroon in the Grpc-Metadata-macaroon header and TLS pinned to the node's
// tls.cert. The macaroon must allow offchain:read and offchain:write (admin.macaroon does),
// and info:read for the network check.
//
// Money safety: Pay wraps ErrPaymentFailed only on LND's final FAILED status; a cut stream, a
// timeout or an answer it cannot place leaves the payment pending, and Lookup (TrackPaymentV2)
// settles it later. LND records a payment before sending anything and keeps it IN_FLIGHT until
// its last attempt ends, so its "not found" and FAILED are final.
type LNDWallet struct {
	address  string // host:port, for messages and Identity
	baseURL  string
	macaroon string // hex, as the REST header carries it
	client   *http.Client
	// PaymentTimeout is how long LND keeps trying routes (timeout_seconds). Keep it below
	// the transport's pay timeout, so a payment that finds no route ends with a definite
	// FAILED. Default 45 s.
	PaymentTimeout time.Duration
}

// LNDDefaultRESTPort is LND's default restlisten port.
const LNDDefaultRESTPort = 8080

const maxStreamUpdates = 10000

// NewLNDWallet connects to LND's REST API at address ("host:port"; port 8080 if left out).
// certPEM is the node's tls.cert (PEM or DER): the TLS connection is pinned to it, whatever
// name the certificate lists; nil trusts the system roots (a node behind a proxy with a public
// certificate). macaroon is the binary .macaroon file's content (hex text is accepted too).
func NewLNDWallet(address string, certPEM, macaroon []byte) (*LNDWallet, error) {
	host, port, err := splitHostPort(address)
	if err != nil {
		return nil, err
	}
	mac, err := checkLNDMacaroon(macaroon)
	if err != nil {
		return nil, err
	}
	config := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: host}
	if certPEM != nil {
		cert, err := parseCertificate(certPEM)
		if err != nil {
			return nil, err
		}
		config = pinnedTLS(cert, host)
	}
	hostPort := net.JoinHostPort(host, strconv.Itoa(port))
	transport := &http.Transport{
		TLSClientConfig:     config,
		Proxy:               nil, // the node is reached directly, never through HTTP(S)_PROXY
		TLSHandshakeTimeout: 10 * time.Second,
		DialContext:         (&net.Dialer{Timeout: 10 * time.Second}).DialContext,
	}
	client := &http.Client{Transport: transport, CheckRedirect: func(*http.Request, []*http.Request) error {
		// LND never redirects. Following one would send the macaroon (a redirect keeps custom
		// headers) and the payment request to whatever the Location names, maybe over plain
		// HTTP, outside the pinned TLS connection.
		return errors.New("the node answered with a redirect, which is not followed")
	}}
	return &LNDWallet{
		address:        hostPort,
		baseURL:        "https://" + hostPort,
		macaroon:       hex.EncodeToString(mac),
		client:         client,
		PaymentTimeout: 45 * time.Second,
	}, nil
}

// NewLNDWalletFromFiles reads the node's tls.cert and a .macaroon file (as LND writes them).
func NewLNDWalletFromFiles(address, certPath, macaroonPath string) (*LNDWallet, error) {
	var cert []byte
	if certPath != "" {
		data, err := os.ReadFile(certPath)
		if err != nil {
			return nil, fmt.Errorf("lnd: cannot read the cert file: %w", err)
		}
		cert = data
	}
	mac, err := os.ReadFile(macaroonPath)
	if err != nil {
		return nil, fmt.Errorf("lnd: cannot read the macaroon file: %w", err)
	}
	return NewLNDWallet(address, cert, mac)
}

// ParseLNDConnect reads an lndconnect URI, lndconnect://host:port?cert=<base64url DER>&
// macaroon=<base64url> (what Zeus and Zap show), and connects to LND's REST API there: the
// port must be the node's REST port (8080 if left out). cert may be left out (system roots).
func ParseLNDConnect(uri string) (*LNDWallet, error) {
	text := strings.TrimSpace(uri)
	const prefix = "lndconnect://"
	if !strings.HasPrefix(strings.ToLower(text), prefix) {
		return nil, errors.New("lndconnect URI: must start with lndconnect://")
	}
	rest := text[len(prefix):]
	address, query, _ := strings.Cut(rest, "?")
	address = strings.TrimSuffix(address, "/")
	if strings.ContainsAny(address, "/#@") {
		return nil, errors.New("lndconnect URI: expected lndconnect://host:port?cert=...&macaroon=...")
	}
	params := map[string]string{}
	// Own parser: url.ParseQuery turns '+' into a space, which breaks standard base64.
	for _, part := range strings.Split(query, "&") {
		if part == "" {
			continue
		}
		name, value, _ := strings.Cut(part, "=")
		if name != "cert" && name != "macaroon" {
			return nil, fmt.Errorf("lndconnect URI: unknown parameter %q (allowed: cert, macaroon)", shortName(name))
		}
		if _, twice := params[name]; twice {
			return nil, fmt.Errorf("lndconnect URI: parameter %q given twice", name)
		}
		unescaped, err := url.PathUnescape(value)
		if err != nil {
			return nil, fmt.Errorf("lndconnect URI: parameter %q is not URL-encoded properly", name)
		}
		params[name] = unescaped
	}
	macText, ok := params["macaroon"]
	if !ok || macText == "" {
		return nil, errors.New("lndconnect URI: parameter 'macaroon' is missing (the base64url macaroon)")
	}
	var mac []byte
	if isHex(macText) {
		mac, _ = hex.DecodeString(macText) // some generators put the REST header's hex form here
	} else {
		decoded, err := decodeBase64URL(macText)
		if err != nil {
			return nil, errors.New("lndconnect URI: parameter 'macaroon' is not valid base64url")
		}
		mac = decoded
	}
	var cert []byte
	if certText, ok := params["cert"]; ok {
		der, err := decodeBase64URL(certText)
		if err != nil {
			return nil, errors.New("lndconnect URI: parameter 'cert' is not valid base64url")
		}
		cert = der
	}
	return NewLNDWallet(address, cert, mac)
}

func shortName(name string) string {
	if len(name) > 20 {
		return name[:20] + "..."
	}
	return name
}

func isHex(text string) bool {
	if text == "" || len(text)%2 != 0 {
		return false
	}
	_, err := hex.DecodeString(text)
	return err == nil
}

// decodeBase64URL: lndconnect uses base64url without padding; standard base64 and padding are
// tolerated too.
func decodeBase64URL(text string) ([]byte, error) {
	text = strings.Join(strings.Fields(text), "")
	text = strings.NewReplacer("+", "-", "/", "_").Replace(strings.TrimRight(text, "="))
	return base64.RawURLEncoding.DecodeString(text)
}

func splitHostPort(address string) (string, int, error) {
	address = strings.TrimSpace(address)
	if address == "" {
		return "", 0, errors.New("lnd: no address (host:port of the REST API)")
	}
	host, portText, err := net.SplitHostPort(address)
	if err != nil {
		// No port: the whole text is the host (an IPv6 host needs brackets and a port).
		host, portText = strings.Trim(address, "[]"), strconv.Itoa(LNDDefaultRESTPort)
		if strings.Contains(host, ":") && !strings.HasPrefix(address, "[") {
			return "", 0, errors.New("lnd: put an IPv6 host in brackets: [host]:port")
		}
	}
	port, err := strconv.Atoi(portText)
	if err != nil || port < 1 || port > 65535 || !isASCIIDigits(portText) {
		return "", 0, errors.New("lnd: bad port: use a number from 1 to 65535")
	}
	if host == "" {
		return "", 0, errors.New("lnd: no host before the port")
	}
	return strings.ToLower(host), port, nil
}

func checkLNDMacaroon(data []byte) ([]byte, error) {
	trimmed := bytes.TrimSpace(data)
	if len(trimmed) == 0 {
		return nil, errors.New("lnd: the macaroon is empty")
	}
	if isHex(string(trimmed)) {
		decoded, _ := hex.DecodeString(string(trimmed))
		data = decoded
	}
	// LND accepts only version 2 macaroons, whose binary form starts with 0x02.
	if data[0] != 0x02 {
		return nil, errors.New("lnd: the macaroon is not a binary LND macaroon (version 2)")
	}
	return data, nil
}

func parseCertificate(data []byte) (*x509.Certificate, error) {
	if block, _ := pem.Decode(data); block != nil {
		data = block.Bytes
	}
	cert, err := x509.ParseCertificate(data)
	if err != nil {
		return nil, errors.New("lnd: the cert is not a certificate (PEM or DER)")
	}
	return cert, nil
}

// pinnedTLS trusts exactly the node's certificate, whatever names it lists: LND's self-signed
// tls.cert names "localhost" and the machine's own addresses, not the one it may be reached by
// (Docker, a VPN, port forwarding). A CA certificate given instead is a root for the usual check.
func pinnedTLS(pinned *x509.Certificate, host string) *tls.Config {
	roots := x509.NewCertPool()
	roots.AddCert(pinned)
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The standard check is replaced, not skipped: VerifyPeerCertificate below.
		InsecureSkipVerify: true, //nolint:gosec
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) == 0 {
				return errors.New("lnd: the node presented no certificate")
			}
			if bytes.Equal(raw[0], pinned.Raw) {
				return nil
			}
			leaf, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return err
			}
			intermediates := x509.NewCertPool()
			for _, der := range raw[1:] {
				if cert, err := x509.ParseCertificate(der); err == nil {
					intermediates.AddCert(cert)
				}
			}
			_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: intermediates, DNSName: host})
			if err != nil {
				return fmt.Errorf("lnd: the node's certificate is not the pinned tls.cert (%v)", err)
			}
			return nil
		},
	}
}

// Identity names the node as the Python LND wallet does.
func (w *LNDWallet) Identity() string { return "lnd:" + w.address }

// lndPayment is routerrpc's Payment as the REST API writes it (int64 fields are strings).
type lndPayment struct {
	PaymentHash     string `json:"payment_hash"`
	PaymentPreimage string `json:"payment_preimage"`
	Status          string `json:"status"`
	FailureReason   string `json:"failure_reason"`
	FeeMsat         string `json:"fee_msat"`
}

// lndError is a gRPC status as the REST gateway writes it (grpc-gateway v1 named the code
// grpc_code, v2 names it code).
type lndError struct {
	Code     int    `json:"code"`
	GRPCCode int    `json:"grpc_code"`
	Message  string `json:"message"`
}

func (e *lndError) code() int {
	if e.Code != 0 {
		return e.Code
	}
	return e.GRPCCode
}

const (
	grpcNotFound      = 5
	grpcAlreadyExists = 6
)

type lndLine struct {
	Result *lndPayment `json:"result"`
	Error  *lndError   `json:"error"`
}

// lndStatusError: the REST call itself failed (the gateway answered an error, or no line).
type lndStatusError struct {
	what string
	err  lndError
	http int
}

func (e *lndStatusError) Error() string {
	return fmt.Sprintf("lnd: %s: %s (gRPC code %d, HTTP %d)", e.what, oneLine(e.err.Message), e.err.code(), e.http)
}

func oneLine(text string) string {
	text = strings.Join(strings.Fields(text), " ")
	if len(text) > 300 {
		text = text[:300] + "..."
	}
	return text
}

// stream opens a streaming REST call and returns a reader of its JSON lines.
func (w *LNDWallet) stream(ctx context.Context, method, path string, body interface{}, what string) (*http.Response, *bufio.Scanner, error) {
	var reader io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return nil, nil, err
		}
		reader = bytes.NewReader(data)
	}
	req, err := http.NewRequestWithContext(ctx, method, w.baseURL+path, reader)
	if err != nil {
		return nil, nil, err
	}
	req.Header.Set("Grpc-Metadata-macaroon", w.macaroon)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := w.client.Do(req)
	if err != nil {
		return nil, nil, fmt.Errorf("lnd %s: %s: %w", w.address, what, err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		data, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		return nil, nil, &lndStatusError{what, gatewayError(data), resp.StatusCode}
	}
	scanner := bufio.NewScanner(resp.Body)
	scanner.Buffer(make([]byte, 64<<10), 4<<20)
	return resp, scanner, nil
}

// next reads the next JSON line of a stream: a payment update, or the gateway's error.
func next(scanner *bufio.Scanner, what string) (*lndPayment, error) {
	for scanner.Scan() {
		line := bytes.TrimSpace(scanner.Bytes())
		if len(line) == 0 {
			continue
		}
		var parsed lndLine
		if err := json.Unmarshal(line, &parsed); err != nil {
			return nil, fmt.Errorf("lnd: %s: unreadable stream line (%v)", what, err)
		}
		if parsed.Error != nil {
			return nil, &lndStatusError{what, *parsed.Error, http.StatusOK}
		}
		if parsed.Result == nil {
			return nil, fmt.Errorf("lnd: %s: a stream line with neither result nor error", what)
		}
		return parsed.Result, nil
	}
	if err := scanner.Err(); err != nil {
		return nil, fmt.Errorf("lnd: %s: the stream broke (%v)", what, err)
	}
	return nil, io.EOF
}

// gatewayError reads an error answer: {"code": .., "message": ..}, or a streaming call's
// {"error": {...}} when the call failed before its first update.
func gatewayError(data []byte) lndError {
	var wrapped lndLine
	if json.Unmarshal(data, &wrapped) == nil && wrapped.Error != nil {
		return *wrapped.Error
	}
	var status lndError
	if json.Unmarshal(data, &status) != nil || status.Message == "" {
		status.Message = string(data)
	}
	return status
}

func grpcCode(err error) int {
	var status *lndStatusError
	if errors.As(err, &status) {
		return status.err.code()
	}
	return 0
}

// Pay sends the payment with SendPaymentV2 and follows it to its final status.
func (w *LNDWallet) Pay(ctx context.Context, bolt11 string, maxFeeSat int64) (Preimage, error) {
	invoice, err := DecodeInvoice(bolt11)
	if err != nil {
		return Preimage{}, fmt.Errorf("lnd %s: not paid: %w: %v", w.address, ErrPaymentFailed, err)
	}
	if maxFeeSat < 0 {
		return Preimage{}, fmt.Errorf("lnd %s: not paid: %w: negative fee limit", w.address, ErrPaymentFailed)
	}
	timeout := int(w.PaymentTimeout / time.Second)
	if timeout < 1 {
		timeout = 45
	}
	request := map[string]interface{}{
		"payment_request":     strings.TrimPrefix(strings.TrimSpace(bolt11), "lightning:"),
		"fee_limit_sat":       strconv.FormatInt(maxFeeSat, 10),
		"timeout_seconds":     timeout,
		"no_inflight_updates": true,
	}
	resp, scanner, err := w.stream(ctx, http.MethodPost, "/v2/router/send", request, "pay (SendPaymentV2)")
	if err == nil {
		defer resp.Body.Close()
		for i := 0; i < maxStreamUpdates; i++ {
			var update *lndPayment
			update, err = next(scanner, "pay (SendPaymentV2)")
			if err != nil {
				break
			}
			if update.Status == "IN_FLIGHT" || update.Status == "INITIATED" {
				continue
			}
			return w.outcome(update, invoice.PaymentHash, "SendPaymentV2")
		}
	}
	if grpcCode(err) == grpcAlreadyExists {
		// "invoice is already paid" / "payment is in transition": LND refused to pay twice.
		// The earlier payment's outcome (and preimage) is what is needed.
		return w.follow(ctx, invoice.PaymentHash, err)
	}
	if errors.Is(err, io.EOF) || err == nil {
		err = errors.New("the payment stream ended without a final status")
	}
	// Cut off, refused or unreadable: it may have been sent. Not a definite failure.
	return Preimage{}, fmt.Errorf("lnd %s: %v; the payment may still complete (checked again later)", w.address, err)
}

func (w *LNDWallet) follow(ctx context.Context, hash [32]byte, refused error) (Preimage, error) {
	state, err := w.track(ctx, hash, true)
	if err != nil {
		return Preimage{}, fmt.Errorf("lnd %s: refused to pay again (%v) and cannot follow the earlier payment: %v", w.address, refused, err)
	}
	switch state.Status {
	case StatusSucceeded:
		return state.Preimage, nil
	case StatusFailed:
		return Preimage{}, fmt.Errorf("lnd %s: %w (the earlier payment of this invoice failed)", w.address, ErrPaymentFailed)
	}
	return Preimage{}, fmt.Errorf("lnd %s: this invoice is being paid already (%v); checked again later", w.address, refused)
}

func (w *LNDWallet) outcome(update *lndPayment, hash [32]byte, what string) (Preimage, error) {
	switch update.Status {
	case "FAILED":
		reason := update.FailureReason
		if reason == "" {
			reason = "FAILURE_REASON_NONE"
		}
		return Preimage{}, fmt.Errorf("lnd %s: %w: %s", w.address, ErrPaymentFailed, reason)
	case "SUCCEEDED":
		var p Preimage
		raw, err := hex.DecodeString(update.PaymentPreimage)
		if err != nil || len(raw) != 32 {
			return p, fmt.Errorf("lnd %s: %s answered SUCCEEDED without a readable preimage", w.address, what)
		}
		copy(p[:], raw)
		if p.Hash() != hash {
			return Preimage{}, fmt.Errorf("lnd %s: %s returned a preimage that does not match the invoice", w.address, what)
		}
		return p, nil
	}
	return Preimage{}, fmt.Errorf("lnd %s: unexpected payment status %q from %s", w.address, update.Status, what)
}

// track reads the current state of a payment from TrackPaymentV2 (the first update it sends).
func (w *LNDWallet) track(ctx context.Context, hash [32]byte, final bool) (PaymentState, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // the stream would go on: one update is all that is needed
	path := "/v2/router/track/" + base64.URLEncoding.EncodeToString(hash[:]) +
		"?no_inflight_updates=" + strconv.FormatBool(final)
	resp, scanner, err := w.stream(ctx, http.MethodGet, path, nil, "look up a payment (TrackPaymentV2)")
	var update *lndPayment
	if err == nil {
		defer resp.Body.Close()
		update, err = next(scanner, "look up a payment (TrackPaymentV2)")
	}
	if grpcCode(err) == grpcNotFound {
		return PaymentState{Status: StatusNotFound}, nil // "payment isn't initiated"
	}
	if errors.Is(err, io.EOF) {
		return PaymentState{}, fmt.Errorf("lnd %s: TrackPaymentV2 ended without a status", w.address)
	}
	if err != nil {
		return PaymentState{}, err
	}
	switch update.Status {
	case "IN_FLIGHT", "INITIATED":
		return PaymentState{Status: StatusInFlight}, nil
	case "FAILED":
		return PaymentState{Status: StatusFailed}, nil
	case "SUCCEEDED":
		p, err := w.outcome(update, hash, "TrackPaymentV2")
		if err != nil {
			return PaymentState{}, err
		}
		return PaymentState{Status: StatusSucceeded, Preimage: p}, nil
	}
	return PaymentState{}, fmt.Errorf("lnd %s: unexpected payment status %q", w.address, update.Status)
}

// Lookup asks TrackPaymentV2 for the payment's current state.
func (w *LNDWallet) Lookup(ctx context.Context, paymentHash [32]byte) (PaymentState, error) {
	return w.track(ctx, paymentHash, false)
}

var lndNetworks = map[string]string{
	"mainnet": "mainnet", "testnet": "testnet", "testnet3": "testnet", "testnet4": "testnet",
	"signet": "signet", "regtest": "regtest", "simnet": "simnet",
}

// Network reads the node's chain from GET /v1/getinfo.
func (w *LNDWallet) Network(ctx context.Context) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, w.baseURL+"/v1/getinfo", nil)
	if err != nil {
		return "", err
	}
	req.Header.Set("Grpc-Metadata-macaroon", w.macaroon)
	resp, err := w.client.Do(req)
	if err != nil {
		return "", fmt.Errorf("lnd %s: GetInfo: %w", w.address, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		return "", &lndStatusError{"GetInfo", gatewayError(data), resp.StatusCode}
	}
	var info struct {
		Chains []struct {
			Network string `json:"network"`
		} `json:"chains"`
	}
	if err := json.Unmarshal(data, &info); err != nil || len(info.Chains) == 0 {
		return "", fmt.Errorf("lnd %s: GetInfo names no chain", w.address)
	}
	network, ok := lndNetworks[info.Chains[0].Network]
	if !ok {
		return "", fmt.Errorf("lnd %s: unknown network %q", w.address, oneLine(info.Chains[0].Network))
	}
	return network, nil
}
