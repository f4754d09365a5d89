package repo

import (
	"errors"
	"strings"
	"testing"
)

func TestValidName(t *testing.T) {
	for _, tc := range []struct {
		name string
		ok   bool
		why  string
	}{
		{"web01", true, ""},
		{"web-01.example.com", true, ""},
		{"db_2+test:blue", true, ""},
		{"Windows Server 2022", true, ""},
		{"_private", true, ""},
		{"höst", true, ""},
		{"", false, "empty"},
		{"a@b", false, `holds '@'`},
		{"a/b", false, `holds '/'`},
		{"line\nbreak", false, `holds '\n'`},
		{"esc\x1b[31m", false, `holds '\x1b'`},
		{"tab\tname", false, `holds '\t'`},
		{`quo"te`, false, `holds '"'`},
		{"-flag", false, "starts with '-'"},
		{" lead", false, "starts with"},
		{"trail ", false, "ends with a space"},
		{strings.Repeat("a", MaxNameLen), true, ""},
		{strings.Repeat("a", MaxNameLen+1), false, "129 bytes"},
		{"bad\xff", false, "UTF-8"},
		{"bidi\u202ename", false, `holds '\u202e'`},
	} {
		err := ValidName(tc.name)
		if tc.ok {
			if err != nil {
				t.Errorf("ValidName(%q) = %v, want nil", tc.name, err)
			}
			continue
		}
		if !errors.Is(err, ErrBadName) {
			t.Errorf("ValidName(%q) = %v, want ErrBadName", tc.name, err)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, tc.why) || !strings.Contains(msg, "--name") || !strings.Contains(msg, "letters, digits") || strings.ContainsAny(msg, "\n\x1b\t") {
			t.Errorf("ValidName(%q) = %q: want one line naming %q, the rule and --name", tc.name, msg, tc.why)
		}
	}
}
