// bench_watch: what `hotfix-ctl watch` costs.
//  1. attach + detach time for 10, 100, 1000 functions: uprobe_multi versus one perf uprobe
//     per function (the fallback), entry + return probes;
//  2. per-call cost on a hot function without probes, with watch (entry, entry + return) and
//     with bpftrace, on the same target in the same run.
// Usage: bench_watch [--quick]   (as root; fixtures built: cmake --build B --target hotfix_fixtures)
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fmt/core.h>
#include <optional>
#include <string>
#include <vector>

#include "observe/watch.hpp"
#include "patch/watchstubs.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix;
using clk = std::chrono::steady_clock;

namespace {

// A program we talk to line by line over pipes; killed and reaped on destruction.
class Proc {
 public:
  explicit Proc(std::vector<std::string> argv) {
    int in[2], out[2];
    if (::pipe2(in, O_CLOEXEC) || ::pipe2(out, O_CLOEXEC)) throw std::runtime_error("pipe");
    pid_ = ::fork();
    if (pid_ == 0) {
      ::dup2(in[0], 0);
      ::dup2(out[1], 1);
      int null = ::open("/dev/null", O_WRONLY);
      ::dup2(null, 2);
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the bench, even a killed one
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(a.data());
      args.push_back(nullptr);
      ::execvp(args[0], args.data());
      ::_exit(127);
    }
    ::close(in[0]);
    ::close(out[1]);
    in_ = in[1], out_ = out[0];
  }
  ~Proc() {
    ::kill(pid_, SIGKILL);
    ::waitpid(pid_, nullptr, 0);
    ::close(in_);
    ::close(out_);
  }
  pid_t pid() const { return pid_; }
  std::optional<std::string> line(int timeout_ms = 30000) {
    auto deadline = clk::now() + std::chrono::milliseconds(timeout_ms);
    for (;;) {
      if (auto nl = buf_.find('\n'); nl != std::string::npos) {
        std::string l = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return l;
      }
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - clk::now()).count();
      pollfd p{out_, POLLIN, 0};
      if (left <= 0 || ::poll(&p, 1, static_cast<int>(left)) <= 0) return std::nullopt;
      char tmp[4096];
      ssize_t n = ::read(out_, tmp, sizeof tmp);
      if (n <= 0) return std::nullopt;
      buf_.append(tmp, n);
    }
  }
  std::string request(const std::string& cmd) {
    std::string s = cmd + "\n";
    if (::write(in_, s.data(), s.size()) < 0) return "err write";
    while (auto l = line())
      if (l->rfind("ok", 0) == 0 || l->rfind("err", 0) == 0) return *l;
    return "err timeout";
  }
  // Ask it to stop with `sig`; after 10 s the destructor's SIGKILL ends it anyway.
  void stop(int sig) {
    ::kill(pid_, sig);
    for (int i = 0; i < 1000 && ::waitpid(pid_, nullptr, WNOHANG) == 0; ++i) ::usleep(10000);
  }

 private:
  pid_t pid_ = -1;
  int in_ = -1, out_ = -1;
  std::string buf_;
};

std::string fixture(const std::string& name) { return std::string(HOTFIX_FIXTURES) + "/" + name; }

double ms_since(clk::time_point t0) { return std::chrono::duration<double, std::milli>(clk::now() - t0).count(); }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct AttachTime {
  double attach_ms = 0, detach_ms = 0;
};

std::optional<AttachTime> time_attach(pid_t pid, const std::vector<Function>& fns, ProbeMechanism m, int runs) {
  std::vector<double> attach, detach;
  for (int r = 0; r < runs; ++r) {
    auto w = Watch::attach(pid, fns, WatchOptions{.returns = true, .mechanism = m});
    if (!w) {
      fmt::print(stderr, "bench_watch: {}\n", w.error().line());
      return std::nullopt;
    }
    attach.push_back(w->attach_ms());
    auto t0 = clk::now();
    w->detach();
    detach.push_back(ms_since(t0));
  }
  return AttachTime{median(attach), median(detach)};
}

void bench_attach(bool quick) {
  Proc many({fixture("calls_many")});
  many.request("ready");
  auto table = SymbolTable::for_pid(many.pid());
  if (!table) return (void)fmt::print(stderr, "bench_watch: {}\n", table.error().line());
  auto all = symbols__select(*table, {"many_*"});
  if (!all) return (void)fmt::print(stderr, "bench_watch: {}\n", all.error().line());
  fmt::print("## attach + detach, entry + return probes (median of runs)\n\n");
  fmt::print("| functions | uprobe_multi attach | uprobe_multi detach | perf uprobes attach | perf uprobes detach |\n");
  fmt::print("|---:|---:|---:|---:|---:|\n");
  std::optional<AttachTime> perf_per_fn;
  for (size_t n : {10, 100, 1000}) {
    std::vector<Function> fns(all->begin(), all->begin() + static_cast<long>(std::min(n, all->size())));
    auto multi = time_attach(many.pid(), fns, ProbeMechanism::uprobe_multi, 5);
    std::string perf_a = "-", perf_d = "-";
    if (n <= (quick ? 10u : 100u)) {
      auto perf = time_attach(many.pid(), fns, ProbeMechanism::perf, 1);
      if (perf) {
        perf_a = fmt::format("{:.1f} ms", perf->attach_ms);
        perf_d = fmt::format("{:.1f} ms", perf->detach_ms);
        perf_per_fn = AttachTime{perf->attach_ms / double(n), perf->detach_ms / double(n)};
      }
    } else if (perf_per_fn) {
      perf_a = fmt::format("~{:.0f} ms (extrapolated)", perf_per_fn->attach_ms * double(n));
      perf_d = fmt::format("~{:.0f} ms (extrapolated)", perf_per_fn->detach_ms * double(n));
    }
    if (multi)
      fmt::print("| {} | {:.1f} ms | {:.1f} ms | {} | {} |\n", n, multi->attach_ms, multi->detach_ms, perf_a, perf_d);
    std::fflush(stdout);
  }
  fmt::print("\n");
}

