// The patch transaction (see engine.hpp for the order of things and why).
#include "patch/engine.hpp"

#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <thread>

#include "patch/abi_check.hpp"
#include "observe/liveness.hpp"
#include "observe/probe_safety.hpp"
#include "observe/watch.hpp"
#include "patch/binder.hpp"
#include "patch/counting.hpp"
#include "patch/fixlib.hpp"
#include "process/maps.hpp"
#include "process/memory.hpp"
#include "process/ptrace.hpp"
#include "process/remote.hpp"

namespace hotfix {

namespace {

using namespace std::chrono;

uint64_t realtime_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

std::string executable_of(pid_t pid) {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink(fmt::format("/proc/{}/exe", pid), ec).string();
  const std::string deleted = " (deleted)";
  if (exe.size() > deleted.size() && exe.ends_with(deleted)) exe.resize(exe.size() - deleted.size());
  return exe;
}

std::string hex_bytes(const std::vector<uint8_t>& bytes) {
  std::string s;
  for (auto b : bytes) s += fmt::format("{}{:02x}", s.empty() ? "" : " ", b);
  return s;
}

// The bytes the file had at `address` before any active patch: the oldest active patch there
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
  s.stacked_on = registry.top_at(fn.address);
  auto trap = arch::trap_instruction();
  if (std::equal(trap.begin(), trap.end(), s.current.begin()))
    return fail(fmt::format("cannot patch {}: its entry holds a breakpoint (a uprobe of a running `hotfix-ctl watch`, "
                            "bpftrace or a debugger)", fn.name),
                "stop the tool that probes it and retry; removing that breakpoint later would corrupt the jump");
  return s;
}

std::string basename_of(const std::string& path) { return std::filesystem::path(path).filename().string(); }

}  // namespace

const char* consistency__name(Consistency c) { return c == Consistency::strict ? "strict" : "entry"; }

Result<PreparedPatch> patch__prepare(const PatchOptions& opts) {
  HOTFIX_CHECK(process__check_privileges(false, true));
  HOTFIX_CHECK(process__check_alive(opts.pid));
  (void)patchcount__gc();  // counters and copies of processes that are gone go first (cheap)
  PreparedPatch p;
  p.options = opts;
  p.executable = executable_of(opts.pid);
  HOTFIX_CHECK(fixlib__validate(opts.library, p.executable));
  auto fix = HOTFIX_TRY(fixlib__read(opts.library));
  p.table = HOTFIX_TRY(SymbolTable::for_pid(opts.pid));
  PlanOptions plan_opts;
  plan_opts.patterns = opts.patterns;
  plan_opts.object = opts.object;
  plan_opts.patch_dir = opts.patch_dir;
  plan_opts.executable = p.executable;
  auto plan = HOTFIX_TRY(plan__build(p.table, fix, plan_opts));
  p.registry = HOTFIX_TRY(registry__read(opts.pid));
  p.id = p.registry.next_id;
  auto mem = HOTFIX_TRY(ProcessMemory::open(opts.pid));
  for (auto& e : plan.entries) p.switches.push_back(HOTFIX_TRY(plan_switch(mem, p.registry, e)));
  if (opts.abi_check) {
    auto fix_table = HOTFIX_TRY(SymbolTable::for_file(opts.library));
    for (auto& s : p.switches)
      HOTFIX_CHECK(abi__check_replacement({p.table, mem, s.entry.target, fix_table, s.entry.replacement}));
  }
  return p;
}

Result<std::vector<FunctionLiveness>> patch__observe(const PreparedPatch& p, milliseconds window) {
  std::vector<Function> targets;
  for (auto& s : p.switches) targets.push_back(s.entry.target);
  auto live = registry__live_functions(p.registry, p.table, targets, p.options.patch_dir, nullptr);
  auto seen = HOTFIX_TRY(liveness__observe(p.options.pid, live, window));
  std::vector<FunctionLiveness> out;
  for (size_t i = 0; i < seen.size(); ++i) out.push_back({targets[i].name, seen[i].calls_per_s, seen[i].inflight});
  return out;
}

