package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/kura-backup/kura/internal/backend/s3/s3test"
)

// TestS3KillSoak runs scripts/s3-soak.sh for three rounds: backups to a
// versitygw server, and copies of that repository to a second one,
// killed with SIGKILL at random moments; then in both repositories verify
// --read-data before and after prune, and every restore point restored
// byte for byte against the image it was taken from. The script runs
// 30 rounds by hand (SOAK_ROUNDS); this keeps it working. Its window for
// the kill is shorter here, for a smaller image, and the third backup
// runs to the end.
func TestS3KillSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("slow: kills backups")
	}
	if _, err := s3test.Binary(s3test.VersityGW); err != nil {
		t.Fatal(err)
	}
	script, err := filepath.Abs("../../scripts/s3-soak.sh")
	if err != nil {
		t.Fatal(err)
	}
	c := exec.Command("bash", script)
	c.Env = append(os.Environ(), "KURA_BIN="+kuraBin, "KURA_S3_BIN="+s3test.BinDir(), "SOAK_WORK="+t.TempDir(),
		"SOAK_ROUNDS=3", "SOAK_IMAGE_MIB=512", "SOAK_SCRIBBLE_MIB=32", "SOAK_KILL_MIN_MS=100", "SOAK_KILL_MAX_MS=1000", "SOAK_FINISH_EVERY=3")
	start := time.Now()
	out, err := c.CombinedOutput()
	t.Logf("s3-soak.sh, 3 rounds, %v:\n%s", time.Since(start).Round(time.Second), out)
	if err != nil {
		t.Fatalf("s3-soak.sh: %v", err)
	}
	if !strings.Contains(string(out), "OK: 3 rounds") || !strings.Contains(string(out), "in the copy too") {
		t.Fatal("s3-soak.sh did not say OK")
	}
}
