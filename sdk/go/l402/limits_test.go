package l402

import (
	"net/url"
	"reflect"
	"testing"
)

func TestHostPatterns(t *testing.T) {
	allow := func(patterns []string, host string, port int) bool {
		parsed, err := parseHostPatterns(patterns)
		if err != nil {
			t.Fatal(err)
		}
		return hostAllowed(parsed, host, port)
	}
	cases := []struct {
		patterns []string
		host     string
		port     int
		want     bool
	}{
		{nil, "anything.example", 443, true},
		{[]string{"example.com"}, "example.com", 443, true},
		{[]string{"example.com"}, "EXAMPLE.com", 80, true},
		{[]string{"example.com"}, "api.example.com", 443, false},
		{[]string{"*.example.com"}, "api.example.com", 443, true},
		{[]string{"*.example.com"}, "example.com", 443, false},
		{[]string{"127.0.0.1:8081"}, "127.0.0.1", 8081, true},
		{[]string{"127.0.0.1:8081"}, "127.0.0.1", 8082, false},
		{[]string{"[::1]:8081"}, "::1", 8081, true},
		{[]string{"[::1]:8081"}, "[::1]", 8081, true},
		{[]string{"[::1]"}, "::1", 1, true},
		{[]string{"api?.example"}, "api1.example", 1, true},
	}
	for _, c := range cases {
		if got := allow(c.patterns, c.host, c.port); got != c.want {
			t.Errorf("%v %s:%d = %v", c.patterns, c.host, c.port, got)
		}
	}
	for _, bad := range []string{"", " ", "http://x", "a@b", "example.com:", "example.com:0", "example.com:70000", "[::1", "[::1]x", ":80"} {
		if _, err := parseHostPattern(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestLimitsValidate(t *testing.T) {
	if err := (Limits{MaxPriceSat: 100, DailyBudgetSat: 1000}).Validate(); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []Limits{{MaxPriceSat: -1}, {MaxFeeSat: -1}, {DailyBudgetSat: -5}, {TotalBudgetSat: -1}, {Allow: []string{"http://x"}}, {MaxPriceSat: 1 << 62}} {
		if err := bad.Validate(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

func TestSplitURLAndPaths(t *testing.T) {
	for raw, want := range map[string]target{
		"http://Example.com/a/b?q=1":    {"http://example.com:80", "example.com", 80, "/a/b"},
		"https://x.test":                {"https://x.test:443", "x.test", 443, "/"},
		"http://[::1]:8080/p%20q/r":     {"http://[::1]:8080", "::1", 8080, "/p%20q/r"},
		"HTTPS://h.test:8443/episodes/": {"https://h.test:8443", "h.test", 8443, "/episodes/"},
	} {
		u, _ := url.Parse(raw)
		if got, ok := splitURL(u); !ok || got != want {
			t.Errorf("%s: %+v", raw, got)
		}
	}
	for _, raw := range []string{"ftp://x/", "/relative", "http:///nohost"} {
		u, _ := url.Parse(raw)
		if _, ok := splitURL(u); ok {
			t.Errorf("%s accepted", raw)
		}
	}
	if got := pathCandidates("/a/b/c"); !reflect.DeepEqual(got, []string{"/a/b/c", "/a/b/", "/a/", "/"}) {
		t.Error(got)
	}
	for path, dir := range map[string]string{"/a/b": "/a/", "/a/": "/a/", "/": "/", "": "/", "x": "/", "/a/b?c/d": "/a/"} {
		if got := directoryOf(path); got != dir {
			t.Errorf("directoryOf(%q) = %q", path, got)
		}
	}
}

func TestHeaderSafeAndSats(t *testing.T) {
	for in, want := range map[string]string{
		"21 sat for podcast":        "21 sat for podcast",
		"évil\r\n\r\nX-Injected: 1": `\xe9vil X-Injected: 1`,
		"a\x00b\x7f":                `a\x00b\x7f`,
		"⚡ \U0001F4B8":              `\u26a1 \U0001f4b8`,
	} {
		if got := headerSafe(in); got != want {
			t.Errorf("headerSafe(%q) = %q, want %q", in, got, want)
		}
	}
	for msat, want := range map[int64]string{21000: "21", 1500: "1.5", 1: "0.001", 0: "0"} {
		if got := satText(msat); got != want {
			t.Errorf("satText(%d) = %s", msat, got)
		}
	}
}
