// Package testvm boots small Linux guests for Kura's integration tests, demo
// and benchmarks: under libvirt (as Kura's users run their VMs) or as a plain
// qemu-system-x86_64 process (for the QMP and qemu-storage-daemon paths).
//
// It owns the test guest's life cycle: finding or building the cached guest
// image (scripts/mkguest.sh, cached under $KURA_CACHE or ~/.cache/kura),
// deciding once per machine whether KVM really works or TCG must be used
// (ProbeAccel), creating the per-guest disks (a qcow2 overlay over the cached
// root disk and data disks pre-formatted ext4 or xfs on the host), starting the
// guest, talking to its QEMU guest agent (WaitAgent, Exec, Agent) and removing
// everything again (Destroy).
//
// The guest mounts data disks by filesystem label: DiskSpec.Mount "/data"
// (label kuradata), "/data2", "/data3" and "/data4". Inside it,
// /usr/local/bin/kura-workload writes files of known checksums and verifies
// them:
//
//	g.Exec(ctx, "/usr/local/bin/kura-workload", "write", "/data", "20", "1")
//	g.Exec(ctx, "/usr/local/bin/kura-workload", "verify", "/data") // "OK 20 files"
//
// testvm knows nothing of Kura's repository or backup code; it needs root, QEMU
// and, for libvirt guests, libvirtd (EnsureLibvirtd starts it).
package testvm
