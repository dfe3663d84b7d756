package l402

import (
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Limits is what the program lets the transport spend, in satoshi. Every limit is checked
// before every payment; the zero value pays nothing. Limits has the meaning of the client
// proxy's l402_* options of the same names.
type Limits struct {
	// MaxPriceSat is the most one invoice may ask (l402_max_price_sat).
	MaxPriceSat int64
	// MaxFeeSat is the most the wallet may pay in routing fees per payment (l402_max_fee_sat);
	// 0 allows only fee-free routes, such as a direct channel.
	MaxFeeSat int64
	// DailyBudgetSat caps what is spent in any 24 hours, fees included (l402_budget_daily_sat).
	// A payment counts with its fee limit, since the wallet does not report its fee.
	DailyBudgetSat int64
	// TotalBudgetSat caps what is spent in total (l402_budget_total_sat); 0 means no cap
	// besides the daily budget. It counts what the store remembers, so it only holds across
	// restarts with a file store.
	TotalBudgetSat int64
	// Allow lists the hosts that may be paid (l402_allow): "example.com", "*.example.com"
	// (subdomains, not example.com itself), "127.0.0.1:8081", "[::1]:8081"; '*' and '?' are
	// wildcards. Empty: any host.
	Allow []string
}

// Validate reports the first limit that cannot be used.
func (l Limits) Validate() error {
	for _, limit := range []struct {
		name  string
		value int64
	}{
		{"MaxPriceSat", l.MaxPriceSat},
		{"MaxFeeSat", l.MaxFeeSat},
		{"DailyBudgetSat", l.DailyBudgetSat},
		{"TotalBudgetSat", l.TotalBudgetSat},
	} {
		if limit.value < 0 || limit.value > maxAmountMsat/1000 {
			return fmt.Errorf("l402: Limits.%s must be from 0 to 21e14 sat, got %d", limit.name, limit.value)
		}
	}
	_, err := parseHostPatterns(l.Allow)
	return err
}

type hostPattern struct {
	host    string // lower-case; may hold * and ? wildcards
	port    int    // 0: any port
	hasPort bool
}

func parseHostPatterns(patterns []string) ([]hostPattern, error) {
	parsed := make([]hostPattern, 0, len(patterns))
	for _, text := range patterns {
		pattern, err := parseHostPattern(text)
		if err != nil {
			return nil, err
		}
		parsed = append(parsed, pattern)
	}
	return parsed, nil
}

// parseHostPattern reads `example.com`, `*.example.com`, `127.0.0.1:8081` or `[::1]:8081`.
func parseHostPattern(text string) (hostPattern, error) {
	value := strings.ToLower(strings.TrimSpace(text))
	if value == "" {
		return hostPattern{}, errors.New("l402: empty host pattern in Limits.Allow")
	}
	if strings.ContainsAny(value, "/@") {
		return hostPattern{}, fmt.Errorf("l402: host pattern %q must be a host name, not a URL", text)
	}
	var host, portText string
	hasPort := false
	switch {
	case strings.HasPrefix(value, "["):
		end := strings.IndexByte(value, ']')
		if end < 0 || (end+1 < len(value) && value[end+1] != ':') {
			return hostPattern{}, fmt.Errorf("l402: host pattern %q: bad IPv6 literal", text)
		}
		host = value[1:end]
		if end+1 < len(value) {
			hasPort, portText = true, value[end+2:]
		}
	case strings.Count(value, ":") == 1:
		i := strings.IndexByte(value, ':')
		host, portText, hasPort = value[:i], value[i+1:], true
	default:
		host = value
	}
	pattern := hostPattern{host: host}
	if hasPort {
		// "example.com:" is a typo, not "any port".
		port, err := strconv.Atoi(portText)
		if err != nil || !isASCIIDigits(portText) || port < 1 || port > 65535 {
			return hostPattern{}, fmt.Errorf("l402: host pattern %q: port must be 1-65535", text)
		}
		pattern.port, pattern.hasPort = port, true
	}
	if host == "" {
		return hostPattern{}, fmt.Errorf("l402: host pattern %q has no host", text)
	}
	return pattern, nil
}

// hostAllowed: no patterns, any host; `*.example.com` matches subdomains only.
func hostAllowed(patterns []hostPattern, host string, port int) bool {
	if len(patterns) == 0 {
		return true
	}
	host = strings.Trim(strings.ToLower(host), "[]")
	for _, pattern := range patterns {
		if pattern.hasPort && pattern.port != port {
			continue
		}
		if globMatch(pattern.host, host) {
			return true
		}
	}
	return false
}

// globMatch matches '*' (any run) and '?' (one character); everything else is literal.
func globMatch(pattern, text string) bool {
	if pattern == "" {
		return text == ""
	}
	switch pattern[0] {
	case '*':
		for i := 0; i <= len(text); i++ {
			if globMatch(pattern[1:], text[i:]) {
				return true
			}
		}
		return false
	case '?':
		if text == "" {
			return false
		}
		_, size := utf8.DecodeRuneInString(text)
		return globMatch(pattern[1:], text[size:])
	}
	return text != "" && text[0] == pattern[0] && globMatch(pattern[1:], text[1:])
}

// target is an absolute http(s) URL as the payer sees it.
type target struct {
	origin string // scheme://host:port, host lower-cased, IPv6 in brackets
	host   string
	port   int
	path   string // as sent (escaped), without the query; "/" if empty
}

func splitURL(u *url.URL) (target, bool) {
	scheme := strings.ToLower(u.Scheme)
	host := strings.ToLower(u.Hostname())
	if (scheme != "http" && scheme != "https") || host == "" {
		return target{}, false
	}
	port := 80
	if scheme == "https" {
		port = 443
	}
	if text := u.Port(); text != "" {
		parsed, err := strconv.Atoi(text)
		if err != nil || parsed < 1 || parsed > 65535 {
			return target{}, false
		}
		port = parsed
	}
	shown := host
	if strings.Contains(host, ":") {
		shown = "[" + host + "]"
	}
	path := u.EscapedPath()
	if path == "" {
		path = "/"
	}
	return target{fmt.Sprintf("%s://%s:%d", scheme, shown, port), host, port, path}, true
}

// pathCandidates: the path itself, then each directory above it down to "/": where a scope
// may have been learned.
func pathCandidates(path string) []string {
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	if path == "" {
		path = "/"
	}
	candidates := []string{path}
	cut := len(path)
	for cut > 0 {
		cut = strings.LastIndexByte(path[:cut], '/')
		if cut < 0 {
			break
		}
		candidates = append(candidates, path[:cut+1])
	}
	return candidates
}

func directoryOf(path string) string {
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	if dir := path[:strings.LastIndexByte(path, '/')+1]; dir != "" {
		return dir
	}
	return "/"
}

// satText shows whole sats as an integer and sub-sat amounts as a decimal.
func satText(msat int64) string {
	if msat%1000 == 0 {
		return strconv.FormatInt(msat/1000, 10)
	}
	return strconv.FormatFloat(float64(msat)/1000, 'f', -1, 64)
}

// headerSafe makes one printable ASCII line of text that may quote what a hostile server sent
// (service names), escaped as the Python client escapes it.
func headerSafe(text string) string {
	var escaped strings.Builder
	for _, r := range text {
		switch {
		case r < 0x80:
			escaped.WriteRune(r)
		case r <= 0xff:
			fmt.Fprintf(&escaped, "\\x%02x", r)
		case r <= 0xffff:
			fmt.Fprintf(&escaped, "\\u%04x", r)
		default:
			fmt.Fprintf(&escaped, "\\U%08x", r)
		}
	}
	words := strings.FieldsFunc(escaped.String(), func(r rune) bool {
		return r == ' ' || (r >= '\t' && r <= '\r') || (r >= 0x1c && r <= 0x1f)
	})
	var out strings.Builder
	for _, r := range strings.Join(words, " ") {
		if r >= ' ' && r <= '~' {
			out.WriteRune(r)
		} else {
			fmt.Fprintf(&out, "\\x%02x", r)
		}
	}
	return out.String()
}

func parseTarget(text string) (target, bool) {
	u, err := url.Parse(text)
	if err != nil {
		return target{}, false
	}
	return splitURL(u)
}
