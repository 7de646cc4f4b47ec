// Remote system calls and calls finish without a tracer: every one runs on a signal frame and
// ends in rt_sigreturn (process/remote.cpp), so a controller SIGKILLed at ANY point leaves every
// thread of the target exactly where it was. The controller is a separate process
// (fixtures/remote_ctl, or hotfix-ctl itself) killed at each crash point; the target
// (fixtures/remote_target) checks its own registers, a restartable read, a sleep, and counts
// every real-time signal sent to it meanwhile.
#include <signal.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <thread>

#include "support/harness.hpp"

using namespace hotfix::test;
using namespace std::chrono;

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// "Key:\t..." of /proc/PID[/task/TID]/status.
std::string status_of(const std::string& dir, const std::string& key) {
  std::istringstream in(slurp(dir + "/status"));
  for (std::string line; std::getline(in, line);)
    if (line.rfind(key + ":", 0) == 0) {
      auto v = line.substr(key.size() + 1);
      return v.substr(v.find_first_not_of(" \t"));
    }
  return "";
}

// The kernel detaches the tracees as the killed tracer exits; wait until it has.
bool untraced(pid_t pid) {
  for (int i = 0; i < 300; ++i) {
    if (status_of("/proc/" + std::to_string(pid), "TracerPid") == "0") return true;
    std::this_thread::sleep_for(milliseconds(10));
  }
  return false;
}

// No thread is left stopped (state T/t).
std::string stopped_threads(pid_t pid) {
  std::string out;
  for (auto& e : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task")) {
    auto state = status_of(e.path().string(), "State");
    if (!state.empty() && (state[0] == 'T' || state[0] == 't')) out += e.path().filename().string() + " " + state + "; ";
  }
  return out;
}

// Executable memory that maps no file (what the remote layer maps: the call stubs) holds no trap.
std::string anon_exec_traps(pid_t pid) {
  std::istringstream in(slurp("/proc/" + std::to_string(pid) + "/maps"));
  std::string out;
  for (std::string line; std::getline(in, line);) {
    std::istringstream f(line);
    std::string range, perms, off, dev, inode, path;
    f >> range >> perms >> off >> dev >> inode >> path;
    if (perms.size() < 3 || perms[2] != 'x' || !path.empty()) continue;
    auto dash = range.find('-');
    uint64_t lo = std::stoull(range.substr(0, dash), nullptr, 16), hi = std::stoull(range.substr(dash + 1), nullptr, 16);
    auto bytes = read_memory(pid, lo, hi - lo);
    for (size_t i = 0; i < bytes.size(); ++i)
      if (bytes[i] == 0xcc) out += fmt::format("int3 at {:#x}; ", lo + i);
  }
  return out;
}

struct Status {
  long iters = 0, regfail = 0, sig = 0, bytes = 0, last = 0, rerr = 0, sleeps = 0, serr = 0, sshort = 0, naps = 0, nintr = 0;
};

struct Target {
  Child child;
  pid_t regs = 0, reader = 0, sleeper = 0, napper = 0;
  std::string clobber;
  long fed = 0;  // bytes written into the reader's pipe

  Target() : child({fixture("remote_target")}) {
    auto line = child.wait_for("ready");
    REQUIRE(line);
    REQUIRE(std::sscanf(line->c_str(), "ready regs=%d reader=%d sleeper=%d napper=%d", &regs, &reader, &sleeper,
                        &napper) == 4);
    clobber = line->substr(line->find("clobber=") + 8);
  }
  pid_t pid() const { return child.pid(); }

  Status status() {
    child.send("status");
    auto line = child.wait_for("status ");
    REQUIRE(line);
    Status s;
    REQUIRE(std::sscanf(line->c_str(),
                        "status iters=%ld regfail=%ld sig=%ld bytes=%ld last=%ld rerr=%ld sleeps=%ld serr=%ld sshort=%ld "
                        "naps=%ld nintr=%ld",
                        &s.iters, &s.regfail, &s.sig, &s.bytes, &s.last, &s.rerr, &s.sleeps, &s.serr, &s.sshort,
                        &s.naps, &s.nintr) == 11);
    return s;
  }

  std::vector<std::string> ctl_args() const {
    return {fixture("remote_ctl"), std::to_string(pid()), std::to_string(regs), std::to_string(reader),
            std::to_string(sleeper), std::to_string(napper), clobber, fixture("libremote_lib.so")};
  }

