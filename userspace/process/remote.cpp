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
using Range = Tracee::RemoteCache::Range;

using namespace remote_util;

std::string signal_name(int sig) {
  const char* abbrev = ::sigabbrev_np(sig);
  return abbrev ? fmt::format("SIG{}", abbrev) : fmt::format("signal {}", sig);
}


// ---------------------------------------------------------------- gadgets

Result<void> ensure_gadgets(Tracee& t) {
  auto& cache = t.remote_cache();
  if (cache.syscall_gadget && cache.trap_gadget) return {};
  auto maps = HOTFIX_TRY(process__read_maps(t.pid()));
  // The vDSO first: always there, small, never unmapped; then libc, then any other text.
  std::stable_sort(maps.begin(), maps.end(), [](const Mapping& a, const Mapping& b) {
    auto rank = [](const Mapping& m) { return m.path == "[vdso]" ? 0 : is_libc(m.path) ? 1 : 2; };
    return rank(a) < rank(b);
  });
  auto sys = arch::syscall_instruction();
  auto trap = arch::trap_instruction();
  for (auto& m : maps) {
    if (!m.executable() || m.path == "[vsyscall]" || m.end - m.start > (64u << 20)) continue;
    auto bytes = t.memory().read(m.start, m.end - m.start);
    if (!bytes) continue;
    auto find = [&](std::span<const uint8_t> needle, uint64_t& slot) {
      if (slot) return;
      auto it = std::search(bytes->begin(), bytes->end(), needle.begin(), needle.end());
      if (it != bytes->end()) slot = m.start + static_cast<uint64_t>(it - bytes->begin());
    };
    find(sys, cache.syscall_gadget);
    find(trap, cache.trap_gadget);
    if (cache.syscall_gadget && cache.trap_gadget) return {};
  }
  return fail(fmt::format("found no {} instruction in the executable memory of process {}",
                          cache.syscall_gadget ? "trap" : "system call", t.pid()),
              "the target has no usable [vdso] or libc text; it cannot be patched");
}

Result<TracedThread*> usable_thread(Tracee& t, pid_t tid) {
  HOTFIX_CHECK(t.check_alive());
  auto* th = t.find(tid);
  if (!th) return fail(fmt::format("thread {} is not a thread of process {} we hold", tid, t.pid()));
  if (!th->usable_for_remote())
    return fail(fmt::format("thread {} of process {} cannot run code now: it is in a {}", tid, t.pid(), stop_kind__name(th->stop)),
                "stop it with Tracee::stop_thread or stop_all, or pick another thread");
  return th;
}

// After a timeout the thread may still run our code: take it back so its registers can be restored.
void take_back(Tracee& t, pid_t tid) {
  auto* th = t.find(tid);
  if (!th || th->stopped()) return;
  if (::ptrace(PTRACE_INTERRUPT, tid, nullptr, nullptr) == 0) (void)t.wait_stop(tid, TraceClock::now() + seconds(1));
}

// While we step one system call, the thread's signals wait: under a storm of queued
// (real-time) signals each step would otherwise meet one more pending signal instead of the
// syscall. PTRACE_SETSIGMASK changes only the mask, not what is pending; put back after.
class SignalsBlocked {
 public:
  explicit SignalsBlocked(pid_t tid) : tid_(tid) {
    uint64_t all = ~0ull;
    blocked_ = ::ptrace(PTRACE_GETSIGMASK, tid, sizeof saved_, &saved_) == 0 &&
               ::ptrace(PTRACE_SETSIGMASK, tid, sizeof all, &all) == 0;
  }
  ~SignalsBlocked() {
    if (blocked_) (void)::ptrace(PTRACE_SETSIGMASK, tid_, sizeof saved_, &saved_);
  }

 private:
  pid_t tid_;
  uint64_t saved_ = 0;
  bool blocked_ = false;
};

Result<long> step_over_syscall(Tracee& t, pid_t tid, uint64_t gadget, TraceClock::time_point deadline) {
  SignalsBlocked quiet(tid);
  uint64_t after = gadget + arch::syscall_instruction().size();
  for (int attempt = 0; attempt < 64; ++attempt) {
    HOTFIX_CHECK(t.step(tid, PTRACE_SINGLESTEP));
    auto status = t.wait_stop(tid, deadline);
    if (!status) {
      take_back(t, tid);
      return std::unexpected(status.error());
    }
    if ((*status >> 16) != 0) continue;  // a stray interrupt or a group stop: step again
    arch::RegsBuffer now;
    HOTFIX_CHECK(arch::regs__read(tid, now));
    int sig = WSTOPSIG(*status);
    if (sig == SIGTRAP && arch::regs__pc(now) == after) return arch::regs__syscall_result(now);
    if (arch::regs__pc(now) == gadget) {
      t.defer_signal(tid, sig);  // a pending signal came first; deliver it when the thread resumes
      continue;
    }
    return fail(fmt::format("single-stepping a system call in thread {} stopped at {:#x} with {} instead of {:#x}", tid,
                            arch::regs__pc(now), signal_name(sig), after));
  }
  return fail(fmt::format("thread {} kept receiving signals instead of running the system call", tid));
}

