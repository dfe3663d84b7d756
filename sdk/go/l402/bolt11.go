package l402

import (
	"errors"
	"fmt"
	"math/big"
	"strings"
	"time"
)

// Invoice is what the client reads of a BOLT11 payment request before paying it. The
// signature is not checked here (the standard library has no secp256k1): the wallet checks it
// when it pays, and the payment hash is checked against the macaroon either way.
type Invoice struct {
	// Network is mainnet, testnet, signet or regtest (or the raw currency prefix if unknown).
	Network     string
	PaymentHash [32]byte
	// AmountMsat is the amount in millisatoshi; HasAmount is false for an invoice without one.
	AmountMsat int64
	HasAmount  bool
	CreatedAt  time.Time
	// Expiry is how long after CreatedAt the invoice may be paid (3600 s when not given).
	Expiry time.Duration
}

// ExpiresAt is when the invoice can no longer be paid.
func (i *Invoice) ExpiresAt() time.Time { return i.CreatedAt.Add(i.Expiry) }

// Expired reports whether the invoice has expired at now.
func (i *Invoice) Expired(now time.Time) bool { return !now.Before(i.ExpiresAt()) }

var networks = map[string]string{"bc": "mainnet", "tb": "testnet", "tbs": "signet", "bcrt": "regtest"}

const bech32Charset = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"

// maxAmountMsat is 21 million BTC: any invoice asking more is garbage.
const maxAmountMsat = 21_000_000 * 100_000_000 * 1000

// maxExpirySeconds caps an invoice's expiry (about 272 years) so it fits a time.Duration.
const maxExpirySeconds = 1 << 33

func bech32Polymod(values []byte) uint32 {
	generator := [5]uint32{0x3b6a57b2, 0x26508e6d, 0x1ea119fa, 0x3d4233dd, 0x2a1462b3}
	chk := uint32(1)
	for _, v := range values {
		top := chk >> 25
		chk = (chk&0x1ffffff)<<5 ^ uint32(v)
		for i := 0; i < 5; i++ {
			if (top>>uint(i))&1 == 1 {
				chk ^= generator[i]
			}
		}
	}
	return chk
}

// decodeBech32 splits a bech32 string (no length limit: invoices are longer than BIP-173's 90
// characters) into its human-readable part and 5-bit data, checksum removed and verified.
func decodeBech32(text string) (string, []byte, error) {
	lower, upper := strings.ToLower(text), strings.ToUpper(text)
	if text != lower && text != upper {
		return "", nil, errors.New("bech32 string mixes upper and lower case")
	}
	text = lower
	for i := 0; i < len(text); i++ {
		if text[i] < 33 || text[i] > 126 {
			return "", nil, errors.New("bech32 string has a character out of range")
		}
	}
	sep := strings.LastIndexByte(text, '1')
	if sep < 1 || sep+7 > len(text) {
		return "", nil, errors.New("bech32 string has no separator or is too short")
	}
	hrp := text[:sep]
	data := make([]byte, 0, len(text)-sep-1)
	for i := sep + 1; i < len(text); i++ {
		v := strings.IndexByte(bech32Charset, text[i])
		if v < 0 {
			return "", nil, fmt.Errorf("bech32 string has an invalid character %q", text[i])
		}
		data = append(data, byte(v))
	}
	expanded := make([]byte, 0, 2*len(hrp)+1+len(data))
	for i := 0; i < len(hrp); i++ {
		expanded = append(expanded, hrp[i]>>5)
	}
	expanded = append(expanded, 0)
	for i := 0; i < len(hrp); i++ {
		expanded = append(expanded, hrp[i]&31)
	}
	expanded = append(expanded, data...)
	if bech32Polymod(expanded) != 1 {
		return "", nil, errors.New("bech32 checksum is invalid")
	}
	return hrp, data[:len(data)-6], nil
}

// fiveToEight regroups 5-bit values into bytes, dropping the zero padding at the end.
func fiveToEight(data []byte) []byte {
	var out []byte
	acc, bits := uint32(0), uint(0)
	for _, v := range data {
		acc = acc<<5 | uint32(v)
		bits += 5
		for bits >= 8 {
			bits -= 8
			out = append(out, byte(acc>>bits))
		}
		acc &= (1 << bits) - 1
	}
	return out
}

func fiveBitUint(data []byte) uint64 {
	var n uint64
	for _, v := range data {
		n = n<<5 | uint64(v)
	}
	return n
}

