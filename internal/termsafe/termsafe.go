// Package termsafe makes text that came from a repository, a
// configuration or a user safe to print on a terminal: a restore point's
// name, a hostname, a tag or a guest's file name may hold newlines, tabs
// or escape sequences that would forge output lines or drive the
// terminal.
package termsafe

import (
	"strconv"
	"unicode"
	"unicode/utf8"
)

// Quote returns s as it is when every rune of it prints harmlessly
// (letters, marks, numbers, punctuation, symbols and the ASCII space), and
// otherwise s quoted as a Go string literal, so that control characters,
// escape sequences, format characters (bidirectional overrides among
// them) and invalid UTF-8 show as escapes. The empty string is shown as
// "" so that an empty column stays visible.
func Quote(s string) string {
	if s == "" {
		return `""`
	}
	if Safe(s) {
		return s
	}
	return strconv.Quote(s)
}

// Safe reports whether s prints as it is: valid UTF-8 of printable runes
// only, and not starting with a double quote (which would read as an
// escaped string).
func Safe(s string) bool {
	if s != "" && s[0] == '"' {
		return false
	}
	for i, r := range s {
		if r == utf8.RuneError {
			if _, size := utf8.DecodeRuneInString(s[i:]); size == 1 {
				return false
			}
		}
		if !unicode.IsPrint(r) {
			return false
		}
	}
	return true
}

// Quotes applies Quote to each string of ss.
func Quotes(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = Quote(s)
	}
	return out
}