bool synchronous_fault(int sig, const siginfo_t& si) {
  bool fault_signal = sig == SIGSEGV || sig == SIGBUS || sig == SIGILL || sig == SIGFPE || sig == SIGTRAP || sig == SIGSYS;
  return fault_signal && si.si_code > 0;  // si_code <= 0: sent by kill/tgkill/sigqueue, not raised by the code
}

Result<uint64_t> run_until_trap(Tracee& t, pid_t tid, uint64_t fn, uint64_t trap, TraceClock::time_point deadline,
                                milliseconds timeout) {
  HOTFIX_CHECK(t.step(tid, PTRACE_CONT));
  for (;;) {
    auto status = t.wait_stop(tid, deadline);
    if (!status) {
      HOTFIX_CHECK(t.check_alive());
      take_back(t, tid);
      return fail(fmt::format("the call to {:#x} in thread {} of process {} did not return within {} ms (or the thread "
                              "exited): the thread was taken back and its registers restored, but the call may have "
                              "left locks or state behind",
                              fn, tid, t.pid(), timeout.count()),
                  "inspect the target; restart it if it misbehaves");
    }
    if ((*status >> 16) == 0) {
      int sig = WSTOPSIG(*status);
      siginfo_t si{};
      ::ptrace(PTRACE_GETSIGINFO, tid, nullptr, &si);
      arch::RegsBuffer now;
      HOTFIX_CHECK(arch::regs__read(tid, now));
      if (sig == SIGTRAP && arch::regs__pc(now) == arch::pc_after_trap(trap)) return arch::regs__return_value(now);
      if (synchronous_fault(sig, si))
        return fail(fmt::format("the call to {:#x} in thread {} of process {} crashed with {} at pc {:#x} (address {})", fn,
                                tid, t.pid(), signal_name(sig), arch::regs__pc(now), si.si_addr),
                    "the thread's registers were restored and the signal discarded; the called code is broken");
      t.defer_signal(tid, sig);  // an outside signal: held, delivered when the thread is resumed
    }
    // Other stops (a new thread's clone event, a stray interrupt, a group stop): carry on.
    HOTFIX_CHECK(t.step(tid, PTRACE_CONT));
  }
}

}  // namespace

// ---------------------------------------------------------------- system calls

Result<long> remote__syscall(Tracee& t, pid_t tid, long nr, std::initializer_list<uint64_t> args, milliseconds timeout) {
  auto* th = HOTFIX_TRY(usable_thread(t, tid));
  HOTFIX_CHECK(ensure_gadgets(t));
  uint64_t gadget = t.remote_cache().syscall_gadget;
  arch::RegsBuffer regs = th->regs;
  arch::regs__prepare_syscall(regs, gadget, nr, std::span<const uint64_t>(args.begin(), args.size()));
  HOTFIX_CHECK(t.set_regs(tid, regs));
  auto result = step_over_syscall(t, tid, gadget, TraceClock::now() + timeout);
  auto restored = t.restore_regs(tid);
  if (!result) return result;
  if (!restored) return std::unexpected(restored.error());
  return result;
}

namespace {
Result<long> checked(Result<long> r, const char* what, pid_t pid) {
  if (!r) return r;
  if (*r < 0 && *r > -4096) return fail(fmt::format("{} in process {} failed: {}", what, pid, errno_text(static_cast<int>(-*r))));
  return r;
}
}  // namespace

Result<uint64_t> remote__mmap(Tracee& t, pid_t tid, uint64_t addr, uint64_t len, int prot, int flags, int fd,
                              uint64_t offset) {
  long r = HOTFIX_TRY(checked(remote__syscall(t, tid, SYS_mmap, {addr, len, static_cast<uint64_t>(prot), static_cast<uint64_t>(flags),
                                                                  static_cast<uint64_t>(static_cast<int64_t>(fd)), offset}),
                              "mmap", t.pid()));
  return static_cast<uint64_t>(r);
}

Result<void> remote__munmap(Tracee& t, pid_t tid, uint64_t addr, uint64_t len) {
  HOTFIX_CHECK(checked(remote__syscall(t, tid, SYS_munmap, {addr, len}), "munmap", t.pid()));
  return {};
}

Result<void> remote__mprotect(Tracee& t, pid_t tid, uint64_t addr, uint64_t len, int prot) {
  HOTFIX_CHECK(checked(remote__syscall(t, tid, SYS_mprotect, {addr, len, static_cast<uint64_t>(prot)}), "mprotect", t.pid()));
  return {};
}

Result<void> remote__close(Tracee& t, pid_t tid, int fd) {
  HOTFIX_CHECK(checked(remote__syscall(t, tid, SYS_close, {static_cast<uint64_t>(fd)}), "close", t.pid()));
  return {};
}

