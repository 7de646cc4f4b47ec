// Hostile environments, detected before anything in the target changes: a pid that is no
// patchable process (a thread id, a kernel thread, ourselves), and a target whose sandbox
// would turn the injection into a crash -- a seccomp filter that kills or denies the system
// calls loading a library needs, sealed code (mseal). Memory-deny-write-execute (PR_SET_MDWE)
// does not stop the injection (see target__check_sandbox).
#pragma once
#include <linux/filter.h>
#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "common/error.hpp"

namespace hotfix {

class Tracee;

// `pid` names a live user-space process that is not this one: not a thread id ("TID is a
// thread of process PID; use --pid PID"), not a kernel thread, not a zombie, not us. Reads
// /proc only. Usage errors (pid <= 0, our own pid) have exit code 2.
Result<void> target__check_pid(pid_t pid);

// hotfix's state (journal, pins, the registry's owner pid) is keyed by the HOST's view of a
// process: its pid and start time as the initial pid namespace sees them. Run inside another
// pid namespace, hotfix-ctl would see other pids and could take a live host process's state
// for a dead one's (gc) or write state under a namespaced pid (a container's pid 1). So the
// verbs that read or change that state refuse there.
Result<void> process__check_host_pid_namespace();

// Before stopping it: refuses pid 1 (a crash would take its namespace down), a process
// stopped by job control, one already traced by another tool, and one with a thread that
// stays in uninterruptible sleep (state D: it could not be stopped). Reads /proc only.
Result<void> target__check_holdable(pid_t pid);

// The mappings holding `addresses` are not sealed (mseal: VmFlags "sl" in /proc/PID/smaps).
Result<void> target__check_unsealed(pid_t pid, const std::vector<uint64_t>& addresses,
                                    const std::vector<std::string>& names);

// With the target seized and every thread running: every thread's seccomp filters allow the
// system calls the injection makes (read with PTRACE_SECCOMP_GET_FILTER and evaluated here,
// never by making the call). Stops one filtered thread at a time, briefly; changes nothing.
// `counting`: the patch maps BPF hit counters (the bpf() call is needed too; for a target in
// another mount namespace socketpair() and recvmsg() instead, see process/fdpass.hpp).
Result<void> target__check_sandbox(Tracee& t, bool counting);

// One system call as a seccomp filter sees it (exposed for tests of the evaluator).
struct SeccompCall {
  int nr = 0;
  uint64_t args[6] = {};
  const char* what = "";  // for messages: "mmap(PROT_READ|PROT_EXEC)"
};
// The action of classic-BPF seccomp `filter` for `call` (SECCOMP_RET_* with its data), or
// SECCOMP_RET_KILL_PROCESS for a program that is malformed.
uint32_t seccomp__evaluate(const std::vector<sock_filter>& filter, const SeccompCall& call, uint64_t ip);
// "kills the process" / "fails it with EPERM" ...
std::string seccomp__action_text(uint32_t action);

}  // namespace hotfix
