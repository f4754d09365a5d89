package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"github.com/kura-backup/kura/bench/internal/benchutil"
	"math/rand/v2"
	"os"
	"path/filepath"

	"github.com/kura-backup/kura/internal/testvm"
)

// Layout describes the guest's disks as the tools see them.
type Layout struct {
	RootVirtual   int64  `json:"root_virtual"`   // vda
	RootAllocated int64  `json:"root_allocated"` // data extents through the backing chain
	DataVirtual   int64  `json:"data_virtual"`   // vdb
	DataAllocated int64  `json:"data_allocated"`
	DataFiles     int64  `json:"data_files"`     // bytes of files on vdb (bulk + fio.dat)
	FioFile       int64  `json:"fio_file"`       // /data/fio.dat
	BulkFiles     int    `json:"bulk_files"`     // /data/bulk/fNNNN.bin, 4 MiB each (the last one may be shorter)
	EmptyFSAlloc  int64  `json:"empty_fs_alloc"` // an empty ext4 of the same size
	Total         int64  `json:"total_allocated"`
	DiskFile      string `json:"disk_file"` // the cached qcow2 template
}

const bulkFileSize = 4 * MiB

// makeDataDisk builds (once, cached under $KURA_CACHE/bench/vm-disk) the data
// disk every guest gets a copy of: an ext4 file system (label kuradata, so
// the guest mounts it on /data) of DataGiB GiB holding pseudo-random files
// (seeded, so the same on every run and machine) sized so that the guest's
// two disks together have AllocMB*10^6 bytes allocated, and fio's target
// file /data/fio.dat.
func (b *bench) makeDataDisk(ctx context.Context) error {
	cache, err := testvm.CacheDir()
	if err != nil {
		return err
	}
	dir := filepath.Join(cache, "bench", "vm-disk")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	lay := &b.res.Layout
	if lay.RootAllocated, err = allocated(ctx, b.img.RootQcow2); err != nil {
		return err
	}
	if lay.RootVirtual, err = benchutil.VirtualSize(ctx, b.img.RootQcow2); err != nil {
		return err
	}
	lay.DataVirtual = int64(b.cfg.DataGiB) * GiB

	// What an empty file system of this size allocates (its metadata).
	emptyJSON := filepath.Join(dir, fmt.Sprintf("empty-ext4-%dg.json", b.cfg.DataGiB))
	var empty struct{ Allocated int64 }
	if json.Unmarshal([]byte(benchutil.ReadFile(emptyJSON)), &empty) != nil || empty.Allocated == 0 {
		logf("measuring the allocation of an empty %d GiB ext4", b.cfg.DataGiB)
		stage := filepath.Join(b.work, "empty-stage")
		if err := os.MkdirAll(stage, 0o755); err != nil {
			return err
		}
		q, err := b.mkfsQcow2(ctx, stage, filepath.Join(b.work, "empty"))
		if err != nil {
			return err
		}
		if empty.Allocated, err = allocated(ctx, q); err != nil {
			return err
		}
		os.Remove(q)
		os.RemoveAll(stage)
		if err := writeJSON(emptyJSON, empty); err != nil {
			return err
		}
	}
	lay.EmptyFSAlloc = empty.Allocated

	target := int64(b.cfg.AllocMB) * 1000 * 1000
	lay.FioFile = int64(b.cfg.FioMiB) * MiB
	files := (target - lay.RootAllocated - lay.EmptyFSAlloc) / MiB * MiB
	bulk := files - lay.FioFile
	if bulk < 0 {
		return fmt.Errorf("BENCH_VM_ALLOC_MB=%d is too small: the root disk alone has %d bytes allocated, fio's file %d", b.cfg.AllocMB, lay.RootAllocated, lay.FioFile)
	}
	lay.DataFiles = files
	lay.BulkFiles = int((bulk + bulkFileSize - 1) / bulkFileSize)

	name := fmt.Sprintf("vdb-ext4-%dg-bulk%dm-fio%dm-seed%d-v1.qcow2", b.cfg.DataGiB, bulk/MiB, b.cfg.FioMiB, b.cfg.Seed)
	b.vdb = filepath.Join(dir, name)
	lay.DiskFile = b.vdb
	if _, err := os.Stat(b.vdb); err != nil {
		logf("building the data disk %s: %d MiB of seeded random files + %d MiB fio file on %d GiB ext4", name, bulk/MiB, b.cfg.FioMiB, b.cfg.DataGiB)
		stage := filepath.Join(b.work, "vdb-stage")
		if err := os.MkdirAll(filepath.Join(stage, "bulk"), 0o755); err != nil {
			return err
		}
		if err := writeRandom(filepath.Join(stage, "fio.dat"), lay.FioFile, b.cfg.Seed, 0); err != nil {
			return err
		}
		for i := 0; i < lay.BulkFiles; i++ {
			n := min(int64(bulkFileSize), bulk-int64(i)*bulkFileSize)
			if err := writeRandom(filepath.Join(stage, "bulk", fmt.Sprintf("f%04d.bin", i)), n, b.cfg.Seed, uint64(i+1)); err != nil {
				return err
			}
		}
		q, err := b.mkfsQcow2(ctx, stage, filepath.Join(b.work, "vdb"))
		if err != nil {
			return err
		}
		os.RemoveAll(stage)
		if err := os.Rename(q, b.vdb); err != nil {
			// b.work may be on another file system than the cache.
			if _, err := benchutil.Run(ctx, "cp", q, b.vdb+".tmp"); err != nil {
				return err
			}
			if err := os.Rename(b.vdb+".tmp", b.vdb); err != nil {
				return err
			}
			os.Remove(q)
		}
	}
	if lay.DataAllocated, err = allocated(ctx, b.vdb); err != nil {
		return err
	}
	lay.Total = lay.RootAllocated + lay.DataAllocated
	logf("layout: vda %d MiB virtual, %.1f MB allocated; vdb %d GiB virtual, %.1f MB allocated (%d MiB files); total %.1f MB allocated",
		lay.RootVirtual/MiB, float64(lay.RootAllocated)/1e6, lay.DataVirtual/GiB, float64(lay.DataAllocated)/1e6, lay.DataFiles/MiB, float64(lay.Total)/1e6)
	return nil
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
	if _, err := benchutil.Run(ctx, "mkfs.ext4", "-q", "-F", "-L", "kuradata", "-U", "6b757261-6265-6e63-682d-766462000001",
		"-E", "lazy_itable_init=0,lazy_journal_init=0,hash_seed=6b757261-6265-6e63-682d-766462000002", "-d", stage, raw); err != nil {
		return "", err
	}
	if _, err := benchutil.Run(ctx, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q); err != nil {
		return "", err
	}
	return q, nil
}

// writeRandom writes n pseudo-random bytes (ChaCha8 keyed by seed and stream)
// to path.
func writeRandom(path string, n int64, seed int64, stream uint64) error {
	var key [32]byte
	binary.LittleEndian.PutUint64(key[0:], uint64(seed))
	binary.LittleEndian.PutUint64(key[8:], stream)
	copy(key[16:], "kura-vm-bench-v1")
	rng := rand.NewChaCha8(key)
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	buf := make([]byte, MiB)
	for n > 0 {
		k := min(int64(len(buf)), n)
		rng.Read(buf[:k])
		if _, err := f.Write(buf[:k]); err != nil {
			f.Close()
			return err
		}
		n -= k
	}
	return f.Close()
}
