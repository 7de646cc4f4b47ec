// bench_soak: the soak of tests/test_soak.cpp at bench length: 1000 patch/revert cycles
// (strict and entry alternating) on the 32-thread soak_target, all its checks included (0
// deaths, 0 wrong results, footprint back to baseline). Prints cycles, wall time and the time
// per cycle. --quick runs 30 cycles.
// Usage: bench_soak [--quick]   (as root; the test binary must be built: target test_soak)
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fmt/core.h>
#include <string>

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  int cycles = quick ? 30 : 1000;
  std::string test = std::string(HOTFIX_FIXTURES) + "/../test_soak";
  if (::access(test.c_str(), X_OK) != 0) {
    fmt::print("bench_soak: {} is not built (cmake --build BUILD --target test_soak)\n", test);
    return 1;
  }
  auto t0 = std::chrono::steady_clock::now();
  pid_t pid = ::fork();
  if (pid == 0) {
    ::setenv("HOTFIX_SOAK_CYCLES", std::to_string(cycles).c_str(), 1);
    ::execl(test.c_str(), test.c_str(), "--reporter", "compact", static_cast<char*>(nullptr));
    ::_exit(127);
  }
  int status = 0;
  ::waitpid(pid, &status, 0);
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
  fmt::print("## soak: patch/revert cycles on a 32-thread target (strict and entry alternating)\n\n");
  fmt::print("| cycles | result | wall time | per cycle (patch + revert, two hotfix-ctl runs) |\n|---|---|---|---|\n");
  fmt::print("| {} | {} | {:.1f} s | {:.1f} ms |\n", cycles, ok ? "0 deaths, 0 wrong results, footprint at baseline" : "FAILED (see above)",
             s, s * 1000 / cycles);
  return ok ? 0 : 1;
}
