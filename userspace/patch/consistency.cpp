#include "patch/consistency.hpp"

#include <elfutils/libdwfl.h>
#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>

#include "common/unique_fd.hpp"
#include "process/maps.hpp"

namespace hotfix {
namespace {

// Stacks deeper than this are not scanned to the end: such a thread is always unwound.
constexpr size_t kScanCap = 1 << 20;
// Stacks are read in batches of at most this many threads (IOV_MAX) and bytes.
constexpr size_t kBatchThreads = 1024;
constexpr size_t kBatchBytes = 8 << 20;
// A runaway unwind (a corrupt stack that loops) stops here and counts as incomplete.
constexpr int kMaxFrames = 4096;

using Clock = std::chrono::steady_clock;
double micros_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
}

// /proc/TID is every thread's own directory, even though only processes are listed in /proc.
std::string thread_name(pid_t tid) {
  std::ifstream in(fmt::format("/proc/{}/comm", tid));
  std::string name;
  if (!std::getline(in, name)) return "?";
  return name;
}

// The function of a sorted, non-overlapping range list containing `addr`, or nullptr.
const AddressRange* find_range(const std::vector<AddressRange>& sorted, uint64_t addr) {
  auto it = std::upper_bound(sorted.begin(), sorted.end(), addr,
                             [](uint64_t a, const AddressRange& r) { return a < r.begin; });
  if (it == sorted.begin()) return nullptr;
  --it;
  return it->contains(addr) ? &*it : nullptr;
}

struct DwflDeleter {
  void operator()(Dwfl* d) const { dwfl_end(d); }
};
using DwflPtr = std::unique_ptr<Dwfl, DwflDeleter>;

// No separate debug files: a search (or a debuginfod download) must never run inside the stop
// window, and .eh_frame is all the unwinder needs. A file's own .debug_frame is still used.
int no_debuginfo(Dwfl_Module*, void**, const char*, Dwarf_Addr, const char*, const char*, GElf_Word, char**) {
  return -1;
}
const Dwfl_Callbacks kDwflCallbacks = {
    .find_elf = dwfl_linux_proc_find_elf,
    .find_debuginfo = no_debuginfo,
    .section_address = nullptr,
    .debuginfo_path = nullptr,
};

struct Frame {
  uint64_t pc = 0;        // as reported
  uint64_t lookup = 0;    // pc - 1 for a return address: the call instruction's function
  uint64_t sp = 0;        // the stack pointer in this frame, 0 if libdw does not know it
};

}  // namespace

std::string blocker__describe(const Blocker& b) {
  std::string s = fmt::format("thread {} ({}) is inside {} (frame #{}, pc {:#x})", b.tid, b.thread_name.empty() ? thread_name(b.tid) : b.thread_name,
                              b.function, b.frame, b.pc);
  if (b.unwind_incomplete)
    s += " -- found on its stack where the unwinder could not reach, so assumed live";
  return s;
}

void consistency__name_threads(std::vector<Blocker>& blockers) {
  for (auto& b : blockers)
    if (b.thread_name.empty()) b.thread_name = thread_name(b.tid);
}

std::vector<Blocker> consistency__check_entry(const std::vector<StoppedThread>& threads,
                                              const std::vector<AddressRange>& overwritten) {
  std::vector<Blocker> out;
  for (const auto& t : threads) {
    uint64_t pc = arch::regs__pc(t.regs);
    for (const auto& r : overwritten)
      if (r.contains(pc)) out.push_back(Blocker{t.tid, {}, 0, pc, r.name, false});
  }
  return out;
}

struct ConsistencyChecker::State {
  // One thread's stack as read by the scan: the words [lo, lo + 8 * got) at buffer[offset].
  struct Segment {
    const StoppedThread* thread = nullptr;
    uint64_t lo = 0;
    size_t offset = 0, wanted = 0, got = 0;  // in words
    bool to_mapping_end = false;             // lo + 8 * wanted is the end of the stack's mapping
    bool scanned_all() const { return to_mapping_end && got == wanted; }
  };

