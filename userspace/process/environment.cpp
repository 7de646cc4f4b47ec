#include "process/environment.hpp"

#include <sys/stat.h>

#include <fcntl.h>
#include <linux/audit.h>
#include <linux/bpf.h>
#include <linux/seccomp.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <sstream>

#include "process/fdpass.hpp"
#include "process/maps.hpp"
#include "process/ptrace.hpp"
#include "process/remote.hpp"

#ifndef PTRACE_SECCOMP_GET_FILTER
#define PTRACE_SECCOMP_GET_FILTER 0x420c
#endif

namespace hotfix {

namespace {

// A field of /proc/PID/status (or /proc/PID/task/TID/status), or "" when absent.
std::string status_of(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key + ":", 0) != 0) continue;
    auto v = line.substr(key.size() + 1);
    v.erase(0, v.find_first_not_of(" \t"));
    return v;
  }
  return {};
}

long to_long(const std::string& s, long fallback) {
  long v = fallback;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  return ec == std::errc{} ? v : fallback;
}

// Field 9 of /proc/PID/stat (after the parenthesised comm, which may hold anything).
unsigned long stat_flags(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string line;
  std::getline(in, line);
  auto close = line.rfind(')');
  if (close == std::string::npos) return 0;
  std::istringstream fields(line.substr(close + 1));
  std::string f;
  for (int i = 3; fields >> f; ++i)
    if (i == 9) return static_cast<unsigned long>(to_long(f, 0));
  return 0;
}

constexpr unsigned long kPfKthread = 0x00200000;  // PF_KTHREAD (include/linux/sched.h)

// A thread in state D cannot be stopped by ptrace: the stop-the-world would time out after
// the library was loaded. D is often brief (a disk read): look a few times over 100 ms.
Result<void> check_no_stuck_thread(pid_t pid) {
  auto tids = process__list_threads(pid);
  if (!tids) return {};
  for (pid_t tid : *tids) {
    const std::string task = fmt::format("/proc/{}/task/{}/", pid, tid);
    bool stuck = true;
    for (int i = 0; i < 10 && stuck; ++i) {
      if (i) ::usleep(10000);
      stuck = status_of(task + "status", "State").rfind("D", 0) == 0;
    }
    if (!stuck) continue;
    std::ifstream wchan_in(task + "wchan");
    std::string wchan;
    std::getline(wchan_in, wchan);
    return fail(fmt::format("thread {} of process {} ({}) is in uninterruptible sleep (state D{}) and cannot be stopped; "
                            "nothing was changed", tid, pid, process__comm(pid),
                            wchan.empty() || wchan == "0" ? "" : ", in " + wchan),
                "retry once it has left it (a disk or NFS wait, a vfork parent waiting for its child)");
  }
  return {};
}

}  // namespace

Result<void> process__check_host_pid_namespace() {
  constexpr uint64_t kInitialPidNamespace = 0xEFFFFFFCu;  // PROC_PID_INIT_INO: the same on every kernel
  struct stat st {};
  if (::stat("/proc/self/ns/pid", &st) != 0 || st.st_ino == kInitialPidNamespace) return {};
  return fail("hotfix-ctl runs inside a pid namespace: hotfix's state is keyed by the host's pids, which it cannot see "
              "from here, so it could act on another process's state",
              "run hotfix-ctl on the host (e.g. `nsenter -t 1 -p -m hotfix-ctl ...` from a privileged container) and "
              "give the target's host pid (NSpid in /proc/PID/status)");
}

Result<void> target__check_pid(pid_t pid) {
  if (pid <= 0) return usage_error(fmt::format("--pid must be a positive process id, not {}", pid));
  if (pid == ::getpid())
    return usage_error(fmt::format("pid {} is hotfix-ctl itself", pid), "give the pid of the process to work on");
  const std::string status = fmt::format("/proc/{}/status", pid);
  if (::access(status.c_str(), F_OK) != 0) return process__check_alive(pid);  // "no process with pid N"
  // /proc/TID exists for every thread (hidden from listings): a thread id looks like a pid.
  long tgid = to_long(status_of(status, "Tgid"), pid);
  if (tgid != pid)
    return usage_error(fmt::format("{} is a thread of process {}; use --pid {}", pid, tgid, tgid));
  if (stat_flags(pid) & kPfKthread)
    return fail(fmt::format("pid {} is a kernel thread; it has no user code to patch", pid),
                "give the pid of a user-space process (`ps -p PID -o comm`: kernel threads show in [brackets])");
  return process__check_alive(pid);
}

