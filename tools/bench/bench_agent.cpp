// bench_agent: what the agent costs a new process. Start-up to exit of agent_target (prints
// its first line from the patched function, then exits on EOF) without an agent, and with
// `hotfix-ctl agent` armed for it (stop at the entry point, park, patch, release).
// Usage: bench_agent [--quick]   (as root; fixtures built: cmake --build B --target hotfix_fixtures)
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fmt/core.h>
#include <string>
#include <vector>

using clk = std::chrono::steady_clock;

namespace {

const std::string kCtl = HOTFIX_CTL;
const std::string kTarget = std::string(HOTFIX_FIXTURES) + "/agent_target";
const std::string kFix = std::string(HOTFIX_FIXTURES) + "/agent_fix.so";

// fork+exec `argv` with stdin from `in_fd` (-1: /dev/null) and stdout to a pipe we return.
pid_t spawn(std::vector<std::string> argv, int& out_fd, int in_fd = -1) {
  int out[2];
  if (::pipe2(out, O_CLOEXEC)) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {
    int null = ::open("/dev/null", O_RDWR);
    ::dup2(in_fd >= 0 ? in_fd : null, 0);
    ::dup2(out[1], 1);
    ::dup2(null, 2);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ::close(out[1]);
  out_fd = out[0];
  return pid;
}

// Read from `fd` until `needle` appears (or EOF).
std::string read_until(int fd, const std::string& needle) {
  std::string text;
  char buf[4096];
  while (text.find(needle) == std::string::npos) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n <= 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  return text;
}

// One run of agent_target: ms from fork to exit, and its first line.
double one_run(std::string& first) {
  int out = -1;
  auto t0 = clk::now();
  pid_t pid = spawn({kTarget}, out);
  first = read_until(out, "\n");
  ::waitpid(pid, nullptr, 0);
  double ms = std::chrono::duration<double, std::milli>(clk::now() - t0).count();
  ::close(out);
  first = first.substr(0, first.find('\n'));
  return ms;
}

void row(const char* what, int n) {
  std::vector<double> ms;
  std::string first;
  for (int i = 0; i < n; ++i) ms.push_back(one_run(first));
  std::sort(ms.begin(), ms.end());
  fmt::print("| {} | {} | {:.1f} | {:.1f} | {} |\n", what, n, ms[ms.size() / 2], ms.back(), first);
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  int n = quick ? 5 : 30;
  if (::geteuid() != 0) {
    fmt::print("bench_agent: needs root\n");
    return 1;
  }
  char tmpl[] = "/tmp/hotfix-bench-agent-XXXXXX";
  std::string state = ::mkdtemp(tmpl);
  ::chmod(state.c_str(), 0755);
  ::setenv("HOTFIX_STATE_DIR", state.c_str(), 1);
  int keep_in[2];
  if (::pipe(keep_in)) return 1;
  int out = -1;
  pid_t running = spawn({kTarget}, out, keep_in[0]);  // stays alive: stdin never closes
  read_until(out, "\n");
  std::string cmd = fmt::format("{} patch --pid {} --lib {} --persist --observe 0 >/dev/null 2>&1", kCtl, running, kFix);
  int rc = std::system(cmd.c_str());
  fmt::print("bench_agent: start-up to exit of a new agent_target (first line from the patched function)\n\n");
  fmt::print("| case | runs | median ms | max ms | first line |\n|---|---|---|---|---|\n");
  row("no agent", n);
  if (rc == 0) {
    int agent_out = -1;
    pid_t agent = spawn({kCtl, "agent"}, agent_out);
    read_until(agent_out, "start: ");
    row("agent armed (park + patch + release)", n);
    ::kill(agent, SIGTERM);
    ::waitpid(agent, nullptr, 0);
  } else {
    fmt::print("patch --persist failed (exit {})\n", rc);
  }
  ::kill(running, SIGKILL);
  ::waitpid(running, nullptr, 0);
  std::filesystem::remove_all(state);
  return rc == 0 ? 0 : 1;
}