  pid_t pid = 0;
  std::vector<AddressRange> functions;  // sorted by begin
  uint64_t lowest = 0, highest = 0;     // bounds of all functions: the scan's fast reject
  DwflPtr dwfl;
  UniqueFd mem;                         // /proc/PID/mem, for unwinder reads off the scanned stack
  // The mappings, read before the stop window when possible. The stack of a thread that
  // existed when they were read is among them, and stays put while the thread lives.
  std::vector<Mapping> maps;
  std::vector<pid_t> known_tids;        // sorted: the threads that existed before `maps` was read
  // Reused by every check, so the stop window allocates (almost) nothing.
  std::unique_ptr<uint64_t[]> buffer;   // the stacks of one batch, back to back
  size_t buffer_words = 0;
  std::vector<Segment> segments;
  std::vector<iovec> remote;
  // Words of the thread being checked that point into a function: (slot address, value).
  std::vector<std::pair<uint64_t, uint64_t>> candidates;
  // The current thread's stack holds a signal frame (a handler runs on it): the unwinder must
  // see through it, and if it stops early no word of the thread can be proven stale.
  bool saw_sigframe = false;
  bool other_stack_unread = false;  // a frame's interrupted stack could not be read (blocks)
  std::vector<uint64_t> restorers;  // addresses of the signal restorer (libc's __restore_rt)
  std::vector<uint64_t> other_stack;  // buffer for an interrupted stack elsewhere (sigaltstack)
  const std::vector<StoppedThread>* threads = nullptr;  // during check()
  const Segment* current = nullptr;                     // the thread being unwound
  ConsistencyStats stats;

  // ---- libdw thread callbacks: the threads are the caller's, already stopped ----
  // A thread's argument is its StoppedThread, inside `threads`.
  static pid_t next_thread(Dwfl*, void* arg, void** thread_argp) {
    auto* s = static_cast<State*>(arg);
    if (!s->threads) return 0;
    auto* prev = static_cast<const StoppedThread*>(*thread_argp);
    size_t next = prev ? size_t(prev - s->threads->data()) + 1 : 0;
    if (next >= s->threads->size()) return 0;
    *thread_argp = const_cast<StoppedThread*>(&(*s->threads)[next]);
    return (*s->threads)[next].tid;
  }
  static bool get_thread(Dwfl*, pid_t tid, void* arg, void** thread_argp) {
    auto* s = static_cast<State*>(arg);
    if (s->current && s->current->thread->tid == tid) {
      *thread_argp = const_cast<StoppedThread*>(s->current->thread);
      return true;
    }
    if (!s->threads) return false;
    for (const auto& t : *s->threads)
      if (t.tid == tid) {
        *thread_argp = const_cast<StoppedThread*>(&t);
        return true;
      }
    return false;
  }
  static bool memory_read(Dwfl*, Dwarf_Addr addr, Dwarf_Word* result, void* arg) {
    auto* s = static_cast<State*>(arg);
    if (const Segment* g = s->current; g && addr >= g->lo && addr + 8 <= g->lo + 8 * g->got) {
      std::memcpy(result, reinterpret_cast<const char*>(s->buffer.get() + g->offset) + (addr - g->lo), 8);
      return true;
    }
    return pread(s->mem.get(), result, sizeof *result, static_cast<off_t>(addr)) == sizeof *result;
  }
  static bool set_initial_registers(Dwfl_Thread* thread, void* thread_arg) {
    const auto* t = static_cast<const StoppedThread*>(thread_arg);
    const auto& regs = t->regs;
    std::vector<uint64_t> dwarf = arch::regs__dwarf(regs);
    static_assert(sizeof(Dwarf_Word) == sizeof(uint64_t));
    // A thread read without stopping it: the others are unknown, and an unknown register must
    // stay undefined for libdw (a made-up value would send the unwind astray, not stop it).
    unsigned first = t->pc_sp_only ? arch::dwarf_sp_register() : 0;
    size_t count = t->pc_sp_only ? 1 : dwarf.size();
    if (!dwfl_thread_state_registers(thread, first, count, reinterpret_cast<const Dwarf_Word*>(dwarf.data() + first)))
      return false;
    dwfl_thread_state_register_pc(thread, arch::regs__pc(regs));
    return true;
  }

