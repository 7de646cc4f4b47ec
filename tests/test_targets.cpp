// Many processes per command (cli/targets.cpp, process/targets.cpp): --exe, --pid a,b,
// --children and --unit on real processes, one summary, exit 1 only for real failures.
#include <catch2/catch.hpp>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <memory>
#include <sstream>
#include <thread>

#include "support/harness.hpp"

using namespace hotfix::test;

namespace {

// One patchee process, killed and cleaned up even when the test fails.
struct Target {
  Child child{{fixture("patchee")}};
  Target() {
    for (;;) {
      auto line = child.read_line();
      REQUIRE(line);
      if (line->rfind("ready", 0) == 0) break;
    }
  }
  ~Target() {
    child.signal(SIGKILL);
    child.wait();
    std::error_code ec;
    std::filesystem::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(child.pid()), ec);
  }
  pid_t pid() const { return child.pid(); }
};

RunResult hctl(std::vector<std::string> args) {
  args.insert(args.begin(), hotfix::test::ctl());
  return run(args);
}

size_t count(const std::string& text, const std::string& what) {
  size_t n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

}  // namespace

TEST_CASE("three processes of one binary: patched with --exe, listed, reverted", "[targets]") {
  require_root();
  Target a, b, c;
  auto patched = hctl({"patch", "--exe", fixture("patchee"), "--lib", fixture("fix_v1.so"), "c_answer", "--json"});
  INFO("stdout: " << patched.out << "\nstderr: " << patched.err);
  REQUIRE(patched.exit_code == 0);
  CHECK(patched.out.find("\"processes\":3,\"ok\":3,\"failed\":0") != std::string::npos);
  for (auto* t : {&a, &b, &c}) CHECK(patched.out.find("\"pid\":" + std::to_string(t->pid()) + ",") != std::string::npos);

  auto listed = hctl({"list", "--exe", fixture("patchee"), "--json"});
  INFO("list: " << listed.out << listed.err);
  REQUIRE(listed.exit_code == 0);
  CHECK(count(listed.out, "\"state\":\"active\"") == 3);
  CHECK(count(listed.out, "\"sha256\":\"") == 3);  // the fix's digest, for a fleet tool

  auto host = hctl({"list"});  // no target: every patched process of the host
  REQUIRE(host.exit_code == 0);
  for (auto* t : {&a, &b, &c}) CHECK(host.out.find("pid " + std::to_string(t->pid()) + " (") != std::string::npos);

  auto reverted = hctl({"revert", "--exe", fixture("patchee"), "--all"});
  INFO("revert: " << reverted.out << reverted.err);
  REQUIRE(reverted.exit_code == 0);
  CHECK(count(reverted.out, "reverted patch") == 3);
  auto after = hctl({"list", "--exe", fixture("patchee"), "--json"});
  CHECK(count(after.out, "\"state\":\"active\"") == 0);
}

TEST_CASE("--pid a,b; a process gone meanwhile is reported, not a failure", "[targets]") {
  require_root();
  Target a;
  auto gone = std::make_unique<Target>();
  pid_t dead = gone->pid();
  gone.reset();  // killed and reaped: its pid names nothing now
  auto r = hctl({"list", "--pid", std::to_string(a.pid()) + "," + std::to_string(dead), "--json"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("\"processes\":2,\"ok\":1,\"failed\":0,\"exited\":1") != std::string::npos);
  auto text = hctl({"list", "--pid", std::to_string(a.pid()), "--pid", std::to_string(dead)});
  CHECK(text.exit_code == 0);
  CHECK(text.out.find("exited") != std::string::npos);

  auto bad = hctl({"list", "--pid", "12,x"});
  CHECK(bad.exit_code == 2);
}

TEST_CASE("--children adds the descendants", "[targets]") {
  require_root();
  Child sh({"/bin/sh", "-c", "sleep 60 & sleep 60 & wait"});
  std::vector<std::string> kids;
  for (int i = 0; i < 200; ++i) {
    std::ifstream in("/proc/" + std::to_string(sh.pid()) + "/task/" + std::to_string(sh.pid()) + "/children");
    kids.clear();
    for (std::string k; in >> k;) kids.push_back(k);
    if (kids.size() == 2) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  REQUIRE(kids.size() == 2);
  auto r = hctl({"list", "--pid", std::to_string(sh.pid()), "--children", "--json"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("\"processes\":3,\"ok\":3") != std::string::npos);
  for (auto& k : kids) ::kill(std::stoi(k), SIGKILL);
  sh.signal(SIGKILL);
  sh.wait();
}

TEST_CASE("--unit reads the unit's cgroup from cgroupfs", "[targets]") {
  require_root();
  std::string unit = "hotfix-test-" + std::to_string(::getpid()) + ".service";
  // cgroup v2 at /sys/fs/cgroup, or its "unified" mount on a hybrid host.
  std::string root = std::filesystem::exists("/sys/fs/cgroup/unified/cgroup.procs") ? "/sys/fs/cgroup/unified" : "/sys/fs/cgroup";
  std::string dir = root + "/" + unit;
  if (!std::filesystem::exists(root + "/cgroup.procs") || ::mkdir(dir.c_str(), 0755) != 0) {
    WARN("SKIP: cgroupfs (v2) is not writable here");
    return;
  }
  Target a;
  auto cleanup = [&] {
    std::ofstream(root + "/cgroup.procs") << a.pid() << "\n";  // back to the root, then remove
    ::rmdir(dir.c_str());
  };
  {
    std::ofstream procs(dir + "/cgroup.procs");
    procs << a.pid() << "\n";
  }
  auto r = hctl({"list", "--unit", unit, "--json"});
  auto missing = hctl({"list", "--unit", "hotfix-no-such-unit.service"});
  cleanup();
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("\"processes\":1,\"ok\":1") != std::string::npos);
  CHECK(r.out.find("\"pid\":" + std::to_string(a.pid()) + ",") != std::string::npos);
  CHECK(missing.exit_code == 1);
  CHECK(missing.err.find("no cgroup named") != std::string::npos);
}
