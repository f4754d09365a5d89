package restore

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestWriteSparseSkipsZeroBlocks(t *testing.T) {
	p := make([]byte, 10*4096)
	copy(p[4096:], bytes.Repeat([]byte{1}, 5000)) // blocks 1 and 2
	p[9*4096+7] = 9                               // block 9
	type w struct{ off, n int64 }
	var got []w
	err := writeSparse(p, 1<<20, 4096, func(b []byte, off int64) error {
		got = append(got, w{off, int64(len(b))})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []w{{1<<20 + 4096, 2 * 4096}, {1<<20 + 9*4096, 4096}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("writes %v, want %v", got, want)
	}
}

func TestRawFileTarget(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "disk.raw")
	tg, err := NewRawFile(path, 8<<20, false)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("kura"), 1024)
	if err := tg.WriteAt(ctx, data, 4<<20); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(path); err == nil {
		t.Fatal("target visible before Commit")
	}
	if err := tg.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	got, _ := os.ReadFile(path)
	if len(got) != 8<<20 || !bytes.Equal(got[4<<20:4<<20+len(data)], data) {
		t.Fatal("restored file content wrong")
	}
	if _, err := NewRawFile(path, 8<<20, false); !errors.Is(err, ErrExists) {
		t.Fatalf("existing file: %v, want ErrExists", err)
	}
	// An aborted overwrite leaves the old file untouched.
	tg, err = NewRawFile(path, 8<<20, true)
	if err != nil {
		t.Fatal(err)
	}
	tg.WriteAt(ctx, bytes.Repeat([]byte{7}, 4096), 0)
	tg.Abort()
	again, _ := os.ReadFile(path)
	if !bytes.Equal(again, got) {
		t.Fatal("aborted restore changed the existing file")
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".*partial*"))
	if len(left) != 0 {
		t.Fatalf("partial files left: %v", left)
	}
}
