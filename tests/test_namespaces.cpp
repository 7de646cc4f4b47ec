// A containerised target: stats_target under `unshare --mount --pid --fork` with its own /proc,
// a private (empty) /run, /tmp and /sys/fs/bpf. hotfix-ctl on the host addresses it by its host
// pid; nothing it asks the target to open is a host path (the fix library and the registry are
// memfds made inside it, the hit counters come as an fd over a socketpair).
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <set>
#include <regex>

#include "support/harness.hpp"
#include "symbols/symbols.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace std::chrono;

namespace {

// Mounts inside the namespace, then the fixture as a child of sh (pid 1 of a namespace is
// never patched). --kill-child: when the test kills unshare, the namespace goes with it.
const char* kContainer =
    "mount -t tmpfs none /run && mount -t tmpfs none /tmp && mount -t tmpfs none /sys/fs/bpf && \"$0\"; exit $?";

void require_unshare() {
  require_root();
  // The container mounts a private /tmp, which would hide a build tree under /tmp.
  if (fixture("stats_target").rfind("/tmp/", 0) == 0) {
    std::fprintf(stderr, "SKIP: the build tree is under /tmp (%s), which the test's container hides behind its own "
                 "/tmp; build outside /tmp\n", fixture("stats_target").c_str());
    std::exit(4);
  }
  auto probe = run({"/usr/bin/unshare", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "/bin/sh", "-c",
                    "mount -t tmpfs none /run && mount -t tmpfs none /sys/fs/bpf"},
                   20s);
  if (probe.exit_code != 0) {
    std::fprintf(stderr, "SKIP: unshare --mount --pid is not permitted here (exit %d: %s)\n", probe.exit_code,
                 probe.err.c_str());
    std::exit(4);
  }
}

std::vector<pid_t> children_of(pid_t pid) {
  std::vector<pid_t> out;
  std::ifstream in("/proc/" + std::to_string(pid) + "/task/" + std::to_string(pid) + "/children");
  for (pid_t c; in >> c;) out.push_back(c);
  return out;
}

std::string exe_of(pid_t pid) {
  char buf[4096];
  ssize_t n = ::readlink(("/proc/" + std::to_string(pid) + "/exe").c_str(), buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, static_cast<size_t>(n)) : "";
}

// The fixture's host pid: the descendant of unshare that runs it.
pid_t find_fixture(pid_t root, const std::string& exe) {
  for (pid_t c : children_of(root)) {
    if (exe_of(c) == exe) return c;
    if (pid_t p = find_fixture(c, exe)) return p;
  }
  return 0;
}

struct Contained {
  Child child;
  pid_t host_pid = 0;
  long ns_pid = 0;
  Contained()
      : child({"/usr/bin/unshare", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "/bin/sh", "-c", kContainer,
               fixture("stats_target")}) {
    auto ready = child.request("ready");
    REQUIRE(ready.rfind("ok ", 0) == 0);
    ns_pid = std::stol(ready.substr(3));
    host_pid = find_fixture(child.pid(), fixture("stats_target"));
    REQUIRE(host_pid > 0);
  }
  ~Contained() {
    child.signal(SIGKILL);
    child.wait();
    (void)run({ctl(), "gc"});
  }
  std::string ask(const std::string& cmd) { return child.request(cmd); }
};

uint64_t entry_of(pid_t pid, const std::string& name) {
  auto table = SymbolTable::for_pid(pid);
  REQUIRE(table);
  for (auto& f : table->functions())
    if (f.name == name) return f.address;
  FAIL("no function " << name);
  return 0;
}

long number_after(const std::string& text, const std::string& key) {
  std::smatch m;
  if (!std::regex_search(text, m, std::regex("\"" + key + "\":(-?[0-9]+)"))) return -1;
  return std::stol(m[1]);
}

// The "total" of stats_work in the last JSON line watch printed.
long watched_total(const std::string& out) {
  std::string last;
  for (auto& l : lines_of(out))
    if (l.find("stats_work") != std::string::npos) last = l;
  std::smatch m;
  if (!std::regex_search(last, m, std::regex(R"("mangled":"stats_work"[^}]*"total":([0-9]+))"))) return -1;
  return std::stol(m[1]);
}

}  // namespace

