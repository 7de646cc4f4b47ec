#!/usr/bin/python3
# An Ansible module of the hotfix role: make every running process of one binary run (state
# present) or stop running (state absent) one fix library, through hotfix-ctl's JSON. It
# reports one line per process and is idempotent: a process that already runs this exact fix
# is left alone and reported "ok".
from __future__ import annotations

import json
import os
import re

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


# A persisted set's copy (agent/store.hpp: <state>/persisted/<build-id>/<id>/fix.so): what the
# agent loads into the new processes of the binary, the same bytes as the role's copy.
PERSISTED_COPY = re.compile(r"/persisted/[0-9a-f]+/[0-9]+/fix\.so$")


def is_this_fix(patch: dict, lib: str, sha256: str) -> bool:
    """The one place that decides whether a patch of `list --json` is this fix: an active
    patch whose path is the role's copy (named after its sha256) or a persisted set's copy
    (applied by the agent), and whose recorded sha256 is this fix's. A hotfix-ctl that
    reports no sha256 is judged by the copy's path alone."""
    if patch.get("state") != "active":
        return False
    reported = patch.get("sha256")
    if reported is None:
        return patch.get("lib") == lib
    return reported == sha256 and (patch.get("lib") == lib or bool(PERSISTED_COPY.search(patch.get("lib") or "")))


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


def per_process(objects: list[dict]) -> dict[int, dict]:
    """hotfix-ctl's JSON for several processes (one {"verb","pid","status","results"...} line
    each, then {"summary"}), by pid."""
    return {o["pid"]: o for o in objects if "verb" in o and "pid" in o}


def label(listing: dict, pid: int) -> str:
    ns = listing.get("ns_pid")
    return f"pid {pid}" + (f" (ns pid {ns})" if ns not in (None, pid) else "")


def gone_or_failed(pid: int, why: str) -> dict:
    # A process that exited meanwhile is reported, not a failure of the run.
    if not os.path.exists(f"/proc/{pid}"):
        return {"pid": pid, "label": f"pid {pid}", "action": "exited", "changed": False, "ids": []}
    return {"pid": pid, "label": f"pid {pid}", "action": "failed", "changed": False, "ids": [], "error": why}


class Processes:
    """Every process of the binary with its `list --json` record: by `--pid` per process
    (select pids), or from one `list --exe` (select exe)."""

    def __init__(self, ctl: Ctl, p: dict):
        self.ctl, self.p = ctl, p

    def listings(self) -> tuple[dict[int, dict], list[dict]]:
        """{pid: listing} of the processes to work on, and rows of those that could not be listed."""
        if self.p["select"] == "exe":
            return self.listings_by_exe()
        found, rows = {}, []
        for pid in pids_by_inode(self.p["binary"]):
            rc, objects, why = self.ctl.run(["list", "--pid", str(pid), "--json"])
            if rc != 0 or not objects:
                rows.append(gone_or_failed(pid, f"list: {why}"))
            else:
                found[pid] = objects[-1]
        return found, rows

    def listings_by_exe(self) -> tuple[dict[int, dict], list[dict]]:
        rc, objects, why = self.ctl.run(["list", "--exe", self.p["binary"], "--json"])
        if rc != 0 and not objects:
            if why.startswith("hotfix-ctl: no process runs"):
                return {}, []
            self.ctl.module.fail_json(msg=f"hotfix-ctl list --exe {self.p['binary']} failed: {why}")
        found, rows = {}, []
        for pid, run in per_process(objects).items():
            if run.get("status") == "ok" and run.get("results"):
                found[pid] = run["results"][-1]
            elif run.get("status") == "exited":
                rows.append({"pid": pid, "label": f"pid {pid}", "action": "exited", "changed": False, "ids": []})
            else:
                rows.append(gone_or_failed(pid, f"list: {run.get('error')}"))
        return found, rows

    def patch(self, pids: list[int]) -> dict[int, dict]:
        """Patch `pids`: one hotfix-ctl per process (select pids) or one for all (select exe,
        `patch --pid A,B,...`, which works on them in parallel). {pid: row}."""
        p = self.p
        args = ["--lib", p["lib"], "--json", "--observe", "0"] + p["patch_args"]
        args += ["--persist"] if p["persist"] else []
        args += p["patterns"]
        groups = [pids] if p["select"] == "exe" else [[pid] for pid in pids]
        rows = {}
        for group in groups:
            rc, objects, why = self.ctl.run(["patch", "--pid", ",".join(map(str, group))] + args)
            runs = per_process(objects)
            for pid in group:
                if len(group) == 1 and pid not in runs:  # one pid: hotfix-ctl's single-process JSON
                    runs[pid] = {"status": "ok" if rc == 0 and objects else "failed", "results": objects, "error": why}
                run = runs.get(pid, {"status": "failed", "error": why or "no result"})
                result = (run.get("results") or [{}])[-1]
                if run["status"] == "ok":
                    rows[pid] = {"action": "patched", "changed": True, "ids": [result.get("id")],
                                 "persisted": (result.get("persisted") or {}).get("set")}
                elif run["status"] == "exited":
                    rows[pid] = {"action": "exited", "changed": False, "ids": []}
                else:
                    rows[pid] = gone_or_failed(pid, f"patch: {run.get('error')}")
        return rows

    def revert(self, pid: int, ids: list[int]) -> dict:
        for patch_id in sorted(ids, reverse=True):  # newest first: stacked patches unwind in order
            rc, _, why = self.ctl.run(["revert", "--pid", str(pid), "--id", str(patch_id), "--json"])
            if rc != 0:
                return gone_or_failed(pid, f"revert {patch_id}: {why}")
        return {"action": "reverted", "changed": True, "ids": ids}


