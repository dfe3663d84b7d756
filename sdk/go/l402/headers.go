package l402

import (
	"fmt"
	"strings"
)

// Challenge is one L402 or LSAT challenge read from a WWW-Authenticate header.
type Challenge struct {
	// Scheme is "L402" or "LSAT", upper-cased whatever case the server used.
	Scheme string
	// Macaroon is the token as sent (any base64 flavour): the macaroon= parameter, or token=.
	Macaroon string
	// Invoice is the BOLT11 payment request.
	Invoice string
	// Version is the version= parameter; HasVersion says whether there was one.
	Version    string
	HasVersion bool
	// Params holds every parameter of the challenge, names lower-cased; a token68 is under "".
	Params map[string]string
}

const whitespace = " \t\r\n"

// The parser below is a line-for-line port of addons/l402proxy/l402/headers.py
// (parse_auth_header): tests/fixtures/challenge_shapes.json holds the shapes both must read.
// It is deliberately tolerant: servers in the wild send space-separated parameters, single
// quotes and unquoted base64 with '=' padding, which RFC 7235 parsers reject or misread.

func isWhitespace(c byte) bool { return strings.IndexByte(whitespace, c) >= 0 }
func isQuote(c byte) bool      { return c == '"' || c == '\'' }
func isWordEnd(c byte) bool    { return isWhitespace(c) || c == ',' || c == '=' || isQuote(c) }
func isValueEnd(c byte) bool   { return isWhitespace(c) || c == ',' }

type rawChallenge struct {
	scheme string
	params map[string]string
}

// parseAuthHeader splits one WWW-Authenticate value into (scheme, params) challenges; it never
// fails. A bare word starts a new challenge unless it directly follows a scheme (then it is
// that scheme's token68, stored under ""). `name=` is always a parameter of the current
// challenge, so parameters never move from one challenge to another.
func parseAuthHeader(value string) []rawChallenge {
	var challenges []rawChallenge
	var params map[string]string // nil until the first scheme: earlier params are dropped
	afterScheme := false         // only whitespace since the scheme: a token68 may come here
	i, n := 0, len(value)
	for i < n {
		c := value[i]
		switch {
		case isWhitespace(c):
			i++
			continue
		case c == ',':
			afterScheme = false
			i++
			continue
		case isQuote(c):
			_, _, i = readQuoted(value, i) // a stray quoted string: nothing to attach it to
			afterScheme = false
			continue
		case c == '=':
			i++
			afterScheme = false
			continue
		}
		end := wordEnd(value, i)
		word := value[i:end]
		following := skipWhitespace(value, end)
		if following < n && value[following] == '=' {
			i = readParam(value, word, end, following, params, afterScheme)
			afterScheme = false
			continue
		}
		if afterScheme && params != nil && !paramStarts(value, end, following) {
			params[""] = word
			afterScheme = false
			i = end
			continue
		}
		params = map[string]string{}
		challenges = append(challenges, rawChallenge{word, params})
		afterScheme = true
		i = end
	}
	return challenges
}

func setDefault(params map[string]string, name, value string) {
	if _, ok := params[name]; !ok {
		params[name] = value
	}
}

// readParam reads `name=value` (or a token68 ending in '=') at equals; it returns the next index.
func readParam(value, name string, nameEnd, equals int, params map[string]string, afterScheme bool) int {
	n := len(value)
	padEnd := equals
	for padEnd < n && value[padEnd] == '=' {
		padEnd++
	}
	pads := padEnd - equals
	start := skipWhitespace(value, padEnd)

	if pads == 1 && start < n && isQuote(value[start]) {
		text, ok, next := readQuoted(value, start)
		if ok && params != nil {
			setDefault(params, strings.ToLower(name), text)
		}
		return next
	}
	if pads == 1 && padEnd < n && !isValueEnd(value[padEnd]) {
		// Unquoted: runs to whitespace or comma, so base64 '=' padding stays in the value.
		end := padEnd
		for end < n && !isValueEnd(value[end]) {
			end++
		}
		if params != nil {
			setDefault(params, strings.ToLower(name), value[padEnd:end])
		}
		return end
	}
	if params != nil {
		if afterScheme && nameEnd == equals && !paramFollows(value, padEnd) {
			params[""] = name + strings.Repeat("=", pads) // `Bearer abc==`: token68 padding
		} else if pads == 1 {
			setDefault(params, strings.ToLower(name), "")
		}
	}
	return padEnd
}

