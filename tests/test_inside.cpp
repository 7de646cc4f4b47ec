// "Threads inside" sees threads that were inside before anyone looked (observe/inside.hpp):
// a thread parked in pk_park (tests/fixtures/parked_target.c) is counted from one look,
// without being stopped; a spinning thread is stopped alone, briefly, and counted; neither
// stays traced or stopped. watch --inflight shows the parked thread from its first sample and
// drops it when it leaves; patch's observe window reports it.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <regex>

#include "observe/inside.hpp"
#include "support/harness.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace std::chrono;

namespace {

struct Target {
  Child child{{fixture("parked_target")}};
  Target() { REQUIRE(child.wait_for("ready")); }
  ~Target() {
    child.signal(SIGKILL);
    child.wait();
  }
  pid_t pid() const { return child.pid(); }
};

std::vector<Function> functions_of(pid_t pid, const std::vector<std::string>& names) {
  auto table = SymbolTable::for_pid(pid);
  REQUIRE(table);
  std::vector<Function> out;
  for (auto& n : names) {
    auto fs = symbols__select(*table, {n}, SelectOptions{"parked_target"});
    INFO(n << ": " << (fs ? "" : fs.error().line()));
    REQUIRE(fs);
    REQUIRE(fs->size() == 1);
    out.push_back(fs->front());
  }
  return out;
}

// No thread of the process is traced or in a ptrace/job-control stop.
void check_untouched(pid_t pid) {
  for (auto& entry : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task")) {
    std::string status = read_file(entry.path().string() + "/status");
    INFO(entry.path() << ":\n" << status);
    CHECK(status.find("TracerPid:\t0\n") != std::string::npos);
    CHECK(status.find("State:\tt") == std::string::npos);
    CHECK(status.find("State:\tT") == std::string::npos);
  }
}

// The "inflight" of function `name` in a watch JSON line, or -1.
long inflight_in(const std::string& json, const std::string& name) {
  std::smatch m;
  if (!std::regex_search(json, m, std::regex("\"name\":\"" + name + "\"[^}]*\"inflight\":(-?[0-9]+)"))) return -1;
  return std::stol(m[1]);
}

}  // namespace

TEST_CASE("inside: a thread parked inside before anyone looked is counted, without stopping it") {
  require_root();
  Target t;
  REQUIRE(t.child.request("park") == "ok parked");
  auto fs = functions_of(t.pid(), {"pk_park", "pk_tick", "main"});
  auto s = inside__snapshot(t.pid(), fs);
  INFO((s ? "" : s.error().line()));
  REQUIRE(s);
  for (auto& n : s->notes) INFO(n);
  CHECK(s->functions[0].threads == 1);  // the parker, blocked in read() inside pk_park
  CHECK(s->functions[0].known());
  CHECK(s->functions[1].threads == 0);  // nobody calls pk_tick
  CHECK(s->functions[1].known());
  CHECK(s->functions[2].threads == 1);  // main, blocked in fgets
  CHECK(s->looked_at == 2);
  CHECK(s->read_blocked == 2);          // both read from /proc and their stacks, not stopped
  CHECK(s->stopped == 0);
  check_untouched(t.pid());

  REQUIRE(t.child.request("release") == "ok released 1");
  s = inside__snapshot(t.pid(), fs);
  REQUIRE(s);
  CHECK(s->functions[0].threads == 0);
  CHECK(s->functions[0].known());
  CHECK(inside__describe(s->functions[0]) == "0");
}

TEST_CASE("inside: a running thread is stopped alone, briefly, counted, and goes on running") {
  require_root();
  Target t;
  REQUIRE(t.child.request("spin") == "ok spinning");
  auto fs = functions_of(t.pid(), {"spinner", "pk_park"});
  auto s = inside__snapshot(t.pid(), fs);
  REQUIRE(s);
  for (auto& n : s->notes) INFO(n);
  CHECK(s->functions[0].threads == 1);  // the spinner thread, running its loop
  CHECK(s->functions[0].known());
  CHECK(s->functions[1].threads == 0);
  CHECK(s->stopped >= 1);  // the spinner (main is blocked in fgets)
  check_untouched(t.pid());
  // It goes on spinning.
  std::smatch m;
  std::string before = t.child.request("ticks");
  usleep(50000);
  std::string after = t.child.request("ticks");
  REQUIRE(std::regex_search(before, m, std::regex("ok ([0-9]+)")));
  long calls_before = std::stol(m[1]);
  REQUIRE(std::regex_search(after, m, std::regex("ok ([0-9]+)")));
  CHECK(std::stol(m[1]) > calls_before);
}

