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
#include <functional>
#include <mutex>
#include <set>

#include "arch/arch.hpp"
#include "common/crashpoint.hpp"
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
  if (cache.syscall_gadget && cache.sigreturn_gadget) return {};
  auto maps = HOTFIX_TRY(process__read_maps(t.pid()));
  // libc first (it has both: every wrapper like getpid ends in `syscall; ret`, and __restore_rt
  // is the restorer of every signal handler glibc installs), then any other text.
  std::stable_sort(maps.begin(), maps.end(), [](const Mapping& a, const Mapping& b) {
    return is_libc(a.path) > is_libc(b.path);
  });
  // In slices, overlapping by a needle's length: both are usually found early, and most of
  // libc's text is then never copied (each patch and watch starts here).
  constexpr uint64_t kSlice = 256u << 10, kOverlap = 32;
  for (auto& m : maps) {
    if (!m.executable() || m.path == "[vsyscall]" || m.end - m.start > (64u << 20)) continue;
    for (uint64_t at = m.start; at < m.end; at += kSlice) {
      uint64_t len = std::min(m.end - at, kSlice + kOverlap);
      auto bytes = t.memory().read(at, len);
      if (!bytes) break;
      auto find = [&](std::span<const uint8_t> needle, uint64_t& slot) {
        if (slot) return;
        if (const void* hit = ::memmem(bytes->data(), bytes->size(), needle.data(), needle.size()))
          slot = at + static_cast<uint64_t>(static_cast<const uint8_t*>(hit) - bytes->data());
      };
      find(arch::syscall_return_gadget(), cache.syscall_gadget);
      find(arch::sigreturn_code(), cache.sigreturn_gadget);
      if (cache.syscall_gadget && cache.sigreturn_gadget) return {};
    }
  }
  return fail(fmt::format("found no {} in the executable memory of process {}",
                          cache.syscall_gadget ? "rt_sigreturn restorer (glibc's __restore_rt)" : "`syscall; ret` sequence",
                          t.pid()),
              "hotfix runs code in a target only through glibc's own code; a target without glibc cannot be patched");
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

bool synchronous_fault(int sig, const siginfo_t& si) {
  bool fault_signal = sig == SIGSEGV || sig == SIGBUS || sig == SIGILL || sig == SIGFPE || sig == SIGTRAP || sig == SIGSYS;
  return fault_signal && si.si_code > 0;  // si_code <= 0: sent by kill/tgkill/sigqueue, not raised by the code
}

bool blockable(int sig) { return sig != SIGKILL && sig != SIGSTOP; }

Result<uint64_t> read_sigmask(pid_t tid) {
  uint64_t mask = 0;
  if (::ptrace(PTRACE_GETSIGMASK, tid, sizeof mask, &mask) == -1)
    return fail(fmt::format("cannot read the signal mask of thread {}: {}", tid, errno_text(errno)));
  return mask;
}

Result<void> write_sigmask(pid_t tid, uint64_t mask) {
  if (::ptrace(PTRACE_SETSIGMASK, tid, sizeof mask, &mask) == -1)
    return fail(fmt::format("cannot set the signal mask of thread {}: {}", tid, errno_text(errno)));
  return {};
}

// ---------------------------------------------------------------- code on a signal frame
//
// Every system call and function call runs on a signal frame (arch::sigframe__build) holding
// the thread's own state, and ends in rt_sigreturn on it:
//   system call:   pc = `syscall; ret` in libc, rsp = frame; the `ret` pops the frame's return
//                  address, __restore_rt, which is rt_sigreturn.
//   function call: pc = fn, rsp = frame; fn returns to a stub page (mov [rsp-8], rax;
//                  rt_sigreturn) that keeps the return value in the frame.
// Every signal is blocked meanwhile (PTRACE_SETSIGMASK; the frame holds the real mask), so what
// arrives stays pending in the kernel rather than being dequeued by us. We follow the code with
// PTRACE_SYSCALL (syscall stops need no tracer), read results at syscall stops, and check that
// rt_sigreturn gave back exactly the saved registers. If hotfix dies anywhere in between, the
// kernel detaches the thread and it runs on into rt_sigreturn by itself.

