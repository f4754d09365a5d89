package backend

import "golang.org/x/sys/unix"

// adviseHugePages asks for transparent huge pages behind b, which starts
// on a huge-page boundary and has not been touched yet. It is only advice:
// a kernel without them (or with them disabled) keeps small pages.
func adviseHugePages(b []byte) {
	if len(b) > 0 {
		_ = unix.Madvise(b, unix.MADV_HUGEPAGE)
	}
}