// readQuoted reads a "double" (with backslash escapes) or 'single' quoted string at start.
// ok is false for an unterminated string, which is dropped rather than guessed at.
func readQuoted(value string, start int) (text string, ok bool, next int) {
	quote := value[start]
	var out strings.Builder
	i, n := start+1, len(value)
	for i < n {
		c := value[i]
		if c == quote {
			return out.String(), true, i + 1
		}
		if c == '\\' && quote == '"' && i+1 < n {
			i++
			c = value[i]
		}
		out.WriteByte(c)
		i++
	}
	return "", false, n
}

func wordEnd(value string, i int) int {
	for i < len(value) && !isWordEnd(value[i]) {
		i++
	}
	return i
}

func skipWhitespace(value string, i int) int {
	for i < len(value) && isWhitespace(value[i]) {
		i++
	}
	return i
}

// paramStarts: after whitespace, does `name=` come next (so the word before it is a scheme)?
func paramStarts(value string, wordEndAt, following int) bool {
	if following == wordEndAt || following >= len(value) || isWordEnd(value[following]) {
		return false
	}
	afterName := skipWhitespace(value, wordEnd(value, following))
	return afterName < len(value) && value[afterName] == '='
}

// paramFollows: is the next item, past whitespace and commas, a `name=` parameter?
func paramFollows(value string, i int) bool {
	n := len(value)
	for i < n && (isWhitespace(value[i]) || value[i] == ',') {
		i++
	}
	end := wordEnd(value, i)
	if end == i {
		return false
	}
	afterName := skipWhitespace(value, end)
	return afterName < n && value[afterName] == '='
}

// ParseChallenges returns every L402/LSAT challenge with a macaroon and an invoice in the given
// WWW-Authenticate values (one per header line), in the order sent. Other schemes are skipped,
// and their parameters never complete an L402 challenge.
func ParseChallenges(values []string) []Challenge {
	var challenges []Challenge
	for _, value := range values {
		for _, raw := range parseAuthHeader(value) {
			scheme := strings.ToUpper(raw.scheme)
			if scheme != "L402" && scheme != "LSAT" {
				continue
			}
			// Servers that send both send the same token; macaroon= is what Aperture names it.
			macaroon := raw.params["macaroon"]
			if macaroon == "" {
				macaroon = raw.params["token"]
			}
			invoice := raw.params["invoice"]
			if macaroon == "" || invoice == "" {
				continue
			}
			version, hasVersion := raw.params["version"]
			challenges = append(challenges, Challenge{
				Scheme:     scheme,
				Macaroon:   macaroon,
				Invoice:    invoice,
				Version:    version,
				HasVersion: hasVersion,
				Params:     raw.params,
			})
		}
	}
	return challenges
}

// FormatCredential is the Authorization value for a paid token:
// `<scheme> <macaroon>:<preimage hex>`.
func FormatCredential(scheme, macaroon string, preimage Preimage) (string, error) {
	upper := strings.ToUpper(scheme)
	if upper != "L402" && upper != "LSAT" {
		return "", fmt.Errorf("credential scheme must be L402 or LSAT, not %q", scheme)
	}
	if macaroon == "" || strings.ContainsAny(macaroon, ",: \t\r\n") {
		return "", fmt.Errorf("macaroon is empty or not base64")
	}
	return upper + " " + macaroon + ":" + preimage.Hex(), nil
}
