package l402test

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"math/big"
	"strings"
	"time"
)

// Macaroon mints a V2 macaroon with Aperture's identifier layout (version 0, paymentHash,
// tokenID) and the given first-party caveats, signed with rootKey, as standard padded base64.
func Macaroon(rootKey []byte, paymentHash, tokenID [32]byte, caveats ...string) string {
	identifier := make([]byte, 0, 66)
	identifier = append(identifier, 0, 0)
	identifier = append(identifier, paymentHash[:]...)
	identifier = append(identifier, tokenID[:]...)
	return MacaroonWithIdentifier(rootKey, identifier, caveats...)
}

// MacaroonWithIdentifier mints a V2 macaroon around any identifier bytes (for tests of
// identifiers a client must refuse).
func MacaroonWithIdentifier(rootKey, identifier []byte, caveats ...string) string {
	// libmacaroons: the signing key is derived from the root key, then an HMAC chain.
	derived := hmacSHA256([]byte("macaroons-key-generator"), rootKey)
	signature := hmacSHA256(derived, identifier)
	out := []byte{2}
	out = appendField(out, 1, []byte("lsat"))
	out = appendField(out, 2, identifier)
	out = append(out, 0)
	for _, caveat := range caveats {
		out = appendField(out, 2, []byte(caveat))
		out = append(out, 0)
		signature = hmacSHA256(signature, []byte(caveat))
	}
	out = append(out, 0)
	out = appendField(out, 6, signature)
	return base64.StdEncoding.EncodeToString(out)
}

func hmacSHA256(key, data []byte) []byte {
	mac := hmac.New(sha256.New, key)
	mac.Write(data)
	return mac.Sum(nil)
}

func appendUvarint(out []byte, n uint64) []byte {
	for n >= 0x80 {
		out = append(out, byte(n)|0x80)
		n >>= 7
	}
	return append(out, byte(n))
}

func appendField(out []byte, fieldType uint64, data []byte) []byte {
	out = appendUvarint(out, fieldType)
	out = appendUvarint(out, uint64(len(data)))
	return append(out, data...)
}

// InvoiceParams describes a test invoice.
type InvoiceParams struct {
	// Network: mainnet, testnet, signet or regtest (default regtest).
	Network     string
	PaymentHash [32]byte
	// AmountMsat: 0 for an invoice without an amount.
	AmountMsat int64
	CreatedAt  time.Time
	// Expiry: 0 for BOLT 11's default (an hour).
	Expiry      time.Duration
	Description string
}

var prefixes = map[string]string{"mainnet": "bc", "testnet": "tb", "signet": "tbs", "regtest": "bcrt"}

const charset = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"

// Invoice encodes a BOLT11 invoice with a payment hash, a payment secret, a description, an
// expiry and an all-zero signature: the l402 package reads it (it does not check signatures),
// no real wallet would pay it.
func Invoice(p InvoiceParams) string {
	network := p.Network
	if network == "" {
		network = "regtest"
	}
	hrp := "ln" + prefixes[network]
	if p.AmountMsat > 0 {
		// Pico-bitcoin: 10 per msat.
		hrp += new(big.Int).Mul(big.NewInt(p.AmountMsat), big.NewInt(10)).String() + "p"
	}
	created := p.CreatedAt
	if created.IsZero() {
		created = time.Now()
	}
	data := uintGroups(uint64(created.Unix()), 7)
	data = appendTagged(data, 1, bytesToGroups(p.PaymentHash[:]))
	secret := sha256.Sum256(p.PaymentHash[:])
	data = appendTagged(data, 16, bytesToGroups(secret[:]))
	description := p.Description
	if description == "" {
		description = "l402test"
	}
	data = appendTagged(data, 13, bytesToGroups([]byte(description)))
	if p.Expiry > 0 {
		seconds := uint64(p.Expiry / time.Second)
		groups := 1
		for seconds>>(5*uint(groups)) > 0 {
			groups++
		}
		data = appendTagged(data, 6, uintGroups(seconds, groups))
	}
	data = append(data, make([]byte, 104)...) // the signature: 65 zero bytes
	return hrp + "1" + toChars(append(data, checksum(hrp, data)...))
}

func uintGroups(n uint64, groups int) []byte {
	out := make([]byte, groups)
	for i := groups - 1; i >= 0; i-- {
		out[i] = byte(n & 31)
		n >>= 5
	}
	return out
}

func bytesToGroups(data []byte) []byte {
	var out []byte
	acc, bits := uint32(0), uint(0)
	for _, b := range data {
		acc = acc<<8 | uint32(b)
		bits += 8
		for bits >= 5 {
			bits -= 5
			out = append(out, byte(acc>>bits)&31)
		}
	}
	if bits > 0 {
		out = append(out, byte(acc<<(5-bits))&31)
	}
	return out
}

func appendTagged(data []byte, tag byte, value []byte) []byte {
	if len(value) > 1023 {
		panic(fmt.Sprintf("l402test: tagged field of %d groups", len(value)))
	}
	data = append(data, tag, byte(len(value)>>5), byte(len(value)&31))
	return append(data, value...)
}

// polymod is bech32's checksum, written here again on purpose: an encoder that borrowed the
// decoder's code would agree with a bug in it, and the tests would not see it.
func polymod(values []byte) uint32 {
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

func checksum(hrp string, data []byte) []byte {
	var values []byte
	for i := 0; i < len(hrp); i++ {
		values = append(values, hrp[i]>>5)
	}
	values = append(values, 0)
	for i := 0; i < len(hrp); i++ {
		values = append(values, hrp[i]&31)
	}
	values = append(values, data...)
	values = append(values, 0, 0, 0, 0, 0, 0)
	mod := polymod(values) ^ 1
	out := make([]byte, 6)
	for i := range out {
		out[i] = byte(mod>>(5*uint(5-i))) & 31
	}
	return out
}

func toChars(data []byte) string {
	var b strings.Builder
	for _, v := range data {
		b.WriteByte(charset[v])
	}
	return b.String()
}
