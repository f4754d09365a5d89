package main

import (
	"context"
	"errors"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/backend/s3"
	"github.com/kura-backup/kura/internal/repo"
)

// Exit statuses. Scripts tell the causes apart by them; docs/EXIT-CODES.md
// lists them, and they follow restic's where the causes are the same.
const (
	exitOK          = 0   // the command did what was asked
	exitError       = 1   // any other failure
	exitUsage       = 2   // bad command line: unknown command or flag, wrong arguments, a flag out of range
	exitPartial     = 3   // done, but with damage: a restore filled unreadable ranges with zeros, verify or repair found problems, a boot check failed
	exitNoRepo      = 10  // no repository at the location (or its config is unreadable), or the S3 bucket does not exist
	exitLocked      = 11  // the repository is locked (another prune runs)
	exitBadPassword = 12  // the password (or key) opens no key of the repository
	exitInterrupted = 130 // SIGINT or SIGTERM stopped the command
)

// exitCode maps the error a command returned to its exit status. ctx is
// the context the signals cancel: once it is done, a failure counts as
// an interruption whatever error it surfaced as.
func exitCode(ctx context.Context, err error) int {
	var d damageFound
	var rd restoredWithDamage
	var ru runError
	switch {
	case err == nil:
		return exitOK
	case !errors.As(err, &ru):
		// Cobra's own errors: the command never ran.
		return exitUsage
	case ctx.Err() != nil:
		return exitInterrupted
	case errors.As(err, &d), errors.Is(err, errBootFailed), errors.As(err, &rd):
		return exitPartial
	case errors.Is(err, repo.ErrNotRepository), errors.Is(err, s3.ErrNoBucket):
		return exitNoRepo
	case errors.Is(err, repo.ErrLocked):
		return exitLocked
	case errors.Is(err, repo.ErrWrongPassword):
		return exitBadPassword
	}
	return exitError
}

// runError marks an error as a command's own, returned once the command
// line was accepted; what cobra returns unmarked is a usage error.
type runError struct{ err error }

func (e runError) Error() string { return e.err.Error() }
func (e runError) Unwrap() error { return e.err }

// usageError marks an error of the command line found by kura itself
// (a flag value out of range) as a usage error.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// markRunErrors wraps the RunE of c and of every command below it so
// their errors are told apart from cobra's.
func markRunErrors(c *cobra.Command) {
	if run := c.RunE; run != nil {
		c.RunE = func(cmd *cobra.Command, args []string) error {
			if err := run(cmd, args); err != nil {
				return runError{err}
			}
			return nil
		}
	}
	if pre := c.PersistentPreRunE; pre != nil {
		c.PersistentPreRunE = func(cmd *cobra.Command, args []string) error {
			err := pre(cmd, args)
			var u usageError
			if err != nil && !errors.As(err, &u) {
				return runError{err}
			}
			return err
		}
	}
	for _, sub := range c.Commands() {
		markRunErrors(sub)
	}
}
