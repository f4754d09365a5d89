package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/kura-backup/kura/internal/testvm"
)

// Layout describes the guest's disks.
type Layout struct {
	RootVirtual   int64  `json:"root_virtual"`   // vda
	RootAllocated int64  `json:"root_allocated"` // data extents through the backing chain
	DataVirtual   int64  `json:"data_virtual"`   // vdb
	DataAllocated int64  `json:"data_allocated"`
	Files         int    `json:"files"`      // regular files in /data/tree
	Dirs          int    `json:"dirs"`       // /data/tree/dNN
	FileBytes     int64  `json:"file_bytes"` // their total size
	Total         int64  `json:"total_allocated"`
	DiskFile      string `json:"disk_file"` // the cached qcow2 template
	Manifest      string `json:"manifest"`  // its files' sha256, JSON
}

// ManifestEntry is one file of the data disk.
type ManifestEntry struct {
	Path   string `json:"path"` // relative to the file system's root: tree/d00/f0000.bin
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

const (
	filesPerDir = 250
	minFile     = 1 << 10
	maxFile     = 512 << 10
)

// makeDataDisk builds (once, cached under $KURA_CACHE/bench/restore-disk)
// the data disk the guest gets a copy of: an ext4 file system (label
// kuradata, so the guest mounts it on /data) of DataGiB GiB holding DataMiB
// MiB of pseudo-random files (seeded ChaCha8, so the same bytes on every run
// and machine) of 1 KiB to 512 KiB in /tree/d00, /tree/d01, … (250 files a
// directory), and a manifest of their sha256 sums beside it.
func (b *bench) makeDataDisk(ctx context.Context) error {
	cache, err := testvm.CacheDir()
	if err != nil {
		return err
	}
	dir := filepath.Join(cache, "bench", "restore-disk")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	lay := &b.res.Layout
	name := fmt.Sprintf("vdb-ext4-%dg-tree%dm-seed%d-v1", b.cfg.DataGiB, b.cfg.DataMiB, b.cfg.Seed)
	b.vdb = filepath.Join(dir, name+".qcow2")
	lay.DiskFile = b.vdb
	lay.Manifest = filepath.Join(dir, name+".manifest.json")
	lay.DataVirtual = int64(b.cfg.DataGiB) * GiB
	_, errDisk := os.Stat(b.vdb)
	_, errMan := os.Stat(lay.Manifest)
	if errDisk != nil || errMan != nil {
		logf("building the data disk %s: %d MiB of seeded random files on %d GiB ext4", name, b.cfg.DataMiB, b.cfg.DataGiB)
		stage := filepath.Join(b.work, "vdb-stage")
		man, err := writeTree(filepath.Join(stage, "tree"), int64(b.cfg.DataMiB)*MiB, b.cfg.Seed)
		if err != nil {
			return err
		}
		q, err := b.mkfsQcow2(ctx, stage, filepath.Join(b.work, "vdb-template"))
		if err != nil {
			return err
		}
		os.RemoveAll(stage)
		if _, err := benchutil.Run(ctx, "cp", "--sparse=always", q, b.vdb+".tmp"); err != nil {
			return err
		}
		os.Remove(q)
		if err := writeJSON(lay.Manifest+".tmp", man); err != nil {
			return err
		}
		if err := os.Rename(lay.Manifest+".tmp", lay.Manifest); err != nil {
			return err
		}
		if err := os.Rename(b.vdb+".tmp", b.vdb); err != nil {
			return err
		}
	}
	if err := json.Unmarshal([]byte(benchutil.ReadFile(lay.Manifest)), &b.manifest); err != nil || len(b.manifest) == 0 {
		return fmt.Errorf("reading the manifest %s: %v (remove it and the disk beside it to rebuild them)", lay.Manifest, err)
	}
	dirs := map[string]bool{}
	lay.Files, lay.FileBytes = len(b.manifest), 0
	for _, e := range b.manifest {
		lay.FileBytes += e.Size
		dirs[filepath.Dir(e.Path)] = true
	}
	lay.Dirs = len(dirs)
	return nil
}

// writeTree writes files of random sizes and contents under root until they
// hold total bytes, and returns their manifest.
func writeTree(root string, total, seed int64) ([]ManifestEntry, error) {
	sizes := rand.New(rand.NewPCG(uint64(seed), 0x6b757261))
	var man []ManifestEntry
	buf := make([]byte, maxFile)
	for i := 0; total > 0; i++ {
		n := min(total, minFile+sizes.Int64N(maxFile-minFile+1))
		rel := filepath.Join("tree", fmt.Sprintf("d%02d", i/filesPerDir), fmt.Sprintf("f%04d.bin", i))
		p := filepath.Join(filepath.Dir(root), rel)
		if i%filesPerDir == 0 {
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return nil, err
			}
		}
		var key [32]byte
		binary.LittleEndian.PutUint64(key[0:], uint64(seed))
		binary.LittleEndian.PutUint64(key[8:], uint64(i))
		copy(key[16:], "kura-restore-v1")
		rand.NewChaCha8(key).Read(buf[:n])
		if err := os.WriteFile(p, buf[:n], 0o644); err != nil {
			return nil, err
		}
		sum := sha256.Sum256(buf[:n])
		man = append(man, ManifestEntry{Path: rel, Size: n, SHA256: hex.EncodeToString(sum[:])})
		total -= n
	}
	return man, nil
}

