package local

import (
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
