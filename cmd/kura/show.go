package main

import "github.com/kura-backup/kura/internal/termsafe"

// show is how the CLI prints a string that came from a repository, a
// configuration, a guest or a user (a restore point's name, a hostname, a
// tag, a file name): as it is when it prints harmlessly, else quoted with
// escapes (termsafe.Quote), so that a newline or an escape sequence in it
// can neither forge a line nor drive the terminal. Repositories written
// before names were checked may hold such names.
func show(s string) string { return termsafe.Quote(s) }

// short is an object id's first 8 characters, or all of it when shorter
// (an id read from a file name need not be well formed).
func short(id string) string {
	if len(id) > 8 {
		return id[:8]
	}
	return id
}