TEST_CASE("inside: watch --inflight shows a thread parked before it attached, then follows entries and exits") {
  require_root();
  Target t;
  REQUIRE(t.child.request("park") == "ok parked");
  Child watch({ctl(), "watch", "--pid", std::to_string(t.pid()), "pk_park", "--inflight", "--json", "--interval", "0.3"});
  auto first = watch.read_line(seconds(30));
  INFO(watch.drain_stderr());
  REQUIRE(first);
  INFO(*first);
  CHECK(inflight_in(*first, "pk_park") == 1);  // seeded: the probes never saw it enter
  REQUIRE(t.child.request("release") == "ok released 1");
  // The thread left (its return was never probed): the next look drops it.
  auto wait_inflight = [&](long want) {
    for (int n = 0; n < 40; ++n) {
      auto line = watch.read_line(seconds(10));
      if (!line) return false;
      if (inflight_in(*line, "pk_park") == want) return true;
    }
    return false;
  };
  CHECK(wait_inflight(0));
  // A call that begins now is the probes' to count, in and out.
  REQUIRE(t.child.request("park") == "ok parked");
  CHECK(wait_inflight(1));
  REQUIRE(t.child.request("release") == "ok released 2");
  CHECK(wait_inflight(0));
  watch.signal(SIGINT);
  CHECK(watch.wait(seconds(30)) == 0);
  check_untouched(t.pid());
}

TEST_CASE("inside: patch's observe window reports a thread parked inside the function") {
  require_root();
  Target t;
  REQUIRE(t.child.request("park") == "ok parked");
  auto r = run({ctl(), "patch", "--pid", std::to_string(t.pid()), "--lib", fixture("parked_fix.so"), "pk_park",
                "--dry-run", "--observe", "0.2"},
               seconds(120));
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  CHECK(std::regex_search(r.out, std::regex("pk_park +0\\.0 calls/s +live +threads inside: 1\n")));
  check_untouched(t.pid());
  REQUIRE(t.child.request("release") == "ok released 1");
}

TEST_CASE("inside: a blocked stack that cannot be unwound from pc and sp alone is unknown, not 0") {
  require_root();
  Target t;
  REQUIRE(t.child.request("parkfp") == "ok parked fp");
  auto fs = functions_of(t.pid(), {"pk_park_fp", "parker_fp", "pk_tick"});
  auto s = inside__snapshot(t.pid(), fs);
  REQUIRE(s);
  for (auto& n : s->notes) INFO(n);
  CHECK(s->functions[0].threads == 1);  // its frame is reached: read()'s CFA is sp-based
  CHECK(s->functions[1].threads == 0);  // its caller is beyond pk_park_fp's rbp-based CFA ...
  CHECK(s->functions[1].unknown == 1);  // ... so: unknown
  CHECK(inside__describe(s->functions[1]) == "unknown (1 thread unknown)");
  CHECK(s->functions[2].known());       // no word of pk_tick on any stack: known absent
  CHECK(s->functions[2].threads == 0);
  CHECK(s->stopped == 0);
  CHECK(!s->notes.empty());
  check_untouched(t.pid());

  // Asked to, the look stops that thread briefly for all its registers, and then knows.
  InsideOptions stop;
  stop.stop_blocked_if_needed = true;
  s = inside__snapshot(t.pid(), fs, stop);
  REQUIRE(s);
  CHECK(s->functions[0].threads == 1);
  CHECK(s->functions[1].threads == 1);
  CHECK(s->functions[1].known());
  CHECK(s->stopped == 1);
  check_untouched(t.pid());
  REQUIRE(t.child.request("releasefp") == "ok released 1");  // its read() was restarted, not failed
}