enum class Code { syscall, call };

struct Job {
  Code code = Code::syscall;
  long nr = 0;                                          // Code::syscall
  std::function<std::vector<uint64_t>(const arch::SelfRestoreFrame&)> args;
  uint64_t fn = 0, stub = 0;                            // Code::call: the function, the stub page
  milliseconds timeout{};
};

// Where the thread is held when something goes wrong: decides how to restore it by hand.
enum class Where { kernel_restarts, syscall_stop };

// Put the thread back by hand (the tracer is alive): registers, FP state and signal mask. At a
// signal or interrupt stop the kernel itself restarts an interrupted syscall on resume; at a
// syscall stop it does not, so the registers are given in restarted form.
Result<void> restore_by_hand(Tracee& t, pid_t tid, Where where, uint64_t mask, const arch::ExtendedRegs& xstate) {
  auto* th = t.find(tid);
  if (!th) return t.check_alive();
  arch::RegsBuffer regs = where == Where::syscall_stop ? arch::regs__resume_by_hand(th->regs) : th->regs;
  auto r1 = arch::regs__write(tid, regs);
  auto r2 = arch::regs__write_extended(tid, xstate);
  auto r3 = write_sigmask(tid, mask);
  if (r1) th->regs_dirty = false;
  crashpoint("remote: restored by hand");
  if (!r1) return r1;
  if (!r2) return r2;
  return r3;
}

// Blocked signals the thread had dequeued before we used it go back to its pending set, so that
// they survive us: the signal of its signal-delivery-stop is re-queued by the kernel (siginfo
// intact) when resumed with it while blocked; signals held in late_signals are re-sent.
int requeue_held_signals(Tracee& t, pid_t tid) {
  auto* th = t.find(tid);
  int resume_with = 0;
  if (th->resume_signal && blockable(th->resume_signal)) {
    resume_with = th->resume_signal;
    th->resume_signal = 0;
    th->resume_info.reset();
  }
  std::vector<int> keep;
  for (int sig : th->late_signals) {
    if (blockable(sig)) ::syscall(SYS_tgkill, t.pid(), tid, sig);
    else keep.push_back(sig);
  }
  th->late_signals = std::move(keep);
  return resume_with;
}

// At a syscall stop: entering (true) or leaving the call.
bool syscall_stop_is_entry(pid_t tid) {
  struct {
    uint8_t op;
    uint8_t pad[87];
  } info{};
  if (::ptrace(PTRACE_GET_SYSCALL_INFO, tid, sizeof info, &info) <= 0) return false;
  return info.op == 1;  // PTRACE_SYSCALL_INFO_ENTRY
}

std::string describe_stop(int status) {
  if (WIFSTOPPED(status)) return fmt::format("stop {:#x}", status >> 8);
  return fmt::format("status {:#x}", status);
}

// After a timeout the thread may still run our code: take it back so it can be restored.
Result<Where> take_back(Tracee& t, pid_t tid) {
  auto* th = t.find(tid);
  if (!th) return std::unexpected(t.check_alive() ? Error{fmt::format("thread {} exited", tid), ""} : t.check_alive().error());
  if (!th->stopped()) {
    if (::ptrace(PTRACE_INTERRUPT, tid, nullptr, nullptr) != 0) return fail(fmt::format("cannot interrupt thread {}", tid));
    int status = HOTFIX_TRY(t.wait_stop(tid, TraceClock::now() + seconds(1)));
    if (WIFSTOPPED(status) && WSTOPSIG(status) == (SIGTRAP | 0x80)) return Where::syscall_stop;
  }
  return Where::kernel_restarts;
}

Result<std::vector<uint8_t>> thread_altstack(Tracee& t, pid_t tid);

