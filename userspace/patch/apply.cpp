// The patch transaction (see engine.hpp for the order of things and why).
#include "patch/engine.hpp"
#include "patch/island_names.hpp"

#include "patch/switch.hpp"
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <set>
#include <thread>

#include <fmt/ranges.h>

#include "common/sha256.hpp"
#include "patch/abi_check.hpp"
#include "patch/abi_types.hpp"
#include "patch/coverage.hpp"
#include "patch/golang.hpp"
#include "patch/provenance.hpp"
#include "common/crashpoint.hpp"
#include "patch/adopt.hpp"
#include "common/timing.hpp"
#include "patch/journal.hpp"
#include "patch/recover.hpp"
#include "observe/liveness.hpp"
#include "observe/probe_safety.hpp"
#include "observe/watch.hpp"
#include "patch/binder.hpp"
#include "patch/code.hpp"
#include "patch/counting.hpp"
#include "patch/deliver.hpp"
#include "patch/fixlib.hpp"
#include "patch/preflight.hpp"
#include "patch/preserve.hpp"
#include "process/environment.hpp"
#include "patch/trust.hpp"
#include "process/maps.hpp"
#include "process/memory.hpp"
#include "process/ptrace.hpp"
#include "process/remote.hpp"
#include "common/crashpoint.hpp"

