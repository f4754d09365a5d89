#!/usr/bin/env python3
"""Helpers for Kura's benchmark (bench/run.sh, bench/mkdisk.sh).

Subcommands:
  stage DIR TARGET_BYTES      fill DIR with copies of real files from /usr
                              until TARGET_BYTES of file data are there
  extents IMAGE               print JSON: logical size, allocated bytes and
                              data extents (SEEK_DATA/SEEK_HOLE)
  scatter IMAGE               apply scattered random writes in place
                              (default: 1600 x 64 KiB = 100 MiB, seed 42)
  report RECORDS.jsonl OUTDIR write results.md and results.json
  aggregate RESULT_DIR...     median (min-max) table over several runs

Only the standard library is used.
"""

import argparse
import errno
import json
import os
import random
import shutil
import stat
import sys
import time

MiB = 1 << 20
GiB = 1 << 30

# ---------------------------------------------------------------------------
# stage


# Roots tried in this order; files inside each are taken in sorted path order,
# so the same machine always yields the same data set. The order mixes
# binaries, shared libraries, text and compressed data (man pages, jars).
STAGE_ROOTS = [
    "/usr/bin",
    "/usr/sbin",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/share",
    "/usr/include",
    "/usr/lib",
    "/usr/libexec",
    "/usr/local",
    "/usr",
]


def _iter_files(root):
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def cmd_stage(args):
    target = int(args.target_bytes)
    dest = args.dir
    os.makedirs(dest, exist_ok=True)
    total = 0
    nfiles = 0
    passno = 0
    # Repeat passes only if /usr is smaller than the target; later passes
    # duplicate earlier data (dedup-friendly), which is reported on stderr.
    while total < target:
        before = total
        seen = set()  # roots overlap (/usr/lib, /usr): take each file once per pass
        for root in STAGE_ROOTS:
            if not os.path.isdir(root):
                continue
            for src in _iter_files(root):
                if total >= target:
                    break
                if src in seen:
                    continue
                seen.add(src)
                try:
                    st = os.lstat(src)
                except OSError:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                    continue
                rel = os.path.relpath(src, "/")
                dst = os.path.join(dest, "pass%d" % passno, rel)
                os.makedirs(os.path.dirname(dst), exist_ok=True)
                try:
                    shutil.copyfile(src, dst, follow_symlinks=False)
                except OSError:
                    continue
                total += st.st_size
                nfiles += 1
            if total >= target:
                break
        if total == before:
            sys.exit("stage: no readable files found under /usr")
        passno += 1
    if passno > 1:
        print("stage: WARNING: /usr smaller than target; %d passes, data repeats" % passno, file=sys.stderr)
    print(json.dumps({"files": nfiles, "bytes": total, "passes": passno}))


# ---------------------------------------------------------------------------
# extents

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)


