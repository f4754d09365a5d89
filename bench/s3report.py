#!/usr/bin/env python3
"""Report of bench/s3.sh: results.md and results.json from records.jsonl and
the counting proxy's statistics.

  s3report.py RECORDS.jsonl PROXY-STATS.json OUTDIR
  s3report.py aggregate DIR...     median (min-max) of the main numbers of several runs

Only the standard library is used.
"""

import json
import os
import sys

MiB = 1 << 20
GiB = 1 << 30
TOOLS = ["kura", "restic", "kopia"]


def load(records_path, stats_path):
    recs = [json.loads(l) for l in open(records_path) if l.strip()]
    stats = json.load(open(stats_path))
    meta = {}
    steps, sizes, floors, checks, skips, syncs = {}, {}, {}, {}, {}, {}
    phys = None
    for r in recs:
        k = r["kind"]
        if k == "meta":
            meta.update({x: y for x, y in r.items() if x != "kind"})
        elif k == "step":
            steps[(r["row"], r["step"])] = r
        elif k == "size":
            sizes[(r["row"], r["step"])] = r["du"]
        elif k == "floor":
            floors[r["label"]] = r
        elif k == "physlimit":
            phys = r["result"]
        elif k == "sync":
            syncs[r["row"]] = r["seconds"]
        elif k == "check":
            checks[r["row"]] = r["ok"]
        elif k == "skip":
            skips[r["row"]] = r["reason"]
    return meta, steps, sizes, floors, phys, checks, skips, syncs, stats.get("phases", {})


def f(x, nd=1):
    if x is None:
        return "–"
    return f"{x:.{nd}f}"


