package crypt

import (
	"runtime"
	"runtime/debug"
	"unsafe"

	"golang.org/x/sys/unix"
)

// prepareKDFMemory makes it likely that Argon2's n bytes of working memory
// come from transparent huge pages. Argon2 writes every byte of a fresh
// allocation once per pass, and on virtual machines the page faults of a
// 64 MiB table (16,384 small pages) cost more than the hashing: about
// 0.1 s of the quarter second a derivation takes (bench/vm.sh -v logs).
//
// golang.org/x/crypto/argon2 allocates the table itself, so this reserves
// an untouched region of the Go heap of that size, advises the kernel to
// back it with huge pages and frees it: Go's page allocator hands out the
// lowest free range that fits, which is that region, to the next
// allocation of that size. If it does not, nothing is lost but the time
// of one collection of a small heap.
func prepareKDFMemory(n int) {
	const huge = 2 << 20
	if n < 4*huge {
		return
	}
	b := make([]byte, n+2*huge)
	p := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	off := int((huge - p%huge) % huge)
	_ = unix.Madvise(b[off:off+(n+huge-1)&^(huge-1)], unix.MADV_HUGEPAGE)
	b = nil
	debug.FreeOSMemory()
}

// releaseKDFMemory collects Argon2's table as soon as the derivation ends,
// so that the next large allocations (a backup's pack buffers) reuse its
// pages, which the derivation has already faulted in. Without it they came
// from fresh memory: on a virtual machine the kernel zeroed about 54 MiB of
// new huge pages while an incremental backup sealed its packs, and reading
// 100 MiB took 0.37 s instead of 0.23 s (A/B on a test guest).
func releaseKDFMemory() { runtime.GC() }
