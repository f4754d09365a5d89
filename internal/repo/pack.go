package repo

import (
	"encoding/binary"
	"fmt"

	"github.com/kura-backup/kura/internal/crypt"
)

// BlobType says what a blob holds.
type BlobType uint8

// Blob types.
const (
	DataBlob BlobType = 0 // a chunk of disk data
	MapBlob  BlobType = 1 // a run of chunk ids of one disk, by position
)

func (t BlobType) String() string {
	switch t {
	case DataBlob:
		return "data"
	case MapBlob:
		return "map"
	}
	return fmt.Sprintf("type%d", uint8(t))
}

const flagCompressed = 1

// headerEntrySize is the size of one entry of a pack header:
// id(32) type(1) flags(1) stored_len(4) raw_len(4).
const headerEntrySize = crypt.IDSize + 1 + 1 + 4 + 4

// packEntry describes one blob inside a pack.
type packEntry struct {
	ID         crypt.ID
	Type       BlobType
	Compressed bool
	Offset     uint32
	Length     uint32 // sealed length in the pack
	RawLength  uint32 // plaintext length
}

// packName is the backend name of a pack.
func packName(id crypt.ID) string {
	s := id.String()
	return "data/" + s[:2] + "/" + s
}

// encodeHeader encodes a pack's blob list (before sealing).
func encodeHeader(entries []packEntry) []byte {
	buf := make([]byte, 0, len(entries)*headerEntrySize)
	for _, e := range entries {
		buf = append(buf, e.ID[:]...)
		var flags byte
		if e.Compressed {
			flags |= flagCompressed
		}
		buf = append(buf, byte(e.Type), flags)
		buf = binary.LittleEndian.AppendUint32(buf, e.Length)
		buf = binary.LittleEndian.AppendUint32(buf, e.RawLength)
	}
	return buf
}

// decodeHeader decodes a pack header; packLen bounds the blob offsets.
func decodeHeader(buf []byte, dataLen int64) ([]packEntry, error) {
	if len(buf)%headerEntrySize != 0 {
		return nil, fmt.Errorf("pack header of %d bytes is not a whole number of entries", len(buf))
	}
	entries := make([]packEntry, 0, len(buf)/headerEntrySize)
	var off int64
	for p := 0; p < len(buf); p += headerEntrySize {
		var e packEntry
		copy(e.ID[:], buf[p:])
		e.Type = BlobType(buf[p+32])
		e.Compressed = buf[p+33]&flagCompressed != 0
		e.Length = binary.LittleEndian.Uint32(buf[p+34:])
		e.RawLength = binary.LittleEndian.Uint32(buf[p+38:])
		if e.Type > MapBlob || e.Length < crypt.Overhead || e.RawLength > MaxChunkSize {
			return nil, fmt.Errorf("pack header entry %d is invalid", len(entries))
		}
		e.Offset = uint32(off)
		off += int64(e.Length)
		if off > dataLen {
			return nil, fmt.Errorf("pack header describes %d bytes of blobs, pack has %d", off, dataLen)
		}
		entries = append(entries, e)
	}
	if off != dataLen {
		return nil, fmt.Errorf("pack header describes %d bytes of blobs, pack has %d", off, dataLen)
	}
	return entries, nil
}

// parsePack splits a whole pack into its blob area and opened header.
func parsePack(key *crypt.Key, pack []byte) ([]packEntry, error) {
	if len(pack) < 4 {
		return nil, fmt.Errorf("pack of %d bytes is truncated", len(pack))
	}
	hlen := int64(binary.LittleEndian.Uint32(pack[len(pack)-4:]))
	if hlen > int64(len(pack))-4 || hlen < crypt.Overhead {
		return nil, fmt.Errorf("pack trailer gives header length %d for a pack of %d bytes (truncated?)", hlen, len(pack))
	}
	dataLen := int64(len(pack)) - 4 - hlen
	hdr, err := key.Open(nil, pack[dataLen:len(pack)-4])
	if err != nil {
		return nil, fmt.Errorf("pack header: %w", err)
	}
	return decodeHeader(hdr, dataLen)
}
