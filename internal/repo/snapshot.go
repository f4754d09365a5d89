package repo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/kura-backup/kura/internal/backend"
	"github.com/kura-backup/kura/internal/crypt"
)

// MapEntries is the most chunk ids one map blob holds.
const MapEntries = 8192

// SnapshotVersion is the snapshot format this code writes. Version 2
// stores maps sparsely (only data chunks, see ChunkMap); version 1 (and
// snapshots without a version) listed every position's id. Both are read.
// The repository's config keeps FormatVersion: packs and indexes did not
// change, and a kura that knows only version 1 refuses version-2
// snapshots by their version instead of misreading their maps.
const SnapshotVersion = 2

// Snapshot is a restore point: a "snapshots/<id>" object.
type Snapshot struct {
	ID       string    `json:"-"`
	Version  int       `json:"version"`
	Time     time.Time `json:"time"`
	Name     string    `json:"name"`
	Hostname string    `json:"hostname"`
	Source   string    `json:"source"`         // "image", "libvirt", "qmp"
	Kind     string    `json:"kind"`           // "full" or "incremental": what was read
	Mode     string    `json:"mode,omitempty"` // consistency mode for live VMs
	Parent   string    `json:"parent,omitempty"`
	// Checkpoint names the hypervisor checkpoint taken at this restore
	// point's instant; the next incremental backup reads changes since it.
	Checkpoint string            `json:"checkpoint,omitempty"`
	Config     *VMConfig         `json:"config,omitempty"`
	Disks      []Disk            `json:"disks"`
	Stats      BackupStats       `json:"stats"`
	Tags       map[string]string `json:"tags,omitempty"`
	// CopiedFrom says where a restore point `kura copy` wrote came from:
	// first the repository and snapshot it was copied from, then that
	// snapshot's own CopiedFrom (a copy of a copy). Empty for a backup.
	CopiedFrom []Origin `json:"copied_from,omitempty"`
}

// Origin names a snapshot in another repository: its config id and its
// snapshot id, and when the copy was made.
type Origin struct {
	Repo     string    `json:"repo"`
	Snapshot string    `json:"snapshot"`
	Copied   time.Time `json:"copied"`
}

// VMConfig is the machine's configuration saved with a snapshot.
type VMConfig struct {
	Type string `json:"type"` // "libvirt-xml", "qemu-cmdline", "qmp-json"
	Data string `json:"data"`
}

// Disk is one disk of a snapshot.
type Disk struct {
	Name       string     `json:"name"`
	Size       int64      `json:"size"`
	Format     string     `json:"format"`
	SourcePath string     `json:"source_path,omitempty"`
	ChunkSize  int        `json:"chunk_size"`
	Maps       []crypt.ID `json:"maps"`           // map blobs, in order
	DataChunks int64      `json:"data_chunks"`    // positions holding data
	DataBytes  int64      `json:"data_bytes"`     // their bytes (logical, non-zero)
	Read       string     `json:"read,omitempty"` // "full", "changed", "full (reason)"
	// Lost lists the byte ranges `kura repair snapshots` found lost for
	// good and replaced by zeros.
	Lost []Range `json:"lost,omitempty"`
	// MapVersion is the encoding of Maps: the version of the snapshot
	// the disk belongs to (1: dense, every position's id; 2: sparse).
	// LoadSnapshot and SaveSnapshot set it; 0 means SnapshotVersion.
	MapVersion int `json:"-"`
}

// BackupStats records what a backup did.
type BackupStats struct {
	Start        time.Time `json:"start"`
	End          time.Time `json:"end"`
	BytesRead    int64     `json:"bytes_read"`
	BytesNew     int64     `json:"bytes_new"`    // plaintext bytes of new chunks
	BytesStored  int64     `json:"bytes_stored"` // their size in packs
	ChunksNew    int64     `json:"chunks_new"`
	ChunksReused int64     `json:"chunks_reused"`
	FreezeMillis float64   `json:"freeze_ms,omitempty"`
	// The freeze window's parts: the agent's freeze call, the instant
	// taken while frozen, the thaw call (when the driver measures them).
	FreezeCallMillis float64 `json:"freeze_call_ms,omitempty"`
	InstantMillis    float64 `json:"instant_ms,omitempty"`
	ThawCallMillis   float64 `json:"thaw_call_ms,omitempty"`
	PauseMillis      float64 `json:"pause_ms,omitempty"`
	Note             string  `json:"note,omitempty"`
}