  // Everything a harmed thread would show: checked after each controller run or kill.
  // `exact_naps`: the relative sleep was never cut short by EINTR (true while the controller
  // lives; a controller killed mid-call may cost it one EINTR, docs/limits.md).
  void require_unharmed(long signals_sent, bool exact_naps) {
    REQUIRE(untraced(pid()));
    REQUIRE(child.running());
    CHECK(stopped_threads(pid()).empty());
    CHECK(anon_exec_traps(pid()).empty());
    auto before = status();
    CHECK(before.regfail == 0);  // general, vector, MXCSR and red-zone values all intact
    CHECK(before.rerr == 0);     // the read was restarted, not failed with EINTR or -ERESTARTSYS
    CHECK(before.serr == 0);     // the sleep was restarted, never failed
    CHECK(before.sshort == 0);   // nor returned early (nor did the relative sleep without EINTR)
    if (exact_naps) CHECK(before.nintr == 0);
    // The blocked read still works and gets exactly what is written.
    int value = static_cast<int>(1 + fed % 250);
    REQUIRE(child.request(fmt::format("feed {}", value)) == "ok fed");
    ++fed;
    Status after;
    for (int i = 0; i < 300; ++i) {
      after = status();
      if (after.bytes == fed && after.sig == signals_sent && after.sleeps > before.sleeps && after.iters > before.iters) break;
      std::this_thread::sleep_for(milliseconds(10));
    }
    CHECK(after.bytes == fed);
    CHECK(after.last == value);
    CHECK(after.sig == signals_sent);  // no signal lost (real-time signals queue, one by one)
    CHECK(after.sleeps > before.sleeps);
    CHECK(after.iters > before.iters);
    CHECK(after.regfail == 0);
  }
};

// Sends SIGRTMIN to the process and to its register thread, as fast as it can, until stopped.
// Queued with siginfo (sigqueue, rt_tgsigqueueinfo): when the user's queue is full (other
// processes of root may fill it) the send fails and is not counted, where kill() would merge
// it silently into a pending one.
struct SignalBurst {
  pid_t pid, tid;
  std::atomic<bool> stop{false};
  std::atomic<long> sent{0};
  std::thread th;
  SignalBurst(pid_t p, pid_t t, long already) : pid(p), tid(t), sent(already) {
    th = std::thread([this] {
      for (long i = 0; !stop; ++i) {
        siginfo_t si{};
        si.si_signo = SIGRTMIN;
        si.si_code = SI_QUEUE;
        si.si_pid = ::getpid();
        si.si_uid = ::getuid();
        long r = (i & 1) ? ::syscall(SYS_rt_tgsigqueueinfo, pid, tid, SIGRTMIN, &si)
                         : ::syscall(SYS_rt_sigqueueinfo, pid, SIGRTMIN, &si);
        if (r == 0) ++sent;
        std::this_thread::sleep_for(microseconds(100));
      }
    });
  }
  long finish() {
    stop = true;
    th.join();
    return sent;
  }
};

struct ScopedEnv {
  std::string name;
  ScopedEnv(const std::string& n, const std::string& v) : name(n) { ::setenv(n.c_str(), v.c_str(), 1); }
  ~ScopedEnv() { ::unsetenv(name.c_str()); }
};

// Runs the controller (killed at crash point `k` when k > 0) with a signal burst meanwhile.
// Returns its exit code (137 when killed) and stdout.
std::pair<int, std::string> run_controller(Target& t, long k, long& signals_sent) {
  std::optional<ScopedEnv> env;
  if (k > 0) env.emplace("HOTFIX_CRASH_AT", std::to_string(k));
  SignalBurst burst(t.pid(), t.regs, signals_sent);
  Child ctl(t.ctl_args());
  env.reset();
  auto code = ctl.wait(seconds(60));
  signals_sent = burst.finish();
  REQUIRE(code);
  return {*code, ctl.drain_stdout() + ctl.drain_stderr()};
}

long count_crash_points(Target& t) {
  ScopedEnv list("HOTFIX_CRASH_LIST", "1");
  auto r = run(t.ctl_args());
  REQUIRE(r.exit_code == 0);
  long n = 0;
  std::istringstream in(r.err);
  for (std::string line; std::getline(in, line);) n += line.rfind("crashpoint ", 0) == 0;
  return n;
}

}  // namespace