Result<uint64_t> run_on_frame(Tracee& t, pid_t tid, const Job& job, std::span<const uint8_t> altstack) {
  auto* th = HOTFIX_TRY(usable_thread(t, tid));
  const StopKind kind = th->stop;
  const arch::RegsBuffer saved = th->regs;
  uint64_t mask = HOTFIX_TRY(read_sigmask(tid));
  auto xstate = HOTFIX_TRY(arch::regs__read_extended(tid));
  auto& cache = t.remote_cache();
  uint64_t ret_to = job.code == Code::syscall ? cache.sigreturn_gadget : job.stub;
  auto frame = HOTFIX_TRY(arch::sigframe__build(saved, mask, xstate, altstack, ret_to));
  HOTFIX_CHECK(t.memory().write(frame.sp, frame.bytes));  // below the red zone: nothing of the thread's
  crashpoint("remote: frame written");

  arch::RegsBuffer regs = saved;
  uint64_t end_pc = 0;  // pc at the entry stop of our rt_sigreturn
  if (job.code == Code::syscall) {
    auto args = job.args(frame);
    arch::regs__prepare_syscall_on_frame(regs, cache.syscall_gadget, job.nr, args, frame.sp);
    end_pc = cache.sigreturn_gadget + arch::sigreturn_code().size();
  } else {
    auto args = job.args(frame);
    HOTFIX_CHECK(arch::regs__prepare_call_on_frame(regs, job.fn, args, frame.sp));
    end_pc = job.stub + arch::encode_call_return_stub().size();
  }
  // Registers first, then the mask: from here on any path of the thread leads to rt_sigreturn,
  // which also restores the mask.
  HOTFIX_CHECK(t.set_regs(tid, regs));
  crashpoint("remote: registers set");
  HOTFIX_CHECK(write_sigmask(tid, ~uint64_t{0}));
  crashpoint("remote: signals blocked");
  int resume_with = requeue_held_signals(t, tid);

  auto fail_restoring = [&](Where where, Error e) -> Result<uint64_t> {
    (void)restore_by_hand(t, tid, where, mask, xstate);
    if (auto* x = t.find(tid)) x->stop = kind;
    return std::unexpected(std::move(e));
  };
  auto deadline = TraceClock::now() + job.timeout;
  int phase = 0;  // system call: 0 before ours, 1 inside it, 2 done
  uint64_t result = 0;
  for (;;) {
    if (auto stepped = t.step(tid, PTRACE_SYSCALL, resume_with); !stepped)
      return fail_restoring(Where::syscall_stop, stepped.error());
    resume_with = 0;
    auto status = t.wait_stop(tid, deadline);
    if (!status) {
      HOTFIX_CHECK(t.check_alive());
      auto where = take_back(t, tid);
      if (!where) return std::unexpected(where.error());
      std::string what = job.code == Code::call
          ? fmt::format("the call to {:#x} in thread {} of process {} did not return within {} ms (or the thread "
                        "exited): the thread was taken back and restored, but the call may have left locks or "
                        "state behind", job.fn, tid, t.pid(), job.timeout.count())
          : fmt::format("system call {} in thread {} of process {} did not finish within {} ms; the thread was "
                        "taken back and restored", job.nr, tid, t.pid(), job.timeout.count());
      return fail_restoring(*where, Error{what, "inspect the target; restart it if it misbehaves"});
    }
    if ((*status >> 16) != 0) continue;  // a clone event of the callee, a stray interrupt: carry on
    int sig = WSTOPSIG(*status);
    arch::RegsBuffer now;
    HOTFIX_CHECK(arch::regs__read(tid, now));
    if (sig != (SIGTRAP | 0x80)) {
      siginfo_t si{};
      ::ptrace(PTRACE_GETSIGINFO, tid, nullptr, &si);
      if (synchronous_fault(sig, si))
        return fail_restoring(Where::kernel_restarts,
                              Error{fmt::format("the {} in thread {} of process {} crashed with {} at pc {:#x} (address {})",
                                                job.code == Code::call ? fmt::format("call to {:#x}", job.fn)
                                                                       : fmt::format("system call {}", job.nr),
                                                tid, t.pid(), signal_name(sig), arch::regs__pc(now), si.si_addr),
                                    "the thread's registers were restored and the signal discarded; the called code is broken"});
      // Only what cannot be blocked gets here (SIGSTOP): held, delivered when the thread resumes.
      t.defer_signal(tid, sig);
      continue;
    }
    bool entry = syscall_stop_is_entry(tid);
    long nr = arch::regs__syscall_nr(now);
    if (job.code == Code::syscall && phase == 0) {
      // Ours: the entry at the gadget (a syscall-exit stop of a call skipped before comes first).
      if (entry && nr == job.nr && arch::regs__pc(now) == cache.syscall_gadget + arch::syscall_instruction().size()) {
        phase = 1;
        crashpoint("remote: at the system call");
      }
      continue;
    }
    if (job.code == Code::syscall && phase == 1) {
      if (entry) continue;
      phase = 2;
      result = static_cast<uint64_t>(arch::regs__syscall_result(now));
      crashpoint("remote: system call done");
      continue;
    }
    if (!entry || nr != arch::sigreturn_syscall_nr() || arch::regs__pc(now) != end_pc) continue;  // the callee's own
    // At the entry of our rt_sigreturn: the result is ours to read, the thread's state still the frame's.
    crashpoint("remote: at rt_sigreturn");
    if (job.code == Code::call) {
      auto slot = t.memory().read(frame.result_slot, 8);
      if (!slot) return fail_restoring(Where::syscall_stop, slot.error());
      std::memcpy(&result, slot->data(), 8);
    }
    if (arch::regs__restart_needs_block(saved)) {
      // rt_sigreturn would reset the kernel's restart block of the interrupted sleep: skip it
      // (orig = -1 at a syscall-entry stop) and restore the thread ourselves.
      HOTFIX_CHECK(restore_by_hand(t, tid, Where::syscall_stop, mask, xstate));
      t.find(tid)->stop = kind;
      return result;
    }
    HOTFIX_CHECK(t.step(tid, PTRACE_SYSCALL));
    auto exit_status = t.wait_stop(tid, deadline);
    if (!exit_status) {
      HOTFIX_CHECK(t.check_alive());
      auto where = take_back(t, tid);
      if (!where) return std::unexpected(where.error());
      return fail_restoring(*where, Error{fmt::format("thread {} did not finish rt_sigreturn", tid), ""});
    }
    crashpoint("remote: rt_sigreturn done");
    HOTFIX_CHECK(arch::regs__read(tid, now));
    auto* back = t.find(tid);
    back->regs_dirty = false;  // rt_sigreturn restored them
    back->stop = kind;
    auto diff = arch::regs__diff(now, frame.resumed);
    uint64_t mask_now = HOTFIX_TRY(read_sigmask(tid));
    if (*exit_status >> 8 != (SIGTRAP | 0x80) || !diff.empty() || mask_now != mask)
      return fail_restoring(Where::syscall_stop,
                            Error{fmt::format("internal error: rt_sigreturn in thread {} of process {} did not restore "
                                              "the thread exactly ({}{}{})", tid, t.pid(), describe_stop(*exit_status),
                                              diff.empty() ? "" : ": " + diff,
                                              mask_now != mask ? fmt::format(", signal mask {:#x}", mask_now) : ""),
                                  "the thread was restored by hand; please report this"});
    return result;
  }
}