TEST_CASE("a target in its own mount and pid namespaces is watched, patched, counted, listed and reverted by host pid",
          "[namespaces][e2e]") {
  require_unshare();
  Contained t;
  const std::string pid = std::to_string(t.host_pid);
  INFO("host pid " << t.host_pid << ", ns pid " << t.ns_pid);
  REQUIRE(t.ns_pid != t.host_pid);
  struct stat theirs {}, ours {};
  REQUIRE(::stat(("/proc/" + pid + "/ns/mnt").c_str(), &theirs) == 0);
  REQUIRE(::stat("/proc/self/ns/mnt", &ours) == 0);
  REQUIRE(theirs.st_ino != ours.st_ino);
  // None of the host's state paths exist for the target.
  CHECK(::access(("/proc/" + pid + "/root/sys/fs/bpf/hotfix").c_str(), F_OK) != 0);
  CHECK(::access(("/proc/" + pid + "/root/run/hotfix").c_str(), F_OK) != 0);

  // call 1: stats_work(0) + stats_tail(0), whatever stats_sink holds: 0 + 8 by the old code,
  // 100000 + 100008 by the fix.
  REQUIRE(t.ask("call 1") == "ok 8");
  const uint64_t work = entry_of(t.host_pid, "stats_work");
  const auto original = file_bytes(t.host_pid, work, 5);
  REQUIRE(original.size() == 5);

  SECTION("watch") {
    Child watch({ctl(), "watch", "--pid", pid, "stats_work", "--json", "--interval", "0.2"});
    auto banner = watch.read_stderr_line(30s);
    while (banner && banner->rfind("note: ", 0) == 0) banner = watch.read_stderr_line(30s);
    REQUIRE(banner);
    CHECK(banner->find("ns pid " + std::to_string(t.ns_pid)) != std::string::npos);
    REQUIRE(t.ask("call 25").rfind("ok", 0) == 0);
    watch.signal(SIGINT);
    std::string out;
    for (int i = 0; i < 200 && watch.running(); ++i) out += watch.drain_stdout();
    REQUIRE(watch.wait(20s) == 0);
    out += watch.drain_stdout();
    INFO(out);
    CHECK(watched_total(out) == 25);
  }

  SECTION("patch, stats, list, revert") {
    auto patch = ctl_run({"patch", "--pid", pid, "--lib", fixture("stats_fix.so"), "--observe", "0"});
    INFO(patch.out << patch.err);
    REQUIRE(patch.exit_code == 0);
    // New calls run the new code.
    CHECK(t.ask("call 1") == "ok 200008");
    REQUIRE(t.ask("call 9").rfind("ok", 0) == 0);

    auto stats = ctl_run({"stats", "--pid", pid, "--json"});
    INFO(stats.out << stats.err);
    REQUIRE(stats.exit_code == 0);
    CHECK(number_after(stats.out, "pid") == t.host_pid);
    CHECK(number_after(stats.out, "ns_pid") == t.ns_pid);
    CHECK(number_after(stats.out, "new_hits") == 10);  // stats_work's row comes first
    auto table = ctl_run({"stats", "--pid", pid});
    CHECK(table.out.find("ns pid " + std::to_string(t.ns_pid)) != std::string::npos);

    auto list = ctl_run({"list", "--pid", pid, "--json"});
    INFO(list.out << list.err);
    REQUIRE(list.exit_code == 0);
    CHECK(number_after(list.out, "ns_pid") == t.ns_pid);
    CHECK(list.out.find("\"state\":\"active\"") != std::string::npos);
    auto text = ctl_run({"list", "--pid", pid});
    CHECK(text.out.find("(stats_target; ns pid " + std::to_string(t.ns_pid) + ")") != std::string::npos);

    auto revert = ctl_run({"revert", "--pid", pid, "--all"});
    INFO(revert.out << revert.err);
    REQUIRE(revert.exit_code == 0);
    CHECK(t.ask("call 1") == "ok 8");
    CHECK(read_memory(t.host_pid, work, 5) == original);
    for (auto& m : file_mappings(t.host_pid)) CHECK(m.find("/memfd:hotfix:") == std::string::npos);  // fix unloaded
    auto after = ctl_run({"list", "--pid", pid});
    CHECK(after.out.find("has no active hotfix patches") != std::string::npos);
  }
  CHECK(t.child.running());
}

