// Throughput of Debian's redis-server under redis-benchmark, unwatched against watched with
// default options (counting trampolines) and with --count uprobe, on five hot functions.
// Prints a markdown table (docs/performance.md). Needs root, redis-server and redis-tools.
#include <fmt/core.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <vector>

namespace {

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

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  if (::geteuid() != 0 || ::access("/usr/bin/redis-server", X_OK) || ::access("/usr/bin/redis-benchmark", X_OK)) {
    fmt::print("# bench_watch_redis: SKIP (needs root, redis-server and redis-tools)\n");
    return 0;
  }
  const int port = 16390;
  const long n = quick ? 100000 : 1000000;
  pid_t redis = spawn({"/usr/bin/redis-server", "--port", std::to_string(port), "--bind", "127.0.0.1", "--save", "",
                       "--appendonly", "no"});
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  const std::vector<std::string> hot{"processCommand", "dictFind", "addReply", "readQueryFromClient", "call"};
  fmt::print("# bench_watch_redis{}\n\n## redis-server throughput, watched on {} hot functions (requests/s; ratio to unwatched)\n\n",
             quick ? " --quick" : "", hot.size());
  auto base = benchmark(port, n);
  std::map<std::string, std::map<std::string, double>> watched;
  for (std::string mode : {"trampoline", "uprobe"}) {
    std::vector<std::string> w{HOTFIX_CTL, "watch", "--pid", std::to_string(redis), "--count", mode, "--interval", "10"};
    w.insert(w.end(), hot.begin(), hot.end());
    pid_t watch = spawn(w);
    std::this_thread::sleep_for(std::chrono::seconds(2));
    watched[mode] = benchmark(port, mode == "uprobe" ? n / 10 : n);
    ::kill(watch, SIGINT);
    ::waitpid(watch, nullptr, 0);
  }
  fmt::print("| test | unwatched | watch (default: trampolines) | watch --count uprobe |\n|---|---:|---:|---:|\n");
  for (auto& [test, rps] : base) {
    double t = watched["trampoline"][test], u = watched["uprobe"][test];
    fmt::print("| {} | {:.0f} | {:.0f} ({:.2f}x) | {:.0f} ({:.2f}x) |\n", test, rps, t, t / rps, u, u / rps);
  }
  fmt::print("\n");
  ::kill(redis, SIGTERM);
  ::waitpid(redis, nullptr, 0);
  return 0;
}