Result<void> target__check_holdable(pid_t pid) {
  if (pid == 1)
    return fail("pid 1 is the init process of its pid namespace: hotfix will not stop or patch it (if it crashed, "
                "everything in the namespace would go down)",
                "restart the service under a supervisor instead");
  auto tracer = to_long(status_of(fmt::format("/proc/{}/status", pid), "TracerPid"), 0);
  if (tracer != 0)
    return fail(fmt::format("process {} ({}) is already traced by pid {} ({})", pid, process__comm(pid), tracer,
                            process__comm(static_cast<pid_t>(tracer))),
                "detach the debugger or tracer first (gdb: `detach`; strace: stop it), then retry");
  auto state = status_of(fmt::format("/proc/{}/status", pid), "State");
  if (!state.empty() && (state[0] == 'T' || state[0] == 't'))
    return fail(fmt::format("process {} ({}) is stopped ({})", pid, process__comm(pid), state),
                fmt::format("continue it first with `kill -CONT {}`", pid));
  return check_no_stuck_thread(pid);
}

// ---------------------------------------------------------------- mseal

Result<void> target__check_unsealed(pid_t pid, const std::vector<uint64_t>& addresses,
                                    const std::vector<std::string>& names) {
  std::ifstream in(fmt::format("/proc/{}/smaps", pid));
  uint64_t start = 0, end = 0;
  for (std::string line; std::getline(in, line);) {
    unsigned long long s, e;
    if (std::sscanf(line.c_str(), "%llx-%llx ", &s, &e) == 2 && line.find(':') > line.find(' ')) {
      start = s, end = e;
      continue;
    }
    if (line.rfind("VmFlags:", 0) != 0) continue;
    std::istringstream flags(line.substr(8));
    bool sealed = false;
    for (std::string f; flags >> f;) sealed |= f == "sl";
    if (!sealed) continue;
    for (size_t i = 0; i < addresses.size(); ++i)
      if (addresses[i] >= start && addresses[i] < end)
        return fail(fmt::format("cannot patch {}: its code at {:#x} is in a sealed mapping (mseal) of process {}; "
                                "nothing was changed", i < names.size() ? names[i] : "?", addresses[i], pid),
                    "sealed code cannot be patched in place; restart the service with the fix");
  }
  return {};
}

// ---------------------------------------------------------------- seccomp

