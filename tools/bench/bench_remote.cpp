// Cost of one remote system call (getpid) and one remote function call on a stopped thread of
// tests/fixtures/remote_target, median of N. Usage: bench_remote [reps]
#include <signal.h>
#include <spawn.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "process/ptrace.hpp"
#include "process/remote.hpp"

using namespace hotfix;
using namespace std::chrono;
extern char** environ;

namespace {

double median_us(std::vector<nanoseconds>& v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : duration<double, std::micro>(v[v.size() / 2]).count();
}

}  // namespace

int main(int argc, char** argv) {
  int reps = argc > 1 ? std::atoi(argv[1]) : 200;
  int o[2], i[2];
  if (::pipe(o) || ::pipe(i)) return 1;
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  posix_spawn_file_actions_adddup2(&fa, o[1], 1);
  posix_spawn_file_actions_adddup2(&fa, i[0], 0);
  std::string exe = std::string(HOTFIX_FIXTURES) + "/remote_target";
  char* args[] = {exe.data(), nullptr};
  pid_t pid = 0;
  if (posix_spawn(&pid, exe.c_str(), &fa, nullptr, args, environ) != 0) return 1;
  ::close(o[1]), ::close(i[0]);
  char buf[256] = {};
  if (::read(o[0], buf, sizeof buf - 1) <= 0) return 1;
  int regs = 0, reader = 0, sleeper = 0, napper = 0;
  unsigned long clobber = 0;
  if (std::sscanf(buf, "ready regs=%d reader=%d sleeper=%d napper=%d clobber=%lx", &regs, &reader, &sleeper, &napper,
                  &clobber) != 5) {
    std::fprintf(stderr, "bench_remote: unexpected target output: %s\n", buf);
    return 1;
  }
  int rc = 0;
  {
    auto t = Tracee::seize(pid);
    if (!t || !t->stop_all()) return 1;
    std::vector<nanoseconds> sys, call;
    for (pid_t tid : {regs, reader}) {
      for (int r = 0; r < reps; ++r) {
        auto a = steady_clock::now();
        auto got = remote__syscall(*t, tid, SYS_getpid, {});
        auto b = steady_clock::now();
        uint64_t argv2[] = {40, 2};
        auto sum = remote__call(*t, tid, clobber, argv2);
        auto c = steady_clock::now();
        if (!got || *got != pid || !sum || *sum != 42) {
          std::fprintf(stderr, "bench_remote: %s\n", !got ? got.error().what.c_str() : !sum ? sum.error().what.c_str() : "wrong result");
          rc = 1;
          break;
        }
        if (r) sys.push_back(b - a), call.push_back(c - b);  // the first also reads the sigaltstack
      }
    }
    std::printf("remote syscall (getpid): median %.1f us\nremote call (a + b):     median %.1f us\n", median_us(sys),
                median_us(call));
    (void)t->resume_all();
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return rc;
}
