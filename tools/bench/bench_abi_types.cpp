// bench_abi_types: what the DWARF signature and layout check (patch/abi_types.hpp) costs, on
// tools/demo's sample service (tools/sample/pricing_service, -O2 -g) and its fix (fix_vip.so):
//  1. abi__check_types alone, in process, on a prepared patch (the target's CU read by
//     address, fix.so's DWARF from its bytes);
//  2. wall time of `hotfix-ctl patch --dry-run --observe 0` with the ABI checks and with
//     --no-abi-check (the difference also holds the call-site check).
// Usage: bench_abi_types [--quick]   (as root; built by tools/bench/run)
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <fmt/core.h>
#include <string>
#include <thread>
#include <vector>

#include "patch/abi_types.hpp"
#include "patch/engine.hpp"

using clk = std::chrono::steady_clock;

namespace {

const std::string kCtl = HOTFIX_CTL;
const std::string kService = std::string(HOTFIX_SAMPLES) + "/pricing_service";
const std::string kFix = std::string(HOTFIX_SAMPLES) + "/fix_vip.so";

double ms_since(clk::time_point t0) { return std::chrono::duration<double, std::milli>(clk::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Start `argv` with its output discarded; the caller kills it.
pid_t spawn(std::vector<std::string> argv) {
  pid_t pid = ::fork();
  if (pid == 0) {
    int null = ::open("/dev/null", O_RDWR);
    ::dup2(null, 0), ::dup2(null, 1), ::dup2(null, 2);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the bench
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  return pid;
}

int wait_exit(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

struct Service {
  pid_t pid = spawn({kService});
  Service() { std::this_thread::sleep_for(std::chrono::milliseconds(300)); }
  ~Service() {
    if (pid > 0) ::kill(pid, SIGKILL), ::waitpid(pid, nullptr, 0);
  }
};

// abi__check_types alone: ms per run, and the note it left.
std::pair<double, std::string> check_alone(pid_t pid, int reps) {
  hotfix::PatchOptions opts;
  opts.pid = pid;
  opts.library = kFix;
  opts.abi_check = false;  // prepare without the checks; time the one under test by itself
  std::vector<double> ms;
  std::string note;
  for (int i = 0; i < reps; i++) {
    auto p = patch__prepare(opts);
    if (!p) throw std::runtime_error(p.error().line());
    p->notes.clear();
    auto t0 = clk::now();
    auto ok = hotfix::abi__check_types(*p);
    ms.push_back(ms_since(t0));
    if (!ok) throw std::runtime_error(ok.error().line());
    note = p->notes.empty() ? "(no note)" : p->notes.front().text;
  }
  return {median(ms), note};
}

double dry_run_once(pid_t pid, bool abi_check) {
  std::vector<std::string> argv{kCtl, "patch", "--pid", std::to_string(pid), "--lib", kFix, "--dry-run", "--observe", "0"};
  if (!abi_check) argv.push_back("--no-abi-check");
  auto t0 = clk::now();
  if (int rc = wait_exit(spawn(argv)); rc != 0) throw std::runtime_error(fmt::format("patch --dry-run exited {}", rc));
  return ms_since(t0);
}

// Medians with and without the checks, run alternately so that drift on a shared machine
// falls on both alike.
std::pair<double, double> dry_runs(pid_t pid, int reps) {
  std::vector<double> with, without;
  for (int i = 0; i < reps; i++) with.push_back(dry_run_once(pid, true)), without.push_back(dry_run_once(pid, false));
  return {median(with), median(without)};
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  if (::geteuid() != 0) {
    fmt::print("bench_abi_types: needs root (ptrace)\n");
    return 1;
  }
  int reps = quick ? 3 : 21;
  try {
    Service svc;
    auto [alone, note] = check_alone(svc.pid, reps);
    auto [with, without] = dry_runs(svc.pid, reps);
    fmt::print("### DWARF signature and layout check, sample service (median of {} runs)\n\n", reps);
    fmt::print("| what | ms |\n|---|---:|\n");
    fmt::print("| abi__check_types alone (\"{}\") | {:.2f} |\n", note, alone);
    fmt::print("| patch --dry-run --observe 0, ABI checks on | {:.1f} |\n", with);
    fmt::print("| patch --dry-run --observe 0, --no-abi-check | {:.1f} |\n", without);
    fmt::print("| difference (types + call sites) | {:.1f} |\n", with - without);
  } catch (const std::exception& e) {
    fmt::print("bench_abi_types: {}\n", e.what());
    return 1;
  }
  return 0;
}