  static constexpr Dwfl_Thread_Callbacks kThreadCallbacks = {
      .next_thread = next_thread,
      .get_thread = get_thread,
      .memory_read = memory_read,
      .set_initial_registers = set_initial_registers,
      .detach = nullptr,
      .thread_detach = nullptr,
  };

  Result<void> build_dwfl();
  Result<void> read_maps();
  bool maps_cover(const std::vector<StoppedThread>& threads) const;
  void reserve_buffer(size_t words);
  Result<std::vector<Blocker>> check(const std::vector<StoppedThread>& threads);
  Segment plan_segment(const StoppedThread& t) const;
  void read_segments();
  void scan(const Segment& g, std::vector<Blocker>& out);
  void scan_words(const uint64_t* words, size_t count, uint64_t lo, std::vector<uint64_t>& interrupted_sps);
  void scan_interrupted_stacks(const Segment& g, std::vector<uint64_t> sps);
  void find_restorers();
  const AddressRange* function_of_word(uint64_t w) const;
  void unwind(const Segment& g, std::vector<Blocker>& out);
  struct Walk {
    std::vector<Frame> frames;
    int rc = 0;
    bool runaway = false;
    bool whole() const { return rc == 0 && !runaway; }
  };
  Walk walk(pid_t tid);
  uint64_t reached(const Walk& w) const;
  Result<std::vector<StackView>> survey(const std::vector<StoppedThread>& threads);
  Result<void> begin_pass(const std::vector<StoppedThread>& list);
  template <class Skip, class Use>
  void in_batches(const std::vector<StoppedThread>& list, Skip skip, Use use);
  StackView survey_one(const Segment& g);
  const AddressRange* function_at_return_address(uint64_t ra) const;
};

Result<void> ConsistencyChecker::State::build_dwfl() {
  DwflPtr d(dwfl_begin(&kDwflCallbacks));
  if (!d) return fail(fmt::format("cannot start libdw: {}", dwfl_errmsg(-1)));
  dwfl_report_begin(d.get());
  int rc = dwfl_linux_proc_report(d.get(), pid);
  if (rc != 0)
    return fail(fmt::format("cannot read the modules of process {}: {}", pid,
                            rc > 0 ? errno_text(rc) : dwfl_errmsg(-1)),
                "check that the process still runs");
  if (dwfl_report_end(d.get(), nullptr, nullptr) != 0)
    return fail(fmt::format("cannot read the modules of process {}: {}", pid, dwfl_errmsg(-1)));
  if (!dwfl_attach_state(d.get(), nullptr, pid, &kThreadCallbacks, this))
    return fail(fmt::format("libdw cannot unwind process {}: {}", pid, dwfl_errmsg(-1)));
  // Load every module's ELF and call frame information now, not lazily inside the stop window.
  dwfl_getmodules(
      d.get(),
      [](Dwfl_Module* mod, void**, const char*, Dwarf_Addr, void*) {
        Dwarf_Addr bias;
        dwfl_module_getelf(mod, &bias);
        dwfl_module_eh_cfi(mod, &bias);
        dwfl_module_dwarf_cfi(mod, &bias);
        return int(DWARF_CB_OK);
      },
      nullptr, 0);
  dwfl = std::move(d);
  return {};
}

Result<void> ConsistencyChecker::State::read_maps() {
  // Threads first: each thread listed had its stack mapped before the maps are read.
  known_tids = HOTFIX_TRY(process__list_threads(pid));
  std::sort(known_tids.begin(), known_tids.end());
  maps = HOTFIX_TRY(process__read_maps(pid));
  return {};
}

