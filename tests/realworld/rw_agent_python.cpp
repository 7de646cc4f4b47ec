// Debian's /usr/bin/python3 under the agent: a fix for Py_GetVersion (a function of the
// python3.11 executable itself) is applied to one running interpreter with --persist; with
// `hotfix-ctl agent` running, every python3 started afterwards answers from the fix on its
// FIRST call (through ctypes, so no inlined copy can hide it); `revert --persist` ends that.
#include <sys/stat.h>
#include <signal.h>
#include <stdlib.h>

#include <catch2/catch.hpp>
#include <regex>

#include "realworld.hpp"

using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

TEST_CASE("python3: a persisted fix is in every new interpreter from its first call") {
  require_root();
  require_program("/usr/bin/python3", "python3");
  ScratchDir dir("rw-agent-python");
  std::string state = dir.file("state");
  REQUIRE(::mkdir(state.c_str(), 0755) == 0);
  ::setenv("HOTFIX_STATE_DIR", state.c_str(), 1);
  auto script = dir.write("version.py",
                          "import ctypes, sys\n"
                          "f = ctypes.pythonapi.Py_GetVersion\n"
                          "f.restype = ctypes.c_char_p\n"
                          "print(f().decode(), flush=True)\n"
                          "for line in sys.stdin:\n"
                          "    print(f().decode(), flush=True)\n");
  auto fix = build_fix(dir.write("fix.c", "const char *Py_GetVersion(void) { return \"patched by hotfix\"; }\n"),
                       dir.file("fix.so"));
  Child running({"/usr/bin/python3", script});
  auto before = running.read_line(seconds(20));
  REQUIRE(before);
  REQUIRE(before->find("patched") == std::string::npos);
  auto patched = ctl_run({"patch", "--pid", std::to_string(running.pid()), "--lib", fix, "Py_GetVersion", "--persist",
                          "--observe", "0"});
  INFO(patched.out << patched.err);
  if (patched.err.find("not in the executable") != std::string::npos) {
    fprintf(stderr, "SKIP: this python3 has Py_GetVersion in a library (%s)\n", patched.err.c_str());
    ::unsetenv("HOTFIX_STATE_DIR");
    std::exit(4);
  }
  REQUIRE(patched.exit_code == 0);
  std::smatch m;
  REQUIRE(std::regex_search(patched.out, m, std::regex("persisted as set (\\d+)")));
  running.send("x");
  CHECK(running.read_line() == "patched by hotfix");

  Child agent({ctl(), "agent"});
  REQUIRE(agent.wait_for("start: ", seconds(60)));
  for (int i = 0; i < 2; ++i) {
    Child fresh({"/usr/bin/python3", script});
    CHECK(fresh.read_line(seconds(30)) == "patched by hotfix");
    fresh.send("x");
    CHECK(fresh.read_line() == "patched by hotfix");
    fresh.close_stdin();
    CHECK(fresh.wait(seconds(20)) == 0);
  }
  auto removed = ctl_run({"revert", "--persist", "--id", m[1]});
  REQUIRE(removed.exit_code == 0);
  Child after({"/usr/bin/python3", script});
  auto old = after.read_line(seconds(30));
  REQUIRE(old);
  CHECK(old->find("patched") == std::string::npos);
  agent.signal(SIGTERM);
  CHECK(agent.wait(seconds(30)) == 0);
  ::unsetenv("HOTFIX_STATE_DIR");
}
