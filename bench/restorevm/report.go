package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Results is results.json.
type Results struct {
	Meta         Meta         `json:"meta"`
	Layout       Layout       `json:"layout"`
	GuestBootS   float64      `json:"guest_boot_s"` // the benchmark guest's first boot (testvm)
	Disks        []diskRef    `json:"disks"`
	RefAllocated int64        `json:"ref_allocated"` // data extents of the raw references: what a restore must write
	Backups      []Backup     `json:"backups"`
	Restores     []RestoreRun `json:"restores"`
	Summary      []Summary    `json:"restore_summary"`
	LocalRestore *Meas        `json:"local_restore,omitempty"` // kura restore --define --format qcow2
	Boots        []BootRun    `json:"boots"`
	Listings     []Listing    `json:"listings"`
	Targets      []Target     `json:"targets"`
	DDAllocated  int64        `json:"dd_allocated"` // data extents of the raw vdb in the range dd reads
	OtherCores   float64      `json:"other_cores"`  // the rest of the machine during the timed restores
	Error        string       `json:"error,omitempty"`
}

// Meta describes the run.
type Meta struct {
	Date           string  `json:"date"`
	Host           string  `json:"host"`
	Cores          int     `json:"cores"`
	CPU            string  `json:"cpu"`
	MemTotal       string  `json:"mem_total"`
	Kernel         string  `json:"kernel"`
	LoadAvgStart   string  `json:"loadavg_start"`
	LoadAvgEnd     string  `json:"loadavg_end"`
	TotalSeconds   float64 `json:"total_seconds"`
	KuraBinary     string  `json:"kura_binary"`
	KuraVersion    string  `json:"kura_version"`
	ResticVersion  string  `json:"restic_version"`
	VNBVersion     string  `json:"virtnbdbackup_version"`
	QEMUVersion    string  `json:"qemu_version"`
	LibvirtVersion string  `json:"libvirt_version"`
	GuestImage     string  `json:"guest_image"`
	Accel          string  `json:"accel"`
	Config         config  `json:"config"`
}

// Backup is one backup, for context.
type Backup struct {
	Tool string `json:"tool"`
	What string `json:"what"`
	Meas
	Stored int64 `json:"stored"` // du -sb of the repository / output directory
}

// RestoreRun is one timed full restore.
type RestoreRun struct {
	Tool string `json:"tool"`
	Run  int    `json:"run"`
	Meas
	MBps          float64  `json:"mb_per_s"` // allocated data of the VM / Seconds
	Written       int64    `json:"written"`  // disk space the restored files take
	DataIdentical bool     `json:"data_disk_identical"`
	OtherGuests   []string `json:"other_guests"` // other libvirt domains running when it started
	OK            bool     `json:"ok"`
	Check         string   `json:"check"`
}

// Summary is the median of a tool's restores.
type Summary struct {
	Tool    string    `json:"tool"`
	Runs    []float64 `json:"runs_s"`
	Median  float64   `json:"median_s"`
	SyncS   float64   `json:"median_sync_s"`
	MBps    float64   `json:"mb_per_s"`
	Ratio   float64   `json:"ratio"` // this tool's median / kura's: above 1, kura is faster
	Written int64     `json:"written"`
	RSSKB   int64     `json:"max_rss_kb"`
	CPU     float64   `json:"median_cpu_s"`
}

// BootRun is one round of cold boot against instant recovery.
type BootRun struct {
	Run              int       `json:"run"`
	ColdS            float64   `json:"cold_boot_s"` // virsh start to the first guest-ping answer
	Instant          Meas      `json:"instant"`     // kura instant, start to exit
	InstantAnsweredS float64   `json:"instant_answered_s"`
	DDLocal          *DDResult `json:"dd_local,omitempty"`
	DDInstant        *DDResult `json:"dd_instant,omitempty"`
	ColdOthers       []string  `json:"cold_other_guests"` // other libvirt domains running at the start
	InstantOthers    []string  `json:"instant_other_guests"`
	// Instant recovery from the repository on S3 (BENCH_RESTORE_S3).
	InstantS3          *Meas     `json:"instant_s3,omitempty"`
	InstantS3AnsweredS float64   `json:"instant_s3_answered_s,omitempty"`
	DDInstantS3        *DDResult `json:"dd_instant_s3,omitempty"`
}

// DDResult is a sequential read of the data disk inside a guest.
type DDResult struct {
	Bytes      int64   `json:"bytes"`
	Seconds    float64 `json:"seconds"` // as dd reports it
	MBps       float64 `json:"mb_per_s"`
	HostWallS  float64 `json:"host_wall_s"`
	GuestState string  `json:"guest_state"` // systemctl is-system-running before dd
}