// Do the cached maps hold every thread's stack? Not for a thread created since (its stack may
// be a new mapping), nor for a stack pointer outside them (the main stack grew, or a thread
// switched to a stack mapped since).
bool ConsistencyChecker::State::maps_cover(const std::vector<StoppedThread>& threads) const {
  for (const auto& t : threads) {
    if (!std::binary_search(known_tids.begin(), known_tids.end(), t.tid)) return false;
    uint64_t sp = arch::regs__sp(t.regs);
    auto m = std::upper_bound(maps.begin(), maps.end(), sp, [](uint64_t a, const Mapping& x) { return a < x.start; });
    if (m == maps.begin() || !(m - 1)->contains(sp)) return false;
  }
  return true;
}

const AddressRange* ConsistencyChecker::State::function_at_return_address(uint64_t ra) const {
  // A call that ends a function (to a noreturn callee) returns to the function's end: look up
  // the call instruction (ra - 1), as the unwinder does.
  return ra ? find_range(functions, ra - 1) : nullptr;
}

// A word that may be a place the thread returns to: a return address (into the function, or
// just past its end), or an interrupted pc saved in a signal frame (which may be a function's
// very first byte).
const AddressRange* ConsistencyChecker::State::function_of_word(uint64_t w) const {
  if (w < lowest || w > highest) return nullptr;
  if (const AddressRange* f = find_range(functions, w)) return f;
  return function_at_return_address(w);
}

// Where the signal restorer is: a handler's frame returns to it, and the kernel's signal
// frame starts right there. libc has no symbol for it (Debian strips .symtab), so look for
// its code in libc's executable mappings (or the executable's, when no libc is loaded:
// statically linked). Done before the stop window.
void ConsistencyChecker::State::find_restorers() {
  restorers.clear();
  const auto needle = arch::sigreturn_sequence();
  auto is_libc = [](const std::string& path) {
    auto base = path.substr(path.rfind('/') + 1);
    return base.starts_with("libc.so") || base.starts_with("libc-");
  };
  bool have_libc = std::any_of(maps.begin(), maps.end(), [&](const Mapping& m) { return is_libc(m.path); });
  for (const Mapping& m : maps) {
    if (!m.executable() || !m.file_backed()) continue;
    if (have_libc ? !is_libc(m.path) : m.path != maps.front().path) continue;
    std::vector<uint8_t> text(m.end - m.start);
    if (pread(mem.get(), text.data(), text.size(), static_cast<off_t>(m.start)) != static_cast<ssize_t>(text.size()))
      continue;
    for (const uint8_t* at = text.data(), *end = text.data() + text.size();
         (at = static_cast<const uint8_t*>(::memmem(at, size_t(end - at), needle.data(), needle.size()))); ++at)
      restorers.push_back(m.start + uint64_t(at - text.data()));
  }
}

void ConsistencyChecker::State::reserve_buffer(size_t words) {
  if (words <= buffer_words) return;
  buffer.reset(new uint64_t[words]);
  std::memset(buffer.get(), 0, words * 8);  // fault the pages in now, not in the stop window
  buffer_words = words;
}

// Where to read `t`'s stack: from its stack pointer up to the end of the mapping holding it
// (the stack grows down), at most kScanCap bytes. wanted = 0 if no mapping holds it.
ConsistencyChecker::State::Segment ConsistencyChecker::State::plan_segment(const StoppedThread& t) const {
  Segment g;
  g.thread = &t;
  g.lo = arch::regs__sp(t.regs) & ~uint64_t(arch::stack_slot_size() - 1);
  auto m = std::upper_bound(maps.begin(), maps.end(), g.lo, [](uint64_t a, const Mapping& x) { return a < x.start; });
  if (m == maps.begin() || !(--m)->contains(g.lo)) return g;
  uint64_t hi = std::min<uint64_t>(m->end, g.lo + kScanCap);
  g.to_mapping_end = hi == m->end;
  g.wanted = (hi - g.lo) / 8;
  return g;
}

