package l402

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// Hostile input must never panic. `go test -fuzz FuzzX` explores further; crashers it finds
// land in testdata/fuzz/FuzzX and are then replayed by every plain `go test`.

func FuzzParseChallenges(f *testing.F) {
	for _, seed := range []string{
		`L402 macaroon="AgE", invoice="lnbc1"`,
		`LSAT token=AgE=, invoice=lnbc1, Bearer abc==`,
		`Basic realm="x", L402 invoice='lnbc1' macaroon="a\"b"`,
		`L402 macaroon="unterminated`,
		`=,=,"`,
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, header string) {
		for _, c := range ParseChallenges([]string{header, header}) {
			if c.Macaroon == "" || c.Invoice == "" || (c.Scheme != "L402" && c.Scheme != "LSAT") {
				t.Fatalf("incomplete challenge %+v from %q", c, header)
			}
		}
	})
}

func FuzzDecodeInvoice(f *testing.F) {
	for _, v := range bolt11Valid {
		f.Add(v.invoice)
	}
	for _, v := range bolt11Invalid {
		f.Add(v.invoice)
	}
	f.Fuzz(func(t *testing.T, text string) {
		invoice, err := DecodeInvoice(text)
		if err != nil {
			return
		}
		if invoice.HasAmount != (invoice.AmountMsat > 0) || invoice.AmountMsat > maxAmountMsat || invoice.Expiry < 0 {
			t.Fatalf("%q decoded to %+v", text, invoice)
		}
		_ = invoice.Expired(invoice.CreatedAt)
	})
}

func FuzzInspectMacaroon(f *testing.F) {
	if data, err := os.ReadFile(filepath.Join("testdata", "minted.json")); err == nil {
		var minted struct {
			Cases []struct {
				Macaroon string `json:"macaroon"`
			} `json:"cases"`
		}
		if json.Unmarshal(data, &minted) == nil {
			for _, c := range minted.Cases {
				f.Add(c.Macaroon)
			}
		}
	}
	f.Add("AgEEbHNhdAJC")
	f.Fuzz(func(t *testing.T, text string) {
		info, err := InspectMacaroon(text)
		if err == nil {
			_ = scopeOf(info, "/a/b")
		}
	})
}

func FuzzParseBalance(f *testing.F) {
	for _, seed := range []string{"99 requests", "0 bytes", "7\tUNITS", "-1 requests", "5 apples", "", "1 requests x"} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, text string) {
		balance, err := ParseBalance([]string{text})
		if err != nil {
			return
		}
		if balance.Remaining < 0 || !knownUnit(balance.Unit) {
			t.Fatalf("%q parsed to %+v", text, balance)
		}
		again, err := ParseBalance([]string{balance.String()})
		if err != nil || *again != *balance {
			t.Fatalf("%q: %+v does not read back (%v)", text, balance, err)
		}
	})
}