namespace {

// What the transaction has changed in the target so far, undone unless committed.
class Undo {
 public:
  Undo(Tracee& t) : t_(t) {}
  ~Undo() {
    if (!committed_) rollback();
  }
  void commit() { committed_ = true; }

  uint64_t handle = 0;                                   // dlopen handle to dlclose
  std::optional<uint32_t> counters;                      // pinned hit counters of this patch id
  std::vector<std::pair<uint64_t, uint64_t>> mappings;   // (address, length) to munmap
  std::string copy;                                      // the bound copy on disk

 private:
  void rollback() {
    // Best effort, in reverse order; the target may already be gone.
    if (handle) (void)remote__dlclose(t_, handle);
    if (!mappings.empty() && t_.check_alive()) {
      pid_t tid = t_.threads().front().tid;
      if (t_.stop_thread(tid)) {
        for (auto& [addr, len] : mappings) (void)remote__munmap(t_, tid, addr, len);
        (void)t_.resume_thread(tid);
      }
    }
    if (!copy.empty()) ::unlink(copy.c_str());
    if (counters) (void)patchcount__remove(t_.pid(), *counters);
  }
  Tracee& t_;
  bool committed_ = false;
};

// An island within reach of `near`, from the pages this patch already mapped or a new one.
struct IslandPages {
  struct Page {
    uint64_t address = 0, used = 0;
  };
  std::vector<Page> pages;
};

Result<uint64_t> island_for(Tracee& t, pid_t tid, Undo& undo, IslandPages& islands, uint64_t near, uint64_t size) {
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
  uint64_t addr = HOTFIX_TRY(remote__mmap_near(t, tid, near, page, PROT_READ | PROT_EXEC));
  undo.mappings.push_back({addr, page});
  islands.pages.push_back({addr, (size + 15) & ~15ull});
  return addr;
}

// Fill in new addresses and jump bytes once fix.so is loaded; map islands where needed: for
// every function when counting (the island counts), else only beyond a direct jump's reach.
Result<void> finish_switches(Tracee& t, pid_t tid, Undo& undo, PreparedPatch& p, uint64_t load_base,
                             const TargetCounters* counters) {
  IslandPages islands;
  for (uint32_t i = 0; i < p.switches.size(); ++i) {
    auto& s = p.switches[i];
    s.new_address = load_base + s.entry.replacement_value;
    auto direct = arch::encode_entry_jump(s.entry.target.address, s.new_address);
    if (direct && !counters) {
      s.jump = *direct;
      continue;
    }
    uint64_t size = counters ? arch::counting_island_size() : arch::island_jump_size();
    s.island = HOTFIX_TRY(island_for(t, tid, undo, islands, s.entry.target.address, size));
    HOTFIX_CHECK(t.memory().write(s.island, counters ? arch::encode_counting_island(s.island, counters->slot(i), s.new_address)
                                                     : arch::encode_island_jump(s.island, s.new_address)));
    auto jump = arch::encode_entry_jump(s.entry.target.address, s.island);
    if (!jump) return fail(fmt::format("the island for {} is out of reach", s.entry.target.name));
    s.jump = *jump;
  }
  return {};
}

// The registry mapping of the target, created (and owned by `undo` until commit) if missing.
Result<uint64_t> ensure_registry(Tracee& t, pid_t tid, Undo& undo) {
  if (auto at = registry__locate(t.pid())) return *at;
  auto memfd = HOTFIX_TRY(remote__map_memfd(t, tid, kRegistryName, kRegistrySize, PROT_READ | PROT_WRITE));
  undo.mappings.push_back({memfd.address, memfd.size});
  HOTFIX_CHECK(remote__close(t, tid, memfd.fd));  // the mapping keeps the memory alive
  return memfd.address;
}

std::vector<StoppedThread> stopped_threads(const Tracee& t) {
  std::vector<StoppedThread> out;
  for (auto& th : t.threads())
    if (th.stopped() && !th.exited) out.push_back({th.tid, th.regs});
  return out;
}

// What must not be running for a switch, by consistency mode.
struct Guard {
  Consistency mode;
  std::vector<AddressRange> overwritten;  // entry mode: the bytes under the jump
  std::optional<ConsistencyChecker> strict;
  std::optional<QuietWaiter> waiter;      // strict mode: uprobes pick the moment to stop
  std::vector<Function> quiet;            // what the waiter watches, once a first stop was blocked
  pid_t pid = 0;