namespace {

#if defined(__x86_64__)
constexpr uint32_t kAuditArch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
constexpr uint32_t kAuditArch = AUDIT_ARCH_AARCH64;
#endif

// The calls hotfix and the target's dynamic loader make while loading fix.so, with the
// arguments they use (filters commonly look at mmap/mprotect protections).
std::vector<SeccompCall> injection_calls(bool counting, bool counters_by_fd) {
  const uint64_t rx = PROT_READ | PROT_EXEC, rw = PROT_READ | PROT_WRITE;
  const uint64_t anon = MAP_PRIVATE | MAP_ANONYMOUS;
  std::vector<SeccompCall> calls = {
      {SYS_mmap, {0, 4096, rx, anon | MAP_FIXED_NOREPLACE, static_cast<uint64_t>(-1), 0}, "mmap(PROT_READ|PROT_EXEC) of an island"},
      {SYS_mmap, {0, 4096, rw, anon, static_cast<uint64_t>(-1), 0}, "mmap(PROT_READ|PROT_WRITE)"},
      {SYS_mmap, {0, 4096, rw, MAP_SHARED, 3, 0}, "mmap(MAP_SHARED) of a memfd"},
      {SYS_mmap, {0, 4096, PROT_READ, MAP_PRIVATE | MAP_DENYWRITE, 3, 0}, "mmap(PROT_READ) of fix.so"},
      {SYS_mmap, {0x10000, 4096, rx, MAP_PRIVATE | MAP_FIXED | MAP_DENYWRITE, 3, 0}, "mmap(PROT_READ|PROT_EXEC) of fix.so's code"},
      {SYS_mmap, {0x10000, 4096, rw, MAP_PRIVATE | MAP_FIXED | MAP_DENYWRITE, 3, 0}, "mmap(PROT_READ|PROT_WRITE) of fix.so's data"},
      {SYS_mprotect, {0x10000, 4096, PROT_READ}, "mprotect(PROT_READ)"},
      {SYS_mprotect, {0x10000, 4096, PROT_NONE}, "mprotect(PROT_NONE)"},
      {SYS_munmap, {0x10000, 4096}, "munmap"},
      {SYS_memfd_create, {0x10000, MFD_CLOEXEC}, "memfd_create"},
      {SYS_ftruncate, {3, 4096}, "ftruncate"},
      {SYS_openat, {static_cast<uint64_t>(AT_FDCWD), 0x10000, O_RDONLY | O_CLOEXEC}, "openat(O_RDONLY)"},
      {SYS_read, {3, 0x10000, 832}, "read"},
      {SYS_pread64, {3, 0x10000, 784, 64}, "pread64"},
      {SYS_newfstatat, {3, 0x10000, 0x10000, AT_EMPTY_PATH}, "newfstatat"},
      {SYS_close, {3}, "close"},
      {SYS_sigaltstack, {0, 0x10000}, "sigaltstack (remote code reads the thread's alternate stack)"},
      {SYS_rt_sigreturn, {}, "rt_sigreturn (how all remote code ends)"},
  };
  if (counting && counters_by_fd) {  // another mount namespace: the counters come over a socketpair
    calls.push_back({SYS_socketpair, {AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, 0x10000}, "socketpair(AF_UNIX) for the hit counters' fd"});
    calls.push_back({SYS_recvmsg, {3, 0x10000, MSG_DONTWAIT | MSG_CMSG_CLOEXEC}, "recvmsg of the hit counters' fd"});
  } else if (counting) {
    calls.push_back({SYS_bpf, {BPF_OBJ_GET, 0x10000, 16}, "bpf(BPF_OBJ_GET) of the hit counters"});
  }
  return calls;
}

struct SeccompData {  // struct seccomp_data, as filters load it
  int32_t nr;
  uint32_t arch;
  uint64_t ip;
  uint64_t args[6];
};

bool load_word(const SeccompData& d, uint32_t off, uint32_t& out) {
  if (off % 4 || off + 4 > sizeof d) return false;
  std::memcpy(&out, reinterpret_cast<const char*>(&d) + off, 4);
  return true;
}

// Lower is more severe (SECCOMP_RET_ACTION_FULL ordering used by the kernel).
int severity(uint32_t action) {
  switch (action & SECCOMP_RET_ACTION_FULL) {
    case SECCOMP_RET_KILL_PROCESS: return 0;
    case SECCOMP_RET_KILL_THREAD: return 1;
    case SECCOMP_RET_TRAP: return 2;
    case SECCOMP_RET_ERRNO: return 3;
    case SECCOMP_RET_USER_NOTIF: return 4;
    case SECCOMP_RET_TRACE: return 5;
    case SECCOMP_RET_LOG: return 6;
    case SECCOMP_RET_ALLOW: return 7;
  }
  return 0;  // unknown actions kill (the kernel treats them as KILL_PROCESS)
}

bool allowed(uint32_t action) { return severity(action) >= 6; }

// Read every filter of stopped thread `tid`, most recent first.
Result<std::vector<std::vector<sock_filter>>> read_filters(pid_t tid) {
  std::vector<std::vector<sock_filter>> out;
  for (unsigned long i = 0;; ++i) {
    long n = ::ptrace(static_cast<__ptrace_request>(PTRACE_SECCOMP_GET_FILTER), tid, reinterpret_cast<void*>(i), nullptr);
    if (n < 0 && errno == ENOENT) break;
    if (n <= 0 || n > BPF_MAXINSNS)
      return fail(fmt::format("thread {} runs under seccomp filters that hotfix cannot read (PTRACE_SECCOMP_GET_FILTER: {}); "
                              "nothing was changed", tid, errno_text(errno)),
                  "a filter could kill the process on the calls the injection makes; run hotfix-ctl as root "
                  "outside any seccomp sandbox");
    std::vector<sock_filter> prog(static_cast<size_t>(n));
    if (::ptrace(static_cast<__ptrace_request>(PTRACE_SECCOMP_GET_FILTER), tid, reinterpret_cast<void*>(i), prog.data()) != n)
      return fail(fmt::format("cannot read seccomp filter {} of thread {}: {}", i, tid, errno_text(errno)));
    out.push_back(std::move(prog));
  }
  return out;
}

Result<void> check_thread_seccomp(Tracee& t, pid_t tid, const std::vector<SeccompCall>& calls) {
  auto status = fmt::format("/proc/{}/task/{}/status", t.pid(), tid);
  long mode = to_long(status_of(status, "Seccomp"), 0);
  if (mode == 0) return {};
  if (mode == 1)
    return fail(fmt::format("process {} ({}) runs in strict seccomp mode (thread {}): only read, write and exit are "
                            "allowed, loading fix.so would kill it; nothing was changed", t.pid(), t.comm(), tid),
                "it cannot be patched; restart it with the fix");
  HOTFIX_CHECK(t.stop_thread(tid));
  auto filters = read_filters(tid);
  HOTFIX_CHECK(t.resume_thread(tid));
  if (!filters) return std::unexpected(filters.error());
  for (auto& call : calls) {
    uint32_t worst = SECCOMP_RET_ALLOW;
    for (auto& f : *filters) {
      uint32_t a = seccomp__evaluate(f, call, 0);
      if (severity(a) < severity(worst)) worst = a;
    }
    if (!allowed(worst))
      return fail(fmt::format("process {} ({}) runs under a seccomp filter that {} on {} (thread {}), which loading "
                              "fix.so needs; nothing was changed", t.pid(), t.comm(), seccomp__action_text(worst), call.what, tid),
                  "hotfix does not bypass a sandbox; relax the filter (or restart the service with the fix)");
  }
  return {};
}

}  // namespace

