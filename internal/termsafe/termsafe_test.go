package termsafe

import "testing"

func TestQuote(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"web01", "web01"},
		{"web 01.example-a_b+c:d", "web 01.example-a_b+c:d"},
		{"café", "café"},
		{"", `""`},
		{"a\nb", `"a\nb"`},
		{"a\tb", `"a\tb"`},
		{"\x1b[31mred", `"\x1b[31mred"`},
		{"evil\r", `"evil\r"`},
		{"bidi\u202egnp.exe", `"bidi\u202egnp.exe"`},
		{"bad\xffutf8", `"bad\xffutf8"`},
		{`"quoted"`, `"\"quoted\""`},
		{`back\slash`, `back\slash`},
	} {
		if got := Quote(tc.in); got != tc.want {
			t.Errorf("Quote(%q) = %s, want %s", tc.in, got, tc.want)
		}
	}
}
