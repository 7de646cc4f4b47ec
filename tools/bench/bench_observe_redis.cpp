// Throughput of Debian's redis-server under redis-benchmark while `hotfix-ctl patch` observes
// (issue 11 §1/§2: the observe window counts with trampolines by default), against the same
// process not observed. The fix (built here with plain gcc) replaces pingCommand and
// processCommand, so the window watches a function called on every request; the patch runs as
// `--dry-run --observe 3` in a loop for the benchmark's whole length (a fixed 3 s window: the
// window, not the process start, is what is measured; a dry run never writes the jumps).
// Needs root, gcc, redis-server and redis-tools. Prints a markdown table (docs/performance.md).
#include <fmt/core.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace {

const char* kFix = R"(// a user's fix for PING and for every command's dispatch (observed, never applied: --dry-run)
struct client;
void addReplyStatus(struct client *c, const char *status);
int processCommand(struct client *c) { (void)c; return 0; }
void pingCommand(struct client *c) { addReplyStatus(c, "PONG"); }
)";

pid_t spawn(const std::vector<std::string>& argv) {
  pid_t pid = ::fork();
  if (pid == 0) {
    std::vector<char*> a;
    for (auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    int null = ::open("/dev/null", O_WRONLY);
    ::dup2(null, 1), ::dup2(null, 2);
    ::execv(a[0], a.data());
    ::_exit(127);
  }
  return pid;
}

int wait_status(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

// requests/s per test from redis-benchmark --csv ("\"SET\",\"81234.56\",...").
std::map<std::string, double> benchmark(int port, long n) {
  std::string cmd = fmt::format("/usr/bin/redis-benchmark -p {} -c 8 -n {} -t set,get,ping -q --csv 2>/dev/null", port, n);
  std::map<std::string, double> out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return out;
  char line[512];
  while (std::fgets(line, sizeof line, p)) {
    char name[64];
    double rps = 0;
    if (std::sscanf(line, "\"%63[^\"]\",\"%lf\"", name, &rps) == 2) out[name] = rps;
  }
  ::pclose(p);
  return out;
}

// The benchmark while patch observes in a loop (`extra`: its options). Counts the windows
// that ran and the patch runs that failed.
std::map<std::string, double> observed(pid_t redis, int port, long n, const std::string& fix,
                                       const std::vector<std::string>& extra, int& windows, int& failures) {
  std::atomic<bool> done{false};
  std::thread loop([&] {
    while (!done) {
      std::vector<std::string> argv{HOTFIX_CTL, "patch", "--pid", std::to_string(redis), "--lib", fix, "--dry-run",
                                    "--observe", "3", "--no-abi-check", "--allow-untrusted-lib"};
      argv.insert(argv.end(), extra.begin(), extra.end());
      pid_t ctl = spawn(argv);
      (wait_status(ctl) == 0 ? windows : failures)++;
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(500));  // the first window is up
  auto out = benchmark(port, n);
  done = true;
  loop.join();
  return out;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  if (::geteuid() != 0 || ::access("/usr/bin/redis-server", X_OK) || ::access("/usr/bin/redis-benchmark", X_OK) ||
      ::access("/usr/bin/gcc", X_OK)) {
    fmt::print("# bench_observe_redis: SKIP (needs root, gcc, redis-server and redis-tools)\n");
    return 0;
  }
  char dir_template[] = "/tmp/hotfix-bench-observe-XXXXXX";
  std::string dir = ::mkdtemp(dir_template);
  { std::ofstream(dir + "/fix.c") << kFix; }
  std::string fix = dir + "/fix.so";
  if (std::system(fmt::format("gcc -O2 -g -shared -fPIC -o {} {}/fix.c", fix, dir).c_str()) != 0) {
    fmt::print("# bench_observe_redis: SKIP (gcc could not build the fix)\n");
    return 0;
  }
  const int port = 7101;  // this bench's own (bench_watch_redis uses 16390)
  const long n = quick ? 100000 : 500000;
  pid_t redis = spawn({"/usr/bin/redis-server", "--port", std::to_string(port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no"});
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  fmt::print("# bench_observe_redis{}\n\n## redis-server throughput while `patch --dry-run --observe 3` observes "
             "pingCommand and processCommand in a loop (requests/s; ratio to not observed)\n\n",
             quick ? " --quick" : "");
  // Modes alternated, median of `rounds`: the machine's own drift hits every column alike.
  struct Mode {
    const char* label;
    std::vector<std::string> extra;
    bool observe = true;
  };
  std::vector<Mode> modes{{"not observed", {}, false},
                          {"default (trampolines)", {}},
                          {"--count uprobe (the budget moves hot functions to trampolines)", {"--count", "uprobe"}},
                          {"--count uprobe --max-overhead 1000 (uprobes all window long)",
                           {"--count", "uprobe", "--max-overhead", "1000"}}};
  const int rounds = quick ? 3 : 5;
  std::map<size_t, std::map<std::string, std::vector<double>>> rps;
  std::vector<std::pair<int, int>> runs(modes.size());
  for (int r = 0; r < rounds; ++r)
    for (size_t m = 0; m < modes.size(); ++m) {
      auto got = modes[m].observe ? observed(redis, port, n, fix, modes[m].extra, runs[m].first, runs[m].second)
                                  : benchmark(port, n);
      for (auto& [test, v] : got) rps[m][test].push_back(v);
    }
  fmt::print("median of {} rounds, modes alternated, {} requests per test\n\n| test |", rounds, n);
  for (auto& m : modes) fmt::print(" {} |", m.label);
  fmt::print("\n|---|");
  for (size_t m = 0; m < modes.size(); ++m) fmt::print("---:|");
  fmt::print("\n");
  for (auto& [test, base] : rps[0]) {
    double b = median(base);
    fmt::print("| {} | {:.0f} |", test, b);
    for (size_t m = 1; m < modes.size(); ++m) {
      double v = median(rps[m][test]);
      fmt::print(" {:.0f} ({:.2f}x) |", v, v / b);
    }
    fmt::print("\n");
  }
  fmt::print("\npatch runs (windows ok / failed):");
  for (size_t m = 1; m < modes.size(); ++m) fmt::print(" {} {}/{};", modes[m].label, runs[m].first, runs[m].second);
  fmt::print("\n\n");
  ::kill(redis, SIGTERM);
  ::waitpid(redis, nullptr, 0);
  std::system(fmt::format("rm -rf {}", dir).c_str());
  return 0;
}