  // Until the probes see no thread inside (or the deadline), servicing the target's signals.
  // The probes stay attached through the stop: none sits under the bytes we write.
  void wait_for_quiet(Tracee& t, steady_clock::time_point deadline) {
    if (!waiter) return;
    while (!waiter->wait_quiet(std::min(deadline, steady_clock::now() + milliseconds(10))) &&
           steady_clock::now() < deadline)
      if (!t.pump()) break;
  }
  // After a blocked stop: attach the probes. The first attempt goes without them, because
  // attaching and (at the end) detaching costs tens of ms, more than most patches need in all.
  void rearm() {
    if (waiter || quiet.empty()) return;
    if (auto w = QuietWaiter::attach(pid, quiet)) waiter.emplace(std::move(*w));
    else quiet.clear();  // blind retries from now on
  }

  // The kernel's out-of-line area for probed instructions ("[uprobes]"), read before each stop:
  // a thread stopped there is executing some function's displaced first instruction and will
  // resume right after it -- possibly inside bytes we are about to overwrite.
  std::optional<AddressRange> xol;
  void note_xol_area(pid_t pid) {
    if (auto maps = process__read_maps(pid))
      for (auto& m : *maps)
        if (m.path == "[uprobes]") xol = AddressRange{m.start, m.end, "a probed instruction (uprobe single-step)"};
  }