// LogicalSize sums the disks' sizes.
func (s *Snapshot) LogicalSize() int64 {
	var n int64
	for _, d := range s.Disks {
		n += d.Size
	}
	return n
}

// Chunks returns the number of chunk positions of d.
func (d Disk) Chunks() int64 { return (d.Size + int64(d.ChunkSize) - 1) / int64(d.ChunkSize) }

// SaveMap stores a disk's chunk map as map blobs (SnapshotVersion's
// encoding) and returns their ids, none for a disk of zeros.
func (r *Repo) SaveMap(ctx context.Context, m *ChunkMap) ([]crypt.ID, error) {
	s := r.NewSealer()
	var maps []crypt.ID
	err := encodeMapBlobs(m, func(plain []byte) error {
		mid := r.key.Hash(plain)
		maps = append(maps, mid)
		if !r.Claim(mid) {
			return nil
		}
		return r.StoreBlob(ctx, s, MapBlob, mid, plain)
	})
	if err != nil {
		return nil, err
	}
	return maps, nil
}

// LoadMap reads a disk's chunk map. Maps that do not fit the disk (too
// many or too few positions, positions out of order, records cut short,
// a count of data chunks other than d.DataChunks) fail with an error
// wrapping ErrDamaged.
func (r *Repo) LoadMap(ctx context.Context, d Disk) (*ChunkMap, error) {
	m, _, err := r.loadMap(ctx, d, false)
	return m, err
}

// LoadMapLenient reads what can be read of a disk's chunk map: a map blob
// that is missing or damaged loses the positions it covered (between the
// readable blobs around it), returned as byte ranges, instead of failing.
// Other errors (I/O, a manifest that does not fit) still fail.
func (r *Repo) LoadMapLenient(ctx context.Context, d Disk) (*ChunkMap, []Range, error) {
	return r.loadMap(ctx, d, true)
}

func (r *Repo) loadMap(ctx context.Context, d Disk, lenient bool) (*ChunkMap, []Range, error) {
	if d.ChunkSize <= 0 || d.Size < 0 {
		return nil, nil, fmt.Errorf("disk %s: size %d in chunks of %d: %w", d.Name, d.Size, d.ChunkSize, ErrDamaged)
	}
	n := d.Chunks()
	cs := int64(d.ChunkSize)
	dense := d.MapVersion == 1
	if dense && int64(len(d.Maps)) != (n+MapEntries-1)/MapEntries {
		return nil, nil, fmt.Errorf("disk %s: %d map blobs for %d chunks: %w", d.Name, len(d.Maps), n, ErrDamaged)
	}
	if !dense && (d.DataChunks < 0 || d.DataChunks > n || int64(len(d.Maps)) > d.DataChunks) {
		return nil, nil, fmt.Errorf("disk %s: %d map blobs for %d data chunks of %d: %w", d.Name, len(d.Maps), d.DataChunks, n, ErrDamaged)
	}
	// The counts come from the authenticated manifest; the bound keeps a
	// wrong one from reserving more than the maps can hold.
	m := NewChunkMap(n, int(min(d.DataChunks, int64(len(d.Maps))*MapEntries, 1<<20)))
	var lost []Range
	lose := func(from, to int64) { // positions [from, to)
		if to > from {
			lost = addRange(lost, from*cs, min(to*cs, d.Size)-from*cs)
		}
	}
	var next int64
	lostFrom := int64(-1) // a sparse map blob was lost after this position
	for i, mid := range d.Maps {
		plain, err := r.LoadBlob(ctx, mid, nil)
		if err == nil {
			if dense {
				err = decodeDenseMapBlob(plain, &next, m)
			} else {
				start := len(m.pos)
				if err = decodeMapBlob(plain, &next, m); err == nil && lostFrom >= 0 {
					lose(lostFrom, m.pos[start])
					lostFrom = -1
				}
			}
			if err != nil {
				err = fmt.Errorf("disk %s map %d (%s): %w", d.Name, i, mid.Short(), err)
			}
		} else {
			err = fmt.Errorf("disk %s map: %w", d.Name, err)
		}
		if err == nil {
			continue
		}
		if !lenient || !errors.Is(err, ErrDamaged) && !errors.Is(err, ErrBlobMissing) {
			return nil, nil, err
		}
		if dense {
			first := int64(i) * MapEntries
			lose(first, min(first+MapEntries, n))
			next = min(first+MapEntries, n)
		} else if lostFrom < 0 {
			lostFrom = next
		}
	}
	if lostFrom >= 0 {
		lose(lostFrom, n)
	}
	if lenient && len(lost) > 0 {
		return m, lost, nil
	}
	if dense && next != n {
		return nil, nil, fmt.Errorf("disk %s: map holds %d chunks, want %d: %w", d.Name, next, n, ErrDamaged)
	}
	if !dense && m.DataChunks() != d.DataChunks {
		return nil, nil, fmt.Errorf("disk %s: map holds %d data chunks, the snapshot says %d: %w", d.Name, m.DataChunks(), d.DataChunks, ErrDamaged)
	}
	return m, lost, nil
}

