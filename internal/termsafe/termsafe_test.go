package termsafe

import "testing"

func TestQuote(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"web01", "web01"},
		{"web 01.example-a_b+c:d", "web 01.example-a_b+c:d"},
		{"café", "café"},
		{"", ""},
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

func TestLine(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"snapshot web: no such snapshot", "snapshot web: no such snapshot"},
		{`name "x" is bad`, `name "x" is bad`},
		{"two\nlines", `two\nlines`},
		{"esc \x1b[2J here", `esc \x1b[2J here`},
		{"bidi\u202eX", `bidi\u202eX`},
		{"bad\xffbyte", `bad\xffbyte`},
		{"tab\there", `tab\there`},
	} {
		if got := Line(tc.in); got != tc.want {
			t.Errorf("Line(%q) = %s, want %s", tc.in, got, tc.want)
		}
	}
}