def data_extents(fd, size):
    """Return [(offset, length)] of data regions, via SEEK_DATA/SEEK_HOLE."""
    out = []
    off = 0
    while off < size:
        try:
            start = os.lseek(fd, off, SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                break
            raise
        end = os.lseek(fd, start, SEEK_HOLE)
        out.append((start, end - start))
        off = end
    return out


def cmd_extents(args):
    fd = os.open(args.image, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        ext = data_extents(fd, size)
    finally:
        os.close(fd)
    alloc = sum(l for _, l in ext)
    res = {"image": args.image, "size": size, "allocated": alloc, "extents": len(ext)}
    if args.full:
        res["list"] = ext
    print(json.dumps(res))


# ---------------------------------------------------------------------------
# scatter


def cmd_scatter(args):
    bs = args.block_size
    n = args.count
    rng = random.Random(args.seed)
    fd = os.open(args.image, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if args.region == "allocated":
            # Candidate blocks: bs-aligned blocks lying entirely inside a data
            # extent of the image, i.e. inside the used part of the filesystem
            # (file data, inode tables, journal, ...). Overwriting data that is
            # already there is what a running VM mostly does.
            cands = []
            for off, length in data_extents(fd, size):
                first = -(-off // bs)  # ceil
                last = (off + length) // bs  # exclusive
                if last > first:
                    cands.append((first, last - first))
            ncand = sum(c for _, c in cands)
            if ncand < n:
                sys.exit("scatter: only %d candidate blocks in allocated extents, need %d" % (ncand, n))
            picks = sorted(rng.sample(range(ncand), n))
            # map flat indexes to block numbers
            blocks = []
            it = iter(cands)
            base_idx = 0
            first, cnt = next(it)
            for p in picks:
                while p >= base_idx + cnt:
                    base_idx += cnt
                    first, cnt = next(it)
                blocks.append(first + (p - base_idx))
        else:  # whole disk
            nblocks = size // bs
            blocks = sorted(rng.sample(range(nblocks), n))
        # Data: incompressible pseudo-random bytes. By default they come from
        # the same seeded generator, so a rerun produces a byte-identical
        # image; --urandom takes them from os.urandom instead.
        order = list(blocks)
        rng.shuffle(order)  # write in scattered order, not ascending
        t0 = time.time()
        for b in order:
            data = os.urandom(bs) if args.urandom else rng.randbytes(bs)
            os.pwrite(fd, data, b * bs)
        os.fsync(fd)
        dt = time.time() - t0
    finally:
        os.close(fd)
    print(json.dumps({
        "image": args.image, "writes": n, "block_size": bs,
        "bytes": n * bs, "seed": args.seed, "region": args.region,
        "urandom": bool(args.urandom), "first_offsets": [b * bs for b in blocks[:4]],
        "seconds": round(dt, 3),
    }))


# ---------------------------------------------------------------------------
# report


def _fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return ("%%.%df" % nd) % v


def _mib(b):
    return None if b is None else b / MiB


def cmd_report(args):
    recs = []
    with open(args.records) as f:
        for line in f:
            line = line.strip()
            if line:
                recs.append(json.loads(line))
    meta = {}
    rows = {}  # row name -> dict
    order = []
    physlimit = None
    for r in recs:
        kind = r.get("kind")
        if kind == "meta":
            meta.update(r)
            continue
        if kind == "physlimit":
            physlimit = r
            continue
        row = r["row"]
        if row not in rows:
            rows[row] = {"row": row, "tool": r.get("tool", row)}
            order.append(row)
        d = rows[row]
        if kind == "step":
            d[r["step"]] = {k: r.get(k) for k in ("seconds", "max_rss_kb", "user", "sys", "other_cpu", "ok", "rc")}
        elif kind == "size":
            d[r["step"]] = r["bytes"]
        elif kind == "skip":
            d["skipped"] = r.get("reason", "skipped")
        elif kind == "check":
            d["restore_ok"] = r.get("ok")
        elif kind == "extra":
            d.setdefault("extra", {}).update(r.get("data", {}))
        elif kind == "sync":
            d["restore_sync_seconds"] = r.get("seconds")

    logical = meta.get("disk_size")
    alloc = meta.get("disk_allocated")
    ref = rows.get("kura")

    def sec(d, step):
        s = d.get(step)
        return None if not s else s.get("seconds")

    def ratio(row, step):
        if ref is None or "skipped" in ref or "skipped" in row:
            return None
        a, b = sec(row, step), sec(ref, step)
        if a is None or not b:
            return None
        return a / b

    out = {"meta": meta, "physlimit": physlimit, "rows": []}
    pref = ["kura", "restic", "kopia", "borg", "kura-qcow2"]
    order.sort(key=lambda n: (pref.index(n) if n in pref else len(pref), n))
    for name in order:
        d = rows[name]
        e = dict(d)
        for step in ("full", "incr", "restore"):
            s = sec(d, step)
            e[step + "_mbps_logical"] = (logical / s / 1e6) if (s and logical) else None
            e[step + "_mbps_alloc"] = (alloc / s / 1e6) if (s and alloc) else None
            e[step + "_ratio_vs_kura"] = ratio(d, step)
        if ref is not None and ref.get("repo_bytes") and d.get("repo_bytes"):
            e["repo_ratio_vs_kura"] = d["repo_bytes"] / ref["repo_bytes"]
        out["rows"].append(e)
    if physlimit and ref is not None and sec(ref, "full"):
        out["kura_full_vs_physlimit"] = sec(ref, "full") / physlimit["seconds"]


    L = []
    L.append("# Kura benchmark results")
    L.append("")
    L.append("- date: %s, host: %s, cores: %s, kernel: %s" % (
        meta.get("date"), meta.get("host"), meta.get("cores"), meta.get("kernel")))
    if logical:
        L.append("- disk: %s, logical %.2f GiB, allocated %.2f GiB (%s extents); changed: %s" % (
            meta.get("disk"), logical / GiB, (alloc or 0) / GiB, meta.get("disk_extents"),
            meta.get("scatter_desc", "?")))
    L.append("- versions: " + ", ".join("%s %s" % (k[:-8], v) for k, v in sorted(meta.items())
                                        if k.endswith("_version")))
    L.append("- load average at start / end: %s / %s; measured commands ran at nice %s" % (
        meta.get("loadavg_start"), meta.get("loadavg_end"), meta.get("nice", 0)))
    L.append("- settings: restic: %s; kopia: %s; borg: %s" % (
        meta.get("restic_settings"), meta.get("kopia_settings"), meta.get("borg_settings")))
    L.append("- MB/s = logical disk size / wall seconds (10^6 bytes); alloc MB/s uses allocated data.")
    L.append("- ratio = tool seconds / Kura seconds (higher = Kura faster).")
    L.append("")
    hdr = ("| tool | full s | full MB/s (log/alloc) | ratio | 2nd s | ratio | restore s | ratio | restore ok "
           "| repo after full MiB | repo MiB | peak RSS full / 2nd / restore MiB |")
    L.append(hdr)
    L.append("|" + "---|" * 12)
    for e in out["rows"]:
        if "skipped" in e:
            L.append("| %s | pending | | | | | | | | | | %s |" % (e["row"], e["skipped"]))
            continue

        def rss(step):
            s = e.get(step)
            return _fmt(None if not s or s.get("max_rss_kb") is None else s["max_rss_kb"] / 1024, 0)

        def mbps(step):
            return "%s / %s" % (_fmt(e.get(step + "_mbps_logical"), 0), _fmt(e.get(step + "_mbps_alloc"), 0))

        L.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s / %s |" % (
            e["row"],
            _fmt(sec(e, "full")), mbps("full"), _fmt(e.get("full_ratio_vs_kura"), 2),
            _fmt(sec(e, "incr")), _fmt(e.get("incr_ratio_vs_kura"), 2),
            _fmt(sec(e, "restore")), _fmt(e.get("restore_ratio_vs_kura"), 2),
            {True: "yes", False: "NO", None: "–"}[e.get("restore_ok")],
            _fmt(_mib(e.get("repo_after_full_bytes"))), _fmt(_mib(e.get("repo_bytes"))),
            rss("full"), rss("incr"), rss("restore")))
    L.append("")
    if physlimit:
        L.append("Physical limit (keyed BLAKE3 + zstd-1 of the non-zero %d KiB chunks of the allocated extents, "
                 "%d workers, best of %s runs): %.2f s, %.0f MB/s of data read, %.0f MB/s of logical size "
                 "(%d chunks, %d non-zero, %.1f MiB compressed)." % (
                     physlimit.get("chunk_size", 0) // 1024, physlimit.get("workers", 0), physlimit.get("runs", 1), physlimit["seconds"],
                     physlimit.get("mbps_read", 0), physlimit.get("mbps_logical", 0),
                     physlimit.get("chunks", 0), physlimit.get("nonzero_chunks", 0),
                     physlimit.get("compressed_bytes", 0) / MiB))
        if "kura_full_vs_physlimit" in out:
            L.append("Kura full backup / physical limit = %.2fx (target <= 1.2x)." % out["kura_full_vs_physlimit"])
        else:
            L.append("Kura full backup / physical limit: pending (Kura not run).")
        rf = physlimit.get("restore")
        if rf:
            L.append("")
            L.append("Restore floor (every non-zero chunk sealed beforehand with AES-256-GCM over zstd-1; timed: "
                     "open + decompress + keyed BLAKE3 check on %d workers, then the same plus a pwrite at its offset "
                     "into a fresh sparse file and an fsync): decode %.2f s, decode + write + fsync %.2f s." % (
                         rf.get("workers", 0), rf["decode_seconds"], rf["write_seconds"]))
            for e in out["rows"]:
                s = sec(e, "restore")
                if s and "skipped" not in e:
                    e["restore_vs_floor"] = s / rf["write_seconds"]
            parts = ["%s %.2fx" % (e["row"], e["restore_vs_floor"]) for e in out["rows"] if e.get("restore_vs_floor")]
            if parts:
                L.append("Restore time / restore floor: " + ", ".join(parts) + ".")
            if rs_floor_note(out, rf):
                L.append(rs_floor_note(out, rf))
        L.append("")
    # CPU time is less sensitive than wall time to other load on the machine.
    def cpu(d, step):
        s = d.get(step)
        if not s or s.get("user") is None:
            return None
        return s["user"] + s["sys"]

    def cpu_ratio(d, step):
        if ref is None or "skipped" in ref:
            return None
        a, b = cpu(d, step), cpu(ref, step)
        return None if a is None or not b else a / b

    L.append("CPU seconds (user+sys of the tool), ratio to Kura's CPU seconds, and in brackets the CPU "
             "seconds used elsewhere on the machine during the step: other processes, kernel writeback threads, hypervisor steal (large = timing disturbed):")
    L.append("")
    L.append("| tool | full CPU s | ratio | 2nd CPU s | ratio | restore CPU s | ratio |")
    L.append("|" + "---|" * 7)
    for e in out["rows"]:
        if "skipped" in e:
            continue
        cells = [e["row"]]
        for step in ("full", "incr", "restore"):
            c = cpu(e, step)
            o = (e.get(step) or {}).get("other_cpu")
            cells.append("%s%s" % (_fmt(c), "" if o is None else " (%.0f)" % o))
            r = cpu_ratio(e, step)
            e[step + "_cpu_ratio_vs_kura"] = r
            cells.append(_fmt(r, 2))
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    # Restore until durable: the tool's time plus the sync after it.
    def durable(e):
        s = sec(e, "restore")
        return None if s is None or e.get("restore_sync_seconds") is None else s + e["restore_sync_seconds"]

    if any(e.get("restore_sync_seconds") is not None for e in out["rows"]):
        L.append("Restore until the data is on disk: the tool's time plus a `sync` run right after it "
                 "(Kura fsyncs before it returns; the others leave the data to the kernel's writeback), "
                 "and the ratio to Kura's:")
        L.append("")
        L.append("| tool | restore s | sync after s | restore + sync s | ratio |")
        L.append("|---|---|---|---|---|")
        kd = durable(ref) if ref is not None else None
        for e in out["rows"]:
            if "skipped" in e:
                continue
            d = durable(e)
            e["restore_durable_seconds"] = d
            e["restore_durable_ratio_vs_kura"] = None if d is None or not kd else d / kd
            L.append("| %s | %s | %s | %s | %s |" % (e["row"], _fmt(sec(e, "restore")), _fmt(e.get("restore_sync_seconds")),
                                                   _fmt(d), _fmt(e["restore_durable_ratio_vs_kura"], 2)))
        L.append("")
    # Targets (docs/BENCHMARKS.md), judged on wall time against restic.
    rows_by = {e["row"]: e for e in out["rows"]}
    rs = rows_by.get("restic")
    targets = []
    if ref is not None and "skipped" not in ref:
        def tgt(name, value, ok, fmt):
            targets.append({"target": name, "value": value, "pass": ok})
            L.append("| %s | %s | %s |" % (name, "–" if value is None else fmt % value,
                                         "–" if ok is None else ("PASS" if ok else "FAIL")))
        L.append("Targets:")
        L.append("")
        L.append("| target | measured | |")
        L.append("|---|---|---|")
        if rs is not None and "skipped" not in rs:
            for step, need, label in (("full", 4, "full backup >= 4x faster than restic"),
                                      ("incr", 5, "second backup >= 5x faster than restic"),
                                      ("restore", 5, "restore >= 5x faster than restic")):
                r = rs.get(step + "_ratio_vs_kura")
                tgt(label, r, None if r is None else r >= need, "%.2fx")
            r = rs.get("restore_durable_ratio_vs_kura")
            if r is not None:
                tgt("restore until on disk >= 5x faster than restic's restore + sync", r, r >= 5, "%.2fx")
            kb, rb = ref.get("repo_bytes"), rs.get("repo_bytes")
            v = None if not kb or not rb else kb / rb
            tgt("repository no larger than restic's (Kura/restic)", v, None if v is None else v <= 1.0, "%.2f")
        peaks = [(ref.get(st) or {}).get("max_rss_kb") for st in ("full", "incr", "restore")]
        peaks = [p for p in peaks if p is not None]
        v = max(peaks) / 1024 if peaks else None
        tgt("peak RSS < 512 MiB", v, None if v is None else v < 512, "%.0f MiB")
        v = out.get("kura_full_vs_physlimit")
        tgt("full backup within 1.2x of the physical limit", v, None if v is None else v <= 1.2, "%.2fx")
        L.append("")
    out["targets"] = targets

    notes = [(e["row"], e["extra"]) for e in out["rows"] if e.get("extra")]
    for row, ex in notes:
        L.append("- %s: %s" % (row, json.dumps(ex, sort_keys=True)))
    with open(os.path.join(args.outdir, "results.json"), "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
    with open(os.path.join(args.outdir, "results.md"), "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))


def rs_floor_note(out, rf):
    """What the restore target asks of the floor: restic's time / 5 against it."""
    rows = {e["row"]: e for e in out["rows"]}
    rs = rows.get("restic")
    if not rs or "skipped" in rs or not (rs.get("restore") or {}).get("seconds"):
        return None
    need = rs["restore"]["seconds"] / 5
    return ("A restore 5x faster than restic's would take %.2f s: %s the verifying floor with the write (%.2f s) "
            "and %s the floor without it (%.2f s)." % (
                need, "below" if need < rf["write_seconds"] else "above", rf["write_seconds"],
                "below" if need < rf["decode_seconds"] else "above", rf["decode_seconds"]))


def cmd_aggregate(args):
    """Median (min-max) over several runs' results.json, as a markdown table."""
    runs = []
    for d in args.dirs:
        with open(os.path.join(d, "results.json")) as f:
            runs.append(json.load(f))
    names = []
    for r in runs:
        for e in r["rows"]:
            if e["row"] not in names and "skipped" not in e:
                names.append(e["row"])

    def vals(name, get):
        out = []
        for r in runs:
            for e in r["rows"]:
                if e["row"] == name and "skipped" not in e:
                    v = get(e)
                    if v is not None:
                        out.append(v)
        return out

    def med(v, nd=1, scale=1.0):
        if not v:
            return "–"
        v = sorted(x / scale for x in v)
        m = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
        if len(v) == 1:
            return ("%%.%df" % nd) % m
        return ("%%.%df (%%.%df–%%.%df)" % (nd, nd, nd)) % (m, v[0], v[-1])

    step = lambda st, k: (lambda e: (e.get(st) or {}).get(k))
    L = ["Median (min–max) over %d runs: %s" % (len(runs), ", ".join(os.path.basename(os.path.normpath(d)) for d in args.dirs)), ""]
    L.append("| tool | full s | 2nd s | restore s | full ratio | 2nd ratio | restore ratio "
             "| repo after full MiB | repo MiB | peak RSS MiB (max of steps) |")
    L.append("|" + "---|" * 10)
    for n in names:
        rss = vals(n, lambda e: max([(e.get(st) or {}).get("max_rss_kb") or 0 for st in ("full", "incr", "restore")]))
        L.append("| %s | " % n + " | ".join([
            med(vals(n, step("full", "seconds"))), med(vals(n, step("incr", "seconds"))),
            med(vals(n, step("restore", "seconds"))),
            med(vals(n, lambda e: e.get("full_ratio_vs_kura")), 2),
            med(vals(n, lambda e: e.get("incr_ratio_vs_kura")), 2),
            med(vals(n, lambda e: e.get("restore_ratio_vs_kura")), 2),
            med(vals(n, lambda e: e.get("repo_after_full_bytes")), 0, MiB),
            med(vals(n, lambda e: e.get("repo_bytes")), 0, MiB),
            med(rss, 0, 1024)]) + " |")
    pl = [r["physlimit"]["seconds"] for r in runs if r.get("physlimit")]
    kp = [r["kura_full_vs_physlimit"] for r in runs if r.get("kura_full_vs_physlimit")]
    L.append("")
    L.append("Physical limit: %s s; Kura full / physical limit: %sx" % (med(pl, 2), med(kp, 2)))
    print("\n".join(L))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stage")
    s.add_argument("dir")
    s.add_argument("target_bytes")
    s.set_defaults(fn=cmd_stage)
    s = sub.add_parser("extents")
    s.add_argument("image")
    s.add_argument("--full", action="store_true", help="include the extent list")
    s.set_defaults(fn=cmd_extents)
    s = sub.add_parser("scatter")
    s.add_argument("image")
    s.add_argument("--count", type=int, default=1600)
    s.add_argument("--block-size", type=int, default=64 * 1024)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--region", choices=["allocated", "whole"], default="allocated")
    s.add_argument("--urandom", action="store_true")
    s.set_defaults(fn=cmd_scatter)
    s = sub.add_parser("report")
    s.add_argument("records")
    s.add_argument("outdir")
    s.set_defaults(fn=cmd_report)
    s = sub.add_parser("aggregate")
    s.add_argument("dirs", nargs="+", help="result directories of several runs")
    s.set_defaults(fn=cmd_aggregate)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