TEST_CASE("remote syscalls, calls and a dlopen leave every thread exactly as it was", "[remote]") {
  require_root();
  Target t;
  long sent = 0;
  for (int round = 0; round < 3; ++round) {
    auto [code, out] = run_controller(t, 0, sent);
    INFO(out);
    REQUIRE(code == 0);
    CHECK(out.find("done") != std::string::npos);
    t.require_unharmed(sent, true);
  }
  INFO("signals sent: " << sent);
  CHECK(sent > 0);
}

TEST_CASE("the controller SIGKILLed at every crash point of the remote layer harms no thread", "[remote][crash]") {
  require_root();
  long points = 0;
  {
    Target probe;
    points = count_crash_points(probe);
  }
  INFO("crash points: " << points);
  REQUIRE(points > 50);  // every step of every remote syscall and call
  // A fresh target every 16 kills, so that a failure names a small range of k.
  for (long first = 1; first <= points; first += 16) {
    Target t;
    long sent = 0;
    for (long k = first; k < first + 16 && k <= points; ++k) {
      INFO("killed at crash point " << k << " of " << points);
      auto [code, out] = run_controller(t, k, sent);
      INFO(out);
      // Killed there, or (the run took another path: fewer steps) finished normally.
      REQUIRE((code == 128 + SIGKILL || code == 0));
      t.require_unharmed(sent, false);
    }
  }
}

namespace {

// tests/fixtures/patchee: eight workers checking every result of the functions being patched.
struct Patchee {
  Child child;
  Patchee() : child({fixture("patchee")}) { REQUIRE(child.wait_for("ready")); }
  pid_t pid() const { return child.pid(); }
  ~Patchee() {
    child.signal(SIGKILL);
    child.wait();
    std::error_code ec;
    std::filesystem::remove_all("/run/hotfix/" + std::to_string(child.pid()), ec);
    std::filesystem::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(child.pid()), ec);
  }
  // Total calls and bad results since the last call.
  std::pair<long, long> calls_and_bad() {
    child.send("stats");
    long calls = 0, bad = 0;
    for (;;) {
      auto line = child.read_line();
      REQUIRE(line);
      if (line->rfind("ok", 0) == 0) break;
      std::istringstream in(*line);
      std::string kind, name;
      long o = 0, n1 = 0, n2 = 0, b = 0;
      in >> kind >> name >> o >> n1 >> n2 >> b;
      if (kind == "stat") calls += o + n1 + n2 + b, bad += b;
    }
    REQUIRE(child.request("reset") == "ok reset");
    return {calls, bad};
  }
};

}  // namespace

TEST_CASE("hotfix-ctl patch SIGKILLed at random moments never harms the target", "[remote][crash]") {
  require_root();
  std::mt19937 rng(20261202);
  Patchee p;
  // How long a whole patch takes here, to spread the kills over it.
  auto t0 = steady_clock::now();
  auto full = run({ctl(), "patch", "--pid", std::to_string(p.pid()), "--lib", fixture("fix_v1.so")});
  auto took = duration_cast<microseconds>(steady_clock::now() - t0);
  INFO(full.out << full.err);
  REQUIRE(full.exit_code == 0);
  REQUIRE(run({ctl(), "revert", "--pid", std::to_string(p.pid()), "--all"}).exit_code == 0);
  std::uniform_int_distribution<long> when(0, took.count());
  for (int i = 0; i < 50; ++i) {
    auto delay = microseconds(when(rng));
    INFO("run " << i << ": SIGKILL after " << delay.count() << " us of about " << took.count());
    {
      Child victim({ctl(), "patch", "--pid", std::to_string(p.pid()), "--lib", fixture("fix_v1.so")});
      std::this_thread::sleep_for(delay);
      victim.signal(SIGKILL);
      REQUIRE(victim.wait(seconds(30)));
    }
    REQUIRE(untraced(p.pid()));
    REQUIRE(p.child.running());
    CHECK(stopped_threads(p.pid()).empty());
    (void)p.calls_and_bad();
    std::this_thread::sleep_for(milliseconds(30));
    auto [calls, bad] = p.calls_and_bad();
    CHECK(bad == 0);    // every result the workers checked was right
    CHECK(calls > 0);   // and they keep running
  }
}
