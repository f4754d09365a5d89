#!/usr/bin/python3
"""Run /usr/bin/virtnbdbackup unchanged, timing its guest freeze.

Used by bench/vm (Kura's live-VM benchmark) instead of calling virtnbdbackup
directly: virtnbdbackup logs with one-second timestamps, too coarse for a
freeze window. This wrapper wraps the two methods virtnbdbackup freezes and
thaws the guest with (libvirtnbdbackup.virt.client.fsFreeze / fsThaw, both
calls of the libvirt API through the guest agent) and appends one JSON line
per backup to $VNB_FREEZE_OUT:

  {"freeze_start": T, "freeze_end": T, "thaw_start": T, "thaw_end": T,
   "frozen": bool, "thawed": bool}            (time.monotonic() seconds)

The freeze window is thaw_end - freeze_start, as Kura measures its own: from
the freeze call to the return of the thaw call. Everything else, arguments
included, is virtnbdbackup's.
"""
import json
import os
import runpy
import sys
import time

import libvirtnbdbackup.virt as virt

client = virt.client  # the class (virt/__init__.py: from .client import client)
OUT = os.environ.get("VNB_FREEZE_OUT")
rec = {}

orig_freeze = client.fsFreeze
orig_thaw = client.fsThaw


def fs_freeze(domObj, mountpoints):
    rec["freeze_start"] = time.monotonic()
    ok = orig_freeze(domObj, mountpoints)
    rec["freeze_end"] = time.monotonic()
    rec["frozen"] = bool(ok)
    return ok


def fs_thaw(domObj):
    rec["thaw_start"] = time.monotonic()
    ok = orig_thaw(domObj)
    rec["thaw_end"] = time.monotonic()
    rec["thawed"] = bool(ok)
    if OUT:
        with open(OUT, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return ok


client.fsFreeze = staticmethod(fs_freeze)
client.fsThaw = staticmethod(fs_thaw)

sys.argv = ["/usr/bin/virtnbdbackup"] + sys.argv[1:]
runpy.run_path("/usr/bin/virtnbdbackup", run_name="__main__")
