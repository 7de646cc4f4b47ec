// Throughput of a real daemon under its own load generator, unwatched against watched, measured
// side by side in one run: shared by bench_watch_redis and bench_watch_memcached.
//
// Runs interleave: U W1 U W2 U ... U (U = unwatched), every watched run between two unwatched
// ones, and its ratio is taken against their mean, so a machine whose load drifts (other
// builds on the same CPUs) moves both sides of each ratio alike. The table gives the median
// over rounds.
//
// Beside throughput it gives the target's own CPU time per request (all its threads, from
// /proc/PID/task/*/schedstat): what watching adds to the work of the target itself (a uprobe's
// trap is charged to the thread that hits it, a trampoline's add is its user time). On a
// machine shared with other work, throughput swings with everyone's load; the CPU time per
// request much less. And watch's own CPU time (hotfix-ctl's, from wait4), which competes for
// the same CPUs but is not the target's.
#pragma once
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <dirent.h>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <fmt/core.h>

namespace bench {

using clk = std::chrono::steady_clock;

// A program run in the background: stdout to /dev/null, stderr to a pipe we read lines from
// (when asked). Killed and reaped on destruction.
class Background {
 public:
  explicit Background(const std::vector<std::string>& argv, bool keep_stderr = false) {
    int err[2] = {-1, -1};
    if (keep_stderr && ::pipe2(err, O_CLOEXEC)) throw std::runtime_error("pipe");
    pid_ = ::fork();
    if (pid_ < 0) throw std::runtime_error("fork");
    if (pid_ == 0) {
      int null = ::open("/dev/null", O_RDWR);
      ::dup2(null, 0), ::dup2(null, 1), ::dup2(keep_stderr ? err[1] : null, 2);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the bench, even a killed one
      std::vector<char*> a;
      for (auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
      a.push_back(nullptr);
      ::execvp(a[0], a.data());
      ::_exit(127);
    }
    if (keep_stderr) ::close(err[1]), err_ = err[0];
  }
  ~Background() {
    if (pid_ > 0 && !reaped_) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    if (err_ >= 0) ::close(err_);
  }
  Background(const Background&) = delete;
  Background& operator=(const Background&) = delete;
  pid_t pid() const { return pid_; }
  // User + system CPU seconds it used (known once stop() reaped it).
  double cpu_seconds() const { return cpu_s_; }

  // The next stderr line, or nullopt at EOF or after timeout_ms.
  std::optional<std::string> err_line(int timeout_ms) {
    auto deadline = clk::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      if (auto nl = buf_.find('\n'); nl != std::string::npos) {
        std::string l = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return l;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clk::now()).count();
      pollfd p{err_, POLLIN, 0};
      if (err_ < 0 || left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) return std::nullopt;
      char tmp[4096];
      ssize_t n = ::read(err_, tmp, sizeof tmp);
      if (n <= 0) return std::nullopt;
      buf_.append(tmp, static_cast<size_t>(n));
    }
  }
  // Send `sig`, wait up to timeout_ms for the exit; the exit status (-1 if it did not end).
  int stop(int sig, int timeout_ms = 60000) {
    ::kill(pid_, sig);
    for (int i = 0; i < timeout_ms / 10; ++i) {
      int status = 0;
      rusage ru{};
      if (::wait4(pid_, &status, WNOHANG, &ru) == pid_) {
        reaped_ = true;
        cpu_s_ = double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      ::usleep(10000);
    }
    return -1;
  }

 private:
  pid_t pid_ = -1;
  int err_ = -1;
  bool reaped_ = false;
  double cpu_s_ = 0;
  std::string buf_;
};

// One way of watching the daemon: a column of the table.
struct Mode {
  std::string label;                     // column header, e.g. "watch (default)"
  std::vector<std::string> watch_args;   // after `hotfix-ctl watch --pid P`; empty = unwatched
  double load_scale = 1.0;               // share of the requests to send (slow modes send fewer)
};

// One load-generator run: requests/s per test (e.g. {"SET": 81234, "GET": ...}), and how many
// requests it sent in all.
struct LoadResult {
  std::map<std::string, double> rps;
  double requests = 0;
};
using Load = std::function<LoadResult(double scale)>;

using Row = std::map<std::string, double>;  // test -> value; kCpuRow is the target's CPU per request
inline const std::string kCpuRow = "target CPU per request (us, lower is better)";

struct ModeResult {
  std::vector<Row> value;                  // per run
  std::vector<Row> ratio;                  // per round, against the bracketing unwatched runs
  std::vector<double> watch_cpu_pct;       // hotfix-ctl's own CPU, % of one CPU while it ran
  std::string banner;                      // watch's first "watching ..." line
  std::vector<std::string> notes;          // what else watch said on stderr, in order, once each
  std::vector<int> exit_codes;             // of watch
  void note(const std::string& line) {
    if (std::find(notes.begin(), notes.end(), line) == notes.end()) notes.push_back(line);
  }
};

inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

// CPU time all threads of `pid` have run, in ns (first field of each task's schedstat).
inline double cpu_ns(pid_t pid) {
  double total = 0;
  std::string dir = fmt::format("/proc/{}/task", pid);
  DIR* d = ::opendir(dir.c_str());
  if (!d) return 0;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    std::ifstream f(dir + "/" + e->d_name + "/schedstat");
    double ns = 0;
    if (f >> ns) total += ns;
  }
  ::closedir(d);
  return total;
}

// Run the load once under `mode` (watch started first, stopped with SIGINT after).
inline Row run_mode(pid_t target, const Mode& mode, const Load& load, ModeResult& r) {
  auto measure = [&] {
    double cpu0 = cpu_ns(target);
    auto l = load(mode.load_scale);
    Row row = l.rps;
    if (l.requests > 0 && !row.empty()) row[kCpuRow] = (cpu_ns(target) - cpu0) / 1e3 / l.requests;
    return row;
  };
  if (mode.watch_args.empty()) return measure();
  std::vector<std::string> argv{HOTFIX_CTL, "watch", "--pid", std::to_string(target)};
  argv.insert(argv.end(), mode.watch_args.begin(), mode.watch_args.end());
  auto t0 = clk::now();
  Background watch(argv, true);
  // The banner ("watching N functions ... via ...") comes once everything is attached.
  bool attached = false;
  while (auto line = watch.err_line(120000)) {
    if (line->starts_with("watching ")) {
      if (r.banner.empty()) r.banner = *line;
      attached = true;
      break;
    }
    if (!line->starts_with("progress:")) r.note(*line);
  }
  if (!attached) {
    r.note("watch did not attach (no banner within 120 s)");
    return {};
  }
  auto row = measure();
  int code = watch.stop(SIGINT);
  double wall = std::chrono::duration<double>(clk::now() - t0).count();
  while (auto line = watch.err_line(1000))
    if (!line->starts_with("progress:")) r.note(*line);
  r.exit_codes.push_back(code);
  r.watch_cpu_pct.push_back(watch.cpu_seconds() / wall * 100);
  return row;
}

// U W1 U W2 ... U, `rounds` times; modes[0] must be the unwatched one.
inline std::vector<ModeResult> interleave(pid_t target, const std::vector<Mode>& modes, const Load& load, int rounds) {
  std::vector<ModeResult> results(modes.size());
  auto before = run_mode(target, modes[0], load, results[0]);
  results[0].value.push_back(before);
  for (int round = 0; round < rounds; ++round)
    for (size_t m = 1; m < modes.size(); ++m) {
      auto watched = run_mode(target, modes[m], load, results[m]);
      auto after = run_mode(target, modes[0], load, results[0]);
      results[0].value.push_back(after);
      Row ratio;
      for (auto& [test, v] : watched)
        if (before.count(test) && after.count(test) && before[test] + after[test] > 0)
          ratio[test] = v / ((before[test] + after[test]) / 2);
      results[m].value.push_back(watched);
      results[m].ratio.push_back(ratio);
      before = after;
    }
  return results;
}

// The markdown table: one row per test (and the target's CPU per request), the median of each
// mode and the median of its ratios to the unwatched runs beside it.
inline void print_table(const std::vector<Mode>& modes, const std::vector<ModeResult>& results, const std::string& load) {
  std::vector<std::string> tests;
  for (auto& run : results[0].value)
    for (auto& [t, v] : run)
      if (t != kCpuRow && std::find(tests.begin(), tests.end(), t) == tests.end()) tests.push_back(t);
  tests.push_back(kCpuRow);
  std::string head = "| test |", rule = "|---|";
  for (auto& m : modes) head += " " + m.label + " |", rule += "---:|";
  fmt::print("{}\n{}\n", head, rule);
  auto med = [](const std::vector<Row>& runs, const std::string& t) {
    std::vector<double> v;
    for (auto& run : runs)
      if (auto it = run.find(t); it != run.end()) v.push_back(it->second);
    return std::pair{median(v), v.size()};
  };
  for (auto& t : tests) {
    bool cpu = t == kCpuRow;
    auto fmt_value = [&](double v) { return cpu ? fmt::format("{:.1f}", v) : fmt::format("{:.0f}", v); };
    std::string row = "| " + t + " | " + fmt_value(med(results[0].value, t).first) + " |";
    for (size_t m = 1; m < modes.size(); ++m) {
      auto [v, n] = med(results[m].value, t);
      auto [ratio, k] = med(results[m].ratio, t);
      row += n ? fmt::format(" {} ({:.2f}x) |", fmt_value(v), ratio) : " failed |";
    }
    fmt::print("{}\n", row);
  }
  std::string watch_cpu = "| hotfix-ctl watch's own CPU (% of one CPU) | |";
  for (size_t m = 1; m < modes.size(); ++m) watch_cpu += fmt::format(" {:.1f} |", median(results[m].watch_cpu_pct));
  fmt::print("{}\n", watch_cpu);
  size_t rounds = results.size() > 1 ? results[1].ratio.size() : 0;
  fmt::print("\nLoad: {}; {} round{}, {} unwatched runs. Throughput in requests/s; each watched run's ratio is to the "
             "mean of the unwatched runs just before and after it; medians over rounds.\n",
             load, rounds, rounds == 1 ? "" : "s", results[0].value.size());
  for (size_t m = 1; m < modes.size(); ++m) {
    std::string args;
    for (auto& a : modes[m].watch_args) args += (args.empty() ? "" : " ") + a;
    fmt::print("\n`{}`: `hotfix-ctl watch --pid P {}`", modes[m].label, args);
    if (modes[m].load_scale != 1.0) fmt::print(" ({:.0f}% of the requests)", modes[m].load_scale * 100);
    for (int c : results[m].exit_codes)
      if (c != 0) {
        fmt::print(" -- watch exited {}", c);
        break;
      }
    fmt::print("\n");
    if (!results[m].banner.empty()) fmt::print("    {}\n", results[m].banner);
    constexpr size_t kNotes = 4;  // budget notes differ per run in their estimates: the first few
    for (size_t i = 0; i < std::min(kNotes, results[m].notes.size()); ++i) fmt::print("    {}\n", results[m].notes[i]);
    if (results[m].notes.size() > kNotes) fmt::print("    ... and {} more notes\n", results[m].notes.size() - kNotes);
  }
  fmt::print("\n");
  std::fflush(stdout);
}

}  // namespace bench
