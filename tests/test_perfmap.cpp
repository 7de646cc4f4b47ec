// perf names hotfix's code (observe/perfmap.hpp, patch/island_names.hpp): a patch writes one
// "hotfix island..." line per island into /tmp/perf-PID.map, revert and gc take them out, a
// JIT's own lines survive every change, a hostile file (symlink, someone else's) is left alone,
// and `perf record`/`perf report` name the island (tests/fixtures/parked_target.c).
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "observe/perfmap.hpp"
#include "patch/registry.hpp"
#include "support/harness.hpp"

using namespace hotfix::test;
using namespace std::chrono;

namespace {

struct Target {
  Child child{{fixture("parked_target")}};
  Target() {
    std::filesystem::remove(hotfix::perfmap__path(pid()));
    REQUIRE(child.wait_for("ready"));
  }
  ~Target() {
    child.signal(SIGKILL);
    child.wait();
    std::error_code ec;
    std::filesystem::remove_all("/run/hotfix/" + std::to_string(pid()), ec);
    std::filesystem::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(pid()), ec);
    std::filesystem::remove(hotfix::perfmap__path(pid()), ec);
  }
  pid_t pid() const { return child.pid(); }
  std::string map_path() const { return hotfix::perfmap__path(pid()); }
};

std::vector<hotfix::PerfMapEntry> ours(pid_t pid) {
  std::vector<hotfix::PerfMapEntry> out;
  for (auto& e : hotfix::perfmap__read(pid))
    if (e.name.starts_with("hotfix ")) out.push_back(e);
  return out;
}

// The /proc/PID/maps line of the mapping holding `address`.
std::string mapping_of(pid_t pid, uint64_t address) {
  std::istringstream maps(read_file("/proc/" + std::to_string(pid) + "/maps"));
  for (std::string line; std::getline(maps, line);) {
    uint64_t lo = std::stoull(line.substr(0, line.find('-')), nullptr, 16);
    uint64_t hi = std::stoull(line.substr(line.find('-') + 1), nullptr, 16);
    if (address >= lo && address < hi) return line;
  }
  return {};
}

void write_foreign(const std::string& path) {
  std::ofstream(path) << "7f0000001000 40 jit::compiled_thing\n";
  ::chmod(path.c_str(), 0644);
}

}  // namespace

