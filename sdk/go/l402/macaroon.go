package l402

import (
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// decodeBase64Any decodes standard or URL-safe base64, padded or not (what L402 servers send).
func decodeBase64Any(value string) ([]byte, error) {
	text := strings.Trim(value, " \t\r\n\v\f")
	body := strings.TrimRight(text, "=")
	if body == "" || len(text)-len(body) > 2 {
		return nil, errors.New("not valid base64")
	}
	for i := 0; i < len(body); i++ {
		c := body[i]
		ok := c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' ||
			c == '+' || c == '/' || c == '-' || c == '_'
		if !ok {
			return nil, errors.New("not valid base64")
		}
	}
	body = strings.NewReplacer("-", "+", "_", "/").Replace(body)
	if len(body)%4 == 1 {
		return nil, errors.New("not valid base64 (truncated)")
	}
	raw, err := base64.RawStdEncoding.DecodeString(body)
	if err != nil {
		return nil, fmt.Errorf("not valid base64 (%v)", err)
	}
	return raw, nil
}

// Identifier is the 66-byte macaroon identifier Aperture mints: version 0, the payment hash of
// the invoice that pays for the token, and a random token id.
type Identifier struct {
	Version     uint16
	PaymentHash [32]byte
	TokenID     [32]byte
}

const identifierSize = 66

// errUnknownVersion: the identifier names a layout this code does not know.
var errUnknownVersion = errors.New("unknown identifier version")

func decodeIdentifier(raw []byte) (Identifier, error) {
	var id Identifier
	if len(raw) < 2 {
		return id, fmt.Errorf("identifier too short (%d bytes)", len(raw))
	}
	// Version first, as Aperture does: a future version may have another length.
	version := uint16(raw[0])<<8 | uint16(raw[1])
	if version != 0 {
		return id, fmt.Errorf("%w %d", errUnknownVersion, version)
	}
	if len(raw) != identifierSize {
		return id, fmt.Errorf("identifier must be %d bytes, got %d", identifierSize, len(raw))
	}
	id.Version = version
	copy(id.PaymentHash[:], raw[2:34])
	copy(id.TokenID[:], raw[34:])
	return id, nil
}

// clientIdentifier reads Aperture's 66 bytes, or lsat-js/boltwall's hex text of the same 66 bytes.
func clientIdentifier(raw []byte) (Identifier, error) {
	id, err := decodeIdentifier(raw)
	if err == nil || !errors.Is(err, errUnknownVersion) || len(raw) != 2*identifierSize {
		return id, err
	}
	decoded, hexErr := hex.DecodeString(string(raw))
	if hexErr == nil {
		if id, err = decodeIdentifier(decoded); err == nil {
			return id, nil
		}
	}
	return Identifier{}, fmt.Errorf("%w: identifier is neither Aperture's nor lsat-js's layout", errUnknownVersion)
}

// macaroon is what the client reads of a V2 binary macaroon: no signature check (only the
// server that minted it holds the key).
type macaroon struct {
	identifier []byte
	// caveats holds the identifiers of the first-party caveats, in order.
	caveats [][]byte
}

const (
	fieldEOS        = 0
	fieldLocation   = 1
	fieldIdentifier = 2
	fieldVID        = 4
	fieldSignature  = 6
)

type packet struct {
	fieldType uint64
	data      []byte
}

func readUvarint(data []byte) (uint64, int, error) {
	var n uint64
	for i, b := range data {
		if i == 10 {
			break
		}
		if b < 0x80 {
			return n | uint64(b)<<(7*uint(i)), i + 1, nil
		}
		n |= uint64(b&0x7f) << (7 * uint(i))
	}
	return 0, 0, errors.New("cannot read uvarint")
}

func readPacket(data []byte) ([]byte, packet, error) {
	fieldType, n, err := readUvarint(data)
	if err != nil {
		return nil, packet{}, err
	}
	data = data[n:]
	if fieldType == fieldEOS {
		return data, packet{fieldType: fieldEOS}, nil
	}
	length, n, err := readUvarint(data)
	if err != nil {
		return nil, packet{}, err
	}
	data = data[n:]
	if length > uint64(len(data)) {
		return nil, packet{}, errors.New("field data extends past end of buffer")
	}
	return data[length:], packet{fieldType, data[:length]}, nil
}

// readSection reads packets up to an EOS; field types must increase within a section.
func readSection(data []byte) ([]byte, []packet, error) {
	var packets []packet
	var previous uint64
	first := true
	for {
		if len(data) == 0 {
			return nil, nil, errors.New("section extends past end of buffer")
		}
		rest, p, err := readPacket(data)
		if err != nil {
			return nil, nil, err
		}
		if p.fieldType == fieldEOS {
			return rest, packets, nil
		}
		if !first && p.fieldType <= previous {
			return nil, nil, errors.New("fields out of order")
		}
		packets = append(packets, p)
		previous, first = p.fieldType, false
		data = rest
	}
}

// decodeMacaroonV2 follows libmacaroons' V2 binary format as pymacaroons reads it (the server
// side of this project), so both accept and refuse the same tokens.
func decodeMacaroonV2(raw []byte) (*macaroon, error) {
	if len(raw) == 0 || raw[0] != 2 {
		return nil, errors.New("macaroon is not in the V2 binary format")
	}
	rest, section, err := readSection(raw[1:])
	if err != nil {
		return nil, err
	}
	if len(section) > 0 && section[0].fieldType == fieldLocation {
		if !utf8.Valid(section[0].data) {
			return nil, errors.New("location is not UTF-8")
		}
		section = section[1:]
	}
	if len(section) != 1 || section[0].fieldType != fieldIdentifier {
		return nil, errors.New("invalid macaroon header")
	}
	m := &macaroon{identifier: section[0].data}
	for {
		rest, section, err = readSection(rest)
		if err != nil {
			return nil, err
		}
		if len(section) == 0 {
			break
		}
		hasLocation := false
		if section[0].fieldType == fieldLocation {
			if !utf8.Valid(section[0].data) {
				return nil, errors.New("caveat location is not UTF-8")
			}
			hasLocation = true
			section = section[1:]
		}
		if len(section) == 0 || section[0].fieldType != fieldIdentifier {
			return nil, errors.New("no identifier in caveat")
		}
		id := section[0].data
		section = section[1:]
		if len(section) == 0 {
			if hasLocation {
				return nil, errors.New("location not allowed in first party caveat")
			}
			m.caveats = append(m.caveats, id)
			continue
		}
		if len(section) != 1 {
			return nil, errors.New("extra fields found in caveat")
		}
		if section[0].fieldType != fieldVID {
			return nil, errors.New("invalid field found in caveat")
		}
		// A third-party caveat: the client can neither read nor discharge it; skipped, as the
		// Python client skips it.
	}
	_, p, err := readPacket(rest)
	if err != nil {
		return nil, err
	}
	if p.fieldType != fieldSignature {
		return nil, errors.New("unexpected field found instead of signature")
	}
	return m, nil
}

// TokenInfo is what a client can read from a token it was offered, without the server's key.
type TokenInfo struct {
	Identifier Identifier
	// Services are the services every services= caveat allows (later caveats narrow), in the
	// first caveat's order; empty if the token names none.
	Services []string
	// ValidUntil is the tightest expiry that applies to those services (<name>_valid_until in
	// unix seconds, lsat-js expiration= in unix milliseconds), in unix seconds; HasExpiry
	// says whether the token names one.
	ValidUntil float64
	HasExpiry  bool
	// Caveats are the first-party caveats as text, in order.
	Caveats []string
}

// TokenError says why a token cannot be read. Reason is "malformed" or "unknown_version", as
// the Python client's TokenError says.
type TokenError struct {
	Reason  string
	Message string
}

func (e *TokenError) Error() string { return e.Message }

func malformed(format string, args ...interface{}) error {
	return &TokenError{"malformed", fmt.Sprintf(format, args...)}
}

// InspectMacaroon reads a token's identifier, services and expiry; it checks nothing (only the
// server holds the key). It refuses what the Python client's inspect() refuses.
func InspectMacaroon(macaroonB64 string) (*TokenInfo, error) {
	raw, err := decodeBase64Any(macaroonB64)
	if err != nil {
		return nil, malformed("macaroon is not valid base64")
	}
	// V1 is refused rather than parsed: it cannot carry Aperture's binary identifier.
	if len(raw) == 0 || raw[0] != 2 {
		return nil, malformed("macaroon is not in the V2 binary format")
	}
	m, err := decodeMacaroonV2(raw)
	if err != nil {
		return nil, malformed("macaroon cannot be decoded (%v)", err)
	}
	id, err := clientIdentifier(m.identifier)
	if err != nil {
		if errors.Is(err, errUnknownVersion) {
			return nil, &TokenError{"unknown_version", err.Error()}
		}
		return nil, malformed("%v", err)
	}
	info := &TokenInfo{Identifier: id}
	var serviceSets []map[string]bool
	var serviceOrder []string
	expiries := map[string][]float64{}
	for _, caveat := range m.caveats {
		if !utf8.Valid(caveat) {
			return nil, malformed("caveat is not UTF-8 text")
		}
		text := string(caveat)
		info.Caveats = append(info.Caveats, text)
		condition, value, err := parseCaveat(text)
		if err != nil {
			return nil, err
		}
		switch {
		case condition == "services":
			names, err := parseServices(value, text)
			if err != nil {
				return nil, err
			}
			set := map[string]bool{}
			for _, name := range names {
				set[name] = true
			}
			serviceSets = append(serviceSets, set)
			if len(serviceOrder) == 0 {
				serviceOrder = names
			}
		case condition == "expiration":
			ms, err := parseUint(value, text)
			if err != nil {
				return nil, err
			}
			expiries[""] = append(expiries[""], ms/1000)
		case strings.HasSuffix(condition, "_valid_until"):
			seconds, err := parseUint(value, text)
			if err != nil {
				return nil, err
			}
			name := strings.TrimSuffix(condition, "_valid_until")
			expiries[name] = append(expiries[name], seconds)
		}
	}
	for _, name := range serviceOrder {
		everywhere := true
		for _, set := range serviceSets {
			everywhere = everywhere && set[name]
		}
		if everywhere {
			info.Services = append(info.Services, name)
		}
	}
	for name, values := range expiries {
		if name != "" && len(info.Services) > 0 && !contains(info.Services, name) {
			continue
		}
		for _, expiry := range values {
			if !info.HasExpiry || expiry < info.ValidUntil {
				info.ValidUntil, info.HasExpiry = expiry, true
			}
		}
	}
	return info, nil
}

func contains(list []string, item string) bool {
	for _, x := range list {
		if x == item {
			return true
		}
	}
	return false
}

// parseCaveat splits `condition=value`; spaces around '=' are ignored (Aperture trims them too).
func parseCaveat(text string) (string, string, error) {
	i := strings.IndexByte(text, '=')
	if i < 0 || strings.TrimFunc(text[:i], unicode.IsSpace) == "" {
		return "", "", malformed("caveat %q is not 'condition=value'", text)
	}
	return strings.TrimFunc(text[:i], unicode.IsSpace), strings.TrimFunc(text[i+1:], unicode.IsSpace), nil
}

func parseServices(value, text string) ([]string, error) {
	var names []string
	for _, part := range strings.Split(value, ",") {
		colon := strings.IndexByte(part, ':')
		if colon < 0 {
			return nil, malformed("caveat %q: expected <name>:<tier>[,...]", text)
		}
		name := strings.TrimFunc(part[:colon], unicode.IsSpace)
		tier := strings.TrimFunc(part[colon+1:], unicode.IsSpace)
		if name == "" || !isASCIIDigits(tier) {
			return nil, malformed("caveat %q: expected <name>:<tier>[,...]", text)
		}
		for _, r := range name {
			// A name ends up in headers and logs: control characters have no business there.
			if !unicode.IsPrint(r) {
				return nil, malformed("caveat %q: control characters in a name", text)
			}
		}
		names = append(names, name)
	}
	return names, nil
}

func isASCIIDigits(text string) bool {
	if text == "" {
		return false
	}
	for i := 0; i < len(text); i++ {
		if text[i] < '0' || text[i] > '9' {
			return false
		}
	}
	return true
}

// parseUint reads a whole number of ASCII digits; beyond float64's range it is +Inf (never).
func parseUint(value, text string) (float64, error) {
	if !isASCIIDigits(value) {
		return 0, malformed("caveat %q: expected a whole number", text)
	}
	number, err := strconv.ParseFloat(value, 64)
	if err != nil {
		return math.Inf(1), nil
	}
	return number, nil
}

// scopeOf is the server's own scope (services=) when it names one, else the directory asked
// for: tokens are kept and reused per (origin, scope).
func scopeOf(info *TokenInfo, path string) string {
	if len(info.Services) > 0 {
		sorted := append([]string(nil), info.Services...)
		sort.Strings(sorted)
		return "services:" + strings.Join(sorted, ",")
	}
	return "path:" + directoryOf(path)
}
