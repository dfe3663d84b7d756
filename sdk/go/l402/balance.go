package l402

import (
	"fmt"
	"strconv"
	"strings"
)

// HeaderBalance is what a server says is left of the token a request carried, on every answer
// it grants with a token sold as a bundle (single use is a bundle of one): "99 requests",
// "0 requests", "500000000 bytes", "7 units". A token with 0 left is spent: the Transport never
// sends it again, and the next request meets the 402 and pays within the Limits.
const HeaderBalance = "X-L402-Balance"

// Balance is an X-L402-Balance value: what is left of a token after the request it answers.
type Balance struct {
	Remaining int64
	Unit      string // "requests", "bytes" or "units"
}

func (b Balance) String() string { return strconv.FormatInt(b.Remaining, 10) + " " + b.Unit }

var balanceUnits = []string{"requests", "bytes", "units"}

// ParseBalance reads the X-L402-Balance lines of an answer (resp.Header.Values(HeaderBalance)):
// nil and no error when there are none; an error (one line, safe to log) for anything but
// "<remaining> <unit>", a decimal integer >= 0 and one of requests, bytes, units (any case).
// Several lines must agree.
func ParseBalance(values []string) (*Balance, error) {
	if len(values) == 0 {
		return nil, nil
	}
	text := strings.TrimSpace(values[0])
	for _, other := range values[1:] {
		if strings.TrimSpace(other) != text {
			return nil, fmt.Errorf("%s has several different values (%q, %q)", HeaderBalance,
				clip(headerSafe(text), 40), clip(headerSafe(strings.TrimSpace(other)), 40))
		}
	}
	shown := clip(headerSafe(text), 80)
	digits, unit := text, ""
	if i := strings.IndexAny(text, " \t"); i >= 0 {
		digits, unit = text[:i], strings.TrimLeft(text[i:], " \t")
	}
	if !isASCIIDigits(digits) || unit == "" || strings.ContainsAny(unit, " \t") {
		return nil, fmt.Errorf("%s %q is not '<remaining> <unit>' (unit one of %s)", HeaderBalance, shown,
			strings.Join(balanceUnits, ", "))
	}
	unit = strings.ToLower(unit)
	known := false
	for _, u := range balanceUnits {
		known = known || unit == u
	}
	if !known {
		return nil, fmt.Errorf("%s unit %q is not one of %s", HeaderBalance, clip(headerSafe(unit), 40),
			strings.Join(balanceUnits, ", "))
	}
	remaining, err := strconv.ParseInt(digits, 10, 64) // digits only: an error is an overflow
	if err != nil {
		return nil, fmt.Errorf("%s %s is larger than any balance", HeaderBalance, clip(digits, 40))
	}
	return &Balance{remaining, unit}, nil
}

func clip(text string, n int) string {
	if len(text) > n {
		return text[:n]
	}
	return text
}
