// bench_patch: what `hotfix-ctl patch` costs, all on the benchp_target fixture in one run.
//  1. per call: unpatched vs patched (--no-count: island with an absolute jmp; default: counting
//     island) vs uprobe-counted (watch --no-inflight), for a small body and a trivial one;
//  2. end-to-end wall time of `patch --observe 0` (and of --dry-run, --no-count, revert, and
//     a bare CLI start) on an idle target;
//  3. the pause the patch reports (pause_us) against the target's thread count, strict mode;
//  4. time to patch a function busy most of the time: uprobe-driven quiescence vs --blind-retry;
//  5. where `patch --observe 0` spends its time, phase by phase (HOTFIX_TIMING=1): symbol
//     resolution beside the whole patch.
// Usage: bench_patch [--quick]   (as root; fixtures built: cmake --build B --target hotfix_fixtures)
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
#include <fmt/core.h>
#include <fmt/format.h>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using clk = std::chrono::steady_clock;

namespace {

const std::string kCtl = HOTFIX_CTL;
const std::string kTarget = std::string(HOTFIX_FIXTURES) + "/benchp_target";
const std::string kFix = std::string(HOTFIX_FIXTURES) + "/benchp_fix.so";

double ms_since(clk::time_point t0) { return std::chrono::duration<double, std::milli>(clk::now() - t0).count(); }

// A program we talk to line by line over pipes (stdout, or stderr with `read_stderr`); killed
// and reaped on destruction.
class Proc {
 public:
  explicit Proc(std::vector<std::string> argv, bool read_stderr = false) {
    int in[2], out[2];
    if (::pipe2(in, O_CLOEXEC) || ::pipe2(out, O_CLOEXEC)) throw std::runtime_error("pipe");
    pid_ = ::fork();
    if (pid_ < 0) throw std::runtime_error("fork");
    if (pid_ == 0) {
      ::dup2(in[0], 0);
      int null = ::open("/dev/null", O_WRONLY);
      ::dup2(read_stderr ? null : out[1], 1);
      ::dup2(read_stderr ? out[1] : null, 2);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the bench
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(a.data());
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
    ::close(in[0]);
    ::close(out[1]);
    in_ = in[1], out_ = ::fdopen(out[0], "r");
  }
  ~Proc() {
    if (pid_ > 0) {  // never kill(-1): that would signal every process
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
    ::close(in_);
    if (out_) ::fclose(out_);
  }
  Proc(const Proc&) = delete;
  pid_t pid() const { return pid_; }
  std::string line() {
    char buf[4096];
    if (!std::fgets(buf, sizeof buf, out_)) throw std::runtime_error("target closed its output");
    return buf;
  }
  std::string ask(const std::string& cmd) {
    std::string c = cmd + "\n";
    if (::write(in_, c.data(), c.size()) != ssize_t(c.size())) throw std::runtime_error("write to target");
    return line();
  }
  void interrupt_and_wait() {
    if (pid_ <= 0) return;
    ::kill(pid_, SIGINT);
    ::waitpid(pid_, nullptr, 0);
    pid_ = -1;
  }

 private:
  pid_t pid_ = -1;
  int in_ = -1;
  FILE* out_ = nullptr;
};

std::unique_ptr<Proc> start_target(int threads = 1, int spinners = 0) {
  auto t = std::make_unique<Proc>(std::vector<std::string>{kTarget, std::to_string(threads), std::to_string(spinners)});
  if (t->ask("ready").rfind("ok ", 0) != 0) throw std::runtime_error("benchp_target did not start");
  return t;
}

// Run a command to completion: exit status, stdout, wall time.
struct Run {
  int status = -1;
  std::string out;
  double ms = 0;
};
Run run(std::vector<std::string> argv) {
  int out[2];
  if (::pipe2(out, O_CLOEXEC)) throw std::runtime_error("pipe");
  auto t0 = clk::now();
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork");
  if (pid == 0) {
    ::dup2(out[1], 1);
    int null = ::open("/dev/null", O_WRONLY);
    ::dup2(null, 2);
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  ::close(out[1]);
  Run r;
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof buf)) > 0;) r.out.append(buf, n);
  ::close(out[0]);
  int st = 0;
  ::waitpid(pid, &st, 0);
  r.ms = ms_since(t0);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return r;
}

double json_number(const std::string& json, const std::string& key) {
  auto at = json.find("\"" + key + "\":");
  return at == std::string::npos ? -1 : std::atof(json.c_str() + at + key.size() + 3);
}

Run patch(pid_t pid, std::vector<std::string> extra) {
  std::vector<std::string> argv{kCtl, "patch", "--pid", std::to_string(pid), "--lib", kFix, "--observe", "0", "--json"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  auto r = run(argv);
  if (r.status != 0) throw std::runtime_error(fmt::format("hotfix-ctl patch {} failed (exit {}): {}", fmt::join(extra, " "), r.status, r.out));
  return r;
}
Run revert(pid_t pid) {
  auto r = run({kCtl, "revert", "--pid", std::to_string(pid), "--all"});
  if (r.status != 0) throw std::runtime_error(fmt::format("hotfix-ctl revert failed (exit {})", r.status));
  return r;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}

// ns/call of `time WHICH N`, median of `reps`; the checksum tells whose code ran.
struct Timing {
  double ns = 0;
  std::string checksum;
};
Timing time_calls(Proc& t, const std::string& which, long n, int reps) {
  std::vector<double> v;
  Timing out;
  for (int i = 0; i < reps; ++i) {
    auto ans = t.ask(fmt::format("time {} {}", which, n));
    char sum[64] = {};
    double ns = 0;
    if (std::sscanf(ans.c_str(), "ok %lf %63s", &ns, sum) != 2) throw std::runtime_error("bad answer: " + ans);
    v.push_back(ns);
    out.checksum = sum;
  }
  out.ns = median(v);
  return out;
}

std::string ratio(double x, double base) { return fmt::format("{:.2f}x", x / base); }

// 1. Per-call cost. Rounds interleave the columns so load drifts hit all of them alike.
void per_call(bool quick) {
  int rounds = quick ? 3 : 5, reps = 3;
  struct Fn {
    const char* name;
    long n;
    std::vector<double> col[4];
    std::string sums[3];
  } fns[] = {{"small", 2000000, {}, {}}, {"trivial", 10000000, {}, {}}};
  auto target = start_target();
  for (int r = 0; r < rounds; ++r) {
    for (auto& f : fns) {
      auto t = time_calls(*target, f.name, f.n, reps);
      f.col[0].push_back(t.ns), f.sums[0] = t.checksum;
    }
    patch(target->pid(), {"--no-count", "bp_small", "bp_trivial"});
    for (auto& f : fns) {
      auto t = time_calls(*target, f.name, f.n, reps);
      f.col[1].push_back(t.ns), f.sums[1] = t.checksum;
    }
    revert(target->pid());
    patch(target->pid(), {"bp_small", "bp_trivial"});
    for (auto& f : fns) {
      auto t = time_calls(*target, f.name, f.n, reps);
      f.col[2].push_back(t.ns), f.sums[2] = t.checksum;
    }
    revert(target->pid());
  }
  {  // uprobes trap on every call: fewer calls, one round
    Proc watch({kCtl, "watch", "--pid", std::to_string(target->pid()), "--no-inflight", "--interval", "1000",
                "--max-overhead", "1e6", "bp_small", "bp_trivial"},
               /*read_stderr=*/true);
    while (watch.line().find("watching") == std::string::npos) {
    }
    for (auto& f : fns) f.col[3].push_back(time_calls(*target, f.name, 20000, reps).ns);
    watch.interrupt_and_wait();
  }
  for (auto& f : fns)
    if (f.sums[1] == f.sums[0] || f.sums[2] == f.sums[0])
      std::printf("WARNING: bp_%s: the patched runs returned the unpatched checksum: the patch did not take\n", f.name);
  std::printf("### Cost per call (ns/call, median of %d rounds x %d runs; ratio to unpatched)\n\n", rounds, reps);
  std::printf("| function | unpatched | patched --no-count (island, absolute jmp) | patched, counting island (default) | watch --no-inflight (uprobe) |\n");
  std::printf("|---|---:|---:|---:|---:|\n");
  for (auto& f : fns) {
    double base = median(f.col[0]);
    std::printf("| bp_%s | %.2f | %.2f (%s) | %.2f (%s) | %.0f (%s) |\n", f.name, base, median(f.col[1]),
                ratio(median(f.col[1]), base).c_str(), median(f.col[2]), ratio(median(f.col[2]), base).c_str(),
                median(f.col[3]), ratio(median(f.col[3]), base).c_str());
  }
  std::printf("\n");
  std::fflush(stdout);
}

// 2. End-to-end wall time on an idle target, one function.
void end_to_end(bool quick) {
  int reps = quick ? 5 : 9;
  auto target = start_target();
  std::string pid = std::to_string(target->pid());
  std::vector<double> bare, list, dry, full, nocount, entry, entry_nocount, blind, rev, observe1, adaptive, adaptive_uprobe;
  for (int r = 0; r < reps; ++r) {
    bare.push_back(run({kCtl, "--help"}).ms);
    list.push_back(run({kCtl, "list", "--pid", pid}).ms);
    dry.push_back(patch(target->pid(), {"--dry-run", "bp_trivial"}).ms);
    full.push_back(patch(target->pid(), {"bp_trivial"}).ms);
    rev.push_back(revert(target->pid()).ms);
    nocount.push_back(patch(target->pid(), {"--no-count", "bp_trivial"}).ms);
    revert(target->pid());
    entry.push_back(patch(target->pid(), {"--consistency", "entry", "bp_trivial"}).ms);
    revert(target->pid());
    entry_nocount.push_back(patch(target->pid(), {"--consistency", "entry", "--no-count", "bp_trivial"}).ms);
    revert(target->pid());
    blind.push_back(patch(target->pid(), {"--blind-retry", "bp_trivial"}).ms);
    revert(target->pid());
  }
  // The liveness window: default (adaptive, trampolines), adaptive with uprobes, and the old
  // fixed 1 s, for scale. Same target, alternated.
  for (int r = 0; r < (quick ? 5 : 9); ++r) {
    auto res = run({kCtl, "patch", "--pid", pid, "--lib", kFix, "--json", "bp_trivial"});
    if (res.status == 0) adaptive.push_back(res.ms);
    revert(target->pid());
    res = run({kCtl, "patch", "--pid", pid, "--lib", kFix, "--json", "--count", "uprobe", "bp_trivial"});
    if (res.status == 0) adaptive_uprobe.push_back(res.ms);
    revert(target->pid());
  }
  for (int r = 0; r < 3; ++r) {
    auto res = run({kCtl, "patch", "--pid", pid, "--lib", kFix, "--json", "--observe", "1", "bp_trivial"});
    if (res.status == 0) observe1.push_back(res.ms);
    revert(target->pid());
  }
  std::printf("### End-to-end wall time, idle target, one function (ms, median of %d)\n\n", reps);
  // Each row adds one thing to the row above (or says what it is compared with).
  std::printf("| command | wall (ms) | difference |\n|---|---:|---:|\n");
  struct Row {
    const char* what;
    double ms;
    double vs;
  } rows[] = {
      {"`hotfix-ctl --help` (process start, no work)", median(bare), 0},
      {"`list --pid P` (reads the registry)", median(list), median(bare)},
      {"`patch --dry-run --observe 0` (resolve + plan)", median(dry), median(list)},
      {"`patch --observe 0 --consistency entry --no-count` (inject, island, stop, write; no uprobes)",
       median(entry_nocount), median(dry)},
      {"`patch --observe 0 --consistency entry` (+ counting map, counting island, exit probes)", median(entry),
       median(entry_nocount)},
      {"`patch --observe 0 --blind-retry` (strict: + stack check, no quiescence probes)", median(blind),
       median(entry)},
      {"`patch --observe 0` (default: strict; quiescence probes only after a blocked stop)", median(full), median(blind)},
      {"`patch --observe 0 --no-count` (strict, quiescence probes, no counting)", median(nocount), median(full)}};
  for (auto& row : rows)
    std::printf("| %s | %.1f | %s |\n", row.what, row.ms, row.vs ? fmt::format("{:+.1f}", row.ms - row.vs).c_str() : "");
  std::printf("| `revert --pid P --all` | %.1f | |\n", median(rev));
  std::printf("| `patch` (default: adaptive observe window, 0.1 s up to 1 s, counting trampolines; median of %zu) | %.1f | %+.1f vs `--observe 0` |\n",
              adaptive.size(), median(adaptive), median(adaptive) - median(full));
  std::printf("| `patch --count uprobe` (adaptive window counted by uprobes; median of %zu) | %.1f | %+.1f vs default |\n",
              adaptive_uprobe.size(), median(adaptive_uprobe), median(adaptive_uprobe) - median(adaptive));
  std::printf("| `patch --observe 1` (the old default: fixed 1 s window; median of %zu) | %.1f | |\n\n", observe1.size(),
              median(observe1));
  std::fflush(stdout);
}

// 3. Pause vs threads.
void pause_vs_threads(bool quick) {
  int reps = 5;
  std::vector<int> counts = quick ? std::vector<int>{1, 16, 128} : std::vector<int>{1, 16, 128, 1024};
  std::printf("### Pause reported by `patch --json` (strict, one function; µs, median of %d, worst in brackets)\n\n", reps);
  std::printf("| threads | spinning | pause_us | attempts | patch wall (ms) |\n|---:|---:|---:|---:|---:|\n");
  for (int n : counts) {
    int busy = n == 1 ? 0 : std::max(1, n / 16);
    auto target = start_target(n, busy);
    std::vector<double> pause, attempts, wall;
    for (int r = 0; r < reps; ++r) {
      auto res = patch(target->pid(), {"bp_trivial"});
      pause.push_back(json_number(res.out, "pause_us"));
      attempts.push_back(json_number(res.out, "attempts"));
      wall.push_back(res.ms);
      revert(target->pid());
    }
    std::printf("| %d | %d | %.0f (%.0f) | %.0f | %.1f |\n", n, busy, median(pause),
                *std::max_element(pause.begin(), pause.end()), median(attempts), median(wall));
    std::fflush(stdout);
  }
  std::printf("\n");
}

// 4. A function busy most of the time: uprobe-driven quiescence vs blind retry.
void busy_function(bool quick) {
  int reps = quick ? 3 : 5, threads = 2;
  const char* timeout = "30";
  struct Mode {
    const char* name;
    std::vector<std::string> flags;
    std::vector<double> wall, attempts, pause;
    int failed = 0;
  } modes[] = {{"uprobe-driven (default)", {}, {}, {}, {}, 0}, {"--blind-retry", {"--blind-retry"}, {}, {}, {}, 0}};
  for (int r = 0; r < reps; ++r) {
    for (auto& m : modes) {
      auto target = start_target();
      target->ask(fmt::format("busy {}", threads));
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      std::vector<std::string> argv{kCtl, "patch", "--pid", std::to_string(target->pid()), "--lib", kFix,
                                    "--observe", "0", "--json", "--timeout", timeout, "bp_busy"};
      argv.insert(argv.end(), m.flags.begin(), m.flags.end());
      auto res = run(argv);
      if (res.status != 0) {
        ++m.failed;
        continue;
      }
      m.wall.push_back(res.ms);
      m.attempts.push_back(json_number(res.out, "attempts"));
      m.pause.push_back(json_number(res.out, "pause_us"));
    }
  }
  std::printf("### Time to patch bp_busy (%d threads: ~2 ms inside, ~0.2 ms sleep between), strict, --timeout %s s; median of %d\n\n",
              threads, timeout, reps);
  std::printf("| quiescence | wall to success (ms) | worst (ms) | attempts | pause_us | failed (timeout) |\n|---|---:|---:|---:|---:|---:|\n");
  for (auto& m : modes) {
    double worst = m.wall.empty() ? 0 : *std::max_element(m.wall.begin(), m.wall.end());
    std::printf("| %s | %.0f | %.0f | %.0f | %.0f | %d of %d |\n", m.name, median(m.wall), worst, median(m.attempts),
                median(m.pause), m.failed, reps);
  }
  std::printf("\n");
  std::fflush(stdout);
}

// 5. Phases of one `patch --observe 0 bp_trivial`, as hotfix-ctl reports them with HOTFIX_TIMING=1
// (stderr lines "hotfix timing: NAME W ms (cpu C ms)"): wall and CPU, median of `reps`.
void phases(bool quick) {
  int reps = quick ? 5 : 9;
  auto target = start_target();
  std::vector<std::string> order;
  std::map<std::string, std::pair<std::vector<double>, std::vector<double>>> seen;
  std::vector<double> whole;
  for (int r = 0; r < reps; ++r) {
    int err[2];
    if (::pipe2(err, O_CLOEXEC)) throw std::runtime_error("pipe");
    auto t0 = clk::now();
    pid_t pid = ::fork();
    if (pid == 0) {
      int null = ::open("/dev/null", O_WRONLY);
      ::dup2(null, 1);
      ::dup2(err[1], 2);
      ::setenv("HOTFIX_TIMING", "1", 1);
      ::execl(kCtl.c_str(), kCtl.c_str(), "patch", "--pid", std::to_string(target->pid()).c_str(), "--lib", kFix.c_str(),
              "--observe", "0", "bp_trivial", nullptr);
      ::_exit(127);
    }
    ::close(err[1]);
    std::string text;
    char buf[4096];
    for (ssize_t n; (n = ::read(err[0], buf, sizeof buf)) > 0;) text.append(buf, n);
    ::close(err[0]);
    int st = 0;
    ::waitpid(pid, &st, 0);
    double ms = ms_since(t0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) throw std::runtime_error("patch with HOTFIX_TIMING=1 failed: " + text);
    whole.push_back(ms);
    const std::string tag = "hotfix timing: ";
    for (size_t at = text.find(tag); at != std::string::npos; at = text.find(tag, at + 1)) {
      std::string line = text.substr(at + tag.size(), text.find('\n', at) - at - tag.size());
      auto cpu_at = line.rfind(" (cpu ");
      if (cpu_at == std::string::npos || cpu_at < 4 || line.compare(cpu_at - 3, 3, " ms") != 0) continue;
      auto wall_at = line.rfind(' ', cpu_at - 4);  // "NAME W ms (cpu": the space before W
      if (wall_at == std::string::npos) continue;
      std::string name = line.substr(0, wall_at);
      if (!seen.count(name)) order.push_back(name);
      seen[name].first.push_back(std::atof(line.c_str() + wall_at + 1));
      seen[name].second.push_back(std::atof(line.c_str() + cpu_at + 6));
    }
    revert(target->pid());
  }
  std::printf("### Where `patch --observe 0 bp_trivial` spends its time (HOTFIX_TIMING=1; ms, median of %d)\n\n", reps);
  std::printf("| phase | wall | cpu |\n|---|---:|---:|\n");
  double sum_cpu = 0;
  for (auto& name : order) {
    auto& [wall, cpu] = seen[name];
    sum_cpu += median(cpu);
    std::printf("| %s | %.2f | %.2f |\n", name.c_str(), median(wall), median(cpu));
  }
  std::printf("| **the whole `patch --observe 0`** (fork to exit) | %.1f | (phases: %.1f) |\n", median(whole), sum_cpu);
  if (seen.count("prepare: symbols"))
    std::printf("\nsymbol resolution (SymbolTable::for_pid_needing: the objects the patch concerns): %.2f ms wall, %.2f ms cpu, "
                "of a %.1f ms patch\n\n",
                median(seen["prepare: symbols"].first), median(seen["prepare: symbols"].second), median(whole));
  std::fflush(stdout);
}

double load_average() {
  double l = 0;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &l) != 1) l = 0;
    std::fclose(f);
  }
  return l;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && !std::strcmp(argv[1], "--quick");
  ::signal(SIGPIPE, SIG_IGN);
  std::string only = std::getenv("BENCH_PATCH_ONLY") ? std::getenv("BENCH_PATCH_ONLY") : "12345";
  std::printf("## bench_patch (load average at start: %.1f)\n\n", load_average());
  try {
    if (only.find('1') != std::string::npos) per_call(quick);
    if (only.find('2') != std::string::npos) end_to_end(quick);
    if (only.find('3') != std::string::npos) pause_vs_threads(quick);
    if (only.find('4') != std::string::npos) busy_function(quick);
    if (only.find('5') != std::string::npos) phases(quick);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_patch: %s\n", e.what());
    return 1;
  }
  std::printf("load average at end: %.1f\n", load_average());
  return 0;
}
