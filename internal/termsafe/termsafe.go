// Package termsafe makes text that came from a repository, a
// configuration or a user safe to print on a terminal: a restore point's
// name, a hostname, a tag or a guest's file name may hold newlines, tabs
// or escape sequences that would forge output lines or drive the
// terminal.
package termsafe

import (
	"fmt"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Quote returns s as it is when every rune of it prints harmlessly
// (letters, marks, numbers, punctuation, symbols and the ASCII space), and
// otherwise s quoted as a Go string literal, so that control characters,
// escape sequences, format characters (bidirectional overrides among
// them) and invalid UTF-8 show as escapes.
func Quote(s string) string {
	if Safe(s) {
		return s
	}
	return strconv.Quote(s)
}

// Safe reports whether s prints as it is: valid UTF-8 of printable runes
// only, and not starting with a double quote (which would read as an
// escaped string).
func Safe(s string) bool {
	return (s == "" || s[0] != '"') && printable(s)
}

// printable reports whether s is valid UTF-8 of printable runes only.
func printable(s string) bool {
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

// Line returns s with every rune that does not print harmlessly written
// as a Go escape (\n, \x1b, \u202e), without adding quotes: for a
// message that is already text, such as an error that may carry a name
// from a repository, to stay one line that cannot drive the terminal.
func Line(s string) string {
	if printable(s) {
		return s
	}
	var b strings.Builder
	for i, r := range s {
		if r == utf8.RuneError {
			if _, size := utf8.DecodeRuneInString(s[i:]); size == 1 {
				fmt.Fprintf(&b, `\x%02x`, s[i])
				continue
			}
		}
		if unicode.IsPrint(r) {
			b.WriteRune(r)
			continue
		}
		q := strconv.QuoteRune(r)
		b.WriteString(q[1 : len(q)-1])
	}
	return b.String()
}

// Quotes applies Quote to each string of ss.
func Quotes(ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = Quote(s)
	}
	return out
}