namespace hotfix {

namespace {

using namespace std::chrono;

std::string executable_of(pid_t pid) {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink(fmt::format("/proc/{}/exe", pid), ec).string();
  const std::string deleted = " (deleted)";
  if (exe.size() > deleted.size() && exe.ends_with(deleted)) exe.resize(exe.size() - deleted.size());
  return exe;
}

// saved them. Used so that prologue analysis of a re-patched function sees real instructions.
const FunctionRecord* oldest_record_at(const Registry& r, uint64_t address) {
  for (auto& p : r.patches) {
    if (p.state != PatchState::active) continue;
    for (auto& f : p.functions)
      if (f.old_address == address) return &f;
  }
  return nullptr;
}

Result<PlannedSwitch> plan_switch(const ProcessMemory& mem, const Registry& registry, const PlanEntry& e) {
  const Function& fn = e.target;
  size_t len = std::max<size_t>(1, std::min<uint64_t>(fn.size, 1 << 16));
  auto code = HOTFIX_TRY(mem.read(fn.address, len));
  PlannedSwitch s;
  s.entry = e;
  s.current.assign(code.begin(), code.begin() + std::min(code.size(), arch::entry_jump_size()));
  if (auto* base = oldest_record_at(registry, fn.address))  // analyse the file's instructions
    std::copy(base->original.begin(), base->original.end(), code.begin());
  s.check = arch::check_entry(code, fn.address);
  if (!s.check.patchable)
    return fail(fmt::format("cannot patch {}: {}", fn.name, s.check.reason),
                "patch its callers instead, or leave it out with a narrower pattern");
  if (registry.watch_stub_at(fn.address))
    return fail(fmt::format("cannot patch {}: a running `hotfix-ctl watch` counts it with a trampoline at its entry", fn.name),
                "stop that watch (Ctrl-C) and retry, or watch it with --count uprobe");
  s.stacked_on = registry.top_at(fn.address);
  auto trap = arch::trap_instruction();
  if (std::equal(trap.begin(), trap.end(), s.current.begin()))
    return fail(fmt::format("cannot patch {}: its entry holds a breakpoint (a uprobe of a running `hotfix-ctl watch`, "
                            "bpftrace or a debugger)", fn.name),
                "stop the tool that probes it and retry; removing that breakpoint later would corrupt the jump");
  // A breakpoint on a later instruction the jump would cover (a probe at func+N): never write there.
  if (!oldest_record_at(registry, fn.address))
    if (auto file = probe__file_bytes(mem.pid(), fn, s.current.size()); file && file->size() == s.current.size())
      if (auto at = probe__breakpoint_offset(s.current, *file))
        return fail(fmt::format("cannot patch {}: a breakpoint sits at +{:#x}, in the bytes its entry jump would cover "
                                "(a uprobe of bpftrace, perf or a debugger)", fn.name, *at),
                    "stop the tool that probes it and retry; writing the jump there would lose that probe, and its "
                    "removal would corrupt the jump");
  return s;
}

}  // namespace

const char* consistency__name(Consistency c) { return c == Consistency::strict ? "strict" : "entry"; }

namespace {

PlanOptions plan_options(const PreparedPatch& p) {
  PlanOptions plan_opts;
  plan_opts.patterns = p.options.patterns;
  plan_opts.object = p.options.object;
  plan_opts.patch_dir = p.options.patch_dir;
  plan_opts.executable = p.executable;
  return plan_opts;
}

// The objects whose symbols the plan and the checks can concern (issue 11 section 7): those
// that may define a function to replace or a name fix.so needs, the executable, fix copies.
SymbolNeeds symbol_needs(const PreparedPatch& p, const FixLibrary& fix) {
  SymbolNeeds needs;
  plan__add_needs(fix, plan_options(p), needs);
  binder__add_needs(fix, needs);
  needs.names.push_back("_r_debug");  // deliver__into reads the loader's list of objects
  return needs;
}

// Everything of patch__prepare that reads the symbol table.
Result<void> prepare_against_table(PreparedPatch& p, const FixLibrary& fix) {
  const PatchOptions& opts = p.options;
  TimedPhase planning("prepare: plan");
  auto plan = HOTFIX_TRY(plan__build(p.table, fix, plan_options(p)));
  HOTFIX_CHECK(golang__check(plan.entries));  // patch/golang.hpp: Go code is not C ABI, its stacks unseen
  planning.end();
  TimedPhase preflight("prepare: preflight");
  HOTFIX_CHECK(preflight__check({opts.pid, &p.table, p.executable, opts.library,
                                 fmt::format("{}{}", opts.patch_dir, opts.pid), &p.fix}));
  preflight.end();
  TimedPhase binding("prepare: registry and binder");
  p.registry = HOTFIX_TRY(registry__read(opts.pid));
  HOTFIX_CHECK(registry__require_authentic(p.registry, opts.pid));  // stacking trusts its saved bytes
  // The binder's resolution changes nothing, so it runs here too: a --dry-run fails where the
  // apply would (a symbol the target lacks, an ambiguous one, a private copy of a variable).
  HOTFIX_CHECK(binder__bind(p.table, p.executable, p.fix, registry__fix_copies(p.registry, p.table, opts.patch_dir)));
  p.id = p.registry.next_id;
  binding.end();
  TimedPhase prologues("prepare: prologues");
  auto mem = HOTFIX_TRY(ProcessMemory::open(opts.pid));
  for (auto& e : plan.entries) p.switches.push_back(HOTFIX_TRY(plan_switch(mem, p.registry, e)));
  std::vector<uint64_t> entries;
  std::vector<std::string> names;
  for (auto& s : p.switches) entries.push_back(s.entry.target.address), names.push_back(s.entry.target.name);
  HOTFIX_CHECK(target__check_unsealed(opts.pid, entries, names));
  prologues.end();
  TimedPhase provenance("prepare: provenance");
  HOTFIX_CHECK(provenance__check(p));  // patch/provenance.hpp: built for this binary, same toolchain
  provenance.end();
  TimedPhase coverage("prepare: coverage");
  HOTFIX_CHECK(coverage__check(p));    // patch/coverage.hpp: inlined copies, clones, aliases
  coverage.end();
  TimedPhase abi("prepare: ABI checks");
  // The ABI checks stay last: they are the most expensive and the least specific, and a fix.so
  // that cannot be loaded or bound at all must hear that first.
  if (opts.abi_check) {
    HOTFIX_CHECK(abi__check_types(p));            // patch/abi_types.hpp: DWARF signatures and layouts
    HOTFIX_CHECK(abi__check_call_sites(p, mem));  // patch/abi_check.hpp: -fipa-ra at every call site
  } else {
    p.notes.push_back({"abi", "not checked: --no-abi-check was given"});
  }
  return {};
}

// "read 3 of 18 objects (...)": what a partial table held, for the plan.
std::string symbols_note(const SymbolTable& table) {
  size_t read = 0;
  for (auto& o : table.objects()) read += o.symbols_read;
  size_t later = table.objects_read_later();
  return fmt::format("read {} of {} objects up front (the executable and those defining what fix.so names or needs){}",
                     read, table.objects().size(),
                     later ? fmt::format("; {} more when a check reached their code", later) : "");
}

}  // namespace

Result<PreparedPatch> patch__prepare(const PatchOptions& opts) {
  TimedPhase phase("prepare: fix.so read and validated");
  HOTFIX_CHECK(process__check_privileges(false, true));
  HOTFIX_CHECK(process__check_alive(opts.pid));
  (void)patchcount__gc();  // counters and copies of processes that are gone go first (cheap)
  PreparedPatch p;
  p.options = opts;
  p.executable = executable_of(opts.pid);
  auto trusted = HOTFIX_TRY(trust__read_fix(opts.library, opts.allow_untrusted_lib));
  p.fix = std::move(trusted.image);
  p.untrusted = std::move(trusted.untrusted);
  if (!opts.expected_sha256.empty())
    if (auto digest = sha256__hex(p.fix.bytes); digest != opts.expected_sha256)
      return fail(fmt::format("{} was changed since it was persisted (sha256 {}, recorded {})", opts.library,
                              digest.substr(0, 16), opts.expected_sha256.substr(0, 16)),
                  "refusing it; remove the set with `hotfix-ctl revert --persist --id N` and record the fix again");
  HOTFIX_CHECK(fixlib__validate(p.fix, p.executable));
  auto fix = HOTFIX_TRY(fixlib__read(p.fix));
  phase.end();
  // Only the objects the fix can concern are read (and any other whose code a check reaches,
  // when it reaches it: SymbolTable::partial). If the plan or a check then fails, all of it
  // runs again on every object, so that refusals and hints speak of the whole process.
  // HOTFIX_READ_ALL_SYMBOLS=1 reads every object up front (docs/troubleshooting.md).
  const PreparedPatch before_table = p;
  const char* read_all_env = std::getenv("HOTFIX_READ_ALL_SYMBOLS");
  const bool read_all = read_all_env && std::string_view(read_all_env) == "1";
  TimedPhase symbols("prepare: symbols");
  p.table = HOTFIX_TRY(read_all ? SymbolTable::for_pid(opts.pid) : SymbolTable::for_pid_needing(opts.pid, symbol_needs(p, fix)));
  symbols.end();
  auto checked = prepare_against_table(p, fix);
  if (p.table.partial() && !checked) {
    p = before_table;
    TimedPhase again("prepare: symbols of every object (again)");
    p.table = HOTFIX_TRY(SymbolTable::for_pid(opts.pid));
    again.end();
    checked = prepare_against_table(p, fix);
  }
  HOTFIX_CHECK(checked);
  if (p.table.partial()) p.notes.push_back({"symbols", symbols_note(p.table)});
  return p;
}

Result<std::vector<FunctionLiveness>> patch__observe(const PreparedPatch& p, milliseconds window) {
  std::vector<Function> targets;
  for (auto& s : p.switches) targets.push_back(s.entry.target);
  auto live = registry__live_functions(p.registry, p.table, targets, kFixCopyPrefix, nullptr);
  auto seen = HOTFIX_TRY(liveness__observe(p.options.pid, live, window));
  std::vector<FunctionLiveness> out;
  for (size_t i = 0; i < seen.size(); ++i) out.push_back({targets[i].name, seen[i].calls_per_s, seen[i].inflight, seen[i].inside_unknown});
  return out;
}

Result<ObservedWindow> patch__observe_window(const PreparedPatch& p) {
  std::vector<Function> targets;
  for (auto& s : p.switches) targets.push_back(s.entry.target);
  auto live = registry__live_functions(p.registry, p.table, targets, kFixCopyPrefix, nullptr);
  ObserveWindow how{.window = p.options.observe, .adaptive = p.options.observe_adaptive,
                    .max_overhead_pct = p.options.max_overhead_pct, .trampolines = p.options.observe_trampolines};
  auto seen = HOTFIX_TRY(liveness__observe_window(p.options.pid, live, how));
  ObservedWindow out{{}, seen.seconds, std::move(seen.notes), seen.trampolines, seen.uprobes};
  for (size_t i = 0; i < seen.functions.size(); ++i)
    out.functions.push_back({targets[i].name, seen.functions[i].calls_per_s, seen.functions[i].inflight,
                             seen.functions[i].inside_unknown, seen.functions[i].trampoline});
  return out;
}

namespace {

// What the transaction has changed in the target so far, undone unless committed.
class Undo {
 public:
  Undo(Tracee& t, Journal& journal, uint32_t id, milliseconds timeout)
      : t_(t), journal_(journal), id_(id), timeout_(timeout) {}
  ~Undo() {
    if (!committed_) rollback();
  }
  void commit() { committed_ = true; }

