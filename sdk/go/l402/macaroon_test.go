package l402

import (
	"encoding/hex"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"testing"
)

// pythonWithL402proxy is an interpreter that can import the l402proxy package: $L402PROXY_PYTHON,
// else the repository's .venv. Missing: the test skips, or fails under L402PROXY_STRICT=1 (CI).
func pythonWithL402proxy(t *testing.T) string {
	t.Helper()
	candidates := []string{os.Getenv("L402PROXY_PYTHON"), filepath.Join("..", "..", "..", ".venv", "bin", "python")}
	for _, python := range candidates {
		if python == "" {
			continue
		}
		if abs, err := filepath.Abs(python); err == nil {
			python = abs
		}
		if exec.Command(python, "-c", "import l402proxy").Run() == nil {
			return python
		}
	}
	if os.Getenv("L402PROXY_STRICT") == "1" {
		t.Fatal("required component missing: a Python with l402proxy (set L402PROXY_PYTHON)")
	}
	t.Skip("no Python with l402proxy (set L402PROXY_PYTHON)")
	return ""
}

type mintedCase struct {
	ID       string `json:"id"`
	Macaroon string `json:"macaroon"`
	Expect   struct {
		Error       string   `json:"error"`
		Version     uint16   `json:"version"`
		PaymentHash string   `json:"payment_hash"`
		TokenID     string   `json:"token_id"`
		Services    []string `json:"services"`
		ValidUntil  *float64 `json:"valid_until"`
		Caveats     []string `json:"caveats"`
	} `json:"expect"`
}

// Tokens minted by the l402proxy server's own code, and what its Python client reads from them.
func TestInspectReadsWhatThePythonClientReads(t *testing.T) {
	data, err := os.ReadFile(filepath.Join("testdata", "minted.json"))
	if err != nil {
		t.Fatal(err)
	}
	var table struct {
		Cases []mintedCase `json:"cases"`
	}
	if err := json.Unmarshal(data, &table); err != nil {
		t.Fatal(err)
	}
	if len(table.Cases) < 20 {
		t.Fatalf("only %d cases", len(table.Cases))
	}
	for _, c := range table.Cases {
		t.Run(c.ID, func(t *testing.T) {
			info, err := InspectMacaroon(c.Macaroon)
			if c.Expect.Error != "" {
				tokenErr, ok := err.(*TokenError)
				if !ok || tokenErr.Reason != c.Expect.Error {
					t.Fatalf("got %v (%#v), want a %s error", info, err, c.Expect.Error)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if hex.EncodeToString(info.Identifier.PaymentHash[:]) != c.Expect.PaymentHash ||
				hex.EncodeToString(info.Identifier.TokenID[:]) != c.Expect.TokenID || info.Identifier.Version != c.Expect.Version {
				t.Errorf("identifier %+v", info.Identifier)
			}
			if len(info.Services)+len(c.Expect.Services) > 0 && !reflect.DeepEqual(info.Services, c.Expect.Services) {
				t.Errorf("services %q, want %q", info.Services, c.Expect.Services)
			}
			if !reflect.DeepEqual(info.Caveats, c.Expect.Caveats) && len(info.Caveats)+len(c.Expect.Caveats) > 0 {
				t.Errorf("caveats %q, want %q", info.Caveats, c.Expect.Caveats)
			}
			switch {
			case c.Expect.ValidUntil == nil && info.HasExpiry:
				t.Errorf("expiry %v, want none", info.ValidUntil)
			case c.Expect.ValidUntil != nil && (!info.HasExpiry || info.ValidUntil != *c.Expect.ValidUntil):
				t.Errorf("expiry %v (%v), want %v", info.ValidUntil, info.HasExpiry, *c.Expect.ValidUntil)
			}
		})
	}
}

// testdata/minted.json is what gen_minted.py writes today: the server's minting has not moved.
func TestMintedFixtureIsUpToDate(t *testing.T) {
	python := pythonWithL402proxy(t)
	out, err := exec.Command(python, filepath.Join("testdata", "gen_minted.py"), "--check").CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
}

func TestDecodeBase64Any(t *testing.T) {
	for _, good := range []string{"AgE=", "AgE", " AgE= ", "-_8", "+/8", "+/8="} {
		if _, err := decodeBase64Any(good); err != nil {
			t.Errorf("%q: %v", good, err)
		}
	}
	for _, bad := range []string{"", "=", "A", "AgE===", "Ag E", "Ag*E", "AgE=x"} {
		if _, err := decodeBase64Any(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestScopeOf(t *testing.T) {
	withServices := &TokenInfo{Services: []string{"b", "a"}}
	if got := scopeOf(withServices, "/x/y"); got != "services:a,b" {
		t.Fatal(got)
	}
	if got := scopeOf(&TokenInfo{}, "/x/y?q=1"); got != "path:/x/" {
		t.Fatal(got)
	}
}
