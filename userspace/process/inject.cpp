// Loading and unloading libraries in a traced process with its own dynamic loader, on a thread
// that holds no loader or malloc lock (see remote.hpp).
#include "process/remote.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <gelf.h>
#include <libelf.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <mutex>
#include <set>

#include "arch/arch.hpp"
#include "common/crashpoint.hpp"
#include "common/unique_fd.hpp"
#include "process/maps.hpp"
#include "process/remote_util.hpp"
#include "patch/consistency.hpp"

namespace hotfix {

namespace {

using namespace std::chrono;
using namespace remote_util;
using Range = Tracee::RemoteCache::Range;

// ---------------------------------------------------------------- ELF (.dynsym) of mapped objects

struct DynSymbol {
  std::string name;
  uint64_t value = 0, size = 0;
  bool function = false;
  bool default_version = true;  // not a hidden (compat) version
};
struct ElfExports {
  std::vector<DynSymbol> symbols;
  std::vector<std::pair<uint64_t, uint64_t>> loads;  // PT_LOAD (p_vaddr, p_offset)
};

// The exported symbols of an ELF object, read with libelf (only .dynsym: what dlsym sees).
Result<ElfExports> elf__read_exports(const std::string& file) {
  static std::once_flag once;
  std::call_once(once, [] { elf_version(EV_CURRENT); });
  UniqueFd fd(::open(file.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail(fmt::format("cannot open {}: {}", file, errno_text(errno)));
  Elf* elf = elf_begin(fd.get(), ELF_C_READ, nullptr);
  if (!elf) return fail(fmt::format("{} is not an ELF file: {}", file, elf_errmsg(-1)));
  ElfExports out;
  size_t phnum = 0;
  elf_getphdrnum(elf, &phnum);
  for (size_t i = 0; i < phnum; ++i) {
    GElf_Phdr ph;
    if (gelf_getphdr(elf, static_cast<int>(i), &ph) && ph.p_type == PT_LOAD) out.loads.emplace_back(ph.p_vaddr, ph.p_offset);
  }
  Elf_Scn *symscn = nullptr, *verscn = nullptr;
  GElf_Shdr symhdr{};
  for (Elf_Scn* scn = elf_nextscn(elf, nullptr); scn; scn = elf_nextscn(elf, scn)) {
    GElf_Shdr sh;
    if (!gelf_getshdr(scn, &sh)) continue;
    if (sh.sh_type == SHT_DYNSYM) symscn = scn, symhdr = sh;
    if (sh.sh_type == SHT_GNU_versym) verscn = scn;
  }
  if (symscn && symhdr.sh_entsize) {
    Elf_Data* syms = elf_getdata(symscn, nullptr);
    Elf_Data* vers = verscn ? elf_getdata(verscn, nullptr) : nullptr;
    for (size_t i = 0; syms && i < symhdr.sh_size / symhdr.sh_entsize; ++i) {
      GElf_Sym sym;
      if (!gelf_getsym(syms, static_cast<int>(i), &sym) || sym.st_shndx == SHN_UNDEF) continue;
      const char* name = elf_strptr(elf, symhdr.sh_link, sym.st_name);
      if (!name || !*name) continue;
      DynSymbol s{name, sym.st_value, sym.st_size, GELF_ST_TYPE(sym.st_info) == STT_FUNC ||
                                                       GELF_ST_TYPE(sym.st_info) == STT_GNU_IFUNC, true};
      GElf_Versym v;
      if (vers && gelf_getversym(vers, static_cast<int>(i), &v)) s.default_version = (v & 0x8000) == 0;
      out.symbols.push_back(std::move(s));
    }
  }
  elf_end(elf);
  return out;
}

// Runtime address = st_value + bias, from the lowest mapping of the file and its PT_LOAD.
std::optional<uint64_t> load_bias(const ElfExports& e, const std::vector<Mapping>& maps, const std::string& path) {
  const Mapping* first = nullptr;
  for (auto& m : maps)
    if (m.path == path && (!first || m.start < first->start)) first = &m;
  if (!first) return std::nullopt;
  for (auto [vaddr, offset] : e.loads)
    if (page_down(offset) == first->offset) return first->start - page_down(vaddr);
  return std::nullopt;
}

bool is_dynamic_loader(const std::string& path) {
  auto base = basename_of(path);
  return base.rfind("ld-linux", 0) == 0 || base.rfind("ld-", 0) == 0 || base.rfind("ld.so", 0) == 0;
}
bool is_libdl(const std::string& path) { return basename_of(path).rfind("libdl.so", 0) == 0; }

// libc functions that take a lock dlopen also needs (malloc arenas, the loader's locks, the
// atexit list, the stack cache) or leave the heap mid-update: a thread stopped inside one
// must not be made to run dlopen.
const std::set<std::string>& lock_taking_functions() {
  static const std::set<std::string> names = {
      "malloc", "free", "calloc", "realloc", "reallocarray", "memalign", "posix_memalign", "aligned_alloc",
      "valloc", "pvalloc", "cfree", "malloc_trim", "malloc_usable_size", "mallopt", "malloc_info", "malloc_stats",
      "mallinfo", "mallinfo2", "__libc_malloc", "__libc_free", "__libc_calloc", "__libc_realloc",
      "__libc_memalign", "__libc_valloc", "__libc_pvalloc", "fork", "vfork", "_Fork", "__libc_fork", "dlopen",
      "dlmopen", "dlclose", "dlsym", "dlvsym", "dladdr", "dladdr1", "dlinfo", "dlerror", "dl_iterate_phdr",
      "__libc_dlopen_mode", "__libc_dlsym", "__libc_dlclose", "pthread_create", "pthread_exit", "exit",
      "__cxa_atexit", "__cxa_finalize", "__cxa_thread_atexit_impl", "atexit", "on_exit", "__libc_start_main",
  };
  return names;
}

// Frames of these are below `main` on every main thread's stack (glibc's __libc_start_call_main
// is local, so not in any range): executing one means the process is starting up or ending,
// but having one as a caller says nothing about locks.
bool below_main(const Range& r) { return r.name.rfind("__libc_start_main ", 0) == 0; }

std::string resolve_in_target(pid_t pid, const std::string& path) { return fmt::format("/proc/{}/root{}", pid, path); }

Result<void> ensure_loader_info(Tracee& t) {
  auto& cache = t.remote_cache();
  if (cache.lock_ranges_known) return {};
  auto maps = HOTFIX_TRY(process__read_maps(t.pid()));
  std::vector<Range> ranges;
  std::set<std::string> seen;
  for (auto& m : maps) {
    if (!m.file_backed() || !m.executable()) continue;
    if (is_dynamic_loader(m.path)) ranges.push_back({m.start, m.end, "the dynamic loader (" + basename_of(m.path) + ")"});
    if (!(is_libc(m.path) || is_libdl(m.path)) || !seen.insert(m.path).second) continue;
    auto exports = elf__read_exports(resolve_in_target(t.pid(), m.path));
    if (!exports) continue;
    auto bias = load_bias(*exports, maps, m.path);
    if (!bias) continue;
    for (auto& s : exports->symbols) {
      if (!s.function) continue;
      uint64_t addr = s.value + *bias;
      if (lock_taking_functions().count(s.name) && s.size)
        ranges.push_back({addr, addr + s.size, s.name + " (" + basename_of(m.path) + ")"});
      if (!s.default_version) continue;
      auto take = [&](const char* name, uint64_t& slot) {
        if (s.name == name && (slot == 0 || is_libc(m.path))) slot = addr;
      };
      take("dlopen", cache.dlopen), take("dlerror", cache.dlerror), take("dlclose", cache.dlclose), take("dlsym", cache.dlsym);
    }
  }
  std::sort(ranges.begin(), ranges.end(), [](auto& a, auto& b) { return a.begin < b.begin; });
  cache.lock_ranges = std::move(ranges);
  cache.lock_ranges_known = true;
  return {};
}

const Range* range_containing(const std::vector<Range>& ranges, uint64_t addr) {
  // Sorted by begin and disjoint (ld.so's text and libc's functions never overlap).
  auto it = std::upper_bound(ranges.begin(), ranges.end(), addr, [](uint64_t a, const Range& r) { return a < r.begin; });
  if (it == ranges.begin()) return nullptr;
  --it;
  return addr < it->end ? &*it : nullptr;
}

}  // namespace

// ---------------------------------------------------------------- which thread may run the loader

namespace {

// Decides whether a stopped thread may run dlopen: not if it executes the loader or a
// lock-taking libc function (its pc), nor if one of them is a live caller on its stack. A raw
// scan of the stack clears most threads cheaply; a hit (often a stale word: an nginx worker
// in epoll_wait keeps a `__libc_fork` word from its birth) is confirmed or refuted by a libdw
// unwind (the strict checker's, patch/consistency.hpp), built once per inspector.
class LockInspector {
 public:
  explicit LockInspector(Tracee& t) : t_(t) {}

  // Build the unwinder's view of the process now (milliseconds: every module's ELF and CFI),
  // best while no thread is stopped; why_unsafe builds it on first need otherwise.
  void prepare_unwinder() { (void)get_checker(); }
  bool unwinder_ready() const { return tried_; }
  // why_unsafe had a stack hit to confirm (the unwinder was needed).
  bool needed_unwinder() const { return needed_unwinder_; }
  // Let why_unsafe answer "to be confirmed" instead of building the unwinder itself.
  void defer_build() { defer_build_ = true; }

  Result<std::string> why_unsafe(pid_t tid) {
    HOTFIX_CHECK(ensure_loader_info(t_));
    auto* th = t_.find(tid);
    if (!th || !th->stopped()) return fail(fmt::format("thread {} is not stopped by us", tid));
    auto& ranges = t_.remote_cache().lock_ranges;
    uint64_t pc = arch::regs__pc(th->regs);
    if (auto* r = range_containing(ranges, pc)) return fmt::format("it is executing {} (pc {:#x})", r->name, pc);
    auto hit = HOTFIX_TRY(scan_stack(*th));
    if (!hit) return std::string{};
    needed_unwinder_ = true;
    if (!tried_ && defer_build_) return *hit + " (to be confirmed by the unwinder)";
    auto checker = HOTFIX_TRY(get_checker());
    if (!checker) return *hit + " and no unwinder could check it";
    auto blockers = checker->check({StoppedThread{tid, th->regs}});
    if (!blockers) return fmt::format("{}, and unwinding it failed ({}): assumed held", *hit, blockers.error().what);
    if (blockers->empty()) return std::string{};  // the unwind proves the hit stale
    const Blocker& b = blockers->front();
    if (b.unwind_incomplete)
      return fmt::format("the unwinder (libdw) stopped after {} frame(s), below a word pointing into {} ({:#x}) on its "
                         "stack: without call-frame information it cannot be proven stale, so it counts as held",
                         b.frame, b.function, b.pc);
    return fmt::format("{} is a live caller on its stack (frame #{}, return address {:#x})", b.function, b.frame, b.pc);
  }

 private:
  // The first word of the stack pointing into a lock-taking range other than the frames below
  // main, as "X is on its stack (...)"; nullopt if none (then no unwind is needed).
  Result<std::optional<std::string>> scan_stack(const TracedThread& th) {
    auto& ranges = t_.remote_cache().lock_ranges;
    if (!arch::return_addresses_on_stack()) return std::optional<std::string>("return addresses are not on the stack");
    uint64_t sp = arch::regs__sp(th.regs);
    auto maps = HOTFIX_TRY(process__read_maps(t_.pid()));
    auto stack = std::find_if(maps.begin(), maps.end(), [&](auto& m) { return m.contains(sp); });
    if (stack == maps.end()) return std::optional<std::string>(fmt::format("its stack pointer {:#x} is not in any mapping", sp));
    constexpr uint64_t kMaxScan = 1 << 20;
    size_t slot = arch::stack_slot_size();
    uint64_t from = sp & ~(uint64_t(slot) - 1);
    std::vector<uint8_t> bytes(std::min<uint64_t>(stack->end - from, kMaxScan));
    bytes.resize(t_.memory().read_bulk(from, bytes));
    for (size_t off = 0; off + slot <= bytes.size(); off += slot) {
      uint64_t word = 0;
      std::memcpy(&word, bytes.data() + off, std::min(slot, sizeof word));
      if (auto* r = range_containing(ranges, word); r && !below_main(*r))
        return std::optional<std::string>(
            fmt::format("{} is on its stack (word {:#x} at sp+{:#x})", r->name, word, from + off - sp));
    }
    return std::optional<std::string>();
  }

  // The checker over the lock-taking ranges, minus the frames below main (never counted as
  // callers); nullptr if libdw cannot model the process (then every hit counts).
  Result<ConsistencyChecker*> get_checker() {
    if (tried_) return checker_ ? &*checker_ : nullptr;
    tried_ = true;
    std::vector<AddressRange> functions;
    for (auto& r : t_.remote_cache().lock_ranges)
      if (!below_main(r)) functions.push_back({r.begin, r.end, r.name});
    auto c = ConsistencyChecker::create(t_.pid(), std::move(functions));
    if (!c) return nullptr;
    checker_.emplace(std::move(*c));
    return &*checker_;
  }

  Tracee& t_;
  bool tried_ = false, needed_unwinder_ = false, defer_build_ = false;
  std::optional<ConsistencyChecker> checker_;
};

bool thread_sleeping(pid_t pid, pid_t tid) {
  std::ifstream stat(fmt::format("/proc/{}/task/{}/stat", pid, tid));
  std::string line;
  std::getline(stat, line);
  auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'S';
}

}  // namespace

Result<std::string> remote__lock_frame(Tracee& t, pid_t tid) { return LockInspector(t).why_unsafe(tid); }

Result<pid_t> remote__stop_safe_thread(Tracee& t, milliseconds timeout) {
  HOTFIX_CHECK(ensure_loader_info(t));
  LockInspector inspector(t);
  inspector.defer_build();
  auto deadline = TraceClock::now() + timeout;
  std::string last_reason = "no thread could be stopped";
  do {
    // Threads asleep in a system call first: they are the likeliest to hold no lock.
    std::vector<std::pair<bool, pid_t>> order;
    for (auto& th : t.threads()) order.emplace_back(!thread_sleeping(t.pid(), th.tid), th.tid);
    std::stable_sort(order.begin(), order.end());
    for (auto [busy, tid] : order) {
      (void)busy;
      if (!t.find(tid)) continue;
      auto left = duration_cast<milliseconds>(deadline - TraceClock::now());
      auto stopped = t.stop_thread(tid, std::clamp<milliseconds>(left, milliseconds(50), milliseconds(500)));
      if (!stopped) {
        HOTFIX_CHECK(t.check_alive());
        last_reason = stopped.error().what;
        if (t.find(tid)) HOTFIX_CHECK(t.resume_thread(tid));
        continue;
      }
      auto* th = t.find(tid);
      auto why = th->usable_for_remote() ? inspector.why_unsafe(tid)
                                         : Result<std::string>(fmt::format("it is in a {}", stop_kind__name(th->stop)));
      if (why && why->empty()) return tid;
      if (inspector.needed_unwinder() && !inspector.unwinder_ready()) {
        // A stack hit to confirm: build the unwinder with the thread running again (a
        // single-threaded target would otherwise stand still meanwhile), then look again.
        HOTFIX_CHECK(t.resume_thread(tid));
        inspector.prepare_unwinder();
        if (!t.find(tid)) continue;
        left = duration_cast<milliseconds>(deadline - TraceClock::now());
        if (!t.stop_thread(tid, std::clamp<milliseconds>(left, milliseconds(50), milliseconds(500)))) {
          HOTFIX_CHECK(t.check_alive());
          if (t.find(tid)) HOTFIX_CHECK(t.resume_thread(tid));
          continue;
        }
        th = t.find(tid);
        why = th->usable_for_remote() ? inspector.why_unsafe(tid)
                                      : Result<std::string>(fmt::format("it is in a {}", stop_kind__name(th->stop)));
        if (why && why->empty()) return tid;
      }
      last_reason = fmt::format("thread {}: {}", tid, why ? *why : why.error().what);
      HOTFIX_CHECK(t.resume_thread(tid));
    }
    HOTFIX_CHECK(t.pump(milliseconds(5)));  // let them move on, then look again
  } while (TraceClock::now() < deadline);
  return fail(fmt::format("no thread of process {} ({}) was outside the loader and malloc within {} ms (last: {})", t.pid(),
                          t.comm(), timeout.count(), last_reason),
              "retry when the process is less busy, or raise --timeout");
}

namespace {

Result<void> require_running(Tracee& t) {
  HOTFIX_CHECK(t.check_alive());
  for (auto& th : t.threads())
    if (th.stopped())
      return fail(fmt::format("cannot call the loader of process {} while thread {} is stopped by us: a lock it holds "
                              "could deadlock the call", t.pid(), th.tid),
                  "call Tracee::resume_all() before loading or unloading a library");
  return {};
}

// Runs `body(tid, call_timeout)` on a safe thread with the rest of the process running;
// resumes it after. The whole takes at most choose_timeout + call_timeout.
template <typename T, typename F>
Result<T> with_safe_thread(Tracee& t, const InjectOptions& opts, F body) {
  HOTFIX_CHECK(require_running(t));
  auto began = TraceClock::now();
  pid_t tid = HOTFIX_TRY(remote__stop_safe_thread(t, opts.choose_timeout));
  // The call gets what the choice left of the budget (never less than its own share).
  auto spent = duration_cast<milliseconds>(TraceClock::now() - began);
  auto out = body(tid, std::max(opts.call_timeout, opts.choose_timeout + opts.call_timeout - spent));
  if (!t.check_alive()) return out;  // body explains it
  if (auto resumed = t.resume_thread(tid); !resumed && out) return std::unexpected(resumed.error());
  return out;
}

// A private page in the target holding `text` (NUL-terminated); the caller unmaps it.
Result<uint64_t> remote_string(Tracee& t, pid_t tid, const std::string& text) {
  uint64_t len = page_up(text.size() + 1);
  uint64_t addr = HOTFIX_TRY(remote__mmap(t, tid, 0, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS));
  std::vector<uint8_t> bytes(text.begin(), text.end());
  bytes.push_back(0);
  if (auto w = t.memory().write(addr, bytes); !w) {
    (void)remote__munmap(t, tid, addr, len);
    return std::unexpected(w.error());
  }
  return addr;
}

Result<std::string> remote_dlerror(Tracee& t, pid_t tid, milliseconds timeout) {
  if (!t.remote_cache().dlerror) return std::string("(no dlerror in the target)");
  uint64_t msg = HOTFIX_TRY(remote__call(t, tid, t.remote_cache().dlerror, {}, timeout));
  if (!msg) return std::string("(dlerror gave no message)");
  return t.memory().read_string(msg, 4096);
}

Result<void> require_dl(Tracee& t) {
  HOTFIX_CHECK(ensure_loader_info(t));
  auto& c = t.remote_cache();
  if (!c.dlopen || !c.dlclose || !c.dlsym)
    return fail(fmt::format("process {} ({}) has no dlopen: neither libc.so.6 (glibc >= 2.34) nor libdl.so.2 is loaded",
                            t.pid(), t.comm()),
                "only dynamically linked glibc programs can load a fix library");
  return {};
}

}  // namespace

namespace {

// Default action "terminate (and dump core)": a constructor raising one of these would kill the target.
bool kills_by_default(int sig) {
  return sig == SIGSEGV || sig == SIGBUS || sig == SIGILL || sig == SIGFPE || sig == SIGABRT || sig == SIGSYS ||
         sig == SIGTRAP || sig == SIGTERM || sig == SIGINT || sig == SIGQUIT || sig == SIGHUP || sig == SIGUSR1 ||
         sig == SIGUSR2 || sig == SIGALRM || sig == SIGPIPE;
}

// Does the target handle `sig` itself (SigCgt of /proc/PID/status)?
bool target_catches(pid_t pid, int sig) {
  std::ifstream in(fmt::format("/proc/{}/status", pid));
  for (std::string line; std::getline(in, line);)
    if (line.rfind("SigCgt:", 0) == 0) return (std::stoull(line.substr(7), nullptr, 16) >> (sig - 1)) & 1;
  return false;
}

std::string sig_name(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev ? fmt::format("SIG{}", abbrev) : fmt::format("signal {}", sig);
}

// A signal the thread sent itself during the call (raise, abort: si_pid is the target) that
// would end the target: taken back from the thread's deferred signals, so it is never delivered.
// Signals pending for thread `tid` alone (SigPnd of /proc/PID/task/TID/status).
uint64_t thread_pending(pid_t pid, pid_t tid) {
  std::ifstream in(fmt::format("/proc/{}/task/{}/status", pid, tid));
  for (std::string line; std::getline(in, line);)
    if (line.rfind("SigPnd:", 0) == 0) return std::strtoull(line.c_str() + 7, nullptr, 16);
  return 0;
}

// Remote calls run with every signal blocked (remote.cpp), so a signal the constructor raised
// at its own thread is still pending when dlopen returns: dequeue it with rt_sigtimedwait
// (zero timeout) before the thread's own mask is back and it would be delivered.
int take_pending_fatal(Tracee& t, pid_t tid) {
  uint64_t pending = thread_pending(t.pid(), tid);
  for (int sig = 1; sig < 32; ++sig) {
    if (!(pending & (1ull << (sig - 1))) || !kills_by_default(sig) || target_catches(t.pid(), sig)) continue;
    std::string args(24, '\0');  // sigset (8 bytes), then a zero struct timespec
    uint64_t set = 1ull << (sig - 1);
    std::memcpy(args.data(), &set, sizeof set);
    auto page = remote_string(t, tid, args);
    if (!page) return 0;
    auto got = remote__syscall(t, tid, SYS_rt_sigtimedwait, {*page, 0, *page + 8, 8});
    (void)remote__munmap(t, tid, *page, page_up(args.size() + 1));
    if (got && *got == sig) return sig;
  }
  return 0;
}

int take_self_raised_fatal(Tracee& t, pid_t tid, bool had_signal) {
  auto* th = t.find(tid);
  if (th && !had_signal && !th->resume_signal) return take_pending_fatal(t, tid);
  if (!th || had_signal || !th->resume_signal || !th->resume_info) return 0;
  const siginfo_t& si = *th->resume_info;
  int sig = th->resume_signal;
  if (si.si_code > 0 || si.si_pid != t.pid() || !kills_by_default(sig) || target_catches(t.pid(), sig)) return 0;
  th->resume_signal = 0;
  th->resume_info.reset();
  return sig;
}

// The loader call failed (timeout or crash): the thread was taken back out of dlopen and its
// registers restored; the loader's state it held is abandoned. Say so exactly.
Error abandoned_dlopen(Tracee& t, pid_t tid, const std::string& path, const Error& call, milliseconds elapsed,
                       milliseconds budget) {
  bool blocked = elapsed >= budget;
  std::string happened =
      blocked ? fmt::format("dlopen(\"{}\") in thread {} of process {} ({}) did not return within {} ms: a constructor of "
                            "the library (or of a library it needs) blocks",
                            path, tid, t.pid(), t.comm(), budget.count())
              : fmt::format("dlopen(\"{}\") in thread {} of process {} ({}) failed inside the library's constructors ({})",
                            path, tid, t.pid(), t.comm(), call.what);
  bool alone = t.threads().size() == 1;
  std::string state = fmt::format(
      "the target is still running: thread {} was taken back to where it was and runs on, but the loader lock it took "
      "in dlopen stays held by it and the library stays mapped, half initialised; {}",
      tid,
      alone ? "the process has one thread, which may take the (recursive) lock again, so its own later dlopen and exit "
              "still work, but a thread it creates later blocks in dlopen, dlclose and exit"
            : "its other threads will block in dlopen, dlclose, dl_iterate_phdr (C++ exceptions) and exit");
  return Error{happened + "; " + state,
               "restart the target when you can (SIGKILL if it no longer exits); fix the constructor of the library "
               "(constructors run inside the target's loader lock and must not block, crash or exit), or move that "
               "work out of it",
               1};
}

// The target ended while the library's constructors ran.
Error process_ended_in_dlopen(Tracee& t, pid_t tid, const std::string& path) {
  std::string how = t.check_alive() ? std::string("ended") : t.check_alive().error().what;
  return Error{fmt::format("the target ended while dlopen(\"{}\") ran fix.so's constructors in thread {}: {}", path, tid, how),
               "a constructor of the library (or of a library it needs) called exit() or was killed; restart the "
               "service and remove that from the constructor (constructors run inside the target's loader lock)",
               1};
}

}  // namespace

Result<Injection> remote__inject_library(Tracee& t, const std::string& path, const InjectOptions& opts) {
  if (path.empty() || path[0] != '/') return usage_error(fmt::format("library path '{}' is not absolute", path), "give the full path of the .so");
  // "/proc/self/fd/N" (a memfd delivered into the target) is the target's own /proc/PID/fd/N.
  std::string seen = path.starts_with("/proc/self/") ? fmt::format("/proc/{}{}", t.pid(), path.substr(10))
                                                     : resolve_in_target(t.pid(), path);
  if (!opts.already_loaded && ::access(seen.c_str(), R_OK) != 0)
    return fail(fmt::format("process {} cannot see {}: {}", t.pid(), path, errno_text(errno)),
                "the library must exist at that path inside the target's mount namespace");
  HOTFIX_CHECK(require_dl(t));
  return with_safe_thread<Injection>(t, opts, [&](pid_t tid, milliseconds budget) -> Result<Injection> {
    uint64_t name = HOTFIX_TRY(remote_string(t, tid, path));
    bool had_signal = t.find(tid)->resume_signal != 0;
    auto began = TraceClock::now();
    // Never retried: once dlopen started, the library's constructors may have run.
    crashpoint("inject: before dlopen");
    uint64_t flags = RTLD_NOW | (opts.already_loaded ? RTLD_NOLOAD : 0);
    auto handle = remote__call(t, tid, t.remote_cache().dlopen, std::vector<uint64_t>{name, flags}, budget);
    crashpoint("inject: after dlopen");
    auto elapsed = duration_cast<milliseconds>(TraceClock::now() - began);
    if (!t.check_alive()) return std::unexpected(process_ended_in_dlopen(t, tid, path));
    int raised = take_self_raised_fatal(t, tid, had_signal);
    std::string why;
    if (handle && *handle == 0) why = remote_dlerror(t, tid, opts.call_timeout).value_or("(dlerror failed)");
    if (handle && *handle && raised) {
      // The constructor went on after raise() returned (the signal was held): undo the load.
      crashpoint("inject: before dlclose of a library whose constructor raised a signal");
      auto closed = remote__call(t, tid, t.remote_cache().dlclose, std::vector<uint64_t>{*handle}, budget);
      (void)remote__munmap(t, tid, name, page_up(path.size() + 1));
      return fail(fmt::format("a constructor of {} raised {} in thread {} of process {} ({}) during dlopen: the signal "
                              "was held back (delivered, it would have killed the target) and {}",
                              path, sig_name(raised), tid, t.pid(), t.comm(),
                              closed && *closed == 0 ? "the library was unloaded again; the target runs on"
                                                     : "unloading the library failed: it stays loaded, unused"),
                  "fix the constructor of the library: it must not abort or raise fatal signals");
    }
    (void)remote__munmap(t, tid, name, page_up(path.size() + 1));
    if (!handle) return std::unexpected(abandoned_dlopen(t, tid, path, handle.error(), elapsed, budget));
    if (*handle == 0)
      return fail(fmt::format("dlopen(\"{}\") in process {} ({}) failed: {}", path, t.pid(), t.comm(), why),
                  "check the library's dependencies and symbols (ldd, nm -D) as the target sees them");
    return Injection{*handle, tid};
  });
}

Result<void> remote__dlclose(Tracee& t, uint64_t handle, const InjectOptions& opts) {
  HOTFIX_CHECK(require_dl(t));
  return with_safe_thread<void>(t, opts, [&](pid_t tid, milliseconds budget) -> Result<void> {
    crashpoint("inject: before dlclose");
    uint64_t rc = HOTFIX_TRY(remote__call(t, tid, t.remote_cache().dlclose, std::vector<uint64_t>{handle}, budget));
    if (static_cast<int>(rc) == 0) return {};
    auto why = remote_dlerror(t, tid, opts.call_timeout).value_or("(dlerror failed)");
    return fail(fmt::format("dlclose({:#x}) in process {} failed: {}", handle, t.pid(), why));
  });
}

Result<uint64_t> remote__dlsym(Tracee& t, uint64_t handle, const std::string& symbol, const InjectOptions& opts) {
  HOTFIX_CHECK(require_dl(t));
  return with_safe_thread<uint64_t>(t, opts, [&](pid_t tid, milliseconds budget) -> Result<uint64_t> {
    uint64_t name = HOTFIX_TRY(remote_string(t, tid, symbol));
    auto addr = remote__call(t, tid, t.remote_cache().dlsym, std::vector<uint64_t>{handle, name}, budget);
    (void)remote__munmap(t, tid, name, page_up(symbol.size() + 1));
    return addr;
  });
}

Result<uint64_t> remote__call_safe(Tracee& t, uint64_t fn, std::span<const uint64_t> args, const InjectOptions& opts) {
  return with_safe_thread<uint64_t>(t, opts, [&](pid_t tid, milliseconds budget) -> Result<uint64_t> {
    return remote__call(t, tid, fn, args, budget);
  });
}

}  // namespace hotfix