Result<uint64_t> remote__mmap_near(Tracee& t, pid_t tid, uint64_t near, uint64_t len, int prot) {
  len = page_up(len);
  auto maps = HOTFIX_TRY(process__read_maps(t.pid()));
  auto reach = static_cast<uint64_t>(arch::near_jump_reach());
  constexpr uint64_t kLowest = 1ull << 20;         // above vm.mmap_min_addr and the null page area
  constexpr uint64_t kHighest = (1ull << 47) - (1ull << 20);  // below the top of user space (4-level tables)
  uint64_t lo = std::max(kLowest, near > reach ? page_up(near - reach) : 0);
  uint64_t hi = std::min(kHighest, page_down(near + reach - len));  // highest start address
  // Candidate start addresses: in each gap, the end closest to `near`.
  std::vector<uint64_t> candidates;
  uint64_t prev_end = 0;
  for (size_t i = 0; i <= maps.size(); ++i) {
    uint64_t gap_begin = prev_end, gap_end = i < maps.size() ? maps[i].start : kHighest;
    if (i < maps.size()) prev_end = std::max(prev_end, maps[i].end);
    uint64_t first = std::max(gap_begin, lo), last = gap_end >= len ? std::min(gap_end - len, hi) : 0;
    if (gap_end < len || first > last) continue;
    candidates.push_back(near <= first ? first : near >= last ? last : page_down(near));
  }
  std::sort(candidates.begin(), candidates.end(), [&](uint64_t a, uint64_t b) {
    auto dist = [&](uint64_t x) { return x > near ? x - near : near - x; };
    return dist(a) < dist(b);
  });
  for (uint64_t addr : candidates) {
    auto got = remote__mmap(t, tid, addr, len, prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE);
    if (!got) continue;  // taken meanwhile (EEXIST): next gap
    if (*got == addr) return addr;
    (void)remote__munmap(t, tid, *got, len);  // a kernel without MAP_FIXED_NOREPLACE put it elsewhere
  }
  return fail(fmt::format("no free {} bytes within reach of {:#x} in process {}", len, near, t.pid()),
              "the address space around the function is full; the patch cannot use a jump island there");
}

Result<RemoteMemfd> remote__map_memfd(Tracee& t, pid_t tid, const std::string& name, uint64_t size, int prot) {
  uint64_t scratch = HOTFIX_TRY(remote__mmap(t, tid, 0, page_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS));
  auto body = [&]() -> Result<RemoteMemfd> {
    std::vector<uint8_t> cname(name.begin(), name.end());
    cname.push_back(0);
    HOTFIX_CHECK(t.memory().write(scratch, cname));
    RemoteMemfd out;
    out.size = page_up(size);
    out.fd = static_cast<int>(HOTFIX_TRY(checked(remote__syscall(t, tid, SYS_memfd_create, {scratch, MFD_CLOEXEC}), "memfd_create", t.pid())));
    auto mapped = checked(remote__syscall(t, tid, SYS_ftruncate, {static_cast<uint64_t>(out.fd), out.size}), "ftruncate", t.pid());
    if (mapped) {
      auto addr = remote__mmap(t, tid, 0, out.size, prot, MAP_SHARED, out.fd, 0);
      if (addr) {
        out.address = *addr;
        return out;
      }
      mapped = std::unexpected(addr.error());
    }
    (void)remote__close(t, tid, out.fd);
    return std::unexpected(mapped.error());
  };
  auto out = body();
  (void)remote__munmap(t, tid, scratch, page_size());
  return out;
}

// ---------------------------------------------------------------- function calls

Result<uint64_t> remote__call(Tracee& t, pid_t tid, uint64_t fn, std::span<const uint64_t> args, milliseconds timeout) {
  auto* th = HOTFIX_TRY(usable_thread(t, tid));
  HOTFIX_CHECK(ensure_gadgets(t));
  uint64_t trap = t.remote_cache().trap_gadget;
  auto fp = HOTFIX_TRY(arch::regs__read_extended(tid));  // the callee may use any vector register
  arch::RegsBuffer regs = th->regs;
  auto frame = arch::regs__prepare_call(regs, fn, args, trap);
  HOTFIX_CHECK(t.memory().write(frame.sp, frame.stack_bytes));
  HOTFIX_CHECK(t.set_regs(tid, regs));
  auto result = run_until_trap(t, tid, fn, trap, TraceClock::now() + timeout, timeout);
  if (!t.check_alive()) return std::unexpected(t.check_alive().error());
  auto restored = t.restore_regs(tid);
  auto fp_restored = arch::regs__write_extended(tid, fp);
  if (!result) return result;
  if (!restored) return std::unexpected(restored.error());
  if (!fp_restored) return std::unexpected(fp_restored.error());
  return result;
}

}  // namespace hotfix