TEST_CASE("patch names its islands in /tmp/perf-PID.map, revert takes them out, a JIT's line stays") {
  require_root();
  Target t;
  write_foreign(t.map_path());
  auto r = ctl_run({"patch", "--pid", std::to_string(t.pid()), "--lib", fixture("parked_fix.so"), "pk_tick", "--observe", "0"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  // The jump island beyond rel32 reach, and the counting trampoline at the replacement's entry.
  auto lines = ours(t.pid());
  REQUIRE(lines.size() == 2);
  std::set<std::string> names;
  for (auto& l : lines) {
    names.insert(l.name);
    CHECK(l.size > 0);
    // perf reads the map only for anonymous executable mappings: islands are.
    std::string m = mapping_of(t.pid(), l.start);
    INFO(m);
    CHECK(m.find("r-xp") != std::string::npos);
    CHECK(m.find('/') == std::string::npos);
  }
  CHECK(names == std::set<std::string>{"hotfix island: pk_tick -> parked_fix.so",
                                       "hotfix island (counting trampoline): pk_tick in parked_fix.so"});
  CHECK(read_file(t.map_path()).starts_with("7f0000001000 40 jit::compiled_thing\n"));
  struct stat st {};
  REQUIRE(::stat(t.map_path().c_str(), &st) == 0);
  CHECK(st.st_uid == 0);

  r = ctl_run({"revert", "--pid", std::to_string(t.pid()), "--all"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(ours(t.pid()).empty());
  CHECK(read_file(t.map_path()) == "7f0000001000 40 jit::compiled_thing\n");
}

TEST_CASE("a replacement that cannot take a trampoline counts in a counting island, named in the perf map") {
  require_root();
  Child t({fixture("tramp_target")});
  REQUIRE(t.request("ready").rfind("ok", 0) == 0);
  const std::string path = hotfix::perfmap__path(t.pid());
  std::filesystem::remove(path);
  struct Cleanup {
    std::string path;
    ~Cleanup() { std::filesystem::remove(path); }
  } cleanup{path};
  auto r = ctl_run({"patch", "--pid", std::to_string(t.pid()), "--lib", fixture("tramp_fix.so"), "c_count", "--observe", "0"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  // The fix's c_count begins with a conditional branch (its early return): no trampoline there.
  REQUIRE((r.out + r.err).find("calls into the replacement of c_count from inside " + fixture("tramp_fix.so") +
                               " are not counted") != std::string::npos);
  auto lines = ours(t.pid());
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].name == "hotfix island (counting): c_count -> tramp_fix.so");
  CHECK(lines[0].size > 0);
  std::string m = mapping_of(t.pid(), lines[0].start);
  INFO(m);
  CHECK(m.find("r-xp") != std::string::npos);
  CHECK(m.find('/') == std::string::npos);
  CHECK(t.request("call c_count 5") == "ok 2012");
  r = ctl_run({"revert", "--pid", std::to_string(t.pid()), "--all"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(ours(t.pid()).empty());
  CHECK(!std::filesystem::exists(path));
  CHECK(t.request("call c_count 5") == "ok 5");
}

TEST_CASE("watch names its trampolines in the perf map; unwatch, and the recovery of a killed watch, take them out") {
  require_root();
  Child calls({fixture("calls")});
  REQUIRE(calls.request("ready").rfind("ok", 0) == 0);
  const pid_t pid = calls.pid();
  const std::string path = hotfix::perfmap__path(pid);
  write_foreign(path);
  struct Cleanup {
    std::string path;
    ~Cleanup() { std::filesystem::remove(path); }
  } cleanup{path};
  for (int sig : {SIGINT, SIGKILL}) {
    INFO("signal " << sig);
    Child watch({ctl(), "watch", "--pid", std::to_string(pid), "c_add", "scale(int)", "--interval", "60"});
    auto line = watch.read_stderr_line(seconds(30));
    while (line && line->find("watching") == std::string::npos) line = watch.read_stderr_line(seconds(30));
    REQUIRE(line);
    REQUIRE(line->find("via trampolines") != std::string::npos);
    auto registry = hotfix::registry__read(pid);
    REQUIRE(registry);
    REQUIRE(registry->watches.size() == 1);
    std::set<uint64_t> stubs;
    for (auto& st : registry->watches[0].stubs) stubs.insert(st.stub);
    auto lines = ours(pid);
    REQUIRE(lines.size() == 2);
    std::set<std::string> names;
    for (auto& l : lines) {
      names.insert(l.name);
      CHECK(stubs.count(l.start) == 1);
      CHECK(l.size > 0);
      std::string m = mapping_of(pid, l.start);  // anonymous and executable: perf looks the map up there
      INFO(m);
      CHECK(m.find("r-xp") != std::string::npos);
      CHECK(m.find('/') == std::string::npos);
    }
    CHECK(names == std::set<std::string>{"hotfix watch trampoline: c_add", "hotfix watch trampoline: scale(int)"});
    watch.signal(sig);
    REQUIRE(watch.wait(seconds(60)));
    if (sig == SIGKILL) {  // the trampolines are still in place, and named, until the next hotfix-ctl
      CHECK(ours(pid).size() == 2);
      auto r = ctl_run({"list", "--pid", std::to_string(pid)});
      INFO(r.out << r.err);
      CHECK(r.err.find("removed what an ended watch") != std::string::npos);
    }
    CHECK(ours(pid).empty());
    CHECK(read_file(path) == "7f0000001000 40 jit::compiled_thing\n");
  }
}

TEST_CASE("a perf map hotfix created goes away with its last line; gc forgets a dead pid's lines") {
  require_root();
  std::string path;
  pid_t pid = 0;
  {
    Target t;
    pid = t.pid();
    path = t.map_path();
    auto r = ctl_run({"patch", "--pid", std::to_string(pid), "--lib", fixture("parked_fix.so"), "--observe", "0"});
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    CHECK(ours(pid).size() == 4);  // two functions: a jump island and a counting trampoline each
    r = ctl_run({"revert", "--pid", std::to_string(pid), "--all"});
    REQUIRE(r.exit_code == 0);
    CHECK(!std::filesystem::exists(path));

    // Killed with a patch applied: gc takes our lines out of the dead pid's map, a JIT's stay.
    r = ctl_run({"patch", "--pid", std::to_string(pid), "--lib", fixture("parked_fix.so"), "--observe", "0"});
    REQUIRE(r.exit_code == 0);
    std::ofstream(path, std::ios::app) << "7f0000002000 10 jit::other\n";
    t.child.signal(SIGKILL);
    t.child.wait();
    REQUIRE(ctl_run({"gc"}).exit_code == 0);
    CHECK(ours(pid).empty());
    CHECK(read_file(path) == "7f0000002000 10 jit::other\n");
  }
}

TEST_CASE("the perf map API keeps others' lines and refuses a symlink or a stranger's file") {
  require_root();
  Target t;
  const pid_t pid = t.pid();
  write_foreign(t.map_path());
  REQUIRE(hotfix::perfmap__add(pid, 0x1000, 0x20, "hotfix trampoline: a"));
  REQUIRE(hotfix::perfmap__add(pid, 0x2000, 0x20, "trampoline: b"));  // the prefix is added
  REQUIRE(hotfix::perfmap__sync(pid, "hotfix island", {{0x3000, 0x10, "hotfix island: c -> fix.so"}}));
  CHECK(ours(pid).size() == 3);
  REQUIRE(hotfix::perfmap__remove(pid, 0x1000));
  REQUIRE(hotfix::perfmap__sync(pid, "hotfix island", {}));
  REQUIRE(ours(pid).size() == 1);
  CHECK(ours(pid)[0].name == "hotfix trampoline: b");
  REQUIRE(hotfix::perfmap__remove(pid, 0x2000));
  CHECK(read_file(t.map_path()) == "7f0000001000 40 jit::compiled_thing\n");

  // A symlink planted in /tmp: never followed, its target unchanged.
  std::filesystem::remove(t.map_path());
  std::string victim = "/tmp/hotfix-perfmap-victim-" + std::to_string(pid);
  std::ofstream(victim) << "precious\n";
  std::filesystem::create_symlink(victim, t.map_path());
  auto refused = hotfix::perfmap__add(pid, 0x1000, 0x20, "hotfix trampoline: a");
  CHECK(!refused);
  if (!refused) CHECK(refused.error().what.find("symbolic link") != std::string::npos);
  CHECK(read_file(victim) == "precious\n");
  std::filesystem::remove(t.map_path());
  std::filesystem::remove(victim);

  // A file of a user who is neither root nor the target's.
  write_foreign(t.map_path());
  REQUIRE(::chown(t.map_path().c_str(), 65534, 65534) == 0);
  refused = hotfix::perfmap__add(pid, 0x1000, 0x20, "hotfix trampoline: a");
  CHECK(!refused);
  if (!refused) CHECK(refused.error().what.find("owned by uid 65534") != std::string::npos);
  CHECK(read_file(t.map_path()) == "7f0000001000 40 jit::compiled_thing\n");
}

TEST_CASE("perf record and perf report name a patched function's island") {
  require_root();
  if (::access("/usr/bin/perf", X_OK) != 0) {
    std::fprintf(stderr, "SKIP: perf is not installed (Debian package linux-perf)\n");
    std::exit(4);
  }
  auto probe = run({"/usr/bin/perf", "stat", "-e", "cpu-clock", "--", "/bin/true"}, seconds(30));
  if (probe.exit_code != 0) {
    std::fprintf(stderr, "SKIP: perf cannot count on this kernel: %s\n", probe.err.c_str());
    std::exit(4);
  }
  Target t;
  REQUIRE(t.child.request("spin") == "ok spinning");
  auto r = ctl_run({"patch", "--pid", std::to_string(t.pid()), "--lib", fixture("parked_fix.so"), "pk_tick", "--observe", "0"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  std::string data = "/tmp/hotfix-perfmap-" + std::to_string(t.pid()) + ".data";
  auto rec = run({"/usr/bin/perf", "record", "-q", "-o", data, "-e", "cpu-clock", "-F", "2000", "-p",
                  std::to_string(t.pid()), "--", "sleep", "1"}, seconds(60));
  INFO(rec.out << rec.err);
  REQUIRE(rec.exit_code == 0);
  auto rep = run({"/usr/bin/perf", "report", "-i", data, "--stdio", "--sort", "sym"}, seconds(60));
  std::filesystem::remove(data);
  INFO(rep.out << rep.err);
  CHECK((rep.out.find("hotfix island: pk_tick -> parked_fix.so") != std::string::npos ||
         rep.out.find("hotfix island (counting trampoline): pk_tick in parked_fix.so") != std::string::npos));
}