uint32_t seccomp__evaluate(const std::vector<sock_filter>& prog, const SeccompCall& call, uint64_t ip) {
  SeccompData d{};
  d.nr = call.nr, d.arch = kAuditArch, d.ip = ip;
  std::copy(std::begin(call.args), std::end(call.args), d.args);
  uint32_t A = 0, X = 0, mem[BPF_MEMWORDS] = {};
  for (size_t pc = 0; pc < prog.size(); ++pc) {
    const sock_filter& in = prog[pc];
    const uint32_t k = in.k;
    auto jump = [&](bool cond) { pc += cond ? in.jt : in.jf; };
    switch (in.code) {
      case BPF_LD | BPF_W | BPF_ABS: if (!load_word(d, k, A)) return SECCOMP_RET_KILL_PROCESS; break;
      case BPF_LD | BPF_W | BPF_LEN: A = sizeof d; break;
      case BPF_LDX | BPF_W | BPF_LEN: X = sizeof d; break;
      case BPF_LD | BPF_IMM: A = k; break;
      case BPF_LDX | BPF_IMM: X = k; break;
      case BPF_LD | BPF_MEM: if (k >= BPF_MEMWORDS) return SECCOMP_RET_KILL_PROCESS; A = mem[k]; break;
      case BPF_LDX | BPF_MEM: if (k >= BPF_MEMWORDS) return SECCOMP_RET_KILL_PROCESS; X = mem[k]; break;
      case BPF_ST: if (k >= BPF_MEMWORDS) return SECCOMP_RET_KILL_PROCESS; mem[k] = A; break;
      case BPF_STX: if (k >= BPF_MEMWORDS) return SECCOMP_RET_KILL_PROCESS; mem[k] = X; break;
      case BPF_ALU | BPF_ADD | BPF_K: A += k; break;
      case BPF_ALU | BPF_ADD | BPF_X: A += X; break;
      case BPF_ALU | BPF_SUB | BPF_K: A -= k; break;
      case BPF_ALU | BPF_SUB | BPF_X: A -= X; break;
      case BPF_ALU | BPF_MUL | BPF_K: A *= k; break;
      case BPF_ALU | BPF_MUL | BPF_X: A *= X; break;
      case BPF_ALU | BPF_DIV | BPF_K: if (!k) return SECCOMP_RET_KILL_PROCESS; A /= k; break;
      case BPF_ALU | BPF_DIV | BPF_X: if (!X) return SECCOMP_RET_KILL_PROCESS; A /= X; break;
      case BPF_ALU | BPF_MOD | BPF_K: if (!k) return SECCOMP_RET_KILL_PROCESS; A %= k; break;
      case BPF_ALU | BPF_MOD | BPF_X: if (!X) return SECCOMP_RET_KILL_PROCESS; A %= X; break;
      case BPF_ALU | BPF_AND | BPF_K: A &= k; break;
      case BPF_ALU | BPF_AND | BPF_X: A &= X; break;
      case BPF_ALU | BPF_OR | BPF_K: A |= k; break;
      case BPF_ALU | BPF_OR | BPF_X: A |= X; break;
      case BPF_ALU | BPF_XOR | BPF_K: A ^= k; break;
      case BPF_ALU | BPF_XOR | BPF_X: A ^= X; break;
      case BPF_ALU | BPF_LSH | BPF_K: A = k < 32 ? A << k : 0; break;
      case BPF_ALU | BPF_LSH | BPF_X: A = X < 32 ? A << X : 0; break;
      case BPF_ALU | BPF_RSH | BPF_K: A = k < 32 ? A >> k : 0; break;
      case BPF_ALU | BPF_RSH | BPF_X: A = X < 32 ? A >> X : 0; break;
      case BPF_ALU | BPF_NEG: A = -A; break;
      case BPF_JMP | BPF_JA: pc += k; break;
      case BPF_JMP | BPF_JEQ | BPF_K: jump(A == k); break;
      case BPF_JMP | BPF_JEQ | BPF_X: jump(A == X); break;
      case BPF_JMP | BPF_JGT | BPF_K: jump(A > k); break;
      case BPF_JMP | BPF_JGT | BPF_X: jump(A > X); break;
      case BPF_JMP | BPF_JGE | BPF_K: jump(A >= k); break;
      case BPF_JMP | BPF_JGE | BPF_X: jump(A >= X); break;
      case BPF_JMP | BPF_JSET | BPF_K: jump(A & k); break;
      case BPF_JMP | BPF_JSET | BPF_X: jump(A & X); break;
      case BPF_RET | BPF_K: return k;
      case BPF_RET | BPF_A: return A;
      case BPF_MISC | BPF_TAX: X = A; break;
      case BPF_MISC | BPF_TXA: A = X; break;
      default: return SECCOMP_RET_KILL_PROCESS;  // the kernel would have refused it: be safe
    }
  }
  return SECCOMP_RET_KILL_PROCESS;  // fell off the end (impossible for a loaded filter)
}