  Result<std::vector<Blocker>> check(const std::vector<StoppedThread>& threads) {
    auto guarded = overwritten;
    if (xol) guarded.push_back(*xol);
    auto blockers = consistency__check_entry(threads, guarded);
    if (!blockers.empty() || !strict) return blockers;
    return strict->check(threads);
  }
};

// `quiet`: functions whose threads-inside count drives the moment of the stop (strict mode).
Result<Guard> make_guard(pid_t pid, Consistency mode, std::vector<AddressRange> overwritten,
                         std::vector<AddressRange> bodies, const std::vector<Function>& quiet = {}) {
  Guard g{mode, std::move(overwritten), std::nullopt, std::nullopt, {}, pid, std::nullopt};
  if (mode != Consistency::strict) return g;
  g.strict = HOTFIX_TRY(ConsistencyChecker::create(pid, std::move(bodies)));
  g.quiet = quiet;
  return g;
}

// The bytes of one switch: where, what must be there now, what goes there.
struct TextWrite {
  uint64_t address;
  std::vector<uint8_t> expected, bytes;
  std::string name;
};

// Inside the stop window: verify every site still holds what we planned against, then write
// all of them; on a failed write, put back what was already written.
Result<void> write_all(const ProcessMemory& mem, const std::vector<TextWrite>& writes) {
  for (auto& w : writes) {
    auto now = HOTFIX_TRY(mem.read(w.address, w.expected.size()));
    if (now != w.expected)
      return fail(fmt::format("the first bytes of {} changed under us ({} instead of {})", w.name, hex_bytes(now),
                              hex_bytes(w.expected)),
                  "another tool is patching this process; nothing was changed");
  }
  for (size_t i = 0; i < writes.size(); ++i) {
    if (auto r = mem.write(writes[i].address, writes[i].bytes); !r) {
      for (size_t j = 0; j < i; ++j) (void)mem.write(writes[j].address, writes[j].expected);
      return std::unexpected(r.error());
    }
  }
  return {};
}

struct SwitchResult {
  nanoseconds pause{};
  int attempts = 0;
};

// Stop the world until the guard passes (or the deadline), then write and record in one stop.
Result<SwitchResult> switch_when_quiet(Tracee& t, Guard& guard, const std::vector<TextWrite>& writes,
                                       const std::function<Result<void>()>& record, milliseconds timeout,
                                       const ProgressFn& progress) {
  SwitchResult r;
  auto deadline = steady_clock::now() + timeout;
  auto backoff = milliseconds(2);
  std::map<pid_t, int> blocked_in;  // attempts each thread blocked: the error names the most stubborn
  for (;;) {
    ++r.attempts;
    // With probes: stop as soon as they see nobody inside, but no later than the backoff, so a
    // function that is never quiet as a whole still gets blind attempts.
    guard.wait_for_quiet(t, std::min(deadline, steady_clock::now() + backoff));
    guard.note_xol_area(t.pid());
    HOTFIX_CHECK(t.stop_all());
    auto blockers = guard.check(stopped_threads(t));
    Result<void> done = blockers ? Result<void>{} : std::unexpected(blockers.error());
    if (blockers && blockers->empty()) {
      done = write_all(t.memory(), writes);
      if (done && !(done = record()))  // unrecorded jumps must not outlive the undo of their target
        for (auto& w : writes) (void)t.memory().write(w.address, w.expected);
    }
    auto resumed = t.resume_all();
    r.pause = std::max(r.pause, duration_cast<nanoseconds>(t.last_pause().max_pause));
    HOTFIX_CHECK(resumed);
    if (!done) return std::unexpected(done.error());
    if (blockers->empty()) return r;
    for (auto& b : *blockers) blocked_in[b.tid]++;
    const Blocker& b = *std::max_element(blockers->begin(), blockers->end(),
                                         [&](auto& x, auto& y) { return blocked_in[x.tid] < blocked_in[y.tid]; });
    if (steady_clock::now() + backoff > deadline)
      return fail(fmt::format("{} after {} attempts in {} ms ({} consistency); nothing was changed",
                              blocker__describe(b), r.attempts, timeout.count(), consistency__name(guard.mode)),
                  guard.mode == Consistency::strict
                      ? "retry when it is idle, raise --timeout, or use --consistency entry to let running calls finish in the old code"
                      : "retry; a thread is executing the very bytes the jump would overwrite");
    progress(fmt::format("attempt {}: {}; retrying", r.attempts, blocker__describe(b)));
    guard.rearm();
    if (!guard.waiter) std::this_thread::sleep_for(backoff);
    backoff = std::min(backoff * 2, milliseconds(50));
  }
}

AddressRange overwritten_range(uint64_t address, size_t covered, const std::string& name) {
  // A thread stopped exactly at the entry is fine: it will execute the jump.
  return {address + 1, address + covered, name};
}

}  // namespace

namespace {

// A step failed: if the target died meanwhile, that is what to say (the step's own error,
// "cannot open the memory of process N" or "could not stop every thread", is a symptom).
template <class T>
Result<T> or_target_gone(Tracee& t, Result<T> r) {
  if (r) return r;
  // A dying process reports its threads' exits one by one, the leader's last: collect them.
  auto budget = process__alive(t.pid()) ? milliseconds(0) : milliseconds(500);
  if (auto alive = t.pump(budget); !alive) return std::unexpected(alive.error());
  return r;
}

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
  if (auto probes = patchcount__attach_old(p.options.pid, p.id, all); !probes)
    progress(fmt::format("note: old-code hits are not counted: {}", probes.error().line()));
}

