#!/usr/bin/python3
# An Ansible module of the hotfix role: make every running process of one binary run (state
# present) or stop running (state absent) one fix library, through hotfix-ctl's JSON. It
# reports one line per process and is idempotent: a process that already runs this exact fix
# is left alone and reported "ok".
from __future__ import annotations

import json
import os

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: hotfix_processes
short_description: Patch or revert every process of a binary with hotfix-ctl
options:
  ctl: {description: hotfix-ctl on the host, type: path, default: /usr/local/bin/hotfix-ctl}
  lib: {description: the fix library on the host, type: path, required: true}
  sha256: {description: the fix's sha256 (hex), type: str, required: true}
  binary: {description: the executable whose processes to patch, type: path, required: true}
  state: {description: present or absent, type: str, default: present}
  select: {description: "pids (find processes here) or exe (hotfix-ctl --exe)", type: str, default: pids}
  patterns: {description: functions to patch, type: list, elements: str, default: []}
  persist: {description: pass --persist to patch and revert, type: bool, default: false}
  patch_args: {description: more arguments for hotfix-ctl patch, type: list, elements: str, default: []}
"""


def is_this_fix(patch: dict, lib: str, sha256: str) -> bool:
    """The one place that decides whether a patch of `list --json` is this fix: an active
    patch of the same library path (the role names copies after their sha256) and, where
    hotfix-ctl reports one, the same sha256."""
    if patch.get("state") != "active" or patch.get("lib") != lib:
        return False
    reported = patch.get("sha256")
    return reported is None or reported == sha256


def pids_by_inode(binary: str) -> list[int]:
    """Every process whose executable is `binary`, matched by device and inode (renames,
    symlinks and other mount namespaces' paths of the same file all match)."""
    want = os.stat(binary)
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            st = os.stat(f"/proc/{entry}/exe")
        except OSError:  # a kernel thread, or gone meanwhile
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            out.append(int(entry))
    return sorted(out)


class Ctl:
    def __init__(self, module: AnsibleModule):
        self.module = module
        self.path = module.params["ctl"]

    def run(self, args: list[str]) -> tuple[int, list[dict], str]:
        rc, out, err = self.module.run_command([self.path] + args)
        objects = []
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    objects.append(json.loads(line))
                except ValueError:
                    pass
        why = (err.strip().splitlines() or [out.strip()])[-1:] if rc else [""]
        return rc, objects, why[0] if why else ""

    def processes(self, binary: str, select: str) -> list[int]:
        if select == "pids":
            return pids_by_inode(binary)
        rc, objects, why = self.run(["list", "--exe", binary, "--json"])
        if rc != 0 and not objects:
            self.module.fail_json(msg=f"hotfix-ctl list --exe {binary} failed: {why}")
        return sorted({o["pid"] for o in objects if "pid" in o and "patches" in o})


def label(listing: dict, pid: int) -> str:
    ns = listing.get("ns_pid")
    return f"pid {pid}" + (f" (ns pid {ns})" if ns not in (None, pid) else "")


def handle(ctl: Ctl, pid: int, p: dict, check: bool) -> dict:
    rc, objects, why = ctl.run(["list", "--pid", str(pid), "--json"])
    if rc != 0 or not objects:
        return gone_or_failed(pid, f"list: {why}")
    listing = objects[-1]
    mine = [x["id"] for x in listing.get("patches", []) if is_this_fix(x, p["lib"], p["sha256"])]
    row = {"pid": pid, "ns_pid": listing.get("ns_pid", pid), "label": label(listing, pid)}
    if p["state"] == "present":
        if mine:
            return {**row, "action": "ok", "changed": False, "ids": mine}
        if check:
            return {**row, "action": "would patch", "changed": True, "ids": []}
        args = ["patch", "--pid", str(pid), "--lib", p["lib"], "--json", "--observe", "0"] + p["patch_args"]
        args += ["--persist"] if p["persist"] else []
        rc, objects, why = ctl.run(args + p["patterns"])
        if rc != 0 or not objects:
            return {**row, **gone_or_failed(pid, f"patch: {why}")}
        return {**row, "action": "patched", "changed": True, "ids": [objects[-1].get("id")]}
    if not mine:
        return {**row, "action": "ok (not applied)", "changed": False, "ids": []}
    if check:
        return {**row, "action": "would revert", "changed": True, "ids": mine}
    for patch_id in sorted(mine, reverse=True):  # newest first: stacked patches unwind in order
        args = ["revert", "--pid", str(pid), "--id", str(patch_id), "--json"] + (["--persist"] if p["persist"] else [])
        rc, _, why = ctl.run(args)
        if rc != 0:
            return {**row, **gone_or_failed(pid, f"revert {patch_id}: {why}")}
    return {**row, "action": "reverted", "changed": True, "ids": mine}


def gone_or_failed(pid: int, why: str) -> dict:
    # A process that exited meanwhile is reported, not a failure of the run.
    if not os.path.exists(f"/proc/{pid}"):
        return {"pid": pid, "label": f"pid {pid}", "action": "exited", "changed": False, "ids": []}
    return {"pid": pid, "label": f"pid {pid}", "action": "failed", "changed": False, "ids": [], "error": why}


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            ctl=dict(type="path", default="/usr/local/bin/hotfix-ctl"),
            lib=dict(type="path", required=True),
            sha256=dict(type="str", required=True),
            binary=dict(type="path", required=True),
            state=dict(type="str", default="present", choices=["present", "absent"]),
            select=dict(type="str", default="pids", choices=["pids", "exe"]),
            patterns=dict(type="list", elements="str", default=[]),
            persist=dict(type="bool", default=False),
            patch_args=dict(type="list", elements="str", default=[]),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if not os.path.exists(p["binary"]):
        module.fail_json(msg=f"{p['binary']} does not exist on this host: nothing runs it")
    ctl = Ctl(module)
    rows = [handle(ctl, pid, p, module.check_mode) for pid in ctl.processes(p["binary"], p["select"])]
    report = [f"{r['label']}: {r['action']}" + (f", patch {','.join(map(str, r['ids']))}" if r["ids"] else "")
              + (f": {r['error']}" if r.get("error") else "") for r in rows]
    if not rows:
        report = [f"no process runs {p['binary']}"]
    failed = [r for r in rows if r["action"] == "failed"]
    result = dict(changed=any(r["changed"] for r in rows), processes=rows, report=report,
                  failed_processes=len(failed))
    if failed:
        module.fail_json(msg=f"{len(failed)} of {len(rows)} process(es) of {p['binary']} failed", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