// The thread's sigaltstack, which the frame must hold (rt_sigreturn re-installs it): read once
// per stop by a sigaltstack(NULL, &frame.uc_stack) on the frame itself, so the frame is right
// even if we die during this very call.
Result<std::vector<uint8_t>> thread_altstack(Tracee& t, pid_t tid) {
  auto* th = HOTFIX_TRY(usable_thread(t, tid));
  auto& list = t.remote_cache().altstacks;
  auto it = std::find_if(list.begin(), list.end(), [&](auto& a) { return a.tid == tid; });
  if (it != list.end() && it->stop_began == th->stop_began) return it->bytes;
  auto began = th->stop_began;
  uint64_t where = 0;
  Job query{Code::syscall, SYS_sigaltstack,
            [&](const arch::SelfRestoreFrame& f) {
              where = f.altstack_addr;
              return std::vector<uint64_t>{0, f.altstack_addr};
            },
            0, 0, seconds(2)};
  auto none = arch::sigframe__no_altstack();
  long r = static_cast<long>(HOTFIX_TRY(run_on_frame(t, tid, query, none)));
  if (r != 0) return fail(fmt::format("sigaltstack in thread {} of process {} failed: {}", tid, t.pid(), errno_text(static_cast<int>(-r))));
  auto bytes = HOTFIX_TRY(t.memory().read(where, arch::sigframe__altstack_size()));
  if (it == list.end()) {
    list.push_back({tid, began, bytes});
  } else {
    it->stop_began = began;
    it->bytes = bytes;
  }
  return bytes;
}

}  // namespace

