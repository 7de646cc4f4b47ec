// The -fipa-ra call-site check on Debian's /usr/bin/python3: a plain C fix of the
// interpreter's own _Py_HashPointer (which now also reports through stderr's PLT, so it may
// change every call-clobbered register) is judged, the plan says what the ABI check found, and
// the accepted patch runs in the interpreter until it is reverted.
#include <catch2/catch.hpp>

#include "realworld.hpp"

using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

TEST_CASE("python3: the ABI check judges a fix of the interpreter's _Py_HashPointer and says so") {
  require_root();
  require_program("/usr/bin/python3", "python3");
  ScratchDir dir("rw-abi-python");
  auto script = dir.write("loop.py",
                          "import time\n"
                          "while True:\n"
                          "    d = {object(): i for i in range(50)}\n"
                          "    print('tick %d' % len(d), flush=True)\n"
                          "    time.sleep(0.02)\n");
  auto fix = build_fix(dir.write("fix.c",
                                 "#include <stdint.h>\n#include <stdio.h>\n"
                                 "long _Py_HashPointer(const void *p) {\n"
                                 "  uintptr_t y = (uintptr_t)p;\n"
                                 "  long x = (long)((y >> 4) | (y << 60));\n"
                                 "  if (x == -1) { fputs(\"hash of -1\\n\", stderr); x = -2; }\n"
                                 "  return x;\n"
                                 "}\n"),
                       dir.file("fix.so"));
  Child py({"/usr/bin/python3", "-u", script});
  REQUIRE(py.wait_for("tick 50", seconds(20)));
  auto syms = ctl_run({"symbols", "--pid", std::to_string(py.pid()), "_Py_HashPointer"});
  if (syms.out.find("_Py_HashPointer") == std::string::npos) {
    fprintf(stderr, "SKIP: this python3 has no _Py_HashPointer symbol (%s)\n", syms.err.c_str());
    std::exit(4);
  }
  auto plan = ctl_run({"patch", "--pid", std::to_string(py.pid()), "--lib", fix, "_Py_HashPointer", "--dry-run"});
  INFO(plan.out << plan.err);
  REQUIRE(plan.exit_code == 0);
  CHECK(plan.out.find("abi: _Py_HashPointer: ") != std::string::npos);
  auto patched = ctl_run({"patch", "--pid", std::to_string(py.pid()), "--lib", fix, "_Py_HashPointer"});
  INFO(patched.out << patched.err);
  REQUIRE(patched.exit_code == 0);
  for (int i = 0; i < 5; ++i) REQUIRE(py.wait_for("tick 50", seconds(10)));
  auto reverted = ctl_run({"revert", "--pid", std::to_string(py.pid()), "--all"});
  INFO(reverted.out << reverted.err);
  REQUIRE(reverted.exit_code == 0);
  REQUIRE(py.wait_for("tick 50", seconds(10)));
  CHECK(py.running());
}