// Listing is one `kura files ls` command timed several times.
type Listing struct {
	What    string    `json:"what"`
	Command string    `json:"command"`
	Runs    []float64 `json:"runs_s"`
	Median  float64   `json:"median_s"`
	Entries int       `json:"lines"`
}

// Target is one of the targets.
type Target struct {
	Name     string `json:"name"`
	Measured string `json:"measured"`
	Verdict  string `json:"verdict"` // PASS, MISS, NOT MEASURED
}

func mb(n int64) string    { return fmt.Sprintf("%.1f", float64(n)/1e6) }
func mib(n int64) string   { return fmt.Sprintf("%.1f", float64(n)/MiB) }
func sec(x float64) string { return fmt.Sprintf("%.2f", x) }

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "MISS"
}

func (b *bench) summarise() {
	r := b.res
	r.Summary = nil
	var other, wall float64
	for _, tool := range b.cfg.Tools {
		s := Summary{Tool: tool}
		var syncs, cpus []float64
		for _, x := range r.Restores {
			if x.Tool == tool && x.OK {
				s.Runs = append(s.Runs, x.Seconds)
				syncs = append(syncs, x.SyncS)
				cpus = append(cpus, x.User+x.Sys)
				s.Written = x.Written
				s.RSSKB = max(s.RSSKB, x.MaxRSSKB)
				other, wall = other+x.OtherCPU, wall+x.Seconds
			}
		}
		if len(s.Runs) == 0 {
			continue
		}
		s.Median, s.SyncS, s.CPU = median(s.Runs), median(syncs), median(cpus)
		if s.Median > 0 {
			s.MBps = float64(r.RefAllocated) / 1e6 / s.Median
		}
		r.Summary = append(r.Summary, s)
	}
	if wall > 0 {
		r.OtherCores = other / wall
	}
	var k *Summary
	for i := range r.Summary {
		if r.Summary[i].Tool == "kura" {
			k = &r.Summary[i]
		}
	}
	if k != nil && k.Median > 0 {
		for i := range r.Summary {
			r.Summary[i].Ratio = r.Summary[i].Median / k.Median
		}
	}

	r.Targets = nil
	t1 := Target{Name: "full VM restore ≥ 5× faster than restic (restic median / kura median)", Verdict: "NOT MEASURED"}
	for _, s := range r.Summary {
		if s.Tool == "restic" && k != nil && s.Ratio > 0 {
			t1.Measured = fmt.Sprintf("kura %.2f s, restic %.2f s: %.2f×", k.Median, s.Median, s.Ratio)
			t1.Verdict = verdict(s.Ratio >= 5)
		}
	}
	t2 := Target{Name: "instant recovery ≤ cold boot from local disk + 3 s (medians; `kura instant` start to exit)", Verdict: "NOT MEASURED"}
	var cold, inst []float64
	for _, x := range r.Boots {
		if x.ColdS > 0 && x.InstantAnsweredS > 0 {
			cold, inst = append(cold, x.ColdS), append(inst, x.Instant.Seconds)
		}
	}
	if len(cold) > 0 {
		c, i := median(cold), median(inst)
		t2.Measured = fmt.Sprintf("instant %.2f s, cold boot %.2f s: %+.2f s over %d rounds", i, c, i-c, len(cold))
		t2.Verdict = verdict(i <= c+3)
	}
	t3 := Target{Name: "file listing under 3 s (median of each listing)", Verdict: "NOT MEASURED"}
	if len(r.Listings) > 0 {
		var parts []string
		ok := true
		for _, l := range r.Listings {
			parts = append(parts, fmt.Sprintf("%s %.2f s", l.What, l.Median))
			ok = ok && l.Median < 3
		}
		t3.Measured = strings.Join(parts, "; ")
		t3.Verdict = verdict(ok)
	}
	r.Targets = []Target{t1, t2, t3}
}

func (b *bench) writeReport() error {
	b.summarise()
	if err := writeJSON(filepath.Join(b.cfg.Out, "results.json"), b.res); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(b.cfg.Out, "results.md"), []byte(b.markdown()), 0o644); err != nil {
		return err
	}
	latest := filepath.Join(filepath.Dir(b.cfg.Out), "latest")
	os.Remove(latest)
	os.Symlink(b.cfg.Out, latest)
	return nil
}

func joinSec(v []float64) string {
	var s []string
	for _, x := range v {
		s = append(s, sec(x))
	}
	return strings.Join(s, ", ")
}