// ---------------------------------------------------------------- system calls

Result<long> remote__syscall(Tracee& t, pid_t tid, long nr, std::initializer_list<uint64_t> args, milliseconds timeout) {
  HOTFIX_TRY(usable_thread(t, tid));
  HOTFIX_CHECK(ensure_gadgets(t));
  auto altstack = HOTFIX_TRY(thread_altstack(t, tid));
  std::vector<uint64_t> list(args);
  Job job{Code::syscall, nr, [&](const arch::SelfRestoreFrame&) { return list; }, 0, 0, timeout};
  return static_cast<long>(HOTFIX_TRY(run_on_frame(t, tid, job, altstack)));
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

Result<int> remote__memfd_create(Tracee& t, pid_t tid, const std::string& name, uint64_t size) {
  uint64_t scratch = HOTFIX_TRY(remote__mmap(t, tid, 0, page_size(), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS));
  auto body = [&]() -> Result<int> {
    std::vector<uint8_t> cname(name.begin(), name.end());
    cname.push_back(0);
    HOTFIX_CHECK(t.memory().write(scratch, cname));
    int fd = static_cast<int>(HOTFIX_TRY(checked(remote__syscall(t, tid, SYS_memfd_create, {scratch, MFD_CLOEXEC}), "memfd_create", t.pid())));
    auto sized = checked(remote__syscall(t, tid, SYS_ftruncate, {static_cast<uint64_t>(fd), page_up(size)}), "ftruncate", t.pid());
    if (sized) return fd;
    (void)remote__close(t, tid, fd);
    return std::unexpected(sized.error());
  };
  auto out = body();
  (void)remote__munmap(t, tid, scratch, page_size());
  return out;
}

Result<RemoteMemfd> remote__map_memfd(Tracee& t, pid_t tid, const std::string& name, uint64_t size, int prot) {
  RemoteMemfd out;
  out.size = page_up(size);
  out.fd = HOTFIX_TRY(remote__memfd_create(t, tid, name, size));
  auto addr = remote__mmap(t, tid, 0, out.size, prot, MAP_SHARED, out.fd, 0);
  if (!addr) {
    (void)remote__close(t, tid, out.fd);
    return std::unexpected(addr.error());
  }
  out.address = *addr;
  return out;
}

// ---------------------------------------------------------------- function calls

Result<uint64_t> remote__call(Tracee& t, pid_t tid, uint64_t fn, std::span<const uint64_t> args, milliseconds timeout) {
  HOTFIX_TRY(usable_thread(t, tid));
  HOTFIX_CHECK(ensure_gadgets(t));
  if (args.size() > 6) return fail(fmt::format("a remote call takes at most 6 arguments, not {}", args.size()));
  // The stub the function returns to lives on a page of its own, for this call only (a page
  // left behind if we die meanwhile holds no trap: nothing in it can harm the target).
  auto stub_code = arch::encode_call_return_stub();
  uint64_t stub = HOTFIX_TRY(remote__mmap(t, tid, 0, page_size(), PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS));
  crashpoint("remote: stub page mapped");
  auto result = [&]() -> Result<uint64_t> {
    HOTFIX_CHECK(t.memory().write(stub, stub_code));
    auto altstack = HOTFIX_TRY(thread_altstack(t, tid));
    std::vector<uint64_t> list(args.begin(), args.end());
    Job job{Code::call, 0, [&](const arch::SelfRestoreFrame&) { return list; }, fn, stub, timeout};
    return run_on_frame(t, tid, job, altstack);
  }();
  if (!t.check_alive()) return std::unexpected(t.check_alive().error());
  auto* th = t.find(tid);
  if (th && th->usable_for_remote()) {
    auto unmapped = remote__munmap(t, tid, stub, page_size());
    crashpoint("remote: stub page unmapped");
    if (result && !unmapped) return std::unexpected(unmapped.error());
  }
  return result;
}

}  // namespace hotfix
