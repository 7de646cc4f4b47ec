// bench_preserve: the per-call cost of a preserving island (patch/preserve.hpp), on pres_target
// (tests/fixtures): ns per call of pres_caller -> pres_add, a 3-instruction function, measured
// in the target by its own loop ("bench N"), for
//   unpatched | plain jump to the fix (--no-count) | preserving island (rcx, xmm2), no counting |
//   preserving island calling the counting island (the default with counting on).
// The plain jump is wrong for this caller (it is the teeth of test_preserve_island); it is timed
// only as the baseline. The island's cost is the difference to it.
// Usage: bench_preserve [--quick]   (as root; fixtures built: cmake --build B --target hotfix_fixtures)
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <fmt/core.h>
#include <string>
#include <vector>

#include "patch/engine.hpp"

using namespace hotfix;
using namespace std::chrono_literals;

namespace {

const std::string kTarget = std::string(HOTFIX_FIXTURES) + "/pres_target";
const std::string kFix = std::string(HOTFIX_FIXTURES) + "/pres_fix.so";
constexpr uint64_t kRcxXmm2 = 1ull << 1 | 1ull << 11;

// pres_target with no worker threads, spoken to over pipes; killed on destruction.
struct Target {
  pid_t pid = -1;
  FILE* in = nullptr;
  FILE* out = nullptr;
  Target() {
    int to[2], from[2];
    if (::pipe(to) || ::pipe(from)) throw std::runtime_error("pipe");
    pid = ::fork();
    if (pid == 0) {
      ::dup2(to[0], 0), ::dup2(from[1], 1);
      ::close(to[1]), ::close(from[0]);
      ::execl(kTarget.c_str(), kTarget.c_str(), "0", nullptr);
      ::_exit(127);
    }
    ::close(to[0]), ::close(from[1]);
    in = ::fdopen(to[1], "w"), out = ::fdopen(from[0], "r");
    if (line().rfind("ready", 0) != 0) throw std::runtime_error("pres_target did not start: build the fixtures");
  }
  ~Target() {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    std::fclose(in), std::fclose(out);
  }
  std::string line() {
    char buf[256] = {0};
    return std::fgets(buf, sizeof buf, out) ? buf : "";
  }
  double ns_per_call(long calls) {
    std::fprintf(in, "bench %ld\n", calls);
    std::fflush(in);
    double ns = 0;
    if (std::sscanf(line().c_str(), "ok ns_per_call=%lf", &ns) != 1) throw std::runtime_error("bad reply");
    return ns;
  }
};

void patch(pid_t pid, uint64_t preserve, bool count) {
  PatchOptions o;
  o.pid = pid;
  o.library = kFix;
  o.patterns = {"pres_add"};
  o.count = count;
  o.abi_check = false;
  o.observe = 0ms;
  auto p = patch__prepare(o);
  if (!p) throw std::runtime_error(p.error().line());
  p->switches[0].preserve = preserve;
  auto out = patch__apply(*p, [](const ProgressEvent&) {});
  if (!out) throw std::runtime_error(out.error().line());
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  long calls = quick ? 2'000'000 : 20'000'000;
  int reps = quick ? 1 : 5;
  struct Mode {
    const char* name;
    bool patched;
    uint64_t preserve;
    bool count;
  } modes[] = {{"unpatched", false, 0, false},
               {"plain jump (--no-count)", true, 0, false},
               {"preserving island, no counting", true, kRcxXmm2, false},
               {"preserving island + counting island", true, kRcxXmm2, true}};
  fmt::print("bench_preserve: ns per call of a -fipa-ra caller and a 3-instruction callee, median of {} x {} calls\n",
             reps, calls);
  try {
    double base = 0;
    for (auto& m : modes) {
      Target t;
      if (m.patched) patch(t.pid, m.preserve, m.count);
      std::vector<double> ns;
      t.ns_per_call(calls / 10);  // warm up
      for (int r = 0; r < reps; ++r) ns.push_back(t.ns_per_call(calls));
      std::sort(ns.begin(), ns.end());
      double median = ns[ns.size() / 2];
      if (!m.preserve && m.patched) base = median;
      fmt::print("  {:<40} {:7.2f} ns/call{}\n", m.name, median,
                 m.preserve && base ? fmt::format("   (+{:.2f} ns over the plain jump)", median - base) : "");
    }
  } catch (const std::exception& e) {
    fmt::print(stderr, "bench_preserve: {}\n", e.what());
    return 1;
  }
  (void)std::system((std::string(HOTFIX_CTL) + " gc > /dev/null 2>&1").c_str());
  return 0;
}