def aggregate(dirs):
    """Median (min-max) of the main numbers over several runs' results.json."""
    runs = [json.load(open(os.path.join(d, "results.json"))) for d in dirs]

    def med(xs):
        xs = sorted(x for x in xs if x is not None)
        if not xs:
            return "–"
        m = xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
        return f"{m:.2f} ({xs[0]:.2f}–{xs[-1]:.2f})" if len(xs) > 1 else f"{m:.2f}"

    def step(run, row, name, key="seconds"):
        for s in run["steps"]:
            if s["row"] == row and s["step"] == name and s.get("ok"):
                return s.get(key)
        return None

    print(f"{len(runs)} runs: " + ", ".join(dirs))
    print()
    print("| tool | full s | ratio | 2nd s | ratio | restore s | ratio | restore + sync s | ratio | requests full / 2nd / restore |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for t in TOOLS:
        cells = [t]
        for name in ("full", "incr", "restore"):
            cells.append(med([step(r, t, name) for r in runs]))
            cells.append(med([(step(r, t, name) or 0) / step(r, "kura", name) if step(r, t, name) and step(r, "kura", name) else None for r in runs]))
        dur = [step(r, t, "restore") + r.get("sync_after_restore", {}).get(t, 0) if step(r, t, "restore") else None for r in runs]
        kdur = [step(r, "kura", "restore") + r.get("sync_after_restore", {}).get("kura", 0) if step(r, "kura", "restore") else None for r in runs]
        cells.append(med(dur))
        cells.append(med([a / b if a and b else None for a, b in zip(dur, kdur)]))
        cells.append(" / ".join(med([step(r, t, n, "requests") for r in runs]) for n in ("full", "incr", "restore")))
        print("| " + " | ".join(cells) + " |")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "aggregate":
        return aggregate(sys.argv[2:])
    rpath, spath, out = sys.argv[1:4]
    meta, steps, sizes, floors, phys, checks, skips, syncs, phases = load(rpath, spath)
    disk = meta["disk_size"]
    disk_mib = disk / MiB
    disk_gib = disk / GiB
    res = {"meta": meta, "steps": [], "floors": floors, "physlimit": phys, "sizes": {}, "checks": checks, "skips": skips,
           "sync_after_restore": syncs}

    def st(row, step):
        s = steps.get((row, step))
        return s if s and s.get("ok") else None

    def secs(row, step):
        s = st(row, step)
        return s["seconds"] if s else None

    def cpu(row, step):
        s = st(row, step)
        return round((s["user"] or 0) + (s["sys"] or 0), 1) if s else None

    def rss(row, step):
        s = st(row, step)
        return round(s["max_rss_kb"] / 1024) if s and s.get("max_rss_kb") else None

    def ph(row, step):
        return phases.get(f"{row}-{step}")

    def bucket_mib(row, step):
        d = sizes.get((row, step))
        return d["bytes"] / MiB if d else None

    def mibs(row, step):
        s = secs(row, step)
        return disk_mib / s if s else None

    def ratio(row, step, base="kura"):
        a, b = secs(row, step), secs(base, step)
        return a / b if a and b else None

    def durable(row):  # restore, then the sync after it
        s = secs(row, "restore")
        return s + syncs.get(row, 0) if s else None

    def dratio(row):
        a, b = durable(row), durable("kura")
        return a / b if a and b else None

    for (row, step), s in sorted(steps.items()):
        p = ph(row, step) or {}
        d = dict(s)
        d.update({"requests": p.get("requests"), "by_op": p.get("by_op"), "bytes_up": p.get("bytes_up"),
                  "bytes_down": p.get("bytes_down"), "mib_s_of_disk": mibs(row, step)})
        res["steps"].append(d)
    for (row, step), d in sizes.items():
        res["sizes"][f"{row}/{step}"] = d

    L = []
    w = L.append
    w(f"# Kura on S3 against restic and kopia ({meta.get('server')} {meta.get('server_version','')})")
    w("")
    w(f"{meta.get('date')}, {meta.get('cores')} cores ({meta.get('cpu')}), kernel {meta.get('kernel')}; "
      f"disk: {meta.get('disk')}: {disk_mib:.0f} MiB, {meta.get('disk_allocated',0)/MiB:.0f} MiB allocated. "
      f"Kura {meta.get('kura_version')}, restic {meta.get('restic_version')}, kopia {meta.get('kopia_version')}. "
      f"Load average {meta.get('loadavg_start')} at the start, {meta.get('loadavg_end')} at the end; "
      f"page cache dropped before each step: {meta.get('dropped_cache')}.")
    sc = meta.get("scatter") or {}
    if sc:
        w(f"Change between the backups: {sc.get('writes')} x {sc.get('block_size',0)//1024} KiB random writes "
          f"({meta.get('change_pct')}% of the disk's 64 KiB blocks, {sc.get('bytes',0)/MiB:.0f} MiB), seed {sc.get('seed')}.")
    w("")
    w("MiB/s is the disk's size over the wall time; ratio = tool seconds / Kura seconds (2.0: Kura twice as fast). "
      "restore + sync: the restore and a `sync` right after it, until the data is on disk (Kura fsyncs before it returns; "
      "restic and kopia do not). Other CPU: what the rest of the machine used during the step (other work on a shared machine).")
    w("")
    w("| tool | full s | MiB/s | ratio | 2nd s | MiB/s | ratio | restore s | MiB/s | ratio | restore + sync s | ratio | bucket after full MiB | after 2nd MiB | CPU s full / 2nd / restore | peak RSS MiB | server CPU s | other CPU s |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for t in TOOLS:
        if not any((t, s) in steps for s in ("full", "incr", "restore")):
            if t in skips:
                w(f"| {t} | skipped: {skips[t]} |" + " |" * 16)
            continue
        ver = "" if t == "kura" else " " + (meta.get(f"{t}_version") or "")
        cells = [f"{t}{ver}"]
        for step in ("full", "incr", "restore"):
            cells += [f(secs(t, step)), f(mibs(t, step)), f(ratio(t, step), 2)]
        cells += [f(durable(t)), f(dratio(t), 2)]
        cells += [f(bucket_mib(t, "after_full")), f(bucket_mib(t, "after_incr"))]
        cells.append(" / ".join(f(cpu(t, s)) for s in ("full", "incr", "restore")))
        cells.append(" / ".join(str(rss(t, s) or "–") for s in ("full", "incr", "restore")))
        cells.append(" / ".join(f((st(t, s) or {}).get("server_cpu")) for s in ("full", "incr", "restore")))
        cells.append(" / ".join(f((st(t, s) or {}).get("other_cpu")) for s in ("full", "incr", "restore")))
        w("| " + " | ".join(cells) + " |")
    bad = [r for r, ok in checks.items() if not ok]
    w("")
    w("Every restore compared equal to the changed image." if checks and not bad else
      f"Restores that did NOT compare equal: {', '.join(bad) or 'none checked'}.")

    # requests and bytes
    w("")
    w("## Requests and bytes per GiB of disk (through the counting proxy)")
    w("")
    w("| tool | step | requests | per GiB | by operation | MiB sent per GiB | MiB received per GiB |")
    w("|---|---|---|---|---|---|---|")
    rows = [t for t in TOOLS] + ["kura-copy", "kura-copykey", "restic-copy", "kopia-copy"]
    for t in rows:
        for step in ("full", "incr", "restore", "copy"):
            p, s = ph(t, step), st(t, step)
            if not p or not s:
                continue
            ops = ", ".join(f"{k} {v}" for k, v in sorted(p["by_op"].items(), key=lambda kv: -kv[1]))
            w(f"| {t} | {step} | {p['requests']} | {p['requests']/disk_gib:.0f} | {ops} | "
              f"{p['bytes_up']/MiB/disk_gib:.1f} | {p['bytes_down']/MiB/disk_gib:.1f} |")
    tot = {}
    for t in TOOLS:
        ps = [ph(t, s) for s in ("full", "incr", "restore")]
        if all(ps) and all(st(t, s) for s in ("full", "incr", "restore")):
            tot[t] = sum(p["requests"] for p in ps) / disk_gib

    # floors
    w("")
    w("## The floor: this machine and this server")
    w("")
    w("16 MiB objects from /dev/shm, PUT then GET (SigV4, unsigned payload), page cache dropped before each half.")
    w("")
    w("| path | in flight | objects | PUT MiB/s | GET MiB/s |")
    w("|---|---|---|---|---|")
    for lab, r in floors.items():
        x = r["result"]
        w(f"| {r['via']} | {x['inflight']} | {x['objects']} | {f(x.get('put_mib_s'))} | {f(x.get('get_mib_s'))} |")
    prox = [r["result"] for r in floors.values() if r["via"] == "proxy"]
    put_floor = max((x.get("put_mib_s") or 0 for x in prox), default=0)
    get_floor = max((x.get("get_mib_s") or 0 for x in prox), default=0)
    res["floor_put_mib_s"], res["floor_get_mib_s"] = put_floor, get_floor
    if phys:
        w("")
        w(f"Compute floor of Kura's format (bench/physlimit, 2 workers, 256 KiB chunks, image in the page cache): "
          f"hash + zstd-1 of the allocated data {phys['seconds']:.2f} s ({disk_mib/phys['seconds']:.0f} MiB/s of disk); "
          f"restore: decode {phys['restore']['decode_seconds']:.2f} s, decode + write + fsync "
          f"{phys['restore']['write_seconds']:.2f} s ({disk_mib/phys['restore']['write_seconds']:.0f} MiB/s of disk).")
    w("")
    w(f"Each step against the floor: the bytes it moved (counted by the proxy) at the floor's best rate through the proxy "
      f"(PUT {put_floor:.0f} MiB/s for backups, GET {get_floor:.0f} MiB/s for restores)"
      + ("; for Kura also the compute floor, and the larger of the two." if phys else "."))
    w("")
    w("| tool | step | MiB moved | network floor s | tool s | × network floor | × max(network, compute) floor |")
    w("|---|---|---|---|---|---|---|")
    res["vs_floor"] = {}
    for t in TOOLS:
        for step in ("full", "incr", "restore"):
            p, s = ph(t, step), st(t, step)
            if not p or not s:
                continue
            up = step != "restore"
            moved = (p["bytes_up"] if up else p["bytes_down"]) / MiB
            rate = put_floor if up else get_floor
            if not rate:
                continue
            fl = moved / rate
            both = "–"
            if t == "kura" and phys and step == "full":
                cf = max(fl, phys["seconds"])
                both = f"{s['seconds']/cf:.2f}"
            elif t == "kura" and phys and step == "restore":
                cf = max(fl, phys["restore"]["write_seconds"])
                both = f"{s['seconds']/cf:.2f}"
            res["vs_floor"][f"{t}/{step}"] = {"moved_mib": moved, "floor_s": fl, "ratio": s["seconds"] / fl}
            w(f"| {t} | {step} | {moved:.0f} | {fl:.2f} | {s['seconds']:.2f} | {s['seconds']/fl:.2f} | {both} |")

    # proxy cost
    pairs = [(st(f"kura-direct{i}", "full"), st(f"kura-proxied{i}", "full")) for i in (1, 2)]
    pairs = [(d, p) for d, p in pairs if d and p]
    old_direct = st("kura-direct", "full")  # runs before the alternation
    if pairs or old_direct:
        w("")
        w("## What the proxy costs")
        w("")
        if pairs:
            w("Kura's full backup into fresh buckets, directly to the server and through the proxy, alternated:")
            w("")
            w("| round | direct s | through the proxy s | difference | proxy CPU s | other CPU s direct / proxy |")
            w("|---|---|---|---|---|---|")
            for i, (d, p) in enumerate(pairs, 1):
                w(f"| {i} | {d['seconds']:.2f} | {p['seconds']:.2f} | {100*(p['seconds']-d['seconds'])/d['seconds']:+.0f}% | "
                  f"{p['proxy_cpu']:.2f} | {d['other_cpu']:.1f} / {p['other_cpu']:.1f} |")
            ds, ps = sum(d["seconds"] for d, _ in pairs), sum(p["seconds"] for _, p in pairs)
            res["proxy_check"] = {"direct_s": [d["seconds"] for d, _ in pairs], "proxied_s": [p["seconds"] for _, p in pairs],
                                  "proxy_cpu_s": [p["proxy_cpu"] for _, p in pairs], "difference": (ps - ds) / ds}
            w("")
            w(f"In all: {100*(ps-ds)/ds:+.0f}% through the proxy.")
        elif old_direct and st("kura", "full"):
            a = st("kura", "full")
            w(f"Kura's full backup through the proxy {a['seconds']:.2f} s (proxy CPU {a['proxy_cpu']:.2f} s), "
              f"directly to the server {old_direct['seconds']:.2f} s.")
        fd, fp = floors.get("direct8"), floors.get("proxy8")
        if fd and fp:
            w(f"The floor with 8 in flight: PUT {fp['result']['put_mib_s']:.0f} MiB/s through the proxy, "
              f"{fd['result']['put_mib_s']:.0f} directly; GET {fp['result']['get_mib_s']:.0f} / {fd['result']['get_mib_s']:.0f}.")

    # pack sizes
    packs = sorted({int(r[len("kura-pack"):]) for (r, _) in steps if r.startswith("kura-pack")})
    if packs:
        w("")
        w("## Pack size (Kura, full backup of the changed image and its restore, one bucket each)")
        w("")
        w("| pack MiB | full s | MiB/s | restore s | MiB/s | requests/GiB backup | requests/GiB restore | backup ops | objects | bucket MiB | CPU s backup / restore | peak RSS MiB backup / restore | other CPU s backup / restore |")
        w("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        res["packs"] = {}
        for ps in packs:
            r = f"kura-pack{ps}"
            pb, pr = ph(r, "full"), ph(r, "restore")
            d = sizes.get((r, "after_full")) or {}
            ops = ", ".join(f"{k} {v}" for k, v in sorted((pb or {}).get("by_op", {}).items(), key=lambda kv: -kv[1]))
            w(f"| {ps} | {f(secs(r,'full'))} | {f(mibs(r,'full'))} | {f(secs(r,'restore'))} | {f(mibs(r,'restore'))} | "
              f"{f(pb['requests']/disk_gib, 0) if pb and st(r,'full') else '–'} | {f(pr['requests']/disk_gib, 0) if pr and st(r,'restore') else '–'} | {ops} | "
              f"{d.get('objects','–')} | {f(d['bytes']/MiB) if d else '–'} | {f(cpu(r,'full'))} / {f(cpu(r,'restore'))} | "
              f"{rss(r,'full') or '–'} / {rss(r,'restore') or '–'} | "
              f"{f((st(r,'full') or {}).get('other_cpu'))} / {f((st(r,'restore') or {}).get('other_cpu'))} |")
            res["packs"][ps] = {"full_s": secs(r, "full"), "restore_s": secs(r, "restore"),
                                "req_backup": pb and pb["requests"], "req_restore": pr and pr["requests"], "objects": d.get("objects")}

    # copy
    crow = [r for r in ("kura-copy", "kura-copykey", "restic-copy", "kopia-copy") if (r, "copy") in steps or r in skips]
    if crow:
        w("")
        w("## Copying a repository to a second bucket on the same server")
        w("")
        w("| tool | s | requests | MiB sent | MiB received | target bucket MiB | CPU s | peak RSS MiB |")
        w("|---|---|---|---|---|---|---|---|")
        for r in crow:
            if r in skips and not st(r, "copy"):
                w(f"| {r} | skipped: {skips[r]} | | | | | | |")
                continue
            p, s = ph(r, "copy"), st(r, "copy")
            if not s:
                w(f"| {r} | failed | | | | | | |")
                continue
            w(f"| {r} | {s['seconds']:.2f} | {p['requests']} | {p['bytes_up']/MiB:.0f} | {p['bytes_down']/MiB:.0f} | "
              f"{f(bucket_mib(r, 'after_copy'))} | {f(cpu(r,'copy'))} | {rss(r,'copy') or '–'} |")

    # targets
    w("")
    w("## Against the targets")
    w("")
    w("| target | measured | |")
    w("|---|---|---|")
    res["targets"] = {}

    def target(name, val, goal, fmt, higher=True):
        if val is None:
            w(f"| {name} | – | not measured |")
            return
        ok = val >= goal if higher else val <= goal
        res["targets"][name] = {"value": val, "goal": goal, "met": ok}
        w(f"| {name} | {fmt} | {'met' if ok else 'NOT met'} |")

    r = ratio("restic", "full")
    target("full backup ≥ 3× faster than restic", r, 3.0, f"{r:.2f}×" if r else "")
    r = ratio("restic", "restore")
    target("restore ≥ 1.5× faster than restic", r, 1.5, f"{r:.2f}×" if r else "")
    r = dratio("restic")
    target("restore until on disk (restore + sync) ≥ 1.5× faster than restic", r, 1.5, f"{r:.2f}×" if r else "")
    for step in ("full", "incr", "restore"):
        a, b = ph("kura", step), ph("restic", step)
        if a and b and st("kura", step) and st("restic", step):
            target(f"requests per GiB, {step}: no more than restic", a["requests"] / disk_gib, b["requests"] / disk_gib,
                   f"{a['requests']/disk_gib:.0f} vs {b['requests']/disk_gib:.0f}", higher=False)
    if "kura" in tot and "restic" in tot:
        target("requests per GiB, all three steps: no more than restic", tot["kura"], tot["restic"],
               f"{tot['kura']:.0f} vs {tot['restic']:.0f}", higher=False)
    for row, how in (("kura-copy", "independent keys, like restic copy"), ("kura-copykey", "shared key, kura init --copy-key-from")):
        a, b = secs(row, "copy"), secs("restic-copy", "copy")
        if a and b:
            r = b / a
            target(f"copy ≥ 3× faster than restic copy ({how})", r, 3.0, f"{r:.2f}×")

    open(os.path.join(out, "results.md"), "w").write("\n".join(L) + "\n")
    json.dump(res, open(os.path.join(out, "results.json"), "w"), indent=1, default=str)
    print(os.path.join(out, "results.md"))


if __name__ == "__main__":
    main()
