// Persistent patch sets and the agent (docs/design.md "The agent"): `patch --persist` records a
// set, `hotfix-ctl agent` applies it to every new process of the binary before its own code
// runs, and to running ones when it starts; `persisted` lists, `revert --persist` removes.
// agent_target's FIRST output line comes from the function the fix replaces ("first 1": old
// code, "first 2": the fix), so a process that ran any old code before being patched shows it.
// Every test uses its own state directory (HOTFIX_STATE_DIR) and kills what it started.
#include <dirent.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "support/harness.hpp"

using namespace hotfix::test;
using namespace std::chrono;
namespace fs = std::filesystem;

namespace {

// A private state root, set in the environment every hotfix-ctl we start inherits.
struct StateDir {
  std::string path;
  StateDir() {
    char tmpl[] = "/tmp/hotfix-agent-test-XXXXXX";
    path = ::mkdtemp(tmpl);
    ::chmod(path.c_str(), 0755);
    ::setenv("HOTFIX_STATE_DIR", path.c_str(), 1);
  }
  ~StateDir() {
    ::unsetenv("HOTFIX_STATE_DIR");
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::string target() { return fixture("agent_target"); }
std::string fix() { return fixture("agent_fix.so"); }

// The watchdogs of killed agents end by themselves within ~2 s; wait so that no test leaves one.
void wait_for_watchdogs() {
  for (int i = 0; i < 100; ++i) {
    bool any = false;
    if (DIR* d = ::opendir("/proc")) {
      while (auto* e = ::readdir(d)) {
        std::string comm = read_file(std::string("/proc/") + e->d_name + "/comm");
        any = any || comm == "hotfix-watchdog\n";
      }
      ::closedir(d);
    }
    if (!any) return;
    std::this_thread::sleep_for(milliseconds(100));
  }
  FAIL("a hotfix-watchdog is still running 10 s after its agent ended");
}

char state_of(pid_t pid) {
  std::istringstream in(read_file("/proc/" + std::to_string(pid) + "/status"));
  for (std::string line; std::getline(in, line);)
    if (line.rfind("State:", 0) == 0) return line[line.find_first_not_of(" \t", 6)];
  return '?';
}

// An agent whose log we read; `extra` are more options.
std::unique_ptr<Child> start_agent(std::vector<std::string> extra = {}) {
  std::vector<std::string> argv = {ctl(), "agent"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  auto agent = std::make_unique<Child>(argv);
  REQUIRE(agent->wait_for("start: ", seconds(30)));  // armed, and the start sweep is done
  return agent;
}

// A running agent_target, patched with --persist (set recorded): returns the set id.
int persist_from(Child& t) {
  REQUIRE(t.read_line() == "first 1");
  auto r = ctl_run({"patch", "--pid", std::to_string(t.pid()), "--lib", fix(), "--persist", "--observe", "0"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  std::smatch m;
  REQUIRE(std::regex_search(r.out, m, std::regex("persisted as set (\\d+)")));
  t.send("x");
  CHECK(t.read_line() == "value 2");
  return std::stoi(m[1]);
}

int patches_in(pid_t pid) {
  auto r = ctl_run({"list", "--pid", std::to_string(pid), "--json"});
  int n = 0;
  for (size_t at = 0; (at = r.out.find("\"id\":", at)) != std::string::npos; ++at) ++n;
  return n;
}

}  // namespace

TEST_CASE("agent: a new process runs the fixed code from its first call; persisted lists; revert --persist removes") {
  require_root();
  StateDir state;
  Child first({target()});
  int set = persist_from(first);

  auto listed = ctl_run({"persisted", "--json"});
  REQUIRE(listed.exit_code == 0);
  CHECK(listed.out.find("\"id\":" + std::to_string(set)) != std::string::npos);
  CHECK(listed.out.find("\"ok\":true") != std::string::npos);
  CHECK(listed.out.find(target()) != std::string::npos);
  auto table = ctl_run({"persisted"});
  CHECK(table.out.find(target()) != std::string::npos);
  // The copy is root's, 0600, and has the bytes that were checked.
  auto copy = std::regex_replace(listed.out, std::regex(".*\"copy\":\"([^\"]+)\".*\n?"), "$1");
  struct stat st{};
  REQUIRE(::stat(copy.c_str(), &st) == 0);
  CHECK(st.st_uid == 0);
  CHECK((st.st_mode & 0777) == 0600);
  CHECK(read_file(copy) == read_file(fix()));

  auto agent = start_agent();
  for (int i = 0; i < 3; ++i) {
    Child fresh({target()});
    CHECK(fresh.read_line() == "first 2");  // never a call to the old code
    fresh.send("x");
    CHECK(fresh.read_line() == "value 2");
    CHECK(patches_in(fresh.pid()) == 1);
    REQUIRE(agent->wait_for("pid " + std::to_string(fresh.pid()) + " (agent_target): continued with set(s)"));
  }
  // The first process carried the set all along and was not patched twice.
  CHECK(patches_in(first.pid()) == 1);

  auto removed = ctl_run({"revert", "--persist", "--id", std::to_string(set)});
  INFO(removed.out << removed.err);
  REQUIRE(removed.exit_code == 0);
  CHECK(ctl_run({"persisted"}).out.find("no persisted patch sets") != std::string::npos);
  Child after({target()});
  CHECK(after.read_line() == "first 1");
  after.send("x");
  CHECK(after.read_line() == "value 1");
  CHECK(patches_in(after.pid()) == 0);
  // Running processes keep their patch: `revert --persist` only stops future ones.
  first.send("x");
  CHECK(first.read_line() == "value 2");
  agent->signal(SIGTERM);
  CHECK(agent->wait(seconds(20)) == 0);
  wait_for_watchdogs();
}

TEST_CASE("agent: a process started while the agent was down is patched at its start, once") {
  require_root();
  StateDir state;
  Child first({target()});
  persist_from(first);
  Child early({target()});  // no agent yet: old code
  REQUIRE(early.read_line() == "first 1");

  Child agent({ctl(), "agent"});
  CHECK(agent.wait_for("pid " + std::to_string(early.pid()) + " (agent_target): applied set", seconds(30)));
  auto summary = agent.wait_for("start: ", seconds(30));
  REQUIRE(summary);
  CHECK(summary->find("start: 2 running process(es) of armed binaries: 1 patched or tried, 1 already had their sets") !=
        std::string::npos);
  agent.signal(SIGTERM);
  CHECK(agent.wait(seconds(20)) == 0);
  early.send("x");
  CHECK(early.read_line() == "value 2");
  CHECK(patches_in(early.pid()) == 1);
  CHECK(patches_in(first.pid()) == 1);

  // Idempotent: a second start patches nothing.
  Child again({ctl(), "agent"});
  auto summary2 = again.wait_for("start: ", seconds(30));
  REQUIRE(summary2);
  CHECK(summary2->find("0 patched or tried, 2 already had their sets") != std::string::npos);
  again.signal(SIGTERM);
  CHECK(again.wait(seconds(20)) == 0);
  CHECK(patches_in(early.pid()) == 1);
  wait_for_watchdogs();
}

TEST_CASE("agent: killed while idle, it leaves nothing stopped or probed, and a restarted agent works") {
  require_root();
  StateDir state;
  Child first({target()});
  persist_from(first);
  {
    auto agent = start_agent();
    agent->signal(SIGKILL);
    agent->wait(seconds(10));
  }
  wait_for_watchdogs();
  Child orphan({target()});  // no agent: its probe died with it, nothing stops this one
  CHECK(orphan.read_line(seconds(10)) == "first 1");
  auto agent = std::make_unique<Child>(std::vector<std::string>{ctl(), "agent"});
  REQUIRE(agent->wait_for("pid " + std::to_string(orphan.pid()) + " (agent_target): applied set"));
  REQUIRE(agent->wait_for("start: "));
  orphan.send("x");
  CHECK(orphan.read_line() == "value 2");
  Child fresh({target()});
  CHECK(fresh.read_line() == "first 2");
  agent->signal(SIGTERM);
  CHECK(agent->wait(seconds(20)) == 0);
  wait_for_watchdogs();
}

TEST_CASE("agent: killed with a new process stopped or parked, the process never stays stopped") {
  require_root();
  StateDir state;
  Child first({target()});
  persist_from(first);
  // Crash points of the agent's handling of one new process: 1 right after the BPF stop (the
  // watchdog continues it), 2 seized and continued, 3 parked frame ready, then inside the patch
  // (the process sleeps out its 2 s hold and runs on).
  for (int k : {1, 2, 3, 4, 12, 35, 60, 100, 150, 200}) {
    DYNAMIC_SECTION("agent killed at crash point " << k) {
      ::setenv("HOTFIX_CRASH_AT", std::to_string(k).c_str(), 1);
      auto agent = start_agent({"--hold", "2"});
      ::unsetenv("HOTFIX_CRASH_AT");
      Child fresh({target()});
      auto line = fresh.read_line(seconds(15));
      INFO("first line: " << line.value_or("(none)") << ", state " << state_of(fresh.pid()));
      REQUIRE(line);
      CHECK((*line == "first 1" || *line == "first 2"));
      agent->wait(seconds(10));
      wait_for_watchdogs();
      CHECK(state_of(fresh.pid()) != 'T');
      // The next agent finishes the job (recovery of a half-done patch included).
      auto next = start_agent();
      next->signal(SIGTERM);
      CHECK(next->wait(seconds(20)) == 0);
      fresh.send("x");
      CHECK(fresh.read_line() == "value 2");
      CHECK(patches_in(fresh.pid()) == 1);
      wait_for_watchdogs();
    }
  }
}

TEST_CASE("agent: without its watchdog, a process left stopped is patched by the next agent") {
  require_root();
  StateDir state;
  Child first({target()});
  persist_from(first);
  ::setenv("HOTFIX_CRASH_AT", "1", 1);
  auto agent = start_agent({"--no-watchdog"});
  ::unsetenv("HOTFIX_CRASH_AT");
  Child fresh({target()});
  CHECK(agent->wait(seconds(10)));
  for (int i = 0; i < 50 && state_of(fresh.pid()) != 'T'; ++i) std::this_thread::sleep_for(milliseconds(20));
  REQUIRE(state_of(fresh.pid()) == 'T');  // what the watchdog is for
  auto next = start_agent();
  CHECK(fresh.read_line() == "first 2");  // patched before its own code ran, even now
  next->signal(SIGTERM);
  CHECK(next->wait(seconds(20)) == 0);
  wait_for_watchdogs();
}

TEST_CASE("agent: a tampered persisted library is refused in one line, the process runs unpatched") {
  require_root();
  StateDir state;
  Child first({target()});
  int set = persist_from(first);
  auto listed = ctl_run({"persisted", "--json"});
  auto copy = std::regex_replace(listed.out, std::regex(".*\"copy\":\"([^\"]+)\".*\n?"), "$1");
  {
    std::fstream f(copy, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(200);
    f.put('\x5a');
  }
  auto table = ctl_run({"persisted"});
  CHECK(table.out.find("REFUSED") != std::string::npos);
  CHECK(table.out.find("was changed since it was recorded") != std::string::npos);

  auto agent = start_agent();
  Child fresh({target()});
  CHECK(fresh.read_line() == "first 1");
  auto refused = agent->wait_for("pid " + std::to_string(fresh.pid()) + " (agent_target): set " + std::to_string(set) + " refused");
  REQUIRE(refused);
  CHECK(refused->find("was changed since it was recorded") != std::string::npos);
  CHECK(agent->wait_for("pid " + std::to_string(fresh.pid()) + " (agent_target): continued unpatched"));
  fresh.send("x");
  CHECK(fresh.read_line() == "value 1");
  CHECK(patches_in(fresh.pid()) == 0);

  // Not root's any more: refused as well.
  REQUIRE(::chown(copy.c_str(), 65534, 65534) == 0);
  Child other({target()});
  CHECK(other.read_line() == "first 1");
  auto refused2 = agent->wait_for("pid " + std::to_string(other.pid()) + " (agent_target): set " + std::to_string(set) + " refused");
  REQUIRE(refused2);
  CHECK(refused2->find("not root") != std::string::npos);
  agent->signal(SIGTERM);
  CHECK(agent->wait(seconds(20)) == 0);
  wait_for_watchdogs();
}

TEST_CASE("patch --persist refuses what it cannot persist, before changing the target; revert --persist usage") {
  require_root();
  StateDir state;
  Child t({target()});
  REQUIRE(t.read_line() == "first 1");
  auto maps_before = file_mappings(t.pid());
  auto r = ctl_run({"patch", "--pid", std::to_string(t.pid()), "--lib", fixture("agent_fix_libc.so"), "--object",
                    "libc.so.6", "abs", "--persist", "--observe", "0"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 1);
  REQUIRE(lines_of(r.err).size() == 1);
  CHECK(r.err.find("not in the executable") != std::string::npos);
  CHECK(patches_in(t.pid()) == 0);
  CHECK(file_mappings(t.pid()) == maps_before);
  CHECK(ctl_run({"persisted"}).out.find("no persisted patch sets") != std::string::npos);
  t.send("x");
  CHECK(t.read_line() == "value 1");

  CHECK(ctl_run({"revert", "--persist", "--all"}).exit_code == 2);  // --all needs --binary
  auto none = ctl_run({"revert", "--persist", "--id", "999"});
  CHECK(none.exit_code == 1);
  CHECK(lines_of(none.err).size() == 1);
  Child t2({target()});
  persist_from(t2);
  CHECK(ctl_run({"revert", "--persist", "--all", "--binary", target()}).exit_code == 0);
  CHECK(ctl_run({"persisted", "--json"}).out.find("\"sets\":[]") != std::string::npos);
}

TEST_CASE("patch --persist with --exe records one set for the binary, and the agent patches new processes with it") {
  require_root();
  StateDir state;
  std::vector<std::unique_ptr<Child>> running;
  for (int i = 0; i < 3; ++i) {
    running.push_back(std::make_unique<Child>(std::vector<std::string>{target()}));
    REQUIRE(running.back()->read_line() == "first 1");
  }
  // Three hotfix-ctl runs (in parallel), one per process, each asked to persist.
  auto r = ctl_run({"patch", "--exe", target(), "--lib", fix(), "--persist", "--observe", "0", "--json"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("\"processes\":3,\"ok\":3,\"failed\":0") != std::string::npos);
  std::regex set_of(R"("persisted":\{"set":(\d+),)");
  std::set<std::string> sets_named;
  for (auto it = std::sregex_iterator(r.out.begin(), r.out.end(), set_of); it != std::sregex_iterator(); ++it)
    sets_named.insert((*it)[1]);
  CHECK(sets_named.size() == 1);  // every run names the same set
  auto listed = ctl_run({"persisted", "--json"});
  INFO(listed.out);
  REQUIRE(listed.exit_code == 0);
  std::regex id(R"(\{"id":(\d+),)");
  std::vector<std::string> sets;
  for (auto it = std::sregex_iterator(listed.out.begin(), listed.out.end(), id); it != std::sregex_iterator(); ++it)
    sets.push_back((*it)[1]);
  REQUIRE(sets.size() == 1);  // not one per process
  CHECK(sets_named.count(sets[0]));
  CHECK(listed.out.find("\"ok\":true") != std::string::npos);
  for (auto& c : running) {
    c->send("x");
    CHECK(c->read_line() == "value 2");
    CHECK(patches_in(c->pid()) == 1);
  }

  // Persisting the same fix again (another process) reuses the set.
  Child later({target()});
  REQUIRE(later.read_line() == "first 1");
  auto again = ctl_run({"patch", "--pid", std::to_string(later.pid()), "--lib", fix(), "--persist", "--observe", "0"});
  INFO(again.out << again.err);
  REQUIRE(again.exit_code == 0);
  CHECK(again.out.find("already persisted as set " + sets[0]) != std::string::npos);
  auto relisted = ctl_run({"persisted", "--json"}).out;
  CHECK(relisted.find("{\"id\":" + sets[0] + ",") != std::string::npos);
  CHECK(std::distance(std::sregex_iterator(relisted.begin(), relisted.end(), id), std::sregex_iterator()) == 1);

  auto agent = start_agent();
  Child fresh({target()});
  CHECK(fresh.read_line() == "first 2");  // the fixed code from its first call
  REQUIRE(agent->wait_for("pid " + std::to_string(fresh.pid()) + " (agent_target): continued with set(s)"));
  CHECK(patches_in(fresh.pid()) == 1);
  for (auto& c : running) CHECK(patches_in(c->pid()) == 1);  // the start sweep patched none twice
  agent->signal(SIGTERM);
  CHECK(agent->wait(seconds(20)) == 0);
  wait_for_watchdogs();
}