double ns_per_call(Proc& calls, const std::string& fn, long n) {
  auto reply = calls.request(fmt::format("time {} {}", fn, n));
  return reply.rfind("ok ", 0) == 0 ? std::stod(reply.substr(3)) : -1;
}

// bpftrace needs tracefs; mount it for the bench only (and unmount what we mounted).
struct Tracefs {
  bool mounted_here = false;
  Tracefs() {
    struct stat st;
    if (::stat("/sys/kernel/tracing/uprobe_events", &st) == 0) return;
    mounted_here = ::mount("nodev", "/sys/kernel/tracing", "tracefs", 0, nullptr) == 0;
  }
  ~Tracefs() {
    if (mounted_here) ::umount("/sys/kernel/tracing");
  }
};

// bpftrace says "Attaching 1 probe..." before it attaches: wait until the uprobe's breakpoint
// is really in the target's code.
bool wait_for_breakpoint(pid_t pid, uint64_t addr) {
  for (int i = 0; i < 3000; ++i) {
    unsigned char byte = 0;
    iovec local{&byte, 1}, remote{reinterpret_cast<void*>(addr), 1};
    if (::process_vm_readv(pid, &local, 1, &remote, 1, 0) == 1 && byte == 0xcc) return true;
    ::usleep(10000);
  }
  return false;
}

bool have_bpftrace() { return ::system("command -v bpftrace >/dev/null 2>&1") == 0; }

void bench_hit_cost(bool quick) {
  Proc calls({fixture("calls")});
  calls.request("ready");
  auto table = SymbolTable::for_pid(calls.pid());
  if (!table) return (void)fmt::print(stderr, "bench_watch: {}\n", table.error().line());
  const long base_n = quick ? 200000 : 2000000;
  const long probed_n = quick ? 5000 : 50000;
  bool bpftrace = have_bpftrace();
  Tracefs tracefs;  // before any bpftrace run
  fmt::print("## cost per call of a hot function (ns/call; ratio to no probe)\n\n");
  fmt::print("| function (first instruction) | no probe | trampoline (default watch) | added by trampoline | watch --count uprobe --no-inflight | watch (entry+return) | bpftrace count() |\n");
  fmt::print("|---|---:|---:|---:|---:|---:|---:|\n");
  const std::vector<std::pair<std::string, std::string>> hot = {
      {"c_add", "ordinary: movslq"}, {"hot_push", "push %rbp (emulated)"}, {"hot_nop5", "5-byte nop"}};
  for (auto& [fn, what] : hot) {
    ns_per_call(calls, fn, base_n / 10);  // warm up
    double base = ns_per_call(calls, fn, base_n);
    auto fns = symbols__select(*table, {fn});
    if (!fns) return (void)fmt::print(stderr, "bench_watch: {}\n", fns.error().line());
    auto with_watch = [&](bool returns) {
      auto w = Watch::attach(calls.pid(), *fns, WatchOptions{.returns = returns});
      return w ? ns_per_call(calls, fn, probed_n) : -1.0;
    };
    double tramp = -1;
    {
      std::vector<TrampolineRefusal> refused;
      auto stubs = WatchStubs::install(calls.pid(), *fns, {}, refused);
      if (stubs && !stubs->functions().empty()) {
        ns_per_call(calls, fn, base_n / 10);
        tramp = ns_per_call(calls, fn, base_n);
        (void)stubs->remove(std::chrono::seconds(5));
      }
    }
    double entry = with_watch(false);
    double both = with_watch(true);
    std::string bt = "not installed";
    if (bpftrace) {
      Proc trace({"bpftrace", "-B", "line", "-p", std::to_string(calls.pid()), "-e",
                  fmt::format("uprobe:{}:{} {{ @[probe] = count(); }}", fixture("calls"), fn)});
      bt = "failed to attach";
      if (trace.line(60000) && wait_for_breakpoint(calls.pid(), fns->front().address)) {
        double v = ns_per_call(calls, fn, probed_n);
        bt = fmt::format("{:.0f} ({:.0f}x)", v, v / base);
      }
      trace.stop(SIGINT);
    }
    fmt::print("| {} ({}) | {:.1f} | {:.1f} | {:.1f} | {:.0f} ({:.0f}x) | {:.0f} ({:.0f}x) | {} |\n", fn, what, base, tramp,
               tramp - base, entry, entry / base, both, both / base, bt);
    std::fflush(stdout);
  }
  fmt::print("\n");
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  if (::geteuid() != 0) {
    fmt::print(stderr, "bench_watch: needs root (BPF uprobes)\n");
    return 1;
  }
  fmt::print("# bench_watch{}\n\n", quick ? " --quick" : "");
  if (!std::getenv("BENCH_SKIP_ATTACH")) bench_attach(quick);
  bench_hit_cost(quick);
  return 0;
}