// All segments with one process_vm_readv per batch (one call per thread costs 2.4x more).
// The call stops at the first range it cannot read: mark what it got, and go on after it.
void ConsistencyChecker::State::read_segments() {
  std::vector<Segment*> todo;
  remote.clear();
  for (auto& g : segments)
    if (g.wanted) {
      todo.push_back(&g);
      remote.push_back(iovec{reinterpret_cast<void*>(g.lo), g.wanted * 8});
    }
  size_t k = 0;
  while (k < todo.size()) {
    const size_t end = todo.back()->offset + todo.back()->wanted;
    iovec local{buffer.get() + todo[k]->offset, (end - todo[k]->offset) * 8};
    ssize_t got = process_vm_readv(pid, &local, 1, &remote[k], todo.size() - k, 0);
    size_t bytes = got > 0 ? size_t(got) : 0;
    stats.stack_bytes += bytes;
    while (k < todo.size() && bytes >= todo[k]->wanted * 8) {
      todo[k]->got = todo[k]->wanted;
      bytes -= todo[k++]->wanted * 8;
    }
    if (k < todo.size()) todo[k++]->got = bytes / 8;  // the range it stopped in
  }
}

// The fast conservative pass: does any word of the stack point into a function? A thread with
// none, whose whole stack was read, cannot have one of the functions on it.
void ConsistencyChecker::State::scan(const Segment& g, std::vector<Blocker>& out) {
  auto t0 = Clock::now();
  candidates.clear();
  saw_sigframe = other_stack_unread = false;
  std::vector<uint64_t> interrupted_sps;
  scan_words(buffer.get() + g.offset, g.got, g.lo, interrupted_sps);
  if (!interrupted_sps.empty()) scan_interrupted_stacks(g, std::move(interrupted_sps));
  stats.scan_us += micros_since(t0);
  // Where calls leave no return address in memory, a clean scan proves nothing.
  if (g.scanned_all() && candidates.empty() && !other_stack_unread && arch::return_addresses_on_stack()) return;
  ++stats.candidates;
  auto t1 = Clock::now();
  current = &g;
  unwind(g, out);
  current = nullptr;
  stats.unwind_us += micros_since(t1);
}

// One stack's words: candidates, and the stack pointers saved by signal frames found on it.
void ConsistencyChecker::State::scan_words(const uint64_t* words, size_t count, uint64_t lo,
                                           std::vector<uint64_t>& interrupted_sps) {
  const size_t step = arch::stack_slot_size() / 8;
  const size_t sp_at = arch::sigframe_sp_offset() / 8;
  for (size_t i = 0; i < count; i += step) {
    uint64_t w = words[i];
    if (function_of_word(w)) candidates.emplace_back(lo + 8 * i, w);
    if (restorers.empty() || std::find(restorers.begin(), restorers.end(), w) == restorers.end()) continue;
    saw_sigframe = true;
    if (i + sp_at < count) interrupted_sps.push_back(words[i + sp_at]);
    else other_stack_unread = true;  // the frame runs past what was read
  }
}

// A handler on an alternate signal stack: the code it interrupted has its frames on the
// other stack. Scan each such stack too (from the saved stack pointer to the end of its
// mapping), so a return address there is seen.
void ConsistencyChecker::State::scan_interrupted_stacks(const Segment& g, std::vector<uint64_t> sps) {
  std::vector<std::pair<uint64_t, uint64_t>> scanned{{g.lo, g.lo + 8 * g.got}};
  for (size_t n = 0; n < sps.size() && n < 16; ++n) {
    uint64_t lo = sps[n] & ~uint64_t(arch::stack_slot_size() - 1);
    if (std::any_of(scanned.begin(), scanned.end(), [&](auto& r) { return lo >= r.first && lo < r.second; }))
      continue;  // on a stack already read (the usual case: no sigaltstack)
    auto m = std::upper_bound(maps.begin(), maps.end(), lo, [](uint64_t a, const Mapping& x) { return a < x.start; });
    if (m == maps.begin() || !(--m)->contains(lo)) {
      other_stack_unread = true;
      continue;
    }
    uint64_t hi = std::min<uint64_t>(m->end, lo + kScanCap);
    if (hi != m->end) other_stack_unread = true;
    other_stack.resize((hi - lo) / 8);
    iovec local{other_stack.data(), hi - lo}, remote_one{reinterpret_cast<void*>(lo), hi - lo};
    ssize_t got = process_vm_readv(pid, &local, 1, &remote_one, 1, 0);
    if (got != static_cast<ssize_t>(hi - lo)) other_stack_unread = true;
    size_t words = got > 0 ? size_t(got) / 8 : 0;
    stats.stack_bytes += words * 8;
    scanned.emplace_back(lo, lo + 8 * words);
    scan_words(other_stack.data(), words, lo, sps);
  }
  if (sps.size() > 16) other_stack_unread = true;
}

