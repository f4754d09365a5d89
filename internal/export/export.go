// Package export serves the disks of a restore point read-only over NBD,
// straight from the repository: one export per disk, named after the disk,
// on a unix socket. Any NBD client can read it (qemu-img, nbdcopy,
// nbdinfo, QEMU itself for instant recovery), many at once.
package export

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"

	"github.com/kura-backup/kura/internal/nbd"
	"github.com/kura-backup/kura/internal/repo"
	"github.com/kura-backup/kura/internal/snapdisk"
)

// Server is a running export of one restore point.
type Server struct {
	socket string
	disks  []*snapdisk.Disk
	lock   *repo.Lock
	cancel context.CancelFunc
	done   chan error
}

// Options tune a Server.
type Options struct {
	// CacheBytes is each disk's chunk cache (0: snapdisk's default).
	CacheBytes int64
	Logger     *slog.Logger
}

// Start serves disks of snapshot snap on the unix socket path (created,
// replacing a stale socket file) until ctx ends or Close is called. It
// holds a read lock on the repository so that prune keeps what it serves.
func Start(ctx context.Context, r *repo.Repo, snap *repo.Snapshot, disks []repo.Disk, socket string, opts Options) (*Server, error) {
	if len(disks) == 0 {
		return nil, errors.New("export: no disks to serve")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{socket: socket, done: make(chan error, 1)}
	var exports []nbd.ServerExport
	for _, d := range disks {
		k, err := snapdisk.Open(ctx, r, snap.ID, d, snapdisk.Options{CacheBytes: opts.CacheBytes, Logger: opts.Logger})
		if err != nil {
			return nil, err
		}
		s.disks = append(s.disks, k)
		exports = append(exports, nbd.ServerExport{
			Name:        d.Name,
			Description: fmt.Sprintf("kura snapshot %s (%s) disk %s", snap.ID[:8], snap.Name, d.Name),
			Device:      k,
		})
	}
	if err := os.MkdirAll(filepath.Dir(socket), 0o700); err != nil {
		return nil, fmt.Errorf("export: %w", err)
	}
	if fi, err := os.Lstat(socket); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("export: %s exists and is not a socket: choose another --socket", socket)
		}
		if c, err := net.Dial("unix", socket); err == nil {
			c.Close()
			return nil, fmt.Errorf("export: %s is in use by another server: stop it or choose another --socket", socket)
		}
		os.Remove(socket)
	}
	lock, err := r.Lock(ctx, repo.LockRead)
	if err != nil {
		return nil, err
	}
	l, err := net.Listen("unix", socket)
	if err != nil {
		lock.Unlock(context.WithoutCancel(ctx))
		return nil, fmt.Errorf("export: %w", err)
	}
	s.lock = lock
	ctx, s.cancel = context.WithCancel(ctx)
	srv := &nbd.Server{Exports: exports, Logger: opts.Logger}
	go func() {
		err := srv.Serve(ctx, l)
		os.Remove(socket)
		lock.Unlock(context.WithoutCancel(ctx))
		s.done <- err
	}()
	return s, nil
}

// Socket is the unix socket the server listens on.
func (s *Server) Socket() string { return s.socket }

// URI is the NBD URI of one disk's export.
func (s *Server) URI(disk string) string {
	return URI(s.socket, disk)
}

// URI is the NBD URI of export name on a unix socket.
func URI(socket, name string) string {
	return "nbd+unix:///" + url.PathEscape(name) + "?socket=" + url.QueryEscape(socket)
}

// Wait blocks until the server has stopped and returns why.
func (s *Server) Wait() error {
	err := <-s.done
	s.done <- err
	return err
}

// Close stops the server, ends its connections and removes the socket.
func (s *Server) Close() error {
	s.cancel()
	return s.Wait()
}
