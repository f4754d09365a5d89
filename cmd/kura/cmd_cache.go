package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/kura-backup/kura/internal/backend/cache"
	"github.com/kura-backup/kura/internal/backend/location"
)

// cacheCmd manages the local metadata cache of repositories on S3
// (internal/backend/cache).
func (a *app) cacheCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cache",
		Short: "Manage the local metadata cache of repositories on S3",
		Long: "A repository on S3 gets a local copy of its metadata (config, key files, index, snapshots) so that commands do not fetch them from the bucket every time. " +
			"It lives in $KURA_CACHE_DIR, else $XDG_CACHE_HOME/kura/repos, else ~/.cache/kura/repos, one directory per repository, " +
			"holds the same encrypted bytes as the bucket, and can be deleted at any time: it is filled again. --no-cache leaves it unused.",
	}
	var all bool
	clear := &cobra.Command{
		Use:   "clear",
		Short: "Delete the metadata cache of the repository (--repo), or of every repository (--all)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var dirs []string
			if all {
				root := cache.Root(os.Getenv)
				if root == "" {
					return errors.New("no cache directory: set KURA_CACHE_DIR, XDG_CACHE_HOME or HOME")
				}
				// Only what looks like a repository's cache: the root
				// may be a directory shared with other things.
				entries, err := os.ReadDir(root)
				if err != nil && !errors.Is(err, fs.ErrNotExist) {
					return err
				}
				for _, e := range entries {
					d := filepath.Join(root, e.Name())
					if _, err := os.Stat(filepath.Join(d, cache.LocationFile)); e.IsDir() && err == nil {
						dirs = append(dirs, d)
					}
				}
			} else {
				if a.repoPath == "" {
					return errors.New("no repository given: set KURA_REPO or pass --repo (or --all for every repository's cache)")
				}
				d, err := location.CacheDir(a.repoPath, location.Options{})
				if err != nil {
					return err
				}
				if d == "" {
					return errors.New("no cache directory: set KURA_CACHE_DIR, XDG_CACHE_HOME or HOME")
				}
				dirs = append(dirs, d)
			}
			removed := 0
			for _, d := range dirs {
				n, size, err := removeTree(d)
				if err != nil {
					return err
				}
				if n > 0 {
					removed++
					fmt.Fprintf(a.stdout, "removed %s: %d files, %s\n", show(d), n, humanBytes(size))
				}
			}
			if removed == 0 {
				fmt.Fprintln(a.stdout, "nothing cached")
			}
			return nil
		},
	}
	clear.Flags().BoolVar(&all, "all", false, "delete the cache of every repository")
	cmd.AddCommand(clear)
	return cmd
}

// removeTree removes dir and everything in it and says how many files
// and bytes went; a dir that is not there removes nothing.
func removeTree(dir string) (n int, size int64, err error) {
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			if info, err := d.Info(); err == nil {
				n++
				size += info.Size()
			}
		}
		return nil
	})
	if errors.Is(err, fs.ErrNotExist) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, err
	}
	return n, size, os.RemoveAll(dir)
}