def persisted_sets(ctl: Ctl, p: dict) -> list[dict]:
    """The recorded sets (hotfix-ctl persisted --json) of this binary and this fix."""
    rc, objects, why = ctl.run(["persisted", "--json"])
    if rc != 0 or not objects:
        ctl.module.fail_json(msg=f"hotfix-ctl persisted --json failed: {why}")
    binary = os.path.realpath(p["binary"])
    return [s for s in objects[-1].get("sets", [])
            if s.get("sha256") == p["sha256"] and os.path.realpath(s.get("binary", "")) == binary]


def apply(ctl: Ctl, p: dict, check: bool) -> tuple[list[dict], list[str]]:
    procs = Processes(ctl, p)
    todo, notes, removed = [], [], []
    if p["persist"] and p["state"] == "absent":  # first, so that the agent patches no new process meanwhile
        removed = persisted_rows(ctl, p, check, notes)
    listings, rows = procs.listings()
    for pid, listing in sorted(listings.items()):
        mine = [x["id"] for x in listing.get("patches", []) if is_this_fix(x, p["lib"], p["sha256"])]
        row = {"pid": pid, "ns_pid": listing.get("ns_pid", pid), "label": label(listing, pid)}
        if p["state"] == "present":
            if mine:
                rows.append({**row, "action": "ok", "changed": False, "ids": mine})
            elif check:
                rows.append({**row, "action": "would patch", "changed": True, "ids": []})
            else:
                todo.append(row)
            continue
        if not mine:
            rows.append({**row, "action": "ok (not applied)", "changed": False, "ids": []})
        elif check:
            rows.append({**row, "action": "would revert", "changed": True, "ids": mine})
        else:
            rows.append({**row, **procs.revert(pid, mine)})
    if todo:
        done = procs.patch([r["pid"] for r in todo])
        rows += [{**r, **done[r["pid"]]} for r in todo]
    if p["persist"] and p["state"] == "present":
        persisted_rows(ctl, p, check, notes)
    return sorted(rows, key=lambda r: r["pid"]) + removed, notes


def persisted_rows(ctl: Ctl, p: dict, check: bool, notes: list[str]) -> list[dict]:
    """State absent: remove this fix's recorded sets, so that the agent stops applying it.
    State present: say which set the agent applies (patch --persist recorded it, once)."""
    sets = persisted_sets(ctl, p)
    if p["state"] == "present":
        if sets:
            notes.append(f"persisted as set {','.join(str(s['id']) for s in sets)}: the agent applies it to new processes")
        elif not check:
            notes.append("not persisted: no process needed the patch, and patch --persist records the set; "
                         "revert it (hotfix_state=absent) and apply again with hotfix_persist")
        return []
    rows = []
    for s in sets:
        row = {"pid": None, "label": f"persisted set {s['id']} ({s['binary']})", "ids": []}
        if check:
            rows.append({**row, "action": "would remove", "changed": True})
            continue
        rc, _, why = ctl.run(["revert", "--persist", "--id", str(s["id"]), "--json"])
        rows.append({**row, "action": "removed", "changed": True} if rc == 0 else
                    {**row, "action": "failed", "changed": False, "error": f"revert --persist: {why}"})
    return rows


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
    rows, notes = apply(Ctl(module), p, module.check_mode)
    report = [f"{r['label']}: {r['action']}" + (f", patch {','.join(map(str, r['ids']))}" if r["ids"] else "")
              + (f": {r['error']}" if r.get("error") else "") for r in rows]
    if not rows:
        report = [f"no process runs {p['binary']}"]
    report += notes
    failed = [r for r in rows if r["action"] == "failed"]
    result = dict(changed=any(r["changed"] for r in rows), processes=rows, report=report,
                  failed_processes=len(failed))
    if failed:
        module.fail_json(msg=f"{len(failed)} of {len(rows)} process(es) of {p['binary']} failed", **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