// SaveSnapshot writes the manifest. Call Flush first: data, then index,
// then snapshot.
func (r *Repo) SaveSnapshot(ctx context.Context, s *Snapshot) (string, error) {
	s.Version = SnapshotVersion
	for i := range s.Disks {
		s.Disks[i].MapVersion = SnapshotVersion
	}
	plain, err := json.Marshal(s)
	if err != nil {
		return "", err
	}
	sealed, err := r.sealObject(plain)
	if err != nil {
		return "", err
	}
	id := crypt.RandomID().String()
	if err := r.be.Save(ctx, "snapshots/"+id, sealed); err != nil {
		return "", fmt.Errorf("writing snapshot: %w", err)
	}
	s.ID = id
	return id, nil
}

// LoadSnapshot reads one snapshot by full id.
func (r *Repo) LoadSnapshot(ctx context.Context, id string) (*Snapshot, error) {
	plain, err := r.loadObject(ctx, "snapshots/"+id)
	if err != nil {
		if errors.Is(err, backend.ErrNotFound) {
			return nil, fmt.Errorf("snapshot %s: %w", id, ErrNoSnapshot)
		}
		return nil, err
	}
	var s Snapshot
	if err := json.Unmarshal(plain, &s); err != nil {
		return nil, fmt.Errorf("snapshot %s is damaged (%v): %w", id, err, ErrDamaged)
	}
	if s.Version > SnapshotVersion {
		return nil, fmt.Errorf("snapshot %s has format %d, this kura reads up to %d: %w; upgrade kura", id, s.Version, SnapshotVersion, ErrNewerFormat)
	}
	for i := range s.Disks {
		s.Disks[i].MapVersion = max(s.Version, 1)
	}
	s.ID = id
	return &s, nil
}

// SnapshotIDs lists the ids of all snapshots.
func (r *Repo) SnapshotIDs(ctx context.Context) ([]string, error) {
	var ids []string
	err := r.be.List(ctx, "snapshots/", func(oi backend.ObjectInfo) error {
		ids = append(ids, strings.TrimPrefix(oi.Name, "snapshots/"))
		return nil
	})
	return ids, err
}

// snapshotLoads bounds the snapshots read at once: each is one small
// object, so on object storage listing them is bound by round trips.
const snapshotLoads = 16

// loadSnapshots reads the snapshots ids names, snapshotLoads at a time;
// errs[i] is the error of ids[i].
func (r *Repo) loadSnapshots(ctx context.Context, ids []string) ([]*Snapshot, []error) {
	out := make([]*Snapshot, len(ids))
	errs := make([]error, len(ids))
	sem := make(chan struct{}, snapshotLoads)
	var wg sync.WaitGroup
	for i, id := range ids {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			out[i], errs[i] = r.LoadSnapshot(ctx, id)
		})
	}
	wg.Wait()
	return out, errs
}

// Snapshots loads every snapshot, oldest first. A damaged snapshot fails
// the call; use SnapshotIDs and LoadSnapshot to skip it.
func (r *Repo) Snapshots(ctx context.Context) ([]*Snapshot, error) {
	ids, err := r.SnapshotIDs(ctx)
	if err != nil {
		return nil, err
	}
	loaded, errs := r.loadSnapshots(ctx, ids)
	out := make([]*Snapshot, 0, len(ids))
	for i, s := range loaded {
		if err := errs[i]; err != nil {
			if errors.Is(err, ErrNoSnapshot) {
				continue // forgotten meanwhile
			}
			return nil, err
		}
		out = append(out, s)
	}
	SortSnapshots(out)
	return out, nil
}