// parseAmount reads the human-readable amount (in bitcoin, with an optional multiplier) as msat.
func parseAmount(text string) (int64, error) {
	if text == "" {
		return 0, errors.New("no amount")
	}
	digits, multiplier := text, byte(0)
	if last := text[len(text)-1]; last < '0' || last > '9' {
		digits, multiplier = text[:len(text)-1], last
	}
	if !isASCIIDigits(digits) {
		return 0, fmt.Errorf("invalid amount %q", text)
	}
	amount, ok := new(big.Int).SetString(digits, 10)
	if !ok {
		return 0, fmt.Errorf("invalid amount %q", text)
	}
	// msat per unit: 1 BTC = 10^11 msat; pico-BTC is a tenth of a msat.
	msat := new(big.Int)
	switch multiplier {
	case 0:
		msat.Mul(amount, big.NewInt(100_000_000_000))
	case 'm':
		msat.Mul(amount, big.NewInt(100_000_000))
	case 'u':
		msat.Mul(amount, big.NewInt(100_000))
	case 'n':
		msat.Mul(amount, big.NewInt(100))
	case 'p':
		remainder := new(big.Int)
		msat.QuoRem(amount, big.NewInt(10), remainder)
		if remainder.Sign() != 0 {
			return 0, fmt.Errorf("amount %q is not a whole number of millisatoshi", text)
		}
	default:
		return 0, fmt.Errorf("invalid amount multiplier %q", string(multiplier))
	}
	if msat.Sign() <= 0 || msat.Cmp(big.NewInt(maxAmountMsat)) > 0 {
		return 0, fmt.Errorf("amount %q is out of range", text)
	}
	return msat.Int64(), nil
}

// DecodeInvoice reads the network, amount, payment hash and expiry of a BOLT11 invoice (a
// "lightning:" prefix is tolerated). It refuses a bad checksum, an unknown prefix, a bad
// amount, a missing payment hash or payment secret, and fields of the wrong length.
func DecodeInvoice(bolt11 string) (*Invoice, error) {
	text := strings.TrimSpace(bolt11)
	if strings.HasPrefix(strings.ToLower(text), "lightning:") {
		text = text[len("lightning:"):]
	}
	invoice, err := decodeInvoice(text)
	if err != nil {
		return nil, fmt.Errorf("invalid BOLT11 invoice: %w", err)
	}
	return invoice, nil
}

func decodeInvoice(text string) (*Invoice, error) {
	hrp, data, err := decodeBech32(text)
	if err != nil {
		return nil, err
	}
	if !strings.HasPrefix(hrp, "ln") {
		return nil, errors.New("not a Lightning invoice (prefix is not ln)")
	}
	// The currency is the letters after "ln"; the amount starts at the first digit.
	rest := hrp[2:]
	cut := strings.IndexAny(rest, "0123456789")
	currency, amountText := rest, ""
	if cut >= 0 {
		currency, amountText = rest[:cut], rest[cut:]
	}
	network, known := networks[currency]
	if !known {
		return nil, fmt.Errorf("unknown currency prefix %q", currency)
	}
	invoice := &Invoice{Network: network, Expiry: time.Hour}
	if amountText != "" {
		if invoice.AmountMsat, err = parseAmount(amountText); err != nil {
			return nil, err
		}
		invoice.HasAmount = true
	}
	// 35-bit timestamp, tagged fields, then a 520-bit (104 group) signature.
	if len(data) < 7+104 {
		return nil, errors.New("too short to contain a timestamp and a signature")
	}
	invoice.CreatedAt = time.Unix(int64(fiveBitUint(data[:7])), 0)
	fields := data[7 : len(data)-104]
	var hasHash, hasSecret, hasDescription bool
	for len(fields) > 0 {
		if len(fields) < 3 {
			return nil, errors.New("truncated tagged field")
		}
		tag, length := fields[0], int(fields[1])<<5|int(fields[2])
		if len(fields) < 3+length {
			return nil, errors.New("tagged field extends past the signature")
		}
		value := fields[3 : 3+length]
		fields = fields[3+length:]
		// Fixed-length fields of another length are skipped, as BOLT 11's own example
		// "including fields which must be ignored" requires.
		switch {
		case tag == 1 && length == 52: // p: payment hash
			if hasHash {
				return nil, errors.New("more than one payment hash")
			}
			copy(invoice.PaymentHash[:], fiveToEight(value))
			hasHash = true
		case tag == 16 && length == 52: // s: payment secret
			hasSecret = true
		case tag == 13, tag == 23 && length == 52: // d: description, h: description hash
			hasDescription = true
		case tag == 6: // x: expiry in seconds
			seconds := fiveBitUint(value)
			if length > 12 || seconds > maxExpirySeconds {
				seconds = maxExpirySeconds // longer than anyone will wait: never expires
			}
			invoice.Expiry = time.Duration(seconds) * time.Second
		}
	}
	if !hasHash {
		return nil, errors.New("no payment hash")
	}
	if !hasSecret {
		return nil, errors.New("no payment secret")
	}
	if !hasDescription {
		return nil, errors.New("no description or description hash")
	}
	return invoice, nil
}