// libdw's unwind of one thread (its registers from `threads` or `current`), every frame.
ConsistencyChecker::State::Walk ConsistencyChecker::State::walk(pid_t tid) {
  Walk walk;
  walk.rc = dwfl_getthread_frames(
      dwfl.get(), tid,
      [](Dwfl_Frame* frame, void* arg) {
        auto* w = static_cast<Walk*>(arg);
        Frame f;
        bool activation = false;
        if (!dwfl_frame_pc(frame, &f.pc, &activation)) return int(DWARF_CB_ABORT);
        f.lookup = activation ? f.pc : f.pc - 1;
        Dwarf_Word sp = 0;
        if (dwfl_frame_reg(frame, arch::dwarf_sp_register(), &sp) == 0) f.sp = sp;
        w->frames.push_back(f);
        if (w->frames.size() >= size_t(kMaxFrames)) {
          w->runaway = true;
          return int(DWARF_CB_ABORT);
        }
        return int(DWARF_CB_OK);
      },
      &walk);
  return walk;
}

// After an unwind that stopped early: every live return address of the frames it did not
// reach lies at or above the last known stack pointer; words below it belong to the frames it
// walked, whose return addresses it saw, so those are stale. With a signal frame on the stack
// the frames may live on two stacks (sigaltstack), where "below" proves nothing: 0.
uint64_t ConsistencyChecker::State::reached(const Walk& w) const {
  uint64_t out = 0;
  if (!saw_sigframe)
    for (const Frame& f : w.frames)
      if (f.sp) out = std::max(out, f.sp);
  return out;
}

// The confirmation: a real unwind (libdw, CFI) of one thread the scan could not clear.
void ConsistencyChecker::State::unwind(const Segment& g, std::vector<Blocker>& out) {
  ++stats.unwound;
  const pid_t tid = g.thread->tid;
  Walk walk = this->walk(tid);
  for (size_t i = 0; i < walk.frames.size(); ++i)
    if (const AddressRange* f = find_range(functions, walk.frames[i].lookup)) {
      out.push_back(Blocker{tid, {}, int(i), walk.frames[i].pc, f->name, false});
      return;
    }
  if (walk.whole()) return;  // a whole unwind, none of the functions on it

  // The unwind stopped early: anything above where it got is unproven, and blocks.
  uint64_t reached = this->reached(walk);
  const int frame = int(walk.frames.size());
  for (auto [slot, value] : candidates) {
    if (slot < reached) continue;
    out.push_back(Blocker{tid, {}, frame, value, function_of_word(value)->name, true});
    return;
  }
  if (!g.scanned_all() || other_stack_unread) {
    // Part of the stack was neither scanned nor unwound: any function may be there.
    std::string names;
    for (const auto& f : functions) names += (names.empty() ? "" : " or ") + f.name;
    out.push_back(Blocker{tid, {}, frame, 0, names, true});
  }
}

