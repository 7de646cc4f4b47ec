// Strict consistency check inside the stop window: time per check, per thread, for threads
// the stack scan clears (the common case) and for threads it must unwind with libdw.
//   bench_consistency [threads...]      (default: 16 100 1000)
// Each run starts tests/fixtures/cons_threads with N extra threads parked in pool_fn, stops
// every thread with ptrace, and checks {unused_fn} (all clear) and {pool_fn} (all unwound).
#include <fcntl.h>
#include <signal.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <elfutils/libdwfl.h>
#include <fmt/format.h>

#include "patch/consistency.hpp"
#include "process/maps.hpp"

using namespace hotfix;

namespace {

struct Target {
  pid_t pid = -1;
  int to = -1;
  std::map<std::string, uint64_t> fn;
  ~Target() {
    if (pid > 0) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
    if (to >= 0) close(to);
  }
};

bool start(Target& t, int pool) {
  int in[2], out[2];
  if (pipe2(in, O_CLOEXEC) || pipe2(out, O_CLOEXEC)) return false;
  t.pid = fork();
  if (t.pid == 0) {
    dup2(in[0], 0);
    dup2(out[1], 1);
    std::string exe = std::string(HOTFIX_FIXTURES) + "/cons_threads", n = std::to_string(pool);
    execl(exe.c_str(), exe.c_str(), n.c_str(), nullptr);
    _exit(127);
  }
  close(in[0]);
  close(out[1]);
  t.to = in[1];
  FILE* f = fdopen(out[0], "r");
  char line[256], name[128];
  unsigned long long addr;
  while (fgets(line, sizeof line, f)) {
    if (sscanf(line, "fn %127s %llx", name, &addr) == 2) t.fn[name] = addr;
    if (!strncmp(line, "ready", 5)) break;
  }
  fclose(f);
  // Let every thread reach its parking place (the pool threads park right after "ready").
  for (int i = 0; i < 200; ++i) {
    auto tids = process__list_threads(t.pid);
    if (tids && int(tids->size()) == 6 + pool) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  return t.fn.count("pool_fn") && t.fn.count("unused_fn");
}

AddressRange range_of(pid_t pid, const std::string& name, uint64_t addr) {
  static const Dwfl_Callbacks cb{dwfl_linux_proc_find_elf, dwfl_standard_find_debuginfo, nullptr, nullptr};
  Dwfl* d = dwfl_begin(&cb);
  dwfl_linux_proc_report(d, pid);
  dwfl_report_end(d, nullptr, nullptr);
  GElf_Sym sym{};
  GElf_Off off;
  dwfl_module_addrinfo(dwfl_addrmodule(d, addr), addr, &off, &sym, nullptr, nullptr, nullptr);
  dwfl_end(d);
  return {addr, addr + std::max<uint64_t>(sym.st_size, 1), name};
}

// Stops every thread for the life of the object (the engine's job in hotfix-ctl patch).
struct StopWorld {
  std::vector<StoppedThread> threads;
  explicit StopWorld(pid_t pid) {
    auto tids = process__list_threads(pid);
    if (!tids) return;
    for (pid_t t : *tids) ptrace(PTRACE_SEIZE, t, 0, 0);
    for (pid_t t : *tids) ptrace(PTRACE_INTERRUPT, t, 0, 0);
    for (pid_t t : *tids) {
      int status;
      waitpid(t, &status, __WALL);
      StoppedThread st;
      st.tid = t;
      if (arch::regs__read(t, st.regs)) threads.push_back(st);
    }
  }
  ~StopWorld() {
    for (const auto& t : threads) ptrace(PTRACE_DETACH, t.tid, 0, 0);
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> sizes;
  for (int i = 1; i < argc; ++i) sizes.push_back(std::atoi(argv[i]));
  if (sizes.empty()) sizes = {16, 100, 1000};
  constexpr int kRounds = 7;
  fmt::print("strict consistency check, median of {} stops (each thread stopped with ptrace)\n", kRounds);
  fmt::print("{:>8} | {:>12} {:>10} {:>10} {:>12} | {:>12} {:>13} | {:>10}\n", "threads", "clear: total", "maps",
             "us/thread", "stack KiB", "unwind: total", "us/candidate", "create ms");
  for (int n : sizes) {
    Target t;
    if (!start(t, n)) {
      fmt::print(stderr, "cannot start the cons_threads fixture (build hotfix_fixtures first)\n");
      return 1;
    }
    auto c0 = std::chrono::steady_clock::now();
    auto clear = ConsistencyChecker::create(t.pid, {range_of(t.pid, "unused_fn", t.fn["unused_fn"])});
    double create_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - c0).count();
    auto hits = ConsistencyChecker::create(t.pid, {range_of(t.pid, "pool_fn", t.fn["pool_fn"])});
    if (!clear || !hits) {
      fmt::print(stderr, "{}\n", (!clear ? clear.error() : hits.error()).line());
      return 1;
    }
    std::vector<double> clear_total, clear_maps, clear_per, hit_total, hit_per;
    size_t threads = 0, stack_bytes = 0;
    for (int r = 0; r < kRounds; ++r) {
      StopWorld world(t.pid);
      threads = world.threads.size();
      auto a = clear->check(world.threads);
      auto b = hits->check(world.threads);
      if (!a || !b || !a->empty() || b->size() != size_t(n)) {
        fmt::print(stderr, "unexpected check result at {} threads\n", n);
        return 1;
      }
      const auto& s = clear->last_stats();
      clear_total.push_back(s.total_us);
      clear_maps.push_back(s.maps_us);
      clear_per.push_back((s.total_us - s.maps_us) / double(threads));
      stack_bytes = s.stack_bytes;
      const auto& h = hits->last_stats();
      hit_total.push_back(h.total_us);
      hit_per.push_back(h.unwind_us / double(h.unwound));
    }
    fmt::print("{:>8} | {:>10.0f}us {:>8.0f}us {:>10.2f} {:>12} | {:>10.0f}us {:>13.1f} | {:>10.1f}\n", threads,
               median(clear_total), median(clear_maps), median(clear_per), stack_bytes / 1024, median(hit_total),
               median(hit_per), create_ms);
  }
  return 0;
}
