// Stop-the-world pause vs thread count: hotfix's Tracee::stop_all/resume_all against the
// naive loop (per thread: PTRACE_INTERRUPT, waitpid, read registers; then PTRACE_CONT each),
// side by side on the same target. Pause = the longest any one thread was held, from the
// interrupt sent to it to its resume. Usage: bench_pause [reps] [thread counts...]
#include <signal.h>
#include <spawn.h>
#include <sys/ptrace.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "process/ptrace.hpp"

using namespace hotfix;
using namespace std::chrono;
extern char** environ;

namespace {

struct Target {
  pid_t pid = -1;
  int out = -1, in = -1;
  ~Target() {
    if (pid > 0) ::kill(pid, SIGKILL), ::waitpid(pid, nullptr, 0);
    if (out >= 0) ::close(out);
    if (in >= 0) ::close(in);
  }
};

bool spawn(Target& t, int threads, int busy) {
  int o[2], i[2];
  if (::pipe(o) || ::pipe(i)) return false;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, o[1], 1);
  posix_spawn_file_actions_adddup2(&fa, i[0], 0);
  std::string exe = std::string(HOTFIX_FIXTURES) + "/proc_threads", n = std::to_string(threads), b = std::to_string(busy);
  char* argv[] = {exe.data(), n.data(), b.data(), nullptr};
  if (posix_spawn(&t.pid, exe.c_str(), &fa, nullptr, argv, environ) != 0) return false;
  ::close(o[1]), ::close(i[0]);
  t.out = o[0], t.in = i[1];
  char buf[64] = {};
  return ::read(t.out, buf, sizeof buf - 1) > 0 && std::string(buf).rfind("ok ready", 0) == 0;
}

// The naive loop, on threads the Tracee has seized (ptrace requests from this same thread).
nanoseconds naive_pause(const std::vector<pid_t>& tids) {
  std::vector<TraceClock::time_point> asked(tids.size());
  arch::RegsBuffer regs;
  for (size_t i = 0; i < tids.size(); ++i) {
    asked[i] = TraceClock::now();
    ::ptrace(PTRACE_INTERRUPT, tids[i], nullptr, nullptr);
    int st;
    ::waitpid(tids[i], &st, __WALL);
    (void)arch::regs__read(tids[i], regs);
  }
  nanoseconds worst{};
  for (size_t i = 0; i < tids.size(); ++i) {
    ::ptrace(PTRACE_CONT, tids[i], nullptr, nullptr);
    worst = std::max<nanoseconds>(worst, TraceClock::now() - asked[i]);
  }
  return worst;
}

double median_us(std::vector<nanoseconds> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : duration<double, std::micro>(v[v.size() / 2]).count();
}
double max_us(const std::vector<nanoseconds>& v) {
  return v.empty() ? 0 : duration<double, std::micro>(*std::max_element(v.begin(), v.end())).count();
}

}  // namespace

int main(int argc, char** argv) {
  int reps = argc > 1 ? std::atoi(argv[1]) : 15;
  std::vector<int> counts;
  for (int i = 2; i < argc; ++i) counts.push_back(std::atoi(argv[i]));
  if (counts.empty()) counts = {1, 16, 128, 1024};
  std::printf("stop-the-world pause (longest single-thread stop), %d reps each, median / worst, microseconds\n", reps);
  std::printf("%8s %6s | %12s %12s %12s | %12s %12s | %8s\n", "threads", "busy", "hotfix med", "hotfix max",
              "stop latency", "naive med", "naive max", "naive/hf");
  for (int n : counts) {
    int busy = n == 1 ? 0 : std::max(1, n / 16);
    if (const char* b = std::getenv("BENCH_BUSY")) busy = std::min(n - 1, std::atoi(b));
    Target target;
    if (!spawn(target, n, busy)) {
      std::fprintf(stderr, "cannot start proc_threads %d\n", n);
      return 1;
    }
    auto t = Tracee::seize(target.pid);
    if (!t) {
      std::fprintf(stderr, "%s\n", t.error().line().c_str());
      return 1;
    }
    std::vector<pid_t> tids;
    for (auto& th : t->threads()) tids.push_back(th.tid);
    std::vector<nanoseconds> ours, latency, naive;
    for (int r = 0; r < reps; ++r) {
      // Alternate, with a pause between, so neither side inherits the other's cache/scheduler state.
      if (auto s = t->stop_all(); !s) {
        std::fprintf(stderr, "%s\n", s.error().line().c_str());
        return 1;
      }
      (void)t->resume_all();
      ours.push_back(t->last_pause().max_pause);
      latency.push_back(t->last_pause().stop_latency);
      std::this_thread::sleep_for(milliseconds(20));
      naive.push_back(naive_pause(tids));
      std::this_thread::sleep_for(milliseconds(20));
    }
    std::printf("%8d %6d | %12.0f %12.0f %12.0f | %12.0f %12.0f | %7.1fx\n", n, busy, median_us(ours), max_us(ours),
                median_us(latency), median_us(naive), max_us(naive), median_us(naive) / std::max(1.0, median_us(ours)));
    std::fflush(stdout);
  }
  return 0;
}
