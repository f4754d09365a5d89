package testvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Image is the cached, bootable test guest built by scripts/mkguest.sh. Its
// files are shared by every guest and never written: each guest boots from its
// own qcow2 overlay over RootQcow2.
type Image struct {
	Kernel    string // vmlinuz, booted directly
	Initrd    string // initrd.img
	RootQcow2 string // the root filesystem (ext4, whole disk), 2 GiB virtual
	Version   string // the stamp in VERSION
}

// Cmdline is the kernel command line every guest boots with.
const Cmdline = "root=/dev/vda rw console=ttyS0"

// ErrNoImage is returned (wrapped) by EnsureImage when no guest image is cached
// and it cannot be built from here.
var ErrNoImage = errors.New("no test guest image")

// CacheDir is where testvm keeps what outlives a test: the guest image, data
// disk templates and the acceleration verdict. It is $KURA_CACHE, else
// $HOME/.cache/kura, and always outside the repository.
func CacheDir() (string, error) {
	if d := os.Getenv("KURA_CACHE"); d != "" {
		return filepath.Abs(d)
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("finding the cache directory: %w (set KURA_CACHE)", err)
	}
	return filepath.Join(home, ".cache", "kura"), nil
}

// EnsureImage returns the cached guest image, building it first with
// scripts/mkguest.sh (found by walking up from the working directory to
// go.mod) when it is missing or older than the script. A build takes a few
// minutes, needs root and prints its progress on standard error.
func EnsureImage(ctx context.Context) (Image, error) {
	cache, err := CacheDir()
	if err != nil {
		return Image{}, err
	}
	dir := filepath.Join(cache, "guest")
	img := Image{
		Kernel:    filepath.Join(dir, "vmlinuz"),
		Initrd:    filepath.Join(dir, "initrd.img"),
		RootQcow2: filepath.Join(dir, "root.qcow2"),
	}
	have, _ := os.ReadFile(filepath.Join(dir, "VERSION"))
	img.Version = strings.TrimSpace(string(have))
	complete := img.Version != "" && allExist(img.Kernel, img.Initrd, img.RootQcow2)

	wd, err := os.Getwd()
	if err != nil {
		return Image{}, fmt.Errorf("finding the repository: %w", err)
	}
	root, err := findRepoRoot(wd)
	if err != nil {
		if complete {
			return img, nil // cannot check it is current; use what is there
		}
		return Image{}, fmt.Errorf("%w in %s, and %v: run scripts/mkguest.sh %s as root from the kura repository", ErrNoImage, dir, err, dir)
	}
	script := filepath.Join(root, "scripts", "mkguest.sh")
	want, err := runCmd(ctx, "bash", script, "--stamp")
	if err != nil {
		return Image{}, fmt.Errorf("reading the guest version from %s: %w", script, err)
	}
	if complete && img.Version == strings.TrimSpace(want) {
		return img, nil
	}
	if os.Geteuid() != 0 {
		return Image{}, fmt.Errorf("%w in %s (have %q, want %q) and building one needs root: run sudo %s %s", ErrNoImage, dir, img.Version, strings.TrimSpace(want), script, dir)
	}

	// The build is long: show its progress, and keep the tail for the error.
	var tail bytes.Buffer
	cmd := exec.CommandContext(ctx, "bash", script, dir)
	cmd.Stdout = io.MultiWriter(os.Stderr, &tail)
	cmd.Stderr = cmd.Stdout
	if err := cmd.Run(); err != nil {
		return Image{}, fmt.Errorf("building the test guest with %s: %w\n%s", script, err, lastLines(tail.String(), 20))
	}
	have, _ = os.ReadFile(filepath.Join(dir, "VERSION"))
	img.Version = strings.TrimSpace(string(have))
	if !allExist(img.Kernel, img.Initrd, img.RootQcow2) {
		return Image{}, fmt.Errorf("%w: %s succeeded but %s lacks vmlinuz, initrd.img or root.qcow2", ErrNoImage, script, dir)
	}
	return img, nil
}

// findRepoRoot walks up from dir to the directory holding go.mod.
func findRepoRoot(dir string) (string, error) {
	for d := dir; ; {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			return d, nil
		}
		parent := filepath.Dir(d)
		if parent == d {
			return "", fmt.Errorf("no go.mod in %s or any parent directory", dir)
		}
		d = parent
	}
}

func allExist(paths ...string) bool {
	for _, p := range paths {
		if fi, err := os.Stat(p); err != nil || fi.Size() == 0 {
			return false
		}
	}
	return true
}