namespace {

// "N -> what" for every fd of `pid`: what a kill must not change.
std::set<std::string> fds_of(pid_t pid) {
  std::set<std::string> out;
  std::error_code ec;
  for (auto& e : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    char buf[4096];
    ssize_t n = ::readlink(e.path().c_str(), buf, sizeof buf - 1);
    out.insert(e.path().filename().string() + " -> " + (n > 0 ? std::string(buf, static_cast<size_t>(n)) : "?"));
  }
  return out;
}

std::vector<std::string> crash_names(const std::string& err) {
  std::vector<std::string> names;
  std::regex line("crashpoint ([0-9]+) (.*)");
  for (auto& l : lines_of(err)) {
    std::smatch m;
    if (std::regex_match(l, m, line)) names.push_back(m[2]);
  }
  return names;
}

}  // namespace

TEST_CASE("a kill at every crash point of the counters' fd handoff leaves no fd of ours in the target",
          "[namespaces][crash]") {
  require_unshare();
  Contained t;
  const std::string pid = std::to_string(t.host_pid);
  REQUIRE(t.ask("call 1") == "ok 8");
  const auto fds_before = fds_of(t.host_pid);
  const std::vector<std::string> patch = {ctl(), "patch", "--pid", pid, "--lib", fixture("stats_fix.so"), "--observe", "0"};
  auto with_env = [&](const std::string& env) {
    std::vector<std::string> argv = {"/usr/bin/env", env};
    argv.insert(argv.end(), patch.begin(), patch.end());
    return run(argv, 60s);
  };
  auto listed = with_env("HOTFIX_CRASH_LIST=1");
  INFO(listed.out << listed.err);
  REQUIRE(listed.exit_code == 0);
  REQUIRE(ctl_run({"revert", "--pid", pid, "--all"}).exit_code == 0);
  CHECK(fds_of(t.host_pid) == fds_before);
  auto names = crash_names(listed.err);
  size_t first = 0, last = 0;  // the points from the counters' intent to their mapping
  for (size_t k = 0; k < names.size(); ++k) {
    if (names[k] == "patch: before counters") first = k + 1;
    if (names[k] == "patch: after counters") last = k + 1;
  }
  REQUIRE(first > 0);
  REQUIRE(last > first + 10);  // remote calls of the handoff: mmap, socketpair, recvmsg, closes, munmap, mmap
  for (size_t k = first; k <= last; ++k) {
    std::string when = "patch killed at crash point " + std::to_string(k) + " (" + names[k - 1] + ")";
    INFO(when);
    auto killed = with_env("HOTFIX_CRASH_AT=" + std::to_string(k));
    INFO(killed.out << killed.err);
    REQUIRE((killed.exit_code == 128 + SIGKILL || killed.exit_code == -SIGKILL));
    auto recovered = ctl_run({"revert", "--pid", pid, "--all"});
    INFO(recovered.out << recovered.err);
    REQUIRE(recovered.exit_code == 0);
    CHECK(fds_of(t.host_pid) == fds_before);
    CHECK(read_file("/proc/" + pid + "/maps").find("bpf-map") == std::string::npos);
    CHECK(status_field(t.host_pid, "TracerPid") == 0);
    REQUIRE(t.ask("call 1") == "ok 8");
  }
}
