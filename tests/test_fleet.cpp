// tools/fleet: the Ansible role applied with ansible-playbook to localhost (connection local)
// on real stats_target processes -- apply (changed), apply again (ok, nothing changed),
// revert (changed), revert again (ok) -- by pid and by --exe with --persist (one recorded set,
// a process started between runs is the only one patched, one the agent patched counts as
// done, revert removes the set), and the YAML of the role and of the Kubernetes DaemonSet
// linted. SKIP (exit 4) without ansible-playbook or yamllint (tools/check installs both).
#include <signal.h>
#include <sys/stat.h>
#include <stdlib.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <memory>
#include <regex>

#include "support/harness.hpp"
#include "symbols/symbols.hpp"

using namespace hotfix::test;
using namespace std::chrono;
namespace fs = std::filesystem;

namespace {

const std::string kFleet = std::string(HOTFIX_SOURCE_DIR) + "/tools/fleet";
const std::string kPlaybook = kFleet + "/ansible/hotfix.yml";

void require_tool(const char* path, const char* package) {
  require_root();
  if (::access(path, X_OK) != 0) {
    std::fprintf(stderr, "SKIP: %s is missing (apt-get install %s; tools/check does)\n", path, package);
    std::exit(4);
  }
}

// A scratch directory that is removed whatever happens (root's alone, as hotfix's trust rule
// wants for the fix copies the role writes into it).
struct ScratchDir {
  fs::path path;
  ScratchDir() {
    path = fs::path(fixture("")).parent_path() / ("fleet-" + std::to_string(::getpid()));
    fs::remove_all(path);
    fs::create_directories(path / "tmp");
    fs::permissions(path, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                              fs::perms::others_read | fs::perms::others_exec);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

struct Playbook {
  int exit_code = -1;
  std::string out;
  long changed = -1, failed = -1;
};

Playbook playbook(const ScratchDir& dir, const std::string& state, const std::vector<std::string>& extra = {}) {
  std::string tmp = (dir.path / "tmp").string();
  std::vector<std::string> argv = {"/usr/bin/env", "ANSIBLE_NOCOLOR=1", "ANSIBLE_RETRY_FILES_ENABLED=0",
                "ANSIBLE_PYTHON_INTERPRETER=/usr/bin/python3", "ANSIBLE_LOCAL_TEMP=" + tmp,
                "ANSIBLE_REMOTE_TEMP=" + tmp, "HOME=" + tmp, "/usr/bin/ansible-playbook", "-i", "localhost,", "-c",
                "local", kPlaybook, "-e", "hotfix_become=false", "-e", "hotfix_ctl=" + ctl(), "-e",
                "hotfix_fix=" + fixture("stats_fix.so"), "-e", "hotfix_binary=" + fixture("stats_target"), "-e",
                "hotfix_fix_dir=" + (dir.path / "fixes").string(), "-e", "hotfix_state=" + state};
  for (auto& e : extra) argv.insert(argv.end(), {"-e", e});
  auto r = run(argv, 240s);
  Playbook p{r.exit_code, r.out + r.err};
  std::smatch m;
  if (std::regex_search(p.out, m, std::regex(R"(localhost\s*:\s*ok=\d+\s+changed=(\d+)\s+unreachable=\d+\s+failed=(\d+))"))) {
    p.changed = std::stol(m[1]);
    p.failed = std::stol(m[2]);
  }
  return p;
}

struct Target {
  Child child{{fixture("stats_target")}};
  Target() { REQUIRE(child.request("ready").rfind("ok", 0) == 0); }
  ~Target() {
    child.signal(SIGKILL);
    child.wait();
  }
  std::string call1() { return child.request("call 1"); }
  std::string listing() { return run({ctl(), "list", "--pid", std::to_string(child.pid()), "--json"}).out; }
  size_t active_patches() { return count_of(listing(), "\"state\":\"active\""); }
  pid_t pid() const { return child.pid(); }

  static size_t count_of(const std::string& text, const std::string& what) {
    size_t n = 0;
    for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
    return n;
  }
};

// A private state directory for persisted sets (HOTFIX_STATE_DIR), root's and 0755 as the
// store's trust rule wants; the role passes it to hotfix-ctl through hotfix_env.
struct StateDir {
  std::string path;
  StateDir() {
    char tmpl[] = "/tmp/hotfix-fleet-state-XXXXXX";
    path = ::mkdtemp(tmpl);
    ::chmod(path.c_str(), 0755);
    ::setenv("HOTFIX_STATE_DIR", path.c_str(), 1);  // for the hotfix-ctl runs of the test itself
  }
  ~StateDir() {
    ::unsetenv("HOTFIX_STATE_DIR");
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string env_var() const { return R"({"hotfix_env": {"HOTFIX_STATE_DIR": ")" + path + R"("}})"; }
};

std::string fix_sha256() {
  auto r = run({"/usr/bin/sha256sum", fixture("stats_fix.so")});
  return r.out.substr(0, 64);
}

// The ids of the persisted sets (hotfix-ctl persisted --json).
std::vector<std::string> persisted_ids() {
  auto r = run({ctl(), "persisted", "--json"});
  std::vector<std::string> ids;
  std::regex id(R"(\{"id":(\d+),)");
  for (auto it = std::sregex_iterator(r.out.begin(), r.out.end(), id); it != std::sregex_iterator(); ++it)
    ids.push_back((*it)[1]);
  return ids;
}

bool reported(const Playbook& p, pid_t pid, const std::string& action) {
  return p.out.find("pid " + std::to_string(pid) + ": " + action) != std::string::npos;
}

}  // namespace

TEST_CASE("the fleet's YAML lints: the Ansible role and the Kubernetes DaemonSet", "[fleet][lint]") {
  require_tool("/usr/bin/yamllint", "yamllint");
  auto lint = run({"/usr/bin/yamllint", "--strict", "-c", kFleet + "/.yamllint", kFleet}, 60s);
  INFO(lint.out << lint.err);
  CHECK(lint.exit_code == 0);
  require_tool("/usr/bin/ansible-playbook", "ansible-core");
  auto syntax = run({"/usr/bin/env", "ANSIBLE_NOCOLOR=1", "HOME=/tmp", "/usr/bin/ansible-playbook", "--syntax-check",
                     "-i", "localhost,", kPlaybook},
                    120s);
  INFO(syntax.out << syntax.err);
  CHECK(syntax.exit_code == 0);
}

TEST_CASE("ansible-playbook applies a fix to every process of a binary once, and reverts it", "[fleet][ansible]") {
  require_tool("/usr/bin/ansible-playbook", "ansible-core");
  ScratchDir dir;
  Target a, b;
  // call 1 = stats_work(0) + stats_tail(0): 8 by the old code, 200008 by the fix.
  REQUIRE(a.call1() == "ok 8");
  REQUIRE(b.call1() == "ok 8");
  auto work = [&] {
    auto table = hotfix::SymbolTable::for_pid(a.child.pid());
    REQUIRE(table);
    for (auto& f : table->functions())
      if (f.name == "stats_work") return f.address;
    FAIL("no stats_work");
    return uint64_t{0};
  }();
  const auto original = file_bytes(a.child.pid(), work, 5);

  auto apply = playbook(dir, "present");
  INFO(apply.out);
  REQUIRE(apply.exit_code == 0);
  CHECK(apply.failed == 0);
  CHECK(apply.changed >= 1);
  CHECK(apply.out.find("pid " + std::to_string(a.child.pid()) + ": patched") != std::string::npos);
  CHECK(apply.out.find("pid " + std::to_string(b.child.pid()) + ": patched") != std::string::npos);
  CHECK(a.call1() == "ok 200008");
  CHECK(b.call1() == "ok 200008");

  auto again = playbook(dir, "present");
  INFO(again.out);
  REQUIRE(again.exit_code == 0);
  CHECK(again.changed == 0);
  CHECK(again.out.find("pid " + std::to_string(a.child.pid()) + ": ok") != std::string::npos);
  CHECK(a.active_patches() == 1);  // not applied twice
  CHECK(b.active_patches() == 1);
  CHECK(a.call1() == "ok 200008");

  auto revert = playbook(dir, "absent");
  INFO(revert.out);
  REQUIRE(revert.exit_code == 0);
  CHECK(revert.changed >= 1);
  CHECK(revert.out.find("pid " + std::to_string(b.child.pid()) + ": reverted") != std::string::npos);
  CHECK(a.call1() == "ok 8");
  CHECK(b.call1() == "ok 8");
  CHECK(read_memory(a.child.pid(), work, 5) == original);
  CHECK(a.active_patches() == 0);

  auto revert_again = playbook(dir, "absent");
  INFO(revert_again.out);
  REQUIRE(revert_again.exit_code == 0);
  CHECK(revert_again.changed == 0);
  CHECK(a.child.running());
  CHECK(b.child.running());
}

TEST_CASE("ansible-playbook with hotfix_select exe and hotfix_persist: one set, new processes, the agent, revert",
          "[fleet][ansible][exe]") {
  require_tool("/usr/bin/ansible-playbook", "ansible-core");
  ScratchDir dir;
  StateDir state;
  const std::vector<std::string> exe = {"hotfix_select=exe", "hotfix_persist=true", state.env_var()};
  const std::string sha = fix_sha256();
  REQUIRE(sha.size() == 64);
  std::vector<std::unique_ptr<Target>> targets;
  for (int i = 0; i < 3; ++i) targets.push_back(std::make_unique<Target>());
  for (auto& t : targets) REQUIRE(t->call1() == "ok 8");

  // First run: every process patched by one `patch --pid A,B,C --persist`, one set recorded.
  auto apply = playbook(dir, "present", exe);
  INFO(apply.out);
  REQUIRE(apply.exit_code == 0);
  CHECK(apply.failed == 0);
  CHECK(apply.changed >= 1);
  for (auto& t : targets) {
    CHECK(reported(apply, t->pid(), "patched"));
    CHECK(t->call1() == "ok 200008");
    auto listed = t->listing();
    INFO(listed);
    CHECK(Target::count_of(listed, "\"state\":\"active\"") == 1);
    CHECK(listed.find("\"sha256\":\"" + sha + "\"") != std::string::npos);  // what idempotency compares
  }
  auto sets = persisted_ids();
  REQUIRE(sets.size() == 1);  // one set for the binary, not one per process
  CHECK(apply.out.find("persisted as set " + sets[0]) != std::string::npos);

  // Second run: nothing to do.
  auto again = playbook(dir, "present", exe);
  INFO(again.out);
  REQUIRE(again.exit_code == 0);
  CHECK(again.changed == 0);
  for (auto& t : targets) {
    CHECK(reported(again, t->pid(), "ok, patch"));
    CHECK(t->active_patches() == 1);
  }
  CHECK(persisted_ids() == sets);

  // A process started between runs (no agent): the next run patches it, and only it.
  targets.push_back(std::make_unique<Target>());
  Target& late = *targets.back();
  REQUIRE(late.call1() == "ok 8");
  auto third = playbook(dir, "present", exe);
  INFO(third.out);
  REQUIRE(third.exit_code == 0);
  CHECK(third.changed >= 1);
  CHECK(reported(third, late.pid(), "patched"));
  for (size_t i = 0; i < 3; ++i) CHECK(reported(third, targets[i]->pid(), "ok, patch"));
  CHECK(late.call1() == "ok 200008");
  for (auto& t : targets) CHECK(t->active_patches() == 1);
  CHECK(persisted_ids() == sets);

  // One started while the agent runs is patched by the agent (from the set's copy): the role
  // sees the same fix (its sha256) and leaves it alone.
  {
    Child agent({ctl(), "agent"});
    REQUIRE(agent.wait_for("start: ", 30s));
    targets.push_back(std::make_unique<Target>());
    CHECK(targets.back()->call1() == "ok 200008");
    REQUIRE(agent.wait_for("pid " + std::to_string(targets.back()->pid()) + " (stats_target): continued with set(s)"));
    agent.signal(SIGTERM);
    CHECK(agent.wait(20s) == 0);
  }
  auto fourth = playbook(dir, "present", exe);
  INFO(fourth.out);
  REQUIRE(fourth.exit_code == 0);
  CHECK(fourth.changed == 0);
  CHECK(reported(fourth, targets.back()->pid(), "ok, patch"));
  CHECK(targets.back()->active_patches() == 1);

  // Revert by the same role: the set is removed and every process, the agent's too, reverted.
  auto revert = playbook(dir, "absent", exe);
  INFO(revert.out);
  REQUIRE(revert.exit_code == 0);
  CHECK(revert.changed >= 1);
  CHECK(revert.out.find("persisted set " + sets[0] + " (" + fixture("stats_target") + "): removed") != std::string::npos);
  CHECK(persisted_ids().empty());
  for (auto& t : targets) {
    CHECK(reported(revert, t->pid(), "reverted"));
    CHECK(t->call1() == "ok 8");
    CHECK(t->active_patches() == 0);
  }
  auto revert_again = playbook(dir, "absent", exe);
  INFO(revert_again.out);
  REQUIRE(revert_again.exit_code == 0);
  CHECK(revert_again.changed == 0);
  for (auto& t : targets) CHECK(t->child.running());
}
