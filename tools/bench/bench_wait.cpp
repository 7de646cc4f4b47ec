// bench_wait: what a strict patch that cannot succeed costs the target while it waits.
// Debian's redis-server under redis-benchmark (SET, 16 clients): requests/s with nobody
// attached, then while `hotfix-ctl patch aeMain --timeout T` waits for the event loop (which
// never returns) to leave; alternated, median of the runs. Also the number of stops (the
// patch's attempts) against the rate bound (50/s).
// Usage: bench_wait [--quick]   (as root; redis-server and redis-benchmark installed)
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

const std::string kCtl = HOTFIX_CTL;

// Start argv with stdout (and stderr) to the given files; killed if we die.
pid_t spawn(std::vector<std::string> argv, const std::string& out, const std::string& err) {
  pid_t pid = ::fork();
  if (pid == 0) {
    int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644), e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(o, 1), ::dup2(e, 2);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  return pid;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

int wait_exit(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

double benchmark(int port, int requests, const std::string& dir) {
  pid_t b = spawn({"/usr/bin/redis-benchmark", "-p", std::to_string(port), "-t", "set", "-n", std::to_string(requests),
                   "-c", "16", "-q"},
                  dir + "/bench.out", "/dev/null");
  wait_exit(b);
  std::smatch m;
  std::string out = slurp(dir + "/bench.out");
  return std::regex_search(out, m, std::regex("SET: ([0-9.]+) requests per second")) ? std::stod(m[1]) : 0;
}

bool port_open(int port) {
  return std::system(("/usr/bin/redis-cli -p " + std::to_string(port) + " ping >/dev/null 2>&1").c_str()) == 0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && !std::strcmp(argv[1], "--quick");
  if (::access("/usr/bin/redis-server", X_OK) || ::access("/usr/bin/redis-benchmark", X_OK) ||
      ::access("/usr/bin/redis-cli", X_OK)) {
    std::printf("bench_wait: SKIP (redis-server, redis-benchmark or redis-cli missing)\n");
    return 0;
  }
  char tmpl[] = "/tmp/bench_wait.XXXXXX";
  std::string dir = ::mkdtemp(tmpl);
  std::ofstream(dir + "/fix.c") << "struct aeEventLoop;\nextern int aeProcessEvents(struct aeEventLoop *, int);\n"
                                   "void aeMain(struct aeEventLoop *el) { for (;;) aeProcessEvents(el, 3 | 8 | 16); }\n";
  if (std::system(("/usr/bin/gcc -O2 -g -shared -fPIC " + dir + "/fix.c -o " + dir + "/fix.so").c_str()) != 0) return 1;
  int port = 20000 + ::getpid() % 20000;
  pid_t redis = spawn({"/usr/bin/redis-server", "--port", std::to_string(port), "--save", "", "--appendonly", "no"},
                      "/dev/null", "/dev/null");
  for (int i = 0; i < 200 && !port_open(port); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  int reps = quick ? 3 : 5, requests = quick ? 30000 : 60000;
  const int timeout_s = quick ? 3 : 5;
  std::printf("## strict patch of redis's aeMain (never returns), --timeout %d s, redis-benchmark SET -c 16 -n %d\n\n",
              timeout_s, requests);
  std::printf("| run | normal (req/s) | while waiting (req/s) | ratio | stops | stops/s |\n|---:|---:|---:|---:|---:|---:|\n");
  std::vector<double> ratios, rates;
  for (int r = 0; r < reps; ++r) {
    double normal = benchmark(port, requests, dir);
    pid_t ctl = spawn({kCtl, "patch", "--pid", std::to_string(redis), "--lib", dir + "/fix.so", "aeMain", "--timeout",
                       std::to_string(timeout_s), "--observe", "0"},
                      dir + "/ctl.out", dir + "/ctl.err");
    for (int i = 0; i < 600 && slurp(dir + "/ctl.out").find("attempt 1:") == std::string::npos; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    double waiting = benchmark(port, requests, dir);
    wait_exit(ctl);
    std::smatch m;
    std::string err = slurp(dir + "/ctl.err");
    int stops = std::regex_search(err, m, std::regex("of ([0-9]+) attempts in")) ? std::stoi(m[1]) : -1;
    double ratio = normal > 0 ? waiting / normal : 0;
    ratios.push_back(ratio), rates.push_back(stops / double(timeout_s));
    std::printf("| %d | %.0f | %.0f | %.2f | %d | %.1f |\n", r + 1, normal, waiting, ratio, stops, stops / double(timeout_s));
    std::fflush(stdout);
  }
  std::printf("\nmedian ratio %.2f, median %.1f stops/s (bound: 50/s)\n", median(ratios), median(rates));
  ::kill(redis, SIGKILL);
  wait_exit(redis);
  std::system(("rm -rf " + dir).c_str());
  return 0;
}
