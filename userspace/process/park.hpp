// Parking a new process at its entry point: a job-control stop turned into an ordinary sleep
// that ends by itself.
//
// The agent's BPF program stops a new process with SIGSTOP at the executable's entry point
// (the dynamic loader is done, none of the program's own code has run). A stopped process
// cannot be patched (patch refuses job-control stops, and a SIGCONT would let it run), and it
// must never stay stopped if the agent dies. So park__hold, in a few ptrace steps, moves the
// process from "stopped" to "asleep in clock_nanosleep(TIMER_ABSTIME, deadline)" on a signal
// frame holding its exact state (the self-restoring frame of the remote layer, docs/design.md
// "Remote execution"), and continues it:
//   1. PTRACE_SEIZE the main thread (it reports its group-stop), then SIGCONT the process:
//      from here on, if the agent dies, the kernel detaches and the process runs -- nothing
//      can leave it stopped any more;
//   2. build the frame below its red zone, query its sigaltstack into the frame (one followed
//      system call), then point it at `syscall; ret` in libc with rsp on the frame and the
//      sleep's arguments (the deadline lies in the frame's red zone, which no later frame or
//      signal delivery touches) and detach.
// The sleep ends at the deadline (the hold timeout) or by park__release, which interrupts it
// and makes it return -EINTR: either way the `ret` reaches glibc's __restore_rt and
// rt_sigreturn puts the thread back exactly at its entry point. While parked the process is an
// ordinary sleeping process: `patch` works on it unchanged (it sees a thread blocked in a
// system call), and a signal acts on it as it would have at its entry point.
#pragma once
#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "common/error.hpp"

namespace hotfix {

struct ParkedProcess {
  pid_t pid = 0;
  uint64_t resume_pc = 0;   // where rt_sigreturn puts it back (its entry point, after the probed instruction)
  uint64_t sleep_pc = 0;    // pc while parked: right after the gadget's syscall instruction
  uint64_t frame_sp = 0;    // rsp while parked
  std::chrono::steady_clock::time_point deadline{};
};

// Park `pid`, which must be job-control stopped (or about to be: a SIGSTOP is pending) with its
// pc in [entry_lo, entry_hi). On failure the process is left continued (never stopped) and
// unchanged, and the error says why.
Result<ParkedProcess> park__hold(pid_t pid, uint64_t entry_lo, uint64_t entry_hi, std::chrono::milliseconds hold);

// End the sleep now (also when the thread has not entered it yet, just after park__hold):
// the process resumes at its entry point. Ok(false) when it was no longer
// parked (the deadline had passed, a signal ended the sleep, or it exited).
Result<bool> park__release(const ParkedProcess& p);

// The pc of a job-control stopped process, from /proc/PID/syscall ("-1 sp pc"); 0 when it is
// not stopped in user space or cannot be read.
uint64_t park__stopped_pc(pid_t pid);

}  // namespace hotfix