func (b *bench) markdown() string {
	r, c := b.res, b.cfg
	var w strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&w, format, a...) }
	p("# Kura benchmark: getting VMs back (restore, instant recovery, file listing)\n\n")
	if r.Error != "" {
		p("**THE RUN FAILED:** %s\n\nThe tables below hold what was measured before the failure.\n\n", strings.ReplaceAll(r.Error, "\n", " "))
	}
	m := r.Meta
	p("%s, %s: %d cores (%s), %s, kernel %s, guests under %s. Load average %s at the start, %s at the end; %.0f s in all.\n\n",
		m.Date, m.Host, m.Cores, m.CPU, m.MemTotal, m.Kernel, m.Accel, m.LoadAvgStart, m.LoadAvgEnd, m.TotalSeconds)
	if r.OtherCores > 0.1 {
		p("**NOISY RUN:** the rest of the machine used %.2f cores on average during the timed restores; the timings are disturbed.\n\n", r.OtherCores)
	} else if len(r.Summary) > 0 {
		p("The rest of the machine used %.2f cores on average during the timed restores.\n\n", r.OtherCores)
	}
	p("kura %s (`%s`); %s; virtnbdbackup %s; %s; %s; guest image: %s.\n\n", m.KuraVersion, m.KuraBinary, m.ResticVersion, m.VNBVersion, m.QEMUVersion, m.LibvirtVersion, m.GuestImage)

	l := r.Layout
	p("## Guest\n\n%d vCPUs, %d MiB; first boot to the guest agent %.1f s.\n\n", c.CPUs, c.MemoryMiB, r.GuestBootS)
	p("| disk | virtual | allocated MB | contents |\n|---|---|---|---|\n")
	p("| vda (root) | %d MiB | %s | the test guest's Debian 12 root file system (ext4) |\n", l.RootVirtual/MiB, mb(l.RootAllocated))
	p("| vdb (/data) | %d GiB | %s | ext4: %d seeded random files of 1 KiB–512 KiB (%s MB) in %d directories /tree/dNN |\n", l.DataVirtual/GiB, mb(l.DataAllocated), l.Files, mb(l.FileBytes), l.Dirs)
	p("| total | | %s | |\n\n", mb(l.Total))

	p("## Backups (context only: not timed for comparison)\n\n| tool | what | wall s | stored MiB |\n|---|---|---|---|\n")
	for _, x := range r.Backups {
		p("| %s | %s | %s | %s |\n", backupDesc[x.Tool], x.What, sec(x.Seconds), mib(x.Stored))
	}

	p("\n## Full VM restore\n\nEvery disk of the VM (vda + vdb, %s MB allocated in the shut-off guest's raw disks), the host's page cache dropped before each restore and `sync` counted in the time. MB/s = allocated MB / seconds. Ratio = the tool's median / kura's median (above 1: kura is faster). %d runs per tool, taking turns.\n\n", mb(r.RefAllocated), c.RestoreRuns)
	p("- kura: `kura restore NAME@latest --to DIR` (sparse raw files)\n- restic: `restic restore latest --target DIR --sparse` (the raw files it backed up)\n- virtnbdrestore: `virtnbdrestore -i DIR -o DIR` (qcow2 files)\n\n")
	p("| tool | runs s | median s | of which sync s | MB/s | ratio vs kura | CPU s (median) | peak RSS MiB | written MB |\n|---|---|---|---|---|---|---|---|---|\n")
	for _, s := range r.Summary {
		p("| %s | %s | **%s** | %s | %.0f | %.2f× | %.1f | %d | %s |\n", toolDesc[s.Tool], joinSec(s.Runs), sec(s.Median), sec(s.SyncS), s.MBps, s.Ratio, s.CPU, s.RSSKB>>10, mb(s.Written))
	}
	p("\nCPU s is the command's and its children's (/usr/bin/time); virtnbdrestore writes through a qemu-nbd it forks into the background, whose CPU is not in its figure but in the machine's \"other\" CPU.\n")
	p("\nChecks of every restore (outside the timing; the data disk's files are copied out with debugfs, not with kura):\n\n")
	for _, x := range r.Restores {
		p("- %s #%d (other guests running: %d): %s\n", toolDesc[x.Tool], x.Run, len(x.OtherGuests), x.Check)
	}

	p("\n## Cold boot against instant recovery\n\n")
	if r.LocalRestore != nil {
		p("The local copy: `kura restore NAME@latest --define --as %s --to DIR --format qcow2` took %.2f s (sync included). ", b.localName, r.LocalRestore.Seconds)
	}
	how := "through one libvirt connection kept open, as `kura instant` polls it every 200 ms"
	if c.BootPing == "virsh" {
		how = "`virsh qemu-agent-command`, a new virsh process each time"
	}
	p("Cold boot: `virsh start` of that copy to the first answer of the guest agent to guest-ping, polled every 100 ms (%s). Instant: `kura instant NAME@latest --as %s --dir DIR` from start to exit (it returns after the guest agent answered; \"answered\" is what it prints). The page cache is dropped before each boot and before each read. Read: `dd if=/dev/vdb of=/dev/null bs=1M count=%d iflag=direct` in the guest, once systemd reports the boot finished.\n\n", how, b.irName, c.DDMiB)
	p("| round | cold boot s | instant s | instant: agent answered s | instant − cold s | read local MB/s | read instant MB/s | other guests running (cold / instant) |\n|---|---|---|---|---|---|---|---|\n")
	var cold, inst, ans, ddl, ddi []float64
	for _, x := range r.Boots {
		dl, di := "", ""
		if x.DDLocal != nil {
			dl = fmt.Sprintf("%.0f", x.DDLocal.MBps)
			ddl = append(ddl, x.DDLocal.MBps)
		}
		if x.DDInstant != nil {
			di = fmt.Sprintf("%.0f", x.DDInstant.MBps)
			ddi = append(ddi, x.DDInstant.MBps)
		}
		if x.InstantAnsweredS > 0 {
			cold, inst, ans = append(cold, x.ColdS), append(inst, x.Instant.Seconds), append(ans, x.InstantAnsweredS)
			p("| %d | %s | %s | %s | %+.2f | %s | %s | %d / %d |\n", x.Run, sec(x.ColdS), sec(x.Instant.Seconds), sec(x.InstantAnsweredS), x.Instant.Seconds-x.ColdS, dl, di, len(x.ColdOthers), len(x.InstantOthers))
		} else {
			p("| %d | %s | | | | %s | %s | %d / |\n", x.Run, sec(x.ColdS), dl, di, len(x.ColdOthers))
		}
	}
	if len(cold) > 0 {
		p("| **median** | **%s** | **%s** | %s | %+.2f | %.0f | %.0f | |\n", sec(median(cold)), sec(median(inst)), sec(median(ans)), median(inst)-median(cold), median(ddl), median(ddi))
	}
	var s3i, s3a, s3d []float64
	for _, x := range r.Boots {
		if x.InstantS3 != nil && x.InstantS3AnsweredS > 0 {
			s3i, s3a = append(s3i, x.InstantS3.Seconds), append(s3a, x.InstantS3AnsweredS)
			if x.DDInstantS3 != nil {
				s3d = append(s3d, x.DDInstantS3.MBps)
			}
		}
	}
	if len(s3i) > 0 {
		p("\n**From S3** (the same restore point backed up into a repository on versitygw on this host; the same measurement, each round right after the local one):\n\n| | instant s | agent answered s | instant − cold s | read MB/s |\n|---|---|---|---|---|\n")
		for _, x := range r.Boots {
			if x.InstantS3 == nil {
				continue
			}
			d := ""
			if x.DDInstantS3 != nil {
				d = fmt.Sprintf("%.0f", x.DDInstantS3.MBps)
			}
			p("| round %d | %s | %s | %+.2f | %s |\n", x.Run, sec(x.InstantS3.Seconds), sec(x.InstantS3AnsweredS), x.InstantS3.Seconds-x.ColdS, d)
		}
		p("| **median** | **%s** | %s | %+.2f | %.0f |\n", sec(median(s3i)), sec(median(s3a)), median(s3i)-median(cold), median(s3d))
	}
	if len(r.Boots) > 0 {
		p("\nThe read covers the first %d MiB of vdb, of which %s MB are allocated (data, not holes) in the shut-off guest's disk.\n", c.DDMiB, mb(r.DDAllocated))
	}

	p("\n## File listing\n\n`kura files ls` from start to exit, %d runs each, the page cache dropped before each.\n\n| listing | command | runs s | median s | lines |\n|---|---|---|---|---|\n", c.LsRuns)
	for _, x := range r.Listings {
		p("| %s | `%s` | %s | **%s** | %d |\n", x.What, x.Command, joinSec(x.Runs), sec(x.Median), x.Entries)
	}

	p("\n## Targets\n\n| target | measured | verdict |\n|---|---|---|\n")
	for _, t := range r.Targets {
		p("| %s | %s | **%s** |\n", t.Name, t.Measured, t.Verdict)
	}
	return w.String()
}