Result<PatchOutcome> apply_held(Tracee& tracee, PreparedPatch& p, const ProgressFn& progress) {
  const pid_t pid = p.options.pid;
  Undo undo(tracee);

  // Bind and load fix.so while every thread runs.
  std::string copy = fmt::format("{}{}/{}-{}", p.options.patch_dir, pid, p.id, basename_of(p.options.library));
  auto bound = HOTFIX_TRY(binder__prepare(p.table, p.executable, p.options.library, copy));
  undo.copy = bound.path;
  auto injection = HOTFIX_TRY(remote__inject_library(tracee, bound.path));
  undo.handle = injection.handle;
  uint64_t load_base = HOTFIX_TRY(binder__load_base(pid, bound.path));
  HOTFIX_CHECK(binder__apply(pid, load_base, bound.fixups));
  progress(fmt::format("loaded {} at {:#x} (handle {:#x}); bound {} target symbol(s)", bound.path, load_base,
                       injection.handle, bound.bindings.size()));

  // Islands and the registry need one stopped thread; the others keep running.
  pid_t tid = tracee.threads().front().tid;
  HOTFIX_CHECK(tracee.stop_thread(tid));
  std::optional<TargetCounters> counters;
  auto prepared = [&]() -> Result<uint64_t> {
    if (p.options.count) {
      counters = HOTFIX_TRY(counting__map_into(tracee, tid, p.id, static_cast<uint32_t>(p.switches.size())));
      undo.counters = p.id;
      undo.mappings.push_back({counters->address, counters->length});
    }
    HOTFIX_CHECK(finish_switches(tracee, tid, undo, p, load_base, counters ? &*counters : nullptr));
    return ensure_registry(tracee, tid, undo);
  }();
  HOTFIX_CHECK(tracee.resume_thread(tid));
  uint64_t registry_at = HOTFIX_TRY(prepared);

  std::vector<TextWrite> writes;
  std::vector<AddressRange> overwritten, bodies;
  PatchRecord record;
  record.id = p.id;
  record.library = std::filesystem::absolute(p.options.library).string();
  record.loaded_copy = bound.path;
  record.handle = injection.handle;
  record.load_base = load_base;
  record.consistency = consistency__name(p.options.consistency);
  if (counters) record.counters = counters->address, record.counters_len = counters->length;
  for (auto& s : p.switches) {
    const Function& fn = s.entry.target;
    progress(fmt::format("  write {:#x} {}: {}  (jmp {:#x}{})", fn.address, fn.name, hex_bytes(s.jump),
                         s.island ? s.island : s.new_address,
                         s.island ? fmt::format(" -> island -> {:#x}", s.new_address) : ""));
    writes.push_back({fn.address, s.current, s.jump, fn.name});
    overwritten.push_back(overwritten_range(fn.address, s.check.covered, fn.name));
    bodies.push_back({fn.address, fn.address + std::max<uint64_t>(fn.size, 1), fn.name});
    if (s.stacked_on)  // a thread inside the replacement we supersede is also running old code
      for (auto& f : s.stacked_on->functions)
        if (f.old_address == fn.address)
          if (auto* prev = p.table.function_at(f.new_address))
            bodies.push_back({prev->address, prev->address + prev->size, fn.name + " (patch " + std::to_string(s.stacked_on->id) + ")"});
    record.functions.push_back({fn.mangled, fn.address, s.new_address, s.island, s.current, s.jump});
  }

  std::vector<Function> targets;
  for (auto& s : p.switches) targets.push_back(s.entry.target);
  auto quiet = p.options.quiesce_probes
                   ? registry__live_functions(p.registry, p.table, targets, p.options.patch_dir, nullptr)
                   : std::vector<Function>{};
  auto guard = HOTFIX_TRY(make_guard(pid, p.options.consistency, overwritten, bodies, quiet));
  Registry registry = p.registry;
  auto commit_record = [&]() -> Result<void> {
    record.applied_ns = realtime_ns();
    registry.patches.push_back(record);
    registry.next_id = p.id + 1;
    return registry__write(tracee.memory(), registry_at, registry);
  };
  auto sw = HOTFIX_TRY(switch_when_quiet(tracee, guard, writes, commit_record, p.options.timeout, progress));
  undo.commit();
  if (counters) count_old_code(p, progress);
  return PatchOutcome{p.id, sw.pause, sw.attempts, record.functions, bound.path};
}

}  // namespace