// SnapshotsLenient loads every readable snapshot, oldest first, and names
// the ones that are damaged instead of failing, so that listing and
// restoring the others still works. (Prune uses Snapshots: it must not run
// without knowing what every snapshot references.)
func (r *Repo) SnapshotsLenient(ctx context.Context) (good []*Snapshot, damaged []string, err error) {
	ids, err := r.SnapshotIDs(ctx)
	if err != nil {
		return nil, nil, err
	}
	loaded, errs := r.loadSnapshots(ctx, ids)
	for i, s := range loaded {
		switch err := errs[i]; {
		case err == nil:
			good = append(good, s)
		case errors.Is(err, ErrNoSnapshot):
			// forgotten meanwhile
		case errors.Is(err, ErrDamaged):
			damaged = append(damaged, ids[i])
		default:
			return nil, nil, err
		}
	}
	SortSnapshots(good)
	sort.Strings(damaged)
	return good, damaged, nil
}

// SortSnapshots orders by time, oldest first.
func SortSnapshots(ss []*Snapshot) {
	sort.SliceStable(ss, func(i, j int) bool {
		if !ss[i].Time.Equal(ss[j].Time) {
			return ss[i].Time.Before(ss[j].Time)
		}
		return ss[i].ID < ss[j].ID
	})
}

// FindSnapshot resolves a full id, a unique id prefix, "latest",
// "NAME@latest" or "NAME@TIME" (the newest of NAME whose local time
// starts with TIME, e.g. 2026-11-20) among ss (sorted oldest first).
// Anything else, "NAME@" or "@latest" among them, is ErrBadRef: a
// reference that could select a restore point by accident must not.
func FindSnapshot(ss []*Snapshot, ref string) (*Snapshot, error) {
	if ref == "" {
		return nil, fmt.Errorf("empty snapshot reference: %w: %s", ErrBadRef, refForms)
	}
	if ref == "latest" {
		if len(ss) == 0 {
			return nil, fmt.Errorf("latest: the repository has no snapshots: %w", ErrNoSnapshot)
		}
		return ss[len(ss)-1], nil
	}
	// The last "@" splits: a name saved before names were checked may
	// hold one ("a@b@latest").
	if at := strings.LastIndex(ref, "@"); at >= 0 {
		name, when := ref[:at], ref[at+1:]
		switch {
		case name == "":
			return nil, fmt.Errorf("%s: no name before @: %w: %s", quote(ref), ErrBadRef, refForms)
		case when == "":
			return nil, fmt.Errorf("%s: nothing after @: %w: %s", quote(ref), ErrBadRef, refForms)
		case when == "latest":
			for i := len(ss) - 1; i >= 0; i-- {
				if ss[i].Name == name {
					return ss[i], nil
				}
			}
			return nil, fmt.Errorf("%s: no snapshot named %q (see `kura snapshots`): %w", quote(ref), name, ErrNoSnapshot)
		}
		// NAME@TIME: the newest snapshot of NAME whose local time starts
		// with TIME ("2026-11-20", "2026-11-20T14", "2026-11-20 14:05").
		when = strings.Replace(when, " ", "T", 1)
		if !timePrefix(when) {
			return nil, fmt.Errorf("%s: %s is not a local date or time like 2026-11-20 or 2026-11-20T14:05: %w: %s", quote(ref), quote(ref[at+1:]), ErrBadRef, refForms)
		}
		for i := len(ss) - 1; i >= 0; i-- {
			if ss[i].Name == name && strings.HasPrefix(ss[i].Time.Local().Format("2006-01-02T15:04:05"), when) {
				return ss[i], nil
			}
		}
		return nil, fmt.Errorf("%s: no snapshot named %q taken at %s (local time; see `kura snapshots`): %w", quote(ref), name, when, ErrNoSnapshot)
	}
	var match []*Snapshot
	for _, s := range ss {
		if strings.HasPrefix(s.ID, ref) {
			match = append(match, s)
		}
	}
	switch len(match) {
	case 0:
		return nil, fmt.Errorf("%s: see `kura snapshots`: %w", quote(ref), ErrNoSnapshot)
	case 1:
		return match[0], nil
	}
	return nil, fmt.Errorf("%s matches %d snapshots, give more digits: %w", quote(ref), len(match), ErrAmbiguous)
}

// RemoveSnapshot deletes a snapshot manifest (its data stays until prune)
// and its boot checks.
func (r *Repo) RemoveSnapshot(ctx context.Context, id string) error {
	if err := r.be.Remove(ctx, "snapshots/"+id); err != nil {
		return err
	}
	return r.removeBootChecks(ctx, id)
}
