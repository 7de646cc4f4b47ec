// tools/fleet: the Ansible role applied with ansible-playbook to localhost (connection local)
// on two real stats_target processes -- apply (changed), apply again (ok, nothing changed),
// revert (changed), revert again (ok) -- and the YAML of the role and of the Kubernetes
// DaemonSet linted. SKIP (exit 4) without ansible-playbook or yamllint (tools/check installs both).
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
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

Playbook playbook(const ScratchDir& dir, const std::string& state) {
  std::string tmp = (dir.path / "tmp").string();
  auto r = run({"/usr/bin/env", "ANSIBLE_NOCOLOR=1", "ANSIBLE_RETRY_FILES_ENABLED=0",
                "ANSIBLE_PYTHON_INTERPRETER=/usr/bin/python3", "ANSIBLE_LOCAL_TEMP=" + tmp,
                "ANSIBLE_REMOTE_TEMP=" + tmp, "HOME=" + tmp, "/usr/bin/ansible-playbook", "-i", "localhost,", "-c",
                "local", kPlaybook, "-e", "hotfix_become=false", "-e", "hotfix_ctl=" + ctl(), "-e",
                "hotfix_fix=" + fixture("stats_fix.so"), "-e", "hotfix_binary=" + fixture("stats_target"), "-e",
                "hotfix_fix_dir=" + (dir.path / "fixes").string(), "-e", "hotfix_state=" + state},
               240s);
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
  size_t active_patches() {
    auto r = run({ctl(), "list", "--pid", std::to_string(child.pid()), "--json"});
    size_t n = 0;
    for (size_t at = r.out.find("\"state\":\"active\""); at != std::string::npos; at = r.out.find("\"state\":\"active\"", at + 1))
      ++n;
    return n;
  }
};

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