Result<PatchOutcome> patch__apply(PreparedPatch& p, const ProgressFn& progress) {
  auto tracee = HOTFIX_TRY(Tracee::seize(p.options.pid));
  return or_target_gone(tracee, apply_held(tracee, p, progress));
}

// ---------------------------------------------------------------------------------------
// revert

namespace {

// The record of the active patch right above `below` at `address` (whose saved bytes are
// `below`'s jump), if any.
FunctionRecord* record_above(Registry& r, uint32_t below, uint64_t address) {
  FunctionRecord* best = nullptr;
  uint32_t best_id = UINT32_MAX;
  for (auto& p : r.patches) {
    if (p.state != PatchState::active || p.id <= below || p.id >= best_id) continue;
    for (auto& f : p.functions)
      if (f.old_address == address) best = &f, best_id = p.id;
  }
  return best;
}

// The code of `p` a thread could be running: its replacements and its islands.
std::vector<AddressRange> code_of(const SymbolTable& table, const PatchRecord& p) {
  std::vector<AddressRange> out;
  for (auto& f : p.functions) {
    std::string name = symbol__demangle(f.mangled) + fmt::format(" (patch {})", p.id);
    if (auto* fn = table.function_at(f.new_address)) out.push_back({fn->address, fn->address + fn->size, name});
    else out.push_back({f.new_address, f.new_address + 1, name});
    if (f.island) out.push_back({f.island, f.island + arch::island_jump_size(), name + " island"});
  }
  return out;
}

std::vector<uint64_t> island_pages(const PatchRecord& p) {
  std::set<uint64_t> pages;
  const uint64_t page = static_cast<uint64_t>(::getpagesize());
  for (auto& f : p.functions)
    if (f.island) pages.insert(f.island & ~(page - 1));
  return {pages.begin(), pages.end()};
}

// Unload a reverted patch once no thread can run its code (checked in one stop, strict).
Result<std::string> try_release(Tracee& t, const SymbolTable& table, PatchRecord& p, uint64_t registry_at,
                                Registry& registry) {
  auto checker = HOTFIX_TRY(ConsistencyChecker::create(t.pid(), code_of(table, p)));
  HOTFIX_CHECK(t.stop_all());
  auto blockers = checker.check(stopped_threads(t));
  HOTFIX_CHECK(t.resume_all());
  if (!blockers) return std::unexpected(blockers.error());
  if (!blockers->empty()) return blocker__describe(blockers->front());
  HOTFIX_CHECK(remote__dlclose(t, p.handle));
  if (auto pages = island_pages(p); !pages.empty() || p.counters) {
    pid_t tid = t.threads().front().tid;
    HOTFIX_CHECK(t.stop_thread(tid));
    for (auto page : pages) (void)remote__munmap(t, tid, page, static_cast<uint64_t>(::getpagesize()));
    if (p.counters) (void)remote__munmap(t, tid, p.counters, p.counters_len);
    HOTFIX_CHECK(t.resume_thread(tid));
  }
  ::unlink(p.loaded_copy.c_str());
  p.released = true;
  HOTFIX_CHECK(t.stop_all());  // the registry is only written with every thread stopped
  auto written = registry__write(t.memory(), registry_at, registry);
  HOTFIX_CHECK(t.resume_all());
  HOTFIX_CHECK(written);
  return std::string();
}

Result<RevertOutcome> revert_one(Tracee& t, const SymbolTable& table, Registry& registry, uint64_t registry_at,
                                 uint32_t id, const RevertOptions& opts, const ProgressFn& progress) {
  PatchRecord* p = registry.find(id);
  std::vector<TextWrite> writes;
  std::vector<AddressRange> overwritten;
  for (auto& f : p->functions) {
    std::string name = symbol__demangle(f.mangled);
    if (registry.top_at(f.old_address) == p) {
      writes.push_back({f.old_address, f.written, f.original, name});
      overwritten.push_back(overwritten_range(f.old_address, f.written.size(), name));
      progress(fmt::format("  restore {:#x} {}: {}", f.old_address, name, hex_bytes(f.original)));
    } else {
      progress(fmt::format("  {} stays with a newer patch; it now returns to what patch {} replaced", name, id));
    }
  }
  auto guard = HOTFIX_TRY(make_guard(t.pid(), opts.consistency, overwritten, code_of(table, *p)));
  Registry updated = registry;
  auto commit_record = [&]() -> Result<void> {
    PatchRecord* q = updated.find(id);
    for (auto& f : q->functions)  // a newer patch above now sits on what this one replaced
      if (auto* above = record_above(updated, id, f.old_address)) above->original = f.original;
    q->state = PatchState::reverted;
    q->reverted_ns = realtime_ns();
    return registry__write(t.memory(), registry_at, updated);
  };
  auto sw = HOTFIX_TRY(switch_when_quiet(t, guard, writes, commit_record, opts.timeout, progress));
  registry = updated;
  if (auto removed = patchcount__remove(t.pid(), id); !removed)  // its old-code probes go with the pins
    progress(fmt::format("note: {}", removed.error().line()));
  return RevertOutcome{id, sw.pause, sw.attempts, false, {}};
}

Result<std::vector<uint32_t>> revert_ids(const Registry& registry, const RevertOptions& opts) {
  std::vector<uint32_t> ids;
  if (opts.all) {
    for (auto& p : registry.patches)
      if (p.state == PatchState::active) ids.push_back(p.id);
  } else {
    for (auto id : opts.ids) {
      auto it = std::find_if(registry.patches.begin(), registry.patches.end(), [&](auto& p) { return p.id == id; });
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

Result<void> revert_held(Tracee& tracee, const SymbolTable& table, Registry& registry, uint64_t registry_at,
                         const std::vector<uint32_t>& ids, const RevertOptions& opts, const ProgressFn& progress,
                         std::vector<RevertOutcome>& out) {
  for (auto id : ids) out.push_back(HOTFIX_TRY(revert_one(tracee, table, registry, registry_at, id, opts, progress)));
  // Give back the memory of every reverted patch no thread can run any more (older leftovers too).
  for (auto& p : registry.patches) {
    if (p.state != PatchState::reverted || p.released) continue;
    auto held = HOTFIX_TRY(try_release(tracee, table, p, registry_at, registry));
    for (auto& o : out)
      if (o.id == p.id) o.released = held.empty(), o.held_by = held;
  }
  return {};
}

}  // namespace

Result<std::vector<RevertOutcome>> patch__revert(const RevertOptions& opts, const ProgressFn& progress) {
  HOTFIX_CHECK(process__check_privileges(false, true));
  auto registry = HOTFIX_TRY(registry__read(opts.pid));
  auto registry_at = registry__locate(opts.pid);
  auto ids = HOTFIX_TRY(revert_ids(registry, opts));
  if (!registry_at) return std::vector<RevertOutcome>{};
  auto table = HOTFIX_TRY(SymbolTable::for_pid(opts.pid));
  auto tracee = HOTFIX_TRY(Tracee::seize(opts.pid));
  std::vector<RevertOutcome> out;
  auto reverted = revert_held(tracee, table, registry, *registry_at, ids, opts, progress, out);
  HOTFIX_CHECK(or_target_gone(tracee, std::move(reverted)));
  return out;
}

}  // namespace hotfix
