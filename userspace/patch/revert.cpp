// revert: put back the bytes a patch wrote, in one stop, and give back its memory once no
// thread can run its code (see engine.hpp).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <optional>

#include "common/crashpoint.hpp"
#include "patch/adopt.hpp"
#include "patch/engine.hpp"
#include "patch/island_names.hpp"
#include "patch/code.hpp"
#include "patch/preserve.hpp"
#include "patch/journal.hpp"
#include "patch/recover.hpp"
#include "process/maps.hpp"
#include "patch/switch.hpp"
#include "observe/patchcount.hpp"
#include "process/memory.hpp"
#include "process/remote.hpp"

namespace hotfix {

using namespace std::chrono;

namespace {

// Why `p`'s memory may not be given back now, or nullopt if it may: the first thread that
// could still execute or return into any of `code` (its pc, a return address, or a pc saved in
// a signal frame on its stacks; strict check, every thread stopped), or one stepping a probed
// instruction out of line (it resumes in the probed function, which may be ours).
Result<std::optional<std::string>> release__blocker(Tracee& t, std::vector<AddressRange> code) {
  auto maps = HOTFIX_TRY(process__read_maps(t.pid()));
  std::vector<AddressRange> xol;
  for (auto& m : maps)
    if (m.path == "[uprobes]") xol.push_back({m.start, m.end, "a probed instruction (uprobe single-step)"});
  auto checker = HOTFIX_TRY(ConsistencyChecker::create(t.pid(), std::move(code)));
  HOTFIX_CHECK(t.stop_all());
  auto threads = stopped_threads(t);
  auto stepping = consistency__check_entry(threads, xol);
  auto blockers = stepping.empty() ? checker.check(threads) : Result<std::vector<Blocker>>(stepping);
  HOTFIX_CHECK(t.resume_all());
  if (!blockers) return std::unexpected(blockers.error());
  if (blockers->empty()) return std::nullopt;
  return blocker__describe(blockers->front());
}

// Is anything of p's loaded copy still mapped?
bool copy_mapped(pid_t pid, const PatchRecord& p) {
  auto maps = process__read_maps(pid);
  if (!maps) return false;
  return std::any_of(maps->begin(), maps->end(), [&](const Mapping& m) {
    return m.path == p.loaded_copy || m.path == p.loaded_copy + " (deleted)";
  });
}

// Give back p's memory (the caller proved no thread can run it): dlclose its copy, unmap its
// islands and counters, delete the copy's file, and record it. Returns a note when the loader
// kept the copy mapped all the same (its code is unreachable, but the mapping stays).
Result<std::string> release__now(Tracee& t, Journal& journal, PatchRecord& p, uint64_t registry_at, Registry& registry,
                                 milliseconds timeout) {
  // Each step again from the start if killed: recovery unloads only what is still mapped.
  HOTFIX_CHECK(journal.append(journal__record("release", p.id, "releasing").set("copy", p.loaded_copy).set("handle", p.handle)));
  // Unwind information of preserving islands first, while the unwinder (perhaps a dependency
  // of the copy) is loaded; a page whose frame may still be registered stays mapped.
  std::string frames_note;
  auto keep = preserve__release_frames(t, journal, p, timeout, frames_note);
  crashpoint("release: before dlclose");
  if (recover__is_mapped(t.pid(), p.loaded_copy))  // not after a release killed past its dlclose
    HOTFIX_CHECK(remote__dlclose(t, p.handle, InjectOptions::within(timeout)));
  crashpoint("release: after dlclose");
  if (auto pages = patch_code__island_pages(p); !pages.empty() || p.counters) {
    pid_t tid = t.threads().front().tid;
    HOTFIX_CHECK(t.stop_thread(tid));
    // Only what is still the mapping we made: a release killed after its munmap may find
    // the target's own memory at that address since.
    for (auto page : pages)
      if (!keep.count(page) && recover__still_ours(t.pid(), page, static_cast<uint64_t>(::getpagesize()), false))
        (void)remote__munmap(t, tid, page, static_cast<uint64_t>(::getpagesize()));
    if (p.counters && recover__still_ours(t.pid(), p.counters, p.counters_len, true))
      (void)remote__munmap(t, tid, p.counters, p.counters_len);
    HOTFIX_CHECK(t.resume_thread(tid));
  }
  crashpoint("release: after munmap");
  std::string note;
  if (copy_mapped(t.pid(), p))
    note = fmt::format("its islands are unmapped, but the loader keeps {} mapped after dlclose (a library with "
                       "unique symbols or -z nodelete is never unloaded); no jump leads into it",
                       p.loaded_copy);
  if (!frames_note.empty()) note += (note.empty() ? "" : "; ") + frames_note;
  if (p.loaded_copy.starts_with(kPatchDir)) ::unlink(p.loaded_copy.c_str());  // an older build's copy on disk
  p.released = true;
  HOTFIX_CHECK(t.stop_all());  // the registry is only written with every thread stopped
  auto written = registry__write(t.memory(), registry_at, registry);
  HOTFIX_CHECK(t.resume_all());
  HOTFIX_CHECK(written);
  HOTFIX_CHECK(journal.append(journal__record("release", p.id, "released")));
  crashpoint("release: released");
  return note;
}

struct Release {
  bool released = false;
  std::string why;  // held: the thread that holds it; released: a note, if any
};

// Give back a reverted patch's memory once no thread can run its code. A thread that was just
// inside usually leaves within microseconds: a few checks, spread over up to `patience`.
Result<Release> try_release(Tracee& t, Journal& journal, const SymbolTable& table, PatchRecord& p, uint64_t registry_at,
                            Registry& registry, milliseconds patience, milliseconds timeout) {
  auto code = HOTFIX_TRY(patch_code__all(t.pid(), table, p));
  auto deadline = steady_clock::now() + patience;
  auto backoff = milliseconds(1);
  for (;;) {
    auto blocker = HOTFIX_TRY(release__blocker(t, code));
    if (!blocker) return Release{true, HOTFIX_TRY(release__now(t, journal, p, registry_at, registry, timeout))};
    if (steady_clock::now() + backoff > deadline)
      return Release{false, fmt::format("its memory is held (fix library and islands stay mapped) because {}; "
                                        "`hotfix-ctl revert --pid {} --all` gives it back once no thread can "
                                        "return into it",
                                        *blocker, t.pid())};
    HOTFIX_CHECK(t.pump(backoff));  // let the threads run (and their signals be delivered)
    backoff = std::min(backoff * 2, milliseconds(50));
  }
}

Result<RevertOutcome> revert_one(Tracee& t, Journal& journal, const SymbolTable& table, Registry& registry,
                                 uint64_t registry_at, uint32_t id, const RevertOptions& opts, const ProgressFn& progress) {
  auto jr = [&](const char* step) { return journal__record("revert", id, step); };
  HOTFIX_CHECK(journal.append(jr("begin").set("consistency", consistency__name(opts.consistency))));
  // A failure before the commit changed nothing: say so, or the next hotfix-ctl would finish
  // a revert the user saw fail. (A kill runs no destructor: that revert is completed.)
  struct AbortUnlessCommitted {
    Journal& j;
    uint32_t id;
    bool committed = false;
    ~AbortUnlessCommitted() {
      if (!committed) (void)j.append(journal__record("revert", id, "aborted"));
    }
  } abort_guard{journal, id};
  PatchRecord* p = registry.find(id);
  std::vector<TextWrite> writes;
  std::vector<AddressRange> overwritten;
  for (auto& f : p->functions) {
    std::string name = symbol__demangle(f.mangled);
    if (registry.top_at(f.old_address) == p) {
      writes.push_back({f.old_address, f.written, f.original, name});
      overwritten.push_back(overwritten_range(f.old_address, f.written.size(), name));
      progress(fmt::format("  restore {:#x} {}: {}", f.old_address, name, hex_bytes(f.original)));
      HOTFIX_CHECK(journal.append(jr("restoring")
                                      .set("address", f.old_address)
                                      .set("expected", hex_bytes(f.written))
                                      .set("bytes", hex_bytes(f.original))));
    } else {
      progress(fmt::format("  {} stays with a newer patch; it now returns to what patch {} replaced", name, id));
    }
  }
  auto guard = HOTFIX_TRY(make_guard(t.pid(), opts.consistency, overwritten, HOTFIX_TRY(patch_code__all(t.pid(), table, *p))));
  Registry updated = registry;
  auto commit_record = [&]() -> Result<void> {
    PatchRecord* q = updated.find(id);
    for (auto& f : q->functions)  // a newer patch above now sits on what this one replaced
      if (auto* above = updated.record_above(id, f.old_address)) above->original = f.original;
    q->state = PatchState::reverted;
    q->reverted_ns = realtime_ns();
    crashpoint("revert: in the stop, text restored");
    HOTFIX_CHECK(registry__write(t.memory(), registry_at, updated));
    crashpoint("revert: in the stop, registry written");
    HOTFIX_CHECK(journal.append(jr("committed")));
    abort_guard.committed = true;
    crashpoint("revert: in the stop, committed");
    return {};
  };
  crashpoint("revert: before the switch");
  auto sw = HOTFIX_TRY(switch_when_quiet(t, guard, writes, commit_record, opts.timeout, progress));
  registry = updated;
  crashpoint("revert: before unpinning");
  if (auto removed = patchcount__remove(t.pid(), id); !removed)  // its old-code probes go with the pins
    progress(fmt::format("note: {}", removed.error().line()));
  crashpoint("revert: after unpinning");
  HOTFIX_CHECK(journal.append(jr("done")));
  return RevertOutcome{id, sw.pause, sw.attempts, false, {}, false, {}};
}

Result<std::vector<uint32_t>> revert_ids(const Registry& registry, const RevertOptions& opts) {
  std::vector<uint32_t> ids;
  if (opts.all) {
    for (auto& p : registry.patches)
      if (p.state == PatchState::active) ids.push_back(p.id);
  } else {
    for (auto id : opts.ids) {
      auto it = std::find_if(registry.patches.begin(), registry.patches.end(), [&](auto& p) { return p.id == id; });
      if (it == registry.patches.end() && registry.was_pruned(id))
        return fail(fmt::format("patch {} of pid {} is already reverted and released (its record is summarised)", id,
                                opts.pid),
                    "see `hotfix-ctl list --all --pid PID`");
      if (it == registry.patches.end())
        return fail(fmt::format("pid {} has no patch {}", opts.pid, id), "see the patches with `hotfix-ctl list --pid PID`");
      if (it->state != PatchState::active)
        return fail(fmt::format("patch {} of pid {} is already reverted", id, opts.pid), "see `hotfix-ctl list --pid PID`");
      ids.push_back(id);
    }
  }
  std::sort(ids.rbegin(), ids.rend());  // newest first: each restores what the next older wrote
  return ids;
}

Result<void> revert_held(Tracee& tracee, Journal& journal, const SymbolTable& table, Registry& registry,
                         uint64_t registry_at, const std::vector<uint32_t>& ids, const RevertOptions& opts,
                         const ProgressFn& progress, std::vector<RevertOutcome>& out) {
  for (auto id : ids)
    out.push_back(HOTFIX_TRY(revert_one(tracee, journal, table, registry, registry_at, id, opts, progress)));
  // Give back the memory of every reverted patch no thread can run any more (older leftovers too).
  for (auto& p : registry.patches) {
    if (p.state != PatchState::reverted) continue;
    (void)patchcount__remove(tracee.pid(), p.id);  // pins a revert killed after its commit left
    if (p.released) continue;
    auto r = HOTFIX_TRY(
        try_release(tracee, journal, table, p, registry_at, registry, std::min(opts.timeout, milliseconds(1000)),
                    opts.timeout));
    auto o = std::find_if(out.begin(), out.end(), [&](auto& x) { return x.id == p.id; });
    if (o == out.end()) o = out.insert(out.end(), RevertOutcome{p.id, {}, 0, false, {}, true, {}});
    o->released = r.released;
    (r.released ? o->note : o->held_by) = r.why;
    if (r.released) progress(fmt::format("  released patch {}: fix library unloaded, islands unmapped{}", p.id,
                                         r.why.empty() ? "" : " (" + r.why + ")"));
  }
  return {};
}

}  // namespace

Result<std::vector<RevertOutcome>> patch__revert(const RevertOptions& opts, const ProgressFn& progress) {
  HOTFIX_CHECK(process__check_privileges(false, true));
  for (auto& line : HOTFIX_TRY(adopt__before_write(opts.pid))) progress(line);  // this process's record alone
  auto registry = HOTFIX_TRY(registry__read(opts.pid));
  HOTFIX_CHECK(registry__require_authentic(registry, opts.pid));  // its bytes and addresses are what we write
  auto registry_at = registry__locate(opts.pid);
  auto ids = HOTFIX_TRY(revert_ids(registry, opts));
  if (!registry_at) return std::vector<RevertOutcome>{};
  auto table = HOTFIX_TRY(SymbolTable::for_pid(opts.pid));
  auto tracee = HOTFIX_TRY(Tracee::seize(opts.pid));
  auto journal = HOTFIX_TRY(Journal::open(opts.pid));
  std::vector<RevertOutcome> out;
  auto reverted = revert_held(tracee, journal, table, registry, *registry_at, ids, opts, progress, out);
  patch__sync_perfmap(opts.pid, registry, progress);  // the reverted patches' islands lose their names
  HOTFIX_CHECK(or_target_gone(tracee, std::move(reverted)));
  recover__forget_if_clean(journal, registry);  // nothing left: no journal, no /run/hotfix/<pid>
  return out;
}

}  // namespace hotfix