  uint64_t handle = 0;                                   // dlopen handle to dlclose
  std::optional<uint32_t> counters;                      // pinned hit counters of this patch id
  std::vector<std::pair<uint64_t, uint64_t>> mappings;   // (address, length) to munmap
  std::optional<DeliveredFix> delivered;                 // its memfd fd in the target, until closed
  std::vector<uint64_t> frames;                          // preserving islands' unwind info, registered
  Unwinder unwinder;                                     // where `frames` were registered

 private:
  void rollback() {
    // Best effort, in reverse order; the target may already be gone -- or have exec'd: take
    // in its pending events first, so that nothing is undone into a new program's memory.
    bool same_image = t_.pump().has_value();
    // Before the library goes (the unwinder may be one of its dependencies) and before the
    // islands do: a frame that stays registered keeps its page mapped (patch/preserve.hpp).
    std::set<uint64_t> keep;
    for (uint64_t frame : frames)
      if (!same_image || !preserve__deregister(t_, journal_, "patch", id_, unwinder, frame, timeout_))
        keep.insert(frame & ~(static_cast<uint64_t>(::getpagesize()) - 1));
    std::erase_if(mappings, [&](auto& m) { return keep.count(m.first) != 0; });
    if (handle && same_image) (void)remote__dlclose(t_, handle, InjectOptions::within(timeout_));
    if (!mappings.empty() && same_image && t_.check_alive()) {
      pid_t tid = t_.threads().front().tid;
      if (t_.stop_thread(tid)) {
        for (auto& [addr, len] : mappings) (void)remote__munmap(t_, tid, addr, len);
        (void)t_.resume_thread(tid);
      }
    }
    if (delivered && t_.check_alive()) (void)deliver__close(t_, *delivered);
    if (counters) (void)patchcount__remove(t_.pid(), *counters);
    // Undone in this process: nothing for a later recovery to do (a kill before this record
    // leaves the operation unfinished, and recovery undoes it again, idempotently).
    (void)journal_.append(journal__record("patch", id_, "rolled-back"));
  }
  Tracee& t_;
  Journal& journal_;
  uint32_t id_;
  milliseconds timeout_;
  bool committed_ = false;
};

// An island within reach of `near`, from the pages this patch already mapped or a new one.
struct IslandPages {
  struct Page {
    uint64_t address = 0, used = 0;
  };
  std::vector<Page> pages;
};

Result<uint64_t> island_for(Tracee& t, pid_t tid, Undo& undo, Journal& journal, uint32_t id, IslandPages& islands,
                           uint64_t near, uint64_t size) {
  const uint64_t page = static_cast<uint64_t>(::getpagesize());
  auto reachable = [&](uint64_t a) {
    int64_t d = static_cast<int64_t>(a - near);
    return d > -arch::near_jump_reach() + static_cast<int64_t>(page) && d < arch::near_jump_reach() - static_cast<int64_t>(page);
  };
  for (auto& p : islands.pages)
    if (p.used + size <= page && reachable(p.address)) {
      uint64_t at = p.address + p.used;
      p.used += (size + 15) & ~15ull;
      return at;
    }
  HOTFIX_CHECK(journal.append(journal__record("patch", id, "island-mapping")
                                  .set("near", near)
                                  .set("known", recover__anonymous_pages(t.pid()))));
  crashpoint("patch: before island mmap");
  uint64_t addr = HOTFIX_TRY(remote__mmap_near(t, tid, near, page, PROT_READ | PROT_EXEC));
  undo.mappings.push_back({addr, page});
  crashpoint("patch: after island mmap");
  HOTFIX_CHECK(journal.append(journal__record("patch", id, "island").set("address", addr).set("length", page)));
  islands.pages.push_back({addr, (size + 15) & ~15ull});
  return addr;
}

// The jump of `s` goes to a preserving island (patch/preserve.hpp) that calls the replacement
// -- through a counting island right after it when counting, so new-code hits still count.
Result<void> write_preserving_island(Tracee& t, pid_t tid, Undo& undo, Journal& journal, uint32_t id,
                                     IslandPages& islands, PlannedSwitch& s, uint64_t counter) {
  if (s.trampoline) counter = 0;  // the replacement's own trampoline counts
  uint64_t own = (arch::preserving_island_size(s.preserve) + 15) & ~15ull;
  uint64_t size = own + (counter ? arch::counting_island_size() : 0);
  s.island = HOTFIX_TRY(island_for(t, tid, undo, journal, id, islands, s.entry.target.address, size));
  uint64_t callee = s.new_address;
  if (counter) {
    callee = s.island + own;
    HOTFIX_CHECK(t.memory().write(callee, arch::encode_counting_island(callee, counter, s.new_address)));
  }
  auto island = arch::encode_preserving_island(s.island, s.preserve, callee);
  HOTFIX_CHECK(t.memory().write(s.island, island.bytes));
  s.frame = s.island + island.unwind_offset;
  return {};
}

// Count at the replacement's own entry, so that every call into it counts -- from the
// target, from other replacements, through pointers taken inside fix.so: its first
// instructions move to a counting trampoline on an island page and a jump to it takes their
// place in the loaded copy. No thread can be there yet: nothing leads into this copy before
// its entry jumps are written. False (s.uncounted says why) when the prologue cannot move.
Result<bool> write_replacement_trampoline(Tracee& t, pid_t tid, Undo& undo, Journal& journal, uint32_t id,
                                          IslandPages& islands, PlannedSwitch& s, uint64_t counter) {
  uint64_t size = std::max<uint64_t>(s.entry.replacement_size, 1);
  auto body = HOTFIX_TRY(t.memory().read(s.new_address, size));
  // Refusals do not depend on where the trampoline goes (see arch.hpp): ask before mapping.
  auto dry = arch::encode_counting_trampoline(body, s.new_address, s.new_address, counter);
  if (!dry) {
    s.uncounted = dry.error().what;
    return false;
  }
  // Probes on the replacement (watch, stats --callers) go right after the moved instructions:
  // every call must pass there, with a known stack. A branch among them would skip it.
  if (!arch::stack_depth_after(body, s.new_address, dry->covered)) {
    s.uncounted = fmt::format("its first instructions ({}) branch or move the stack, so a probe after them would miss calls",
                              dry->disasm);
    return false;
  }
  uint64_t at = HOTFIX_TRY(island_for(t, tid, undo, journal, id, islands, s.new_address, arch::counting_trampoline_max_size()));
  auto tramp = arch::encode_counting_trampoline(body, s.new_address, at, counter);
  auto jump = arch::encode_entry_jump(s.new_address, at);
  if (!tramp || !jump) {
    s.uncounted = tramp ? "its trampoline is out of a jump's reach" : tramp.error().what;
    return false;
  }
  HOTFIX_CHECK(t.memory().write(at, tramp->code));
  std::vector<uint8_t> entry(body.begin(), body.begin() + static_cast<long>(tramp->covered));
  std::copy(jump->begin(), jump->end(), entry.begin());  // the rest of the covered bytes stay: never run
  HOTFIX_CHECK(t.memory().write(s.new_address, entry));
  crashpoint("patch: trampoline written");
  s.trampoline = at;
  s.trampoline_covered = tramp->covered;
  return true;
}

// Fill in new addresses and jump bytes once fix.so is loaded; map islands where needed: for
// every function when counting and the replacement's prologue cannot take a counting
// trampoline (the island counts), or preserving registers, else only beyond a direct jump's
// reach.
Result<void> finish_switches(Tracee& t, pid_t tid, Undo& undo, Journal& journal, PreparedPatch& p, uint64_t load_base,
                             const TargetCounters* counters) {
  IslandPages islands;
  for (uint32_t i = 0; i < p.switches.size(); ++i) {
    auto& s = p.switches[i];
    s.new_address = load_base + s.entry.replacement_value;
    bool counted_at_entry =
        counters && HOTFIX_TRY(write_replacement_trampoline(t, tid, undo, journal, p.id, islands, s, counters->slot(i)));
    bool island_counts = counters && !counted_at_entry;
    auto direct = arch::encode_entry_jump(s.entry.target.address, s.new_address);
    if (s.preserve) {
      HOTFIX_CHECK(write_preserving_island(t, tid, undo, journal, p.id, islands, s, counters ? counters->slot(i) : 0));
    } else if (direct && !island_counts) {
      s.jump = *direct;
      continue;
    } else {
      uint64_t size = island_counts ? arch::counting_island_size() : arch::island_jump_size();
      s.island = HOTFIX_TRY(island_for(t, tid, undo, journal, p.id, islands, s.entry.target.address, size));
      HOTFIX_CHECK(t.memory().write(s.island, island_counts ? arch::encode_counting_island(s.island, counters->slot(i), s.new_address)
                                                            : arch::encode_island_jump(s.island, s.new_address)));
    }
    auto jump = arch::encode_entry_jump(s.entry.target.address, s.island);
    if (!jump) return fail(fmt::format("the island for {} is out of reach", s.entry.target.name));
    s.jump = *jump;
  }
  return {};
}

// Register the preserving islands' unwind information with the target's unwinder before any
// jump leads into them, so an exception thrown in a replacement unwinds through its island.
// A process without an unwinder (no libgcc_s) has nothing that could unwind: nothing to do.
Result<void> register_frames(Tracee& t, Undo& undo, Journal& journal, PreparedPatch& p, const ProgressFn& progress) {
  std::vector<PlannedSwitch*> preserving;
  for (auto& s : p.switches)
    if (s.frame) preserving.push_back(&s);
  if (preserving.empty()) return {};
  undo.unwinder = HOTFIX_TRY(preserve__unwinder(t, undo.handle, p.options.timeout));
  if (!undo.unwinder) {
    for (auto* s : preserving) s->frame = 0;
    progress(std::string("note: the target has no unwinder (libgcc_s is not loaded): the preserving islands' unwind information "
             "is not registered (nothing in the process can throw through them)"));
    return {};
  }
  for (auto* s : preserving) {
    crashpoint("patch: before frame registration");
    HOTFIX_CHECK(preserve__register(t, journal, "patch", p.id, undo.unwinder, s->frame, p.options.timeout));
    undo.frames.push_back(s->frame);
  }
  return {};
}

// The registry mapping of the target, created (and owned by `undo` until commit) if missing.
Result<uint64_t> ensure_registry(Tracee& t, pid_t tid, Undo& undo, Journal& journal, uint32_t id) {
  if (auto at = registry__locate(t.pid())) return *at;
  HOTFIX_CHECK(journal.append(journal__record("patch", id, "registry-creating")));
  crashpoint("patch: before registry mmap");
  auto memfd = HOTFIX_TRY(remote__map_memfd(t, tid, kRegistryName, kRegistrySize, PROT_READ | PROT_WRITE));
  undo.mappings.push_back({memfd.address, memfd.size});
  crashpoint("patch: after registry mmap");
  HOTFIX_CHECK(journal.append(
      journal__record("patch", id, "registry-created").set("address", memfd.address).set("length", memfd.size)));
  HOTFIX_CHECK(remote__close(t, tid, memfd.fd));  // the mapping keeps the memory alive
  return memfd.address;
}

}  // namespace

namespace {

// Calls still running the old code (threads that were inside) are counted where they leave
// it: uprobes on its exits, which new calls never reach. Exits under the jump are skipped:
// a probe there would sit inside the jump (and no thread can be there after the switch).
void count_old_code(const PreparedPatch& p, const ProgressFn& progress) {
  std::vector<OldCodeExits> all;
  for (uint32_t i = 0; i < p.switches.size(); ++i) {
    const auto& s = p.switches[i];
    auto exits = patchcount__old_exits(p.options.pid, s.entry.target, i);
    if (!exits) continue;
    uint64_t first_free = s.entry.target.offset + s.check.covered;
    std::erase_if(exits->offsets, [&](uint64_t off) { return off < first_free; });
    if (!exits->offsets.empty()) all.push_back(std::move(*exits));
  }
  if (all.empty()) return;
  crashpoint("patch: before old-code probes");
  std::vector<std::string> skipped;
  if (auto probes = patchcount__attach_old(p.options.pid, p.id, all, &skipped); !probes)
    progress(fmt::format("note: old-code hits are not counted: {}", probes.error().line()));
  if (!skipped.empty())
    progress(fmt::format("note: old-code hits are not counted at {} exit(s) the kernel cannot probe: {}", skipped.size(),
                         fmt::join(skipped, ", ")));
  crashpoint("patch: after old-code probes");
}

// `explained`: the failure already says what state the target is in (an injection that ended it).
Result<PatchOutcome> apply_held(Tracee& tracee, PreparedPatch& p, const ProgressFn& progress, bool& explained) {
  const pid_t pid = p.options.pid;
  // Before anything changes: a preserving island only where it is safe (patch/preserve.hpp;
  // whoever set `preserve` should have asked already), and a sandbox that would kill or
  // half-fail the injection refuses.
  for (auto& s : p.switches)
    if (std::string why; s.preserve && !preserve__supported(s, why))
      return fail(fmt::format("cannot keep {} for the callers of {}: {}", arch::register_names(s.preserve),
                              s.entry.target.name, why),
                  "nothing was changed; patch its callers too (they are in the same object), or leave it out of the patch");
  HOTFIX_CHECK(target__check_sandbox(tracee, p.options.count));
  // Intent before every change, completion after (patch/journal.hpp); the lock keeps a
  // concurrent recovery from taking this live operation for an interrupted one.
  auto journal = HOTFIX_TRY(Journal::open(pid));
  p.id = std::max(p.id, recover__next_id(journal));  // never reuse the id (and copy path) of a held one
  auto jr = [&](const char* step) { return journal__record("patch", p.id, step); };
  // The copy is a memfd inside the target (patch/deliver.hpp); maps names it `copy`.
  std::string sha256 = sha256__hex(p.fix.bytes);  // fix.so as read: what `sha256sum fix.so` says
  std::string memfd_name = deliver__memfd_name(p.id, sha256, p.options.library);
  std::string copy = "/memfd:" + memfd_name;
  HOTFIX_CHECK(journal.append(jr("begin")
                                  .set("library", std::filesystem::absolute(p.options.library).string())
                                  .set("copy", copy)
                                  .set("consistency", consistency__name(p.options.consistency))));
  Undo undo(tracee, journal, p.id, p.options.timeout);

  // Bind and load fix.so while every thread runs: its bytes go into a sealed memfd inside the
  // target, which dlopens that (never a path someone could swap, in any mount namespace).
  crashpoint("patch: before binding the copy");
  TimedPhase delivery("apply: bind, deliver, dlopen, fixups");
  auto bound = HOTFIX_TRY(binder__bind(p.table, p.executable, p.fix,
                                       registry__fix_copies(p.registry, p.table, p.options.patch_dir)));
  crashpoint("patch: after binding the copy");
  undo.delivered = HOTFIX_TRY(deliver__into(tracee, p.table, memfd_name, bound.bytes));
  const DeliveredFix& delivered = *undo.delivered;
  HOTFIX_CHECK(journal.append(jr("loading").set("copy", delivered.mapped).set("dlopen", delivered.dlopen_path)));
  crashpoint("patch: before dlopen");
  auto injected = remote__inject_library(tracee, delivered.dlopen_path, InjectOptions::within(p.options.timeout));
  explained = !injected;  // inject.cpp describes a constructor that blocked, crashed or ended the target
  auto injection = HOTFIX_TRY(std::move(injected));
  undo.handle = injection.handle;
  HOTFIX_CHECK(journal.append(jr("loaded").set("handle", injection.handle)));
  crashpoint("patch: after dlopen");  // the copy is loaded, nothing points at it yet
  HOTFIX_CHECK(deliver__close(tracee, *undo.delivered));  // the loader's mappings keep the memfd alive
  auto loaded = binder__load_base(pid, delivered.mapped, bound.bytes);
  if (!loaded)  // dlopen gave back an object it had already, not ours
    return fail(fmt::format("dlopen({}) in pid {} did not map the delivered fix library: {}", delivered.dlopen_path,
                            pid, loaded.error().what), "nothing was changed; retry; if it persists, report it");
  uint64_t load_base = *loaded;
  HOTFIX_CHECK(journal.append(jr("loaded").set("handle", injection.handle).set("base", load_base)));
  crashpoint("patch: before fixups");
  HOTFIX_CHECK(binder__apply(pid, load_base, bound.fixups));
  crashpoint("patch: after fixups");
  progress(fmt::format("loaded {} (sha256 {}) at {:#x} (handle {:#x}); bound {} target symbol(s)", p.options.library,
                       sha256, load_base, injection.handle, bound.bindings.size()));

  delivery.end();
  TimedPhase islands("apply: counters, islands, registry mapping");
  // Islands and the registry need one stopped thread; the others keep running.
  pid_t tid = tracee.threads().front().tid;
  HOTFIX_CHECK(tracee.stop_thread(tid));
  std::optional<TargetCounters> counters;
  auto prepared = [&]() -> Result<uint64_t> {
    if (p.options.count) {
      HOTFIX_CHECK(journal.append(jr("counters").set("pins", patchcount__dir(pid, p.id)).set("known", recover__bpf_map_pages(pid))));
      undo.counters = p.id;
      crashpoint("patch: before counters");
      // Every fd and page the mapping makes in the target is journaled before the next step,
      // so that recovery closes exactly those (a kill midway must leave no fd of ours there).
      auto note = [&](const CountingLeftovers& left) {
        auto r = jr("counters-handoff");
        (void)journal.append(recover__note_handoff(r, left));
      };
      counters = HOTFIX_TRY(counting__map_into(tracee, tid, p.id, static_cast<uint32_t>(p.switches.size()), note));
      undo.mappings.push_back({counters->address, counters->length});
      crashpoint("patch: after counters");
      HOTFIX_CHECK(journal.append(jr("counters-mapped").set("address", counters->address).set("length", counters->length)));
    }
    HOTFIX_CHECK(finish_switches(tracee, tid, undo, journal, p, load_base, counters ? &*counters : nullptr));
    crashpoint("patch: islands written");
    return ensure_registry(tracee, tid, undo, journal, p.id);
  }();
  HOTFIX_CHECK(tracee.resume_thread(tid));
  uint64_t registry_at = HOTFIX_TRY(prepared);
  HOTFIX_CHECK(register_frames(tracee, undo, journal, p, progress));
  islands.end();
  TimedPhase switching("apply: guard, stop, write, record");

  std::vector<TextWrite> writes;
  std::vector<AddressRange> overwritten, bodies;
  PatchRecord record;
  record.id = p.id;
  record.library = std::filesystem::absolute(p.options.library).string();
  record.loaded_copy = delivered.mapped;
  record.handle = injection.handle;
  record.load_base = load_base;
  record.consistency = consistency__name(p.options.consistency);
  record.sha256 = sha256;
  if (counters) record.counters = counters->address, record.counters_len = counters->length;
  record.uncovered = p.uncovered;  // the registry keeps kMaxRecordedUncovered of them, and counts the rest
  for (auto& s : p.switches) {
    const Function& fn = s.entry.target;
    progress(fmt::format("  write {:#x} {}: {}  (jmp {:#x}{}{})", fn.address, fn.name, hex_bytes(s.jump),
                         s.island ? s.island : s.new_address,
                         s.island ? fmt::format(" -> {}island -> {:#x}", s.preserve ? "preserving " : "", s.new_address)
                                  : "",
                         s.trampoline ? fmt::format(", counted at its entry by trampoline {:#x}", s.trampoline) : ""));
    writes.push_back({fn.address, s.current, s.jump, fn.name});
    overwritten.push_back(overwritten_range(fn.address, s.check.covered, fn.name));
    bodies.push_back({fn.address, fn.address + std::max<uint64_t>(fn.size, 1), fn.name});
    if (s.stacked_on)  // a thread inside the replacement we supersede, or its island, runs old code too
      for (auto& f : s.stacked_on->functions)
        if (f.old_address == fn.address)
          for (auto& r : patch_code__function(p.table, *s.stacked_on, f)) bodies.push_back(r);
    record.functions.push_back({fn.mangled, fn.address, s.new_address, s.island, s.current, s.jump, s.preserve, s.frame,
                                s.trampoline, s.trampoline_covered});
    if (!s.uncounted.empty())
      progress(fmt::format("  note: calls into the replacement of {} from inside {} are not counted: its first instructions "
                           "cannot move to a counting trampoline ({}); calls from the target are counted by its island",
                           fn.name, p.options.library, s.uncounted));
  }

  std::vector<Function> targets;
  for (auto& s : p.switches) targets.push_back(s.entry.target);
  auto quiet = p.options.quiesce_probes
                   ? registry__live_functions(p.registry, p.table, targets, kFixCopyPrefix, nullptr)
                   : std::vector<Function>{};
  auto guard = HOTFIX_TRY(make_guard(pid, p.options.consistency, overwritten, bodies, quiet));
  for (auto& w : writes)
    HOTFIX_CHECK(journal.append(
        jr("switching").set("address", w.address).set("expected", hex_bytes(w.expected)).set("bytes", hex_bytes(w.bytes))));
  Registry registry = p.registry;
  auto commit_record = [&]() -> Result<void> {
    crashpoint("patch: in the stop, text written");
    record.applied_ns = realtime_ns();
    // Watches since prepare (the observe window's, if its memory is still held; a concurrent
    // `watch`) are in the target's registry, not in the snapshot: keep them.
    if (auto now = registry__read(pid)) registry.watches = now->watches;
    registry.patches.push_back(record);
    registry.next_id = p.id + 1;
    HOTFIX_CHECK(registry__write(tracee.memory(), registry_at, registry));
    crashpoint("patch: in the stop, registry written");
    HOTFIX_CHECK(journal.append(jr("committed")));  // the patch exists from this record on
    crashpoint("patch: in the stop, committed");
    return {};
  };
  crashpoint("patch: before the switch");
  auto sw = HOTFIX_TRY(switch_when_quiet(tracee, guard, writes, commit_record, p.options.timeout, progress));
  undo.commit();
  crashpoint("patch: after the switch");
  switching.end();
  TimedPhase old_code("apply: old-code probes");
  if (counters) count_old_code(p, progress);
  (void)journal.append(jr("done"));
  return PatchOutcome{p.id, sw.pause, sw.attempts, record.functions, delivered.mapped, sha256, delivered.sha256};
}

}  // namespace

Result<PatchOutcome> patch__apply(PreparedPatch& p, const ProgressFn& progress) {
  // The registry written below must be this process's alone: not a fork's inherited one, and
  // not shared with a fork not adopted yet (patch/adopt.hpp).
  for (auto& line : HOTFIX_TRY(adopt__before_write(p.options.pid))) progress(line);
  TimedPhase seize("apply: seize");
  auto tracee = HOTFIX_TRY(Tracee::seize(p.options.pid));
  seize.end();
  bool explained = false;
  auto out = apply_held(tracee, p, progress, explained);
  TimedPhase perfmap("apply: perf map");
  if (out) patch__sync_perfmap(p.options.pid, progress);  // perf names the new islands
  perfmap.end();
  return explained ? out : or_target_gone(tracee, std::move(out));
}

}  // namespace hotfix
