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
#include <regex>
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

  auto stats = hctl({"stats", "--exe", fixture("patchee"), "--json"});
  INFO("stats: " << stats.out << stats.err);
  CHECK(stats.exit_code == 0);
  CHECK(stats.out.find("\"summary\":{\"verb\":\"stats\",\"processes\":3,\"ok\":3,\"failed\":0") != std::string::npos);
  CHECK(count(stats.out, "{\"verb\":\"stats\",\"pid\":") == 3);  // one line per process, then the summary

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

namespace {

// Processes whose parent is `parent` and whose command line holds `word` (NUL-separated).
std::vector<pid_t> children_with(pid_t parent, const std::string& word) {
  std::vector<pid_t> out;
  for (auto& e : std::filesystem::directory_iterator("/proc")) {
    std::string name = e.path().filename();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    if (status_field(std::stoi(name), "PPid") != parent) continue;
    std::string cmdline = read_file("/proc/" + name + "/cmdline");
    for (auto& c : cmdline) c = c ? c : ' ';
    if (cmdline.find(word) != std::string::npos) out.push_back(std::stoi(name));
  }
  return out;
}

}  // namespace

TEST_CASE("a failed process makes exit 1 with a summary that says which and why; the others are done", "[targets]") {
  require_root();
  Target a;
  Child other({"/bin/sleep", "60"});  // has no c_answer: its patch fails
  std::string both = std::to_string(a.pid()) + "," + std::to_string(other.pid());
  auto r = hctl({"patch", "--pid", both, "--lib", fixture("fix_v1.so"), "c_answer", "--observe", "0", "--json"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 1);
  CHECK(r.out.find("\"processes\":2,\"ok\":1,\"failed\":1,\"exited\":0") != std::string::npos);
  CHECK(r.out.find("\"failures\":[{\"pid\":" + std::to_string(other.pid()) + ",\"error\":\"") != std::string::npos);
  CHECK(r.out.find("{\"verb\":\"patch\",\"pid\":" + std::to_string(a.pid()) + ",\"comm\":\"patchee\",\"status\":\"ok\"") !=
        std::string::npos);
  // One stderr line names the failed process and the reason.
  auto err = lines_of(r.err);
  REQUIRE(!err.empty());
  CHECK(err.back().find("hotfix-ctl patch: 1 of 2 process(es) failed: " + std::to_string(other.pid()) + " (") == 0);
  auto listed = hctl({"list", "--pid", std::to_string(a.pid()), "--json"});
  CHECK(count(listed.out, "\"state\":\"active\"") == 1);  // the good one was patched all the same

  // The text summary: a table row per process, the failed one with its reason.
  auto text = hctl({"revert", "--pid", both, "--id", "1"});  // the sleep has no patch 1
  INFO(text.out << text.err);
  CHECK(text.exit_code == 1);
  CHECK(text.out.find("summary: revert on 2 process(es): 1 ok, 1 failed, 0 exited meanwhile") != std::string::npos);
  std::regex failed_row("\\n  " + std::to_string(other.pid()) + " +sleep +failed +\\S");
  CHECK(std::regex_search(text.out, failed_row));
  std::regex ok_row("\\n  " + std::to_string(a.pid()) + " +patchee +ok");
  CHECK(std::regex_search(text.out, ok_row));
  other.signal(SIGKILL);
  other.wait();
}

TEST_CASE("patch --exe: a process that exits while it is being patched is reported, not fatal", "[targets]") {
  require_root();
  Target a, b;
  auto victim = std::make_unique<Target>();
  pid_t gone = victim->pid();
  // A long observe window: the victim is killed while its hotfix-ctl run is under way.
  Child run({hotfix::test::ctl(), "patch", "--exe", fixture("patchee"), "--lib", fixture("fix_v1.so"), "c_answer",
             "--observe", "5", "--json"});
  bool seen = false;
  for (int i = 0; i < 500 && !seen; ++i) {
    seen = !children_with(run.pid(), "--pid " + std::to_string(gone) + " ").empty();
    if (!seen) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  REQUIRE(seen);
  victim.reset();  // killed and reaped mid-way
  auto code = run.wait(std::chrono::seconds(120));
  std::string out = run.drain_stdout(), err = run.drain_stderr();
  INFO(out << err);
  CHECK(code == 0);
  CHECK(out.find("\"processes\":3,\"ok\":2,\"failed\":0,\"exited\":1") != std::string::npos);
  CHECK(out.find("\"exits\":[{\"pid\":" + std::to_string(gone) + ",") != std::string::npos);
  CHECK(out.find("\"pid\":" + std::to_string(gone) + ",\"comm\":\"patchee\",\"status\":\"exited\"") != std::string::npos);
  for (auto* t : {&a, &b}) CHECK(count(hctl({"list", "--pid", std::to_string(t->pid()), "--json"}).out, "\"state\":\"active\"") == 1);
  CHECK(hctl({"revert", "--exe", fixture("patchee"), "--all"}).exit_code == 0);
}

TEST_CASE("watch on a pre-fork master that calls nothing suggests --children; --children watches the workers",
          "[targets][watch]") {
  require_root();
  Child server({fixture("prefork_server")});
  auto ready = server.wait_for("ready ");
  REQUIRE(ready);
  std::istringstream in(*ready);
  std::string word;
  pid_t master = 0, w1 = 0, w2 = 0;
  in >> word >> master >> w1 >> w2;
  REQUIRE(master == server.pid());
  auto alone = hctl({"watch", "--pid", std::to_string(master), "serve_one", "--duration", "1"});
  INFO(alone.out << alone.err);
  CHECK(alone.exit_code == 0);
  CHECK(alone.err.find("note: pid " + std::to_string(master) + " made no call, but 2 of its child process(es) run the "
                       "same program") != std::string::npos);
  CHECK(alone.err.find("watch them too with --children") != std::string::npos);

  auto all = hctl({"watch", "--pid", std::to_string(master), "--children", "serve_one", "--duration", "1", "--json"});
  INFO(all.out << all.err);
  CHECK(all.exit_code == 0);
  CHECK(all.out.find("\"summary\":{\"verb\":\"watch\",\"processes\":3,\"ok\":3,\"failed\":0") != std::string::npos);
  for (pid_t w : {w1, w2}) CHECK(all.out.find("{\"verb\":\"watch\",\"pid\":" + std::to_string(w) + ",") != std::string::npos);
  server.close_stdin();
  CHECK(server.wait() == 0);
}
