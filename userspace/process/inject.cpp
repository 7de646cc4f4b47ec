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
#include "common/unique_fd.hpp"
#include "process/maps.hpp"
#include "process/remote_util.hpp"

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

// ---------------------------------------------------------------- loader calls

Result<std::string> remote__lock_frame(Tracee& t, pid_t tid) {
  HOTFIX_CHECK(ensure_loader_info(t));
  auto* th = t.find(tid);
  if (!th || !th->stopped()) return fail(fmt::format("thread {} is not stopped by us", tid));
  auto& ranges = t.remote_cache().lock_ranges;
  uint64_t pc = arch::regs__pc(th->regs);
  if (auto* r = range_containing(ranges, pc)) return fmt::format("it is executing {} (pc {:#x})", r->name, pc);
  if (!arch::return_addresses_on_stack()) return std::string{};  // nothing more a scan can prove
  uint64_t sp = arch::regs__sp(th->regs);
  auto maps = HOTFIX_TRY(process__read_maps(t.pid()));
  auto stack = std::find_if(maps.begin(), maps.end(), [&](auto& m) { return m.contains(sp); });
  if (stack == maps.end()) return fmt::format("its stack pointer {:#x} is not in any mapping", sp);
  constexpr uint64_t kMaxScan = 1 << 20;
  size_t slot = arch::stack_slot_size();
  uint64_t from = sp & ~(uint64_t(slot) - 1);
  std::vector<uint8_t> bytes(std::min<uint64_t>(stack->end - from, kMaxScan));
  bytes.resize(t.memory().read_bulk(from, bytes));
  for (size_t off = 0; off + slot <= bytes.size(); off += slot) {
    uint64_t word = 0;
    std::memcpy(&word, bytes.data() + off, std::min(slot, sizeof word));
    if (auto* r = range_containing(ranges, word))
      return fmt::format("{} is on its stack (return address {:#x} at sp+{:#x})", r->name, word, from + off - sp);
  }
  return std::string{};
}

Result<pid_t> remote__stop_safe_thread(Tracee& t, milliseconds timeout) {
  HOTFIX_CHECK(ensure_loader_info(t));
  auto deadline = TraceClock::now() + timeout;
  std::string last_reason = "no thread could be stopped";
  while (TraceClock::now() < deadline) {
    // Threads asleep in a system call first: they are the likeliest to hold no lock.
    std::vector<std::pair<bool, pid_t>> order;
    for (auto& th : t.threads()) {
      std::ifstream stat(fmt::format("/proc/{}/task/{}/stat", t.pid(), th.tid));
      std::string line;
      std::getline(stat, line);
      auto close = line.rfind(')');
      bool sleeping = close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'S';
      order.emplace_back(!sleeping, th.tid);
    }
    std::stable_sort(order.begin(), order.end());
    for (auto [busy, tid] : order) {
      (void)busy;
      if (!t.find(tid)) continue;
      auto stopped = t.stop_thread(tid, std::min<milliseconds>(timeout, milliseconds(500)));
      if (!stopped) {
        HOTFIX_CHECK(t.check_alive());
        last_reason = stopped.error().what;
        if (t.find(tid)) HOTFIX_CHECK(t.resume_thread(tid));
        continue;
      }
      auto* th = t.find(tid);
      auto why = th->usable_for_remote() ? remote__lock_frame(t, tid)
                                         : Result<std::string>(fmt::format("it is in a {}", stop_kind__name(th->stop)));
      if (why && why->empty()) return tid;
      last_reason = fmt::format("thread {}: {}", tid, why ? *why : why.error().what);
      HOTFIX_CHECK(t.resume_thread(tid));
    }
    HOTFIX_CHECK(t.pump(milliseconds(5)));  // let them move on, then look again
  }
  return fail(fmt::format("no thread of process {} ({}) was outside the loader and malloc within {} ms (last: {})", t.pid(),
                          t.comm(), timeout.count(), last_reason),
              "retry when the process is less busy, or raise the timeout");
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

// Runs `body(tid)` on a safe thread with the rest of the process running; resumes it after.
template <typename T, typename F>
Result<T> with_safe_thread(Tracee& t, const InjectOptions& opts, F body) {
  HOTFIX_CHECK(require_running(t));
  pid_t tid = HOTFIX_TRY(remote__stop_safe_thread(t, opts.choose_timeout));
  auto out = body(tid);
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

Result<Injection> remote__inject_library(Tracee& t, const std::string& path, const InjectOptions& opts) {
  if (path.empty() || path[0] != '/') return usage_error(fmt::format("library path '{}' is not absolute", path), "give the full path of the .so");
  // "/proc/self/fd/N" (a memfd delivered into the target) is the target's own /proc/PID/fd/N.
  std::string seen = path.starts_with("/proc/self/") ? fmt::format("/proc/{}{}", t.pid(), path.substr(10))
                                                     : resolve_in_target(t.pid(), path);
  if (::access(seen.c_str(), R_OK) != 0)
    return fail(fmt::format("process {} cannot see {}: {}", t.pid(), path, errno_text(errno)),
                "the library must exist at that path inside the target's mount namespace");
  HOTFIX_CHECK(require_dl(t));
  return with_safe_thread<Injection>(t, opts, [&](pid_t tid) -> Result<Injection> {
    uint64_t name = HOTFIX_TRY(remote_string(t, tid, path));
    // Never retried: once dlopen started, the library's constructors may have run.
    auto handle = remote__call(t, tid, t.remote_cache().dlopen, std::vector<uint64_t>{name, RTLD_NOW}, opts.call_timeout);
    std::string why;
    if (handle && *handle == 0) why = remote_dlerror(t, tid, opts.call_timeout).value_or("(dlerror failed)");
    (void)remote__munmap(t, tid, name, page_up(path.size() + 1));
    if (!handle) return std::unexpected(handle.error());
    if (*handle == 0)
      return fail(fmt::format("dlopen(\"{}\") in process {} ({}) failed: {}", path, t.pid(), t.comm(), why),
                  "check the library's dependencies and symbols (ldd, nm -D) as the target sees them");
    return Injection{*handle, tid};
  });
}

Result<void> remote__dlclose(Tracee& t, uint64_t handle, const InjectOptions& opts) {
  HOTFIX_CHECK(require_dl(t));
  return with_safe_thread<void>(t, opts, [&](pid_t tid) -> Result<void> {
    uint64_t rc = HOTFIX_TRY(remote__call(t, tid, t.remote_cache().dlclose, std::vector<uint64_t>{handle}, opts.call_timeout));
    if (static_cast<int>(rc) == 0) return {};
    auto why = remote_dlerror(t, tid, opts.call_timeout).value_or("(dlerror failed)");
    return fail(fmt::format("dlclose({:#x}) in process {} failed: {}", handle, t.pid(), why));
  });
}

Result<uint64_t> remote__dlsym(Tracee& t, uint64_t handle, const std::string& symbol, const InjectOptions& opts) {
  HOTFIX_CHECK(require_dl(t));
  return with_safe_thread<uint64_t>(t, opts, [&](pid_t tid) -> Result<uint64_t> {
    uint64_t name = HOTFIX_TRY(remote_string(t, tid, symbol));
    auto addr = remote__call(t, tid, t.remote_cache().dlsym, std::vector<uint64_t>{handle, name}, opts.call_timeout);
    (void)remote__munmap(t, tid, name, page_up(symbol.size() + 1));
    return addr;
  });
}

}  // namespace hotfix