// mkfsQcow2 makes an ext4 file system labelled kuradata of DataGiB GiB from
// the files in stage (mkfs.ext4 -d, inode tables and journal initialised as
// internal/testvm does) and converts it to qcow2 (zeros stay unallocated).
func (b *bench) mkfsQcow2(ctx context.Context, stage, base string) (string, error) {
	raw, q := base+".raw", base+".qcow2"
	f, err := os.Create(raw)
	if err != nil {
		return "", err
	}
	err = f.Truncate(int64(b.cfg.DataGiB) * GiB)
	f.Close()
	if err != nil {
		return "", err
	}
	defer os.Remove(raw)
	if _, err := benchutil.Run(ctx, "mkfs.ext4", "-q", "-F", "-L", "kuradata", "-U", "6b757261-7265-7374-6f72-766462000001",
		"-E", "lazy_itable_init=0,lazy_journal_init=0,hash_seed=6b757261-7265-7374-6f72-766462000002", "-d", stage, raw); err != nil {
		return "", err
	}
	if _, err := benchutil.Run(ctx, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q); err != nil {
		return "", err
	}
	return q, nil
}

// checkFiles checks a restored data disk (a raw ext4 image): e2fsck -fn
// finds nothing to fix, and every file of the manifest, copied out with
// debugfs (not with kura), has the size and sha256 it was written with.
func (b *bench) checkFiles(ctx context.Context, raw, scratch string) (string, error) {
	if _, err := benchutil.Run(ctx, "e2fsck", "-fn", raw); err != nil {
		return "", fmt.Errorf("the restored data disk does not fsck clean: %w", err)
	}
	dump := filepath.Join(scratch, "dump")
	os.RemoveAll(dump)
	if err := os.MkdirAll(dump, 0o755); err != nil {
		return "", err
	}
	defer os.RemoveAll(dump)
	if _, err := benchutil.Run(ctx, "debugfs", "-R", "rdump /tree "+dump, raw); err != nil {
		return "", err
	}
	var bytes int64
	for _, e := range b.manifest {
		f, err := os.Open(filepath.Join(dump, e.Path))
		if err != nil {
			return "", fmt.Errorf("restored /%s: %w", e.Path, err)
		}
		h := sha256.New()
		n, err := io.Copy(h, f)
		f.Close()
		if err != nil {
			return "", err
		}
		if got := hex.EncodeToString(h.Sum(nil)); n != e.Size || got != e.SHA256 {
			return "", fmt.Errorf("restored /%s: %d bytes, sha256 %s; written: %d bytes, sha256 %s", e.Path, n, got[:16], e.Size, e.SHA256[:16])
		}
		bytes += n
	}
	return fmt.Sprintf("e2fsck -fn clean; all %d files (%.1f MB) equal to what was written (sha256)", len(b.manifest), float64(bytes)/1e6), nil
}
