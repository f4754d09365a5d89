package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/buildinfo"
)

// addVersion gives root `kura version` and `kura --version`: the release
// version (set at link time, "dev" otherwise), the commit, its time and
// whether the tree was modified (as the Go toolchain recorded them), the
// Go version and the platform.
func (a *app) addVersion(root *cobra.Command) {
	info := buildinfo.Get()
	root.Version = info.Version
	// The template is text/template; the line has no "{{", but escape
	// anyway so that a strange -X version string cannot break it.
	line := strings.ReplaceAll(info.String(), "{{", `{{"{{"}}`)
	root.SetVersionTemplate(line + "\n")

	var asJSON bool
	cmd := &cobra.Command{
		Use:   "version",
		Short: "Print the version, commit and build details",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if asJSON {
				return a.printJSON(info)
			}
			_, err := fmt.Fprintln(a.stdout, info.String())
			return err
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "machine-readable output")
	root.AddCommand(cmd)
}
