package repo

import (
	"errors"
	"fmt"
	"unicode"
	"unicode/utf8"

	"github.com/kura-backup/kura/internal/termsafe"
)

// MaxNameLen is the longest restore point name, in bytes.
const MaxNameLen = 128

// NameRule says what a restore point name may hold, for error messages.
const NameRule = "use 1 to 128 letters, digits, spaces and . _ - + : (no @, /, quotes or control characters), starting with a letter, digit or _"

// ErrBadName is wrapped by ValidName's errors.
var ErrBadName = errors.New("invalid restore point name")

// ErrBadRef is wrapped by FindSnapshot's errors for a reference that is
// none of the forms it knows (refForms).
var ErrBadRef = errors.New("not a snapshot reference")

// refForms lists the snapshot references FindSnapshot resolves.
const refForms = "use NAME@latest, NAME@2026-11-20 (a local date or time prefix such as 2026-11-20T14:05), an id or id prefix (see `kura snapshots`), or latest"

// ValidName checks a restore point name before a backup is made: letters
// and digits (of any script), spaces and ". _ - + :", at most MaxNameLen
// bytes, not starting or ending with a space. That covers libvirt domain
// names and image file names as people write them, while "@" (which
// separates NAME@latest), "/" (a path), quotes and control characters
// (which would forge lines or drive a terminal when listed) are refused.
func ValidName(name string) error {
	bad := func(why string) error {
		return fmt.Errorf("%w %q: %s; %s (pass another with --name; a VM's restore points take its domain name)", ErrBadName, name, why, NameRule)
	}
	switch {
	case name == "":
		return bad("empty")
	case len(name) > MaxNameLen:
		return bad(fmt.Sprintf("%d bytes long", len(name)))
	case !utf8.ValidString(name):
		return bad("not valid UTF-8")
	}
	for i, r := range name {
		switch {
		case unicode.IsLetter(r) || unicode.IsDigit(r) || r == '_':
		case i == 0:
			return bad(fmt.Sprintf("starts with %q", r))
		case r == '.' || r == '-' || r == '+' || r == ':':
		case r == ' ':
			if i == len(name)-1 {
				return bad("ends with a space")
			}
		default:
			return bad(fmt.Sprintf("holds %q", r))
		}
	}
	return nil
}

// timePrefix reports whether s is a prefix of a local time written as
// 2006-01-02T15:04:05: digits where the layout has digits, its
// separators where it has them.
func timePrefix(s string) bool {
	const layout = "2006-01-02T15:04:05"
	if s == "" || len(s) > len(layout) {
		return false
	}
	for i := 0; i < len(s); i++ {
		l, c := layout[i], s[i]
		if l >= '0' && l <= '9' {
			if c < '0' || c > '9' {
				return false
			}
		} else if c != l {
			return false
		}
	}
	return true
}

// quote shows a user's or a repository's string in an error message.
func quote(s string) string { return termsafe.Quote(s) }
