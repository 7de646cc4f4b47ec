// Mistakes a user makes in the first hour, each with its hint, and the hint proven right by
// doing what it says: a fix built with g++ for a C program (extern "C"), a stripped program
// (its -dbgsym package, the debug directory, HOTFIX_DEBUG_ROOT), a --dry-run that must fail
// where the apply would (the binder's resolution), and a --dry-run that does not observe.
#include <catch2/catch.hpp>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>

#include "support/harness.hpp"

using namespace hotfix::test;
namespace fs = std::filesystem;

namespace {

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/hotfix-hints-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    path = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

std::string sh(const std::string& command) {
  auto r = run({"/bin/sh", "-c", command});
  INFO(command << "\n" << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  return r.out;
}

// A C program whose `compute(x)` returns 3*x (bind_ctarget), started and answering. Its
// printf is not flushed into a pipe: stdbuf makes it line-buffered (and execs it, same pid).
struct CTarget {
  Child child;
  explicit CTarget(const std::string& exe) : child({"/usr/bin/stdbuf", "-oL", exe}) { REQUIRE(answer(1).rfind("3 ", 0) == 0); }
  std::string answer(int x) {
    child.send(std::to_string(x));
    auto line = child.read_line();
    REQUIRE(line);
    return *line;
  }
  std::string pid() const { return std::to_string(child.pid()); }
};

}  // namespace

TEST_CASE("a fix for a C program built with g++ is refused with the hint to use extern \"C\"", "[hints]") {
  require_root();
  TempDir dir;
  // The mistake: g++ compiles a .c file as C++, so compute is _Z7computei.
  const std::string wrong = (dir.path / "fix.so").string();
  sh("g++ -O2 -g -shared -fPIC '" + std::string(HOTFIX_SOURCE_DIR) +
     "/tests/fixtures/bind_cfix.c' -o '" + wrong + "'");
  CTarget t(fixture("bind_ctarget"));
  auto before = file_mappings(t.child.pid());
  for (auto pattern : {std::string(), std::string("compute")}) {
    std::vector<std::string> args = {ctl(), "patch", "--pid", t.pid(), "--lib", wrong, "--dry-run"};
    if (!pattern.empty()) args.push_back(pattern);
    auto r = run(args);
    INFO(r.out << r.err);
    CHECK(r.exit_code == 1);
    CHECK(lines_of(r.err).size() == 1);
    CHECK(r.err.find("compiled as C++") != std::string::npos);
    CHECK(r.err.find("`compute(int)` is `_Z7computei`") != std::string::npos);
    CHECK(r.err.find("extern \"C\"") != std::string::npos);
  }
  CHECK(file_mappings(t.child.pid()) == before);
  CHECK(t.answer(5).rfind("15 ", 0) == 0);

  // Doing what the hint says works: the same fix with extern "C", built with g++.
  const std::string source = (dir.path / "fix.cpp").string();
  std::ofstream(source) << "extern \"C\" {\nextern int g_calls;\nint helper(int);\n"
                           "int compute(int x) { g_calls += 1; return helper(x) + 1; }\n}\n";
  const std::string right = (dir.path / "fix_c.so").string();
  sh("g++ -O2 -g -shared -fPIC '" + source + "' -o '" + right + "'");
  auto applied = run({ctl(), "patch", "--pid", t.pid(), "--lib", right, "--observe", "0"});
  INFO(applied.out << applied.err);
  REQUIRE(applied.exit_code == 0);
  CHECK(t.answer(5).rfind("16 ", 0) == 0);  // new calls run the new code
  REQUIRE(run({ctl(), "revert", "--pid", t.pid(), "--all"}).exit_code == 0);
  CHECK(t.answer(5).rfind("15 ", 0) == 0);
}

TEST_CASE("a stripped program: the hint names the debug file's path and HOTFIX_DEBUG_ROOT, and they work",
          "[hints]") {
  require_root();
  TempDir dir;
  const std::string exe = (dir.path / "stripped_ctarget").string();
  fs::copy_file(fixture("bind_ctarget"), exe);
  sh("strip '" + exe + "'");
  CTarget t(exe);
  auto r = run({ctl(), "symbols", "--pid", t.pid(), "compute"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 1);
  CHECK(lines_of(r.err).size() == 1);
  CHECK(r.err.find(exe + " is stripped") != std::string::npos);
  CHECK(r.err.find("no Debian package owns it") != std::string::npos);
  CHECK(r.err.find("HOTFIX_DEBUG_ROOT") != std::string::npos);
  std::smatch m;
  REQUIRE(std::regex_search(r.err, m, std::regex("/usr/lib/debug(/\\.build-id/[0-9a-f]{2}/[0-9a-f]+\\.debug)")));
  // patch says the same where fix.so then matches nothing.
  auto patch = run({ctl(), "patch", "--pid", t.pid(), "--lib", fixture("bind_cfix.so"), "--dry-run"});
  CHECK(patch.exit_code == 1);
  CHECK(patch.err.find(exe + " is stripped") != std::string::npos);

  // The debug file at the path the hint names, under a root given by HOTFIX_DEBUG_ROOT.
  fs::path debug = dir.path / "debug" / fs::path(m[1].str()).relative_path();
  fs::create_directories(debug.parent_path());
  sh("objcopy --only-keep-debug '" + fixture("bind_ctarget") + "' '" + debug.string() + "'");
  auto found = run({"/usr/bin/env", "HOTFIX_DEBUG_ROOT=" + (dir.path / "debug").string(), ctl(), "symbols", "--pid",
                    t.pid(), "compute"});
  INFO(found.out << found.err);
  CHECK(found.exit_code == 0);
  CHECK(found.out.find("compute") != std::string::npos);
  // With the root set, the hint names it.
  auto elsewhere = run({"/usr/bin/env", "HOTFIX_DEBUG_ROOT=/nonexistent", ctl(), "symbols", "--pid", t.pid(), "compute"});
  CHECK(elsewhere.err.find("/nonexistent/.build-id/") != std::string::npos);
}

TEST_CASE("a stripped Debian program: the hint names its -dbgsym package", "[hints]") {
  require_root();
  Child sleeper({"/bin/sleep", "60"});
  std::string pid = std::to_string(sleeper.pid());
  // The process runs /usr/bin/sleep once exec is done: wait for it.
  for (int i = 0; i < 200 && read_file("/proc/" + pid + "/comm") != "sleep\n"; i++) ::usleep(10000);
  auto r = run({ctl(), "symbols", "--pid", pid, "main"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 1);
  if (r.err.find("is stripped") == std::string::npos) {
    WARN("coreutils' debug symbols are installed here: no hint to check");
    return;
  }
  CHECK(r.err.find("install coreutils-dbgsym") != std::string::npos);
  CHECK(r.err.find("/usr/lib/debug/.build-id/") != std::string::npos);
  CHECK(r.err.find("HOTFIX_DEBUG_ROOT") != std::string::npos);
}

TEST_CASE("--dry-run fails where the apply would: it runs the binder's resolution too", "[hints]") {
  require_root();
  Child t({fixture("bind_target")});
  REQUIRE(t.wait_for("ready"));
  std::string pid = std::to_string(t.pid());
  auto before = file_mappings(t.pid());
  auto dry = run({ctl(), "patch", "--pid", pid, "--lib", fixture("bind_needs_missing.so"), "--dry-run"});
  INFO(dry.out << dry.err);
  CHECK(dry.exit_code == 1);
  CHECK(dry.err.find("fix.so needs `no_such_counter`, which the target does not define") != std::string::npos);
  CHECK(dry.out.find("dry run: nothing was changed") == std::string::npos);
  auto apply = run({ctl(), "patch", "--pid", pid, "--lib", fixture("bind_needs_missing.so"), "--observe", "0"});
  CHECK(apply.exit_code == 1);
  CHECK(apply.err == dry.err);  // the same refusal, word for word
  CHECK(file_mappings(t.pid()) == before);
  CHECK(t.request("compute 5").find("value=10") != std::string::npos);
}

TEST_CASE("--dry-run does not observe unless --observe is given", "[hints]") {
  require_root();
  Child t({fixture("bind_target")});
  REQUIRE(t.wait_for("ready"));
  std::string pid = std::to_string(t.pid());
  auto dry = run({ctl(), "patch", "--pid", pid, "--lib", fixture("bind_fix.so"), "--dry-run"});
  INFO(dry.out << dry.err);
  REQUIRE(dry.exit_code == 0);
  CHECK(dry.out.find("plan: patch") != std::string::npos);
  CHECK(dry.out.find("observed for") == std::string::npos);
  CHECK(dry.out.find("dry run: nothing was changed") != std::string::npos);
  auto observed = run({ctl(), "patch", "--pid", pid, "--lib", fixture("bind_fix.so"), "--dry-run", "--observe", "0.2"});
  INFO(observed.out << observed.err);
  REQUIRE(observed.exit_code == 0);
  CHECK(observed.out.find("observed for 0.2") != std::string::npos);
  CHECK(t.request("compute 5").find("value=10") != std::string::npos);  // unchanged
}
