#include "process/park.hpp"

#include <signal.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <thread>

#include "arch/arch.hpp"
#include "common/crashpoint.hpp"
#include "process/maps.hpp"
#include "process/memory.hpp"
#include "process/remote_util.hpp"

namespace hotfix {

namespace {

using namespace std::chrono;

long ptrace_req(int request, pid_t tid, unsigned long addr = 0, unsigned long data = 0) {
  return ::ptrace(static_cast<__ptrace_request>(request), tid, reinterpret_cast<void*>(addr),
                  reinterpret_cast<void*>(data));
}

// The next stop (or exit) of our tracee `pid`, polling until `timeout`; -1 on timeout/exit.
int wait_stop(pid_t pid, milliseconds timeout) {
  auto deadline = steady_clock::now() + timeout;
  for (;;) {
    int status = 0;
    pid_t r = ::waitpid(pid, &status, __WALL | WNOHANG);
    if (r == pid) return WIFSTOPPED(status) ? status : -1;
    if (r < 0 && errno != EINTR) return -1;
    if (steady_clock::now() >= deadline) return -1;
    std::this_thread::sleep_for(microseconds(200));
  }
}

struct Gadgets {
  uint64_t syscall = 0;    // syscall; ret
  uint64_t sigreturn = 0;  // glibc's __restore_rt
};

// The same two pieces of libc the remote layer runs its code through (process/remote.cpp).
Result<Gadgets> find_gadgets(pid_t pid, const ProcessMemory& mem) {
  Gadgets g;
  auto maps = HOTFIX_TRY(process__read_maps(pid));
  for (auto& m : maps) {
    if (!m.executable() || !remote_util::is_libc(m.path)) continue;
    auto bytes = mem.read(m.start, m.end - m.start);
    if (!bytes) continue;
    auto find = [&](std::span<const uint8_t> needle, uint64_t& slot) {
      auto it = std::search(bytes->begin(), bytes->end(), needle.begin(), needle.end());
      if (!slot && it != bytes->end()) slot = m.start + static_cast<uint64_t>(it - bytes->begin());
    };
    find(arch::syscall_return_gadget(), g.syscall);
    find(arch::sigreturn_code(), g.sigreturn);
  }
  if (!g.syscall || !g.sigreturn)
    return fail(fmt::format("process {} has no glibc `syscall; ret` and __restore_rt mapped", pid),
                "only programs linked with glibc can be parked at their entry point");
  return g;
}

Result<uint64_t> sigmask_of(pid_t tid) {
  uint64_t mask = 0;
  if (::ptrace(PTRACE_GETSIGMASK, tid, sizeof mask, &mask) == -1)
    return fail(fmt::format("cannot read the signal mask of {}: {}", tid, errno_text(errno)));
  return mask;
}

Result<void> set_sigmask(pid_t tid, uint64_t mask) {
  if (::ptrace(PTRACE_SETSIGMASK, tid, sizeof mask, &mask) == -1)
    return fail(fmt::format("cannot set the signal mask of {}: {}", tid, errno_text(errno)));
  return {};
}

bool at_syscall_entry(pid_t tid) {
  struct {
    uint8_t op;
    uint8_t pad[87];
  } info{};
  return ::ptrace(PTRACE_GET_SYSCALL_INFO, tid, sizeof info, &info) > 0 && info.op == 1;
}

// Run the system call the registers are set up for, followed with PTRACE_SYSCALL, until its
// exit stop. Event stops (the SIGCONT notification of a seized tracee) are passed over; every
// blockable signal is blocked meanwhile, so at most SIGKILL interrupts.
Result<void> follow_syscall(pid_t pid, long nr, uint64_t gadget_end) {
  int phase = 0;
  auto deadline = steady_clock::now() + seconds(2);
  while (steady_clock::now() < deadline) {
    if (ptrace_req(PTRACE_SYSCALL, pid) != 0) return fail(fmt::format("cannot resume {}: {}", pid, errno_text(errno)));
    int status = wait_stop(pid, seconds(2));
    if (status < 0) return fail(fmt::format("process {} exited or did not stop while being parked", pid));
    if ((status >> 16) != 0 || WSTOPSIG(status) != (SIGTRAP | 0x80)) continue;
    arch::RegsBuffer now;
    HOTFIX_CHECK(arch::regs__read(pid, now));
    bool entry = at_syscall_entry(pid);
    if (phase == 0 && entry && arch::regs__syscall_nr(now) == nr && arch::regs__pc(now) == gadget_end) phase = 1;
    else if (phase == 1 && !entry) return {};
  }
  return fail(fmt::format("process {} did not finish a system call while being parked", pid));
}

struct Seized {
  pid_t pid;
  bool attached = true;
  ~Seized() {
    if (attached) ptrace_req(PTRACE_DETACH, pid);
  }
};

Result<ParkedProcess> hold_seized(Seized& s, uint64_t lo, uint64_t hi, milliseconds hold) {
  const pid_t pid = s.pid;
  int status = wait_stop(pid, seconds(2));
  if (status < 0) return fail(fmt::format("process {} did not stop at its entry point", pid));
  // Held by us now (group-stop trap or the SIGSTOP's signal-delivery-stop, which we drop):
  // end the job-control stop first, so that nothing after this can leave it stopped.
  ::kill(pid, SIGCONT);
  crashpoint("agent: seized, continued");
  arch::RegsBuffer saved;
  HOTFIX_CHECK(arch::regs__read(pid, saved));
  uint64_t pc = arch::regs__pc(saved);
  if (pc < lo || pc >= hi)
    return fail(fmt::format("process {} is not at its entry point (pc {:#x}, entry {:#x})", pid, pc, lo),
                "it was continued as it was");
  auto mem = HOTFIX_TRY(ProcessMemory::open(pid));
  auto gadgets = HOTFIX_TRY(find_gadgets(pid, mem));
  uint64_t mask = HOTFIX_TRY(sigmask_of(pid));
  auto xstate = HOTFIX_TRY(arch::regs__read_extended(pid));
  auto frame = HOTFIX_TRY(arch::sigframe__build(saved, mask, xstate, arch::sigframe__no_altstack(), gadgets.sigreturn));
  HOTFIX_CHECK(mem.write(frame.sp, frame.bytes));
  const uint64_t gadget_end = gadgets.syscall + arch::syscall_instruction().size();

  // The thread's sigaltstack goes into the frame (rt_sigreturn re-installs what it holds).
  arch::RegsBuffer regs = saved;
  uint64_t query[] = {0, frame.altstack_addr};
  arch::regs__prepare_syscall_on_frame(regs, gadgets.syscall, SYS_sigaltstack, query, frame.sp);
  HOTFIX_CHECK(arch::regs__write(pid, regs));
  HOTFIX_CHECK(set_sigmask(pid, ~uint64_t{0}));
  if (auto done = follow_syscall(pid, SYS_sigaltstack, gadget_end); !done) {
    (void)arch::regs__write(pid, arch::regs__resume_by_hand(saved));
    (void)set_sigmask(pid, mask);
    return std::unexpected(done.error());
  }
  crashpoint("agent: frame ready");

  // The sleep: clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &deadline) with the deadline in
  // the frame's red zone (restarted with the same arguments after any interruption).
  timespec now{};
  ::clock_gettime(CLOCK_MONOTONIC, &now);
  auto until = nanoseconds(now.tv_sec * 1000000000ll + now.tv_nsec) + duration_cast<nanoseconds>(hold);
  timespec ts{static_cast<time_t>(until.count() / 1000000000), static_cast<long>(until.count() % 1000000000)};
  uint64_t ts_addr = frame.sp - sizeof ts;
  regs = saved;
  uint64_t sleep[] = {CLOCK_MONOTONIC, TIMER_ABSTIME, ts_addr, 0};
  arch::regs__prepare_syscall_on_frame(regs, gadgets.syscall, SYS_clock_nanosleep, sleep, frame.sp);
  auto ready = [&]() -> Result<void> {
    HOTFIX_CHECK(mem.write(ts_addr, std::span(reinterpret_cast<const uint8_t*>(&ts), sizeof ts)));
    HOTFIX_CHECK(arch::regs__write(pid, regs));
    return set_sigmask(pid, mask);  // signals act as they would have at the entry point
  }();
  if (!ready) {
    (void)arch::regs__write(pid, arch::regs__resume_by_hand(saved));
    (void)set_sigmask(pid, mask);
    return std::unexpected(ready.error());
  }
  ParkedProcess p;
  p.pid = pid;
  p.resume_pc = pc;
  p.sleep_pc = gadget_end;
  p.frame_sp = frame.sp;
  p.deadline = steady_clock::now() + hold;
  if (ptrace_req(PTRACE_DETACH, pid) != 0) return fail(fmt::format("cannot detach from {}: {}", pid, errno_text(errno)));
  s.attached = false;
  return p;
}

}  // namespace

Result<ParkedProcess> park__hold(pid_t pid, uint64_t entry_lo, uint64_t entry_hi, milliseconds hold) {
  if (ptrace_req(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACESYSGOOD) != 0) {
    int err = errno;
    ::kill(pid, SIGCONT);  // never leave it stopped
    return fail(fmt::format("cannot attach to process {} to park it: {}", pid, errno_text(err)),
                err == EPERM ? "another tracer (gdb, strace) holds it; it was continued unpatched" : "it was continued unpatched");
  }
  Seized s{pid};
  auto parked = hold_seized(s, entry_lo, entry_hi, hold);
  if (!parked) {
    // Whatever failed, the thread goes back as it was and the process runs.
    if (s.attached) ::kill(pid, SIGCONT);
  }
  return parked;
}

Result<bool> park__release(const ParkedProcess& p) {
  if (ptrace_req(PTRACE_SEIZE, p.pid, 0, 0) != 0) {
    if (errno == ESRCH) return false;
    return fail(fmt::format("cannot attach to process {} to release it: {}", p.pid, errno_text(errno)),
                "it resumes by itself when its hold times out");
  }
  Seized s{p.pid};
  if (ptrace_req(PTRACE_INTERRUPT, p.pid) != 0 || wait_stop(p.pid, seconds(2)) < 0) return false;
  arch::RegsBuffer regs;
  HOTFIX_CHECK(arch::regs__read(p.pid, regs));
  // Parked: in the sleep (or just out of it), or -- released right after park__hold detached --
  // still on the gadget's syscall instruction, not yet in it. Either way it goes on as if the
  // sleep had returned -EINTR: the `ret` after it leads to rt_sigreturn on the frame.
  uint64_t pc = arch::regs__pc(regs);
  bool not_yet_in = pc + arch::syscall_instruction().size() == p.sleep_pc;
  if (arch::regs__sp(regs) != p.frame_sp || (pc != p.sleep_pc && !not_yet_in)) return false;  // no longer parked
  arch::regs__set_pc(regs, p.sleep_pc);
  arch::regs__end_syscall(regs, -EINTR);
  HOTFIX_CHECK(arch::regs__write(p.pid, regs));
  return true;
}

uint64_t park__stopped_pc(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/syscall", pid));
  std::string nr, sp, pc;
  if (!(in >> nr >> sp >> pc) || nr != "-1") return 0;
  return std::strtoull(pc.c_str(), nullptr, 16);
}

}  // namespace hotfix