std::string seccomp__action_text(uint32_t action) {
  switch (action & SECCOMP_RET_ACTION_FULL) {
    case SECCOMP_RET_KILL_PROCESS: return "kills the process (SECCOMP_RET_KILL_PROCESS)";
    case SECCOMP_RET_KILL_THREAD: return "kills the thread (SECCOMP_RET_KILL_THREAD)";
    case SECCOMP_RET_TRAP: return "sends SIGSYS (SECCOMP_RET_TRAP)";
    case SECCOMP_RET_ERRNO: {
      const char* name = ::strerrorname_np(static_cast<int>(action & SECCOMP_RET_DATA));
      return fmt::format("fails it with {} (SECCOMP_RET_ERRNO)", name ? name : "an error");
    }
    case SECCOMP_RET_USER_NOTIF: return "defers to a supervisor (SECCOMP_RET_USER_NOTIF)";
    case SECCOMP_RET_TRACE: return "fails with ENOSYS (SECCOMP_RET_TRACE, no seccomp tracer)";
  }
  return fmt::format("answers {:#x}", action);
}

Result<void> target__check_sandbox(Tracee& t, bool counting) {
  // "/sys/fs/bpf": kBpffsMount of observe/patchcount.hpp, where the counters are pinned.
  auto calls = injection_calls(counting, fdpass__target_lacks_bpffs(t.pid(), "/sys/fs/bpf"));
  std::vector<pid_t> tids;
  for (auto& th : t.threads()) tids.push_back(th.tid);
  for (pid_t tid : tids) HOTFIX_CHECK(check_thread_seccomp(t, tid, calls));
  // Memory-deny-write-execute (PR_SET_MDWE) needs no check: it refuses W+X mappings and
  // making an existing mapping executable, and the injection does neither (fix.so's code and
  // the islands are mapped PROT_READ|PROT_EXEC from the start, and written through
  // /proc/PID/mem). Measured, and tested by test_hostile "[mdwe]".
  return {};
}

}  // namespace hotfix