// One thread for survey(): the same scan, then an unwind of every thread the scan cannot
// clear, keeping every frame inside a function.
ConsistencyChecker::StackView ConsistencyChecker::State::survey_one(const Segment& g) {
  StackView view;
  view.tid = g.thread->tid;
  auto t0 = Clock::now();
  candidates.clear();
  saw_sigframe = other_stack_unread = false;
  std::vector<uint64_t> interrupted_sps;
  scan_words(buffer.get() + g.offset, g.got, g.lo, interrupted_sps);
  if (!interrupted_sps.empty()) scan_interrupted_stacks(g, std::move(interrupted_sps));
  stats.scan_us += micros_since(t0);
  const uint64_t pc = arch::regs__pc(g.thread->regs);
  if (g.scanned_all() && candidates.empty() && !other_stack_unread && arch::return_addresses_on_stack()) {
    if (find_range(functions, pc)) view.frames.push_back(pc);  // only the innermost frame can be
    return view;
  }
  ++stats.candidates;
  ++stats.unwound;
  auto t1 = Clock::now();
  current = &g;
  Walk walk = this->walk(view.tid);
  current = nullptr;
  stats.unwind_us += micros_since(t1);
  for (const Frame& f : walk.frames)
    if (find_range(functions, f.lookup)) view.frames.push_back(f.lookup);
  uint64_t reached = this->reached(walk);
  // Words above the last frame the unwind reached that point into a function, but not at its
  // first byte (a thread's start routine is kept above its outermost frame; a return address
  // never points there): a live return address the unwind missed, or a stale word.
  std::vector<uint64_t> beyond;
  for (auto [slot, value] : candidates)
    if (slot >= reached && !(find_range(functions, value) && find_range(functions, value)->begin == value))
      beyond.push_back(value);
  // libdw can end an unwind as if at the outermost frame when a frame's rule needs a register
  // it does not have (pc_sp_only: rbp below a frame-pointer function): a whole unwind counts
  // only with no such word beyond it. (With a signal frame, "above" proves nothing: trust it.)
  if (walk.whole() && (saw_sigframe || beyond.empty())) return view;
  view.complete = false;
  for (auto [slot, value] : candidates)
    if (slot >= reached) view.unproven.push_back(value);
  view.unread = !g.scanned_all() || other_stack_unread;
  return view;
}

// The start of a pass over stopped threads: fresh stats, the maps read again if a thread is
// new (its stack may be new too).
Result<void> ConsistencyChecker::State::begin_pass(const std::vector<StoppedThread>& list) {
  auto t0 = Clock::now();
  stats = ConsistencyStats{};
  stats.threads = list.size();
  if (!maps_cover(list)) {
    HOTFIX_CHECK(read_maps());
    stats.maps_reread = true;
  }
  stats.maps_us = micros_since(t0);
  return {};
}

// Reads the stacks of `list` in batches (at most kBatchThreads threads and kBatchBytes of
// stacks each) and hands each segment read to `use`. `skip(t)` true leaves thread t out.
template <class Skip, class Use>
void ConsistencyChecker::State::in_batches(const std::vector<StoppedThread>& list, Skip skip, Use use) {
  threads = &list;
  size_t next = 0;
  while (next < list.size()) {
    segments.clear();
    size_t words = 0;
    for (; next < list.size() && segments.size() < kBatchThreads; ++next) {
      if (skip(list[next])) continue;
      Segment g = plan_segment(list[next]);
      if (words + g.wanted > kBatchBytes / 8 && !segments.empty()) break;
      g.offset = words;
      words += g.wanted;
      segments.push_back(g);
    }
    reserve_buffer(words);
    read_segments();
    for (const Segment& g : segments) use(g);
  }
  threads = nullptr;
}

Result<std::vector<ConsistencyChecker::StackView>> ConsistencyChecker::State::survey(const std::vector<StoppedThread>& list) {
  auto t0 = Clock::now();
  HOTFIX_CHECK(begin_pass(list));
  std::vector<StackView> out;
  in_batches(list, [](const StoppedThread&) { return false; }, [&](const Segment& g) { out.push_back(survey_one(g)); });
  stats.total_us = micros_since(t0);
  return out;
}

