// How long symbol resolution takes: SymbolTable::for_pid on a C++ process (libc +
// libstdc++), then a glob and a failing pattern (the "did you mean" search).
//   bench_symbols [--quick] [PID]     (default: start the sym_app fixture; --quick: fewer runs)
#include <fcntl.h>
#include <fmt/core.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "symbols/pattern.hpp"

using namespace hotfix;
using Clock = std::chrono::steady_clock;

namespace {

double cpu_ms() {
  timespec ts;
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

// Wall and CPU milliseconds of each of `runs` calls of `fn`: medians (CPU time is what a
// busy machine does not distort).
void measure(const char* what, int runs, const std::function<void()>& fn) {
  std::vector<double> wall, cpu;
  for (int i = 0; i < runs; i++) {
    auto t0 = Clock::now();
    double c0 = cpu_ms();
    fn();
    cpu.push_back(cpu_ms() - c0);
    wall.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count());
  }
  std::sort(wall.begin(), wall.end());
  std::sort(cpu.begin(), cpu.end());
  fmt::print("{:<44} wall median {:7.2f} ms (min {:7.2f})   cpu median {:7.2f} ms   ({} runs)\n", what,
             wall[runs / 2], wall.front(), cpu[runs / 2], runs);
}

// The sym_app fixture, stopped when we exit. Its stdin is a pipe we keep open (it runs until
// stdin closes). The pipes are close-on-exec, so the fixture holds only its own ends: it
// must not keep our end of its stdout open, and a dead fixture must read as EOF here rather
// than as a wait forever. "ready" comes within 10 s or the start failed.
pid_t start_fixture() {
  int in[2], out[2];
  if (::pipe2(in, O_CLOEXEC) || ::pipe2(out, O_CLOEXEC)) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {
    ::dup2(in[0], 0);
    ::dup2(out[1], 1);
    std::string path = std::string(HOTFIX_FIXTURES) + "/sym_app";
    ::execl(path.c_str(), path.c_str(), nullptr);
    ::_exit(127);
  }
  ::close(in[0]);
  ::close(out[1]);
  std::string got;
  pollfd p{out[0], POLLIN, 0};
  while (got.find('\n') == std::string::npos && ::poll(&p, 1, 10000) == 1) {
    char buf[256];
    ssize_t n = ::read(out[0], buf, sizeof buf);
    if (n <= 0) break;
    got.append(buf, static_cast<size_t>(n));
  }
  if (got.rfind("ready", 0) != 0) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return -1;
  }
  return pid;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  pid_t given = 0;
  for (int i = 1; i < argc; i++) {
    std::string arg = argv[i];
    if (arg == "--quick") quick = true;
    else if (!arg.empty() && std::all_of(arg.begin(), arg.end(), ::isdigit)) given = std::stoi(arg);
    else {
      fmt::print(stderr, "usage: bench_symbols [--quick] [PID]\n");
      return 2;
    }
  }
  const int runs = quick ? 5 : 20;
  pid_t pid = given ? given : start_fixture();
  if (pid <= 0) {
    fmt::print(stderr, "bench_symbols: cannot start the sym_app fixture (build the hotfix_fixtures target)\n");
    return 1;
  }
  auto table = SymbolTable::for_pid(pid);
  if (!table) {
    fmt::print(stderr, "bench_symbols: {}\n", table.error().line());
    if (!given) ::kill(pid, SIGKILL), ::waitpid(pid, nullptr, 0);
    return 1;
  }
  fmt::print("pid {}: {} objects, {} functions, {} variables\n", pid, table->objects().size(),
             table->functions().size(), table->variables().size());
  for (auto& o : table->objects()) fmt::print("  {:6} functions  {}\n", o.function_count, o.path);

  measure("SymbolTable::for_pid", runs, [&] { (void)SymbolTable::for_pid(pid); });
  measure("symbols__select 'std::*'", runs, [&] { (void)symbols__select(*table, {"std::*"}); });
  measure("symbols__select 'pricing::discont' (miss)", runs, [&] { (void)symbols__select(*table, {"pricing::discont"}); });
  measure("function_at x 100000", quick ? 1 : 5, [&] {
    uint64_t sum = 0;
    const auto& fns = table->functions();
    for (size_t i = 0; i < 100000; i++) {
      const Function* f = table->function_at(fns[i % fns.size()].address + 1);
      sum += f ? f->size : 0;
    }
    if (sum == 1) fmt::print("");
  });
  if (!given) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
  }
  return 0;
}
