package l402

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// The table the Python suite reads too (tests/unit/test_headers.py): the two parsers cannot drift.
var challengeTable = filepath.Join("..", "..", "..", "tests", "fixtures", "challenge_shapes.json")

type tableChallenge struct {
	Scheme   string  `json:"scheme"`
	Macaroon string  `json:"macaroon"`
	Invoice  string  `json:"invoice"`
	Version  *string `json:"version"`
}

type tableCase struct {
	ID      string            `json:"id"`
	Headers []string          `json:"headers"`
	Expect  []tableChallenge  `json:"expect"`
	Params  map[string]string `json:"params"`
	Absent  []string          `json:"absent"`
}

type shapeTable struct {
	Values     map[string]string      `json:"values"`
	Challenges map[string][]tableCase `json:"challenges"`
	AuthHeader []struct {
		Header string               `json:"header"`
		Expect [][2]json.RawMessage `json:"expect"`
	} `json:"auth_header"`
	Garbage []json.RawMessage `json:"garbage"`
}

func loadShapeTable(t *testing.T) *shapeTable {
	t.Helper()
	data, err := os.ReadFile(challengeTable)
	if err != nil {
		t.Fatalf("the shared challenge table: %v", err)
	}
	var table shapeTable
	if err := json.Unmarshal(data, &table); err != nil {
		t.Fatalf("%s: %v", challengeTable, err)
	}
	return &table
}

func (table *shapeTable) expand(text string) string {
	for name, value := range table.Values {
		text = strings.ReplaceAll(text, "{"+name+"}", value)
	}
	return text
}

func TestChallengeTable(t *testing.T) {
	table := loadShapeTable(t)
	total := 0
	for group, cases := range table.Challenges {
		for _, c := range cases {
			total++
			t.Run(group+"/"+c.ID, func(t *testing.T) {
				lines := make([]string, len(c.Headers))
				for i, line := range c.Headers {
					lines[i] = table.expand(line)
				}
				got := ParseChallenges(lines)
				if len(got) != len(c.Expect) {
					t.Fatalf("got %d challenges, want %d: %+v", len(got), len(c.Expect), got)
				}
				for i, want := range c.Expect {
					g := got[i]
					if g.Scheme != want.Scheme || g.Macaroon != table.expand(want.Macaroon) || g.Invoice != table.expand(want.Invoice) {
						t.Errorf("challenge %d: got %s %q %q", i, g.Scheme, g.Macaroon, g.Invoice)
					}
					if (want.Version == nil) == g.HasVersion || (want.Version != nil && *want.Version != g.Version) {
						t.Errorf("challenge %d: version %q (present %v), want %v", i, g.Version, g.HasVersion, want.Version)
					}
					for _, absent := range c.Absent {
						for name, value := range g.Params {
							if value == absent {
								t.Errorf("challenge %d: %q leaked into parameter %q", i, absent, name)
							}
						}
					}
				}
				for name, value := range c.Params {
					if got[0].Params[name] != value {
						t.Errorf("param %q = %q, want %q", name, got[0].Params[name], value)
					}
				}
				if group == "base64-flavours" {
					// Every flavour decodes to the same macaroon.
					a, errA := decodeBase64Any(got[0].Macaroon)
					b, errB := decodeBase64Any(table.Values["MAC"])
					if errA != nil || errB != nil || string(a) != string(b) {
						t.Errorf("flavour decodes differently: %v %v", errA, errB)
					}
				}
			})
		}
	}
	if total < 90 {
		t.Fatalf("only %d cases in %s", total, challengeTable)
	}
}

func TestAuthHeaderTable(t *testing.T) {
	table := loadShapeTable(t)
	for _, row := range table.AuthHeader {
		got := parseAuthHeader(row.Header)
		var want []rawChallenge
		for _, pair := range row.Expect {
			var scheme string
			var params map[string]string
			if json.Unmarshal(pair[0], &scheme) != nil || json.Unmarshal(pair[1], &params) != nil {
				t.Fatalf("bad row %q", row.Header)
			}
			want = append(want, rawChallenge{scheme, params})
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("parseAuthHeader(%q) = %v, want %v", row.Header, got, want)
		}
	}
}

func TestGarbageNeverPanics(t *testing.T) {
	table := loadShapeTable(t)
	for _, entry := range table.Garbage {
		var text string
		if json.Unmarshal(entry, &text) != nil {
			var repeat struct {
				Prefix, Repeat string
				Times          int
			}
			if err := json.Unmarshal(entry, &repeat); err != nil {
				t.Fatal(err)
			}
			text = repeat.Prefix + strings.Repeat(repeat.Repeat, repeat.Times)
		}
		parseAuthHeader(text)
		_ = ParseChallenges([]string{text})
	}
}

func TestApertureChallengeInvoiceMatchesMacaroon(t *testing.T) {
	table := loadShapeTable(t)
	got := ParseChallenges([]string{table.Values["APERTURE_CHALLENGE"]})
	if len(got) != 1 || got[0].Scheme != "LSAT" {
		t.Fatalf("%+v", got)
	}
	info, err := InspectMacaroon(got[0].Macaroon)
	if err != nil {
		t.Fatal(err)
	}
	invoice, err := DecodeInvoice(got[0].Invoice)
	if err != nil {
		t.Fatal(err)
	}
	if info.Identifier.PaymentHash != invoice.PaymentHash || invoice.AmountMsat != 10_000 || invoice.Network != "regtest" {
		t.Fatalf("identifier %x, invoice %+v", info.Identifier.PaymentHash, invoice)
	}
	if !reflect.DeepEqual(info.Services, []string{"meme"}) {
		t.Fatalf("services %v", info.Services)
	}
}

func TestFormatCredential(t *testing.T) {
	var p Preimage
	p[0], p[31] = 0xab, 0x01
	got, err := FormatCredential("lsat", "AgE=", p)
	if err != nil || got != "LSAT AgE=:ab"+strings.Repeat("00", 30)+"01" {
		t.Fatalf("%q %v", got, err)
	}
	for _, bad := range []struct{ scheme, macaroon string }{{"Bearer", "AgE="}, {"L402", ""}, {"L402", "a b"}, {"L402", "a:b"}} {
		if _, err := FormatCredential(bad.scheme, bad.macaroon, p); err == nil {
			t.Errorf("FormatCredential(%q, %q) accepted", bad.scheme, bad.macaroon)
		}
	}
	if strings.Contains(p.String(), "ab") || strings.Contains(p.GoString(), "ab") {
		t.Fatal("a preimage shows itself")
	}
}
