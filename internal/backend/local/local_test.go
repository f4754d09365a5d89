package local

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/backend/backendtest"
)

func TestConformance(t *testing.T) {
	backendtest.Run(t, func(t *testing.T) backend.Backend {
		b, err := Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		return b
	})
}

func TestLargeObjectsRoundTrip(t *testing.T) {
	// Objects from directMin up are written with O_DIRECT where the
	// filesystem allows it; odd sizes are padded and truncated.
	b, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, n := range []int{directMin, directMin + 1, 3*directMin + 4097} {
		data := make([]byte, n)
		for i := range data {
			data[i] = byte(i * 7)
		}
		name := fmt.Sprintf("data/00/obj%d", n)
		if err := b.Save(ctx, name, data); err != nil {
			t.Fatal(err)
		}
		got, err := b.Load(ctx, name, 0, 0)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("size %d: round trip failed (%v)", n, err)
		}
	}
}