Result<std::vector<Blocker>> ConsistencyChecker::State::check(const std::vector<StoppedThread>& list) {
  auto t0 = Clock::now();
  HOTFIX_CHECK(begin_pass(list));
  std::vector<Blocker> out;
  // A thread whose pc is inside a function blocks without a stack read.
  auto inside = [&](const StoppedThread& t) {
    uint64_t pc = arch::regs__pc(t.regs);
    const AddressRange* f = find_range(functions, pc);
    if (f) out.push_back(Blocker{t.tid, {}, 0, pc, f->name, false});
    return f != nullptr;
  };
  in_batches(list, inside, [&](const Segment& g) { scan(g, out); });
  stats.total_us = micros_since(t0);
  return out;
}

ConsistencyChecker::ConsistencyChecker(std::unique_ptr<State> s) : s_(std::move(s)) {}
ConsistencyChecker::ConsistencyChecker(ConsistencyChecker&&) noexcept = default;
ConsistencyChecker& ConsistencyChecker::operator=(ConsistencyChecker&&) noexcept = default;
ConsistencyChecker::~ConsistencyChecker() = default;

Result<ConsistencyChecker> ConsistencyChecker::create(pid_t pid, std::vector<AddressRange> functions) {
  HOTFIX_CHECK(process__check_alive(pid));
  auto s = std::make_unique<State>();
  s->pid = pid;
  std::sort(functions.begin(), functions.end(), [](const auto& a, const auto& b) { return a.begin < b.begin; });
  for (const auto& f : functions)
    if (f.begin >= f.end)
      return fail(fmt::format("function {} has an empty address range [{:#x}, {:#x})", f.name, f.begin, f.end),
                  "give the function's whole body (its symbol size)");
  // Aliases and overlapping bodies become one range, named after all of them.
  std::vector<AddressRange> merged;
  for (auto& f : functions) {
    if (!merged.empty() && f.begin < merged.back().end) {
      auto& last = merged.back();
      last.end = std::max(last.end, f.end);
      if (last.name != f.name) last.name += " / " + f.name;
      continue;
    }
    merged.push_back(std::move(f));
  }
  s->functions = std::move(merged);
  if (!s->functions.empty()) {
    s->lowest = s->functions.front().begin;
    s->highest = s->functions.back().end;
  }
  s->mem.reset(open(fmt::format("/proc/{}/mem", pid).c_str(), O_RDONLY | O_CLOEXEC));
  if (!s->mem) return fail(fmt::format("cannot open the memory of process {}: {}", pid, errno_text(errno)),
                           "check that the process still runs and that you are root");
  HOTFIX_CHECK(s->build_dwfl());
  HOTFIX_CHECK(s->read_maps());
  s->find_restorers();
  // Room for typical stacks (a few KiB each) of the threads there are now.
  s->reserve_buffer(std::min(kBatchBytes, std::max<size_t>(s->known_tids.size(), 16) * 16384) / 8);
  return ConsistencyChecker(std::move(s));
}

Result<std::vector<Blocker>> ConsistencyChecker::check(const std::vector<StoppedThread>& threads) {
  return s_->check(threads);
}

Result<void> ConsistencyChecker::refresh() {
  s_->dwfl.reset();
  HOTFIX_CHECK(s_->build_dwfl());
  HOTFIX_CHECK(s_->read_maps());
  s_->find_restorers();
  return {};
}

const ConsistencyStats& ConsistencyChecker::last_stats() const { return s_->stats; }

Result<std::vector<ConsistencyChecker::StackView>> ConsistencyChecker::survey(const std::vector<StoppedThread>& threads) {
  return s_->survey(threads);
}

Result<std::vector<Blocker>> consistency__check_strict(pid_t pid, const std::vector<StoppedThread>& threads,
                                                       const std::vector<AddressRange>& functions) {
  auto checker = HOTFIX_TRY(ConsistencyChecker::create(pid, functions));
  return checker.check(threads);
}

}  // namespace hotfix
