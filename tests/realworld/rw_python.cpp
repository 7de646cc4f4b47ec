// Debian's /usr/bin/python3 (single-threaded) calling libsqlite3's sqlite3_complete (through
// _sqlite3's PLT) and libz's crc32 in a loop: a user's C fix replaces sqlite3_complete with
// inverted behaviour, python prints the new results, revert restores the old ones, python
// never crashes. Before injection chose threads by unwinding, its only thread (with
// __libc_start_main and stale loader words on its stack) could never be patched.
#include <catch2/catch.hpp>
#include <fstream>

#include "realworld.hpp"

using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

namespace {

// The next `n` lines all equal `expected` (after skipping ones printed before the change).
void expect_ticks(Child& py, const std::string& expected, int n = 5) {
  auto first = py.wait_for(expected, seconds(20));
  REQUIRE(first);
  CHECK(*first == expected);
  for (int i = 0; i < n; ++i) {
    auto line = py.read_line(seconds(10));
    REQUIRE(line);
    CHECK(*line == expected);
  }
}

int threads_of(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind("Threads:", 0) == 0) return std::stoi(line.substr(8));
  return -1;
}

}  // namespace

TEST_CASE("python3: sqlite3_complete replaced and restored in a single-threaded interpreter") {
  require_root();
  require_program("/usr/bin/python3", "python3");
  ScratchDir dir("rw-python");
  auto script = dir.write("loop.py",
                          "import sqlite3, time, zlib\n"
                          "while True:\n"
                          "    print('tick %d %d %d' % (sqlite3.complete_statement('select 1;'),\n"
                          "          sqlite3.complete_statement('select 1'), zlib.crc32(b'hotfix')), flush=True)\n"
                          "    time.sleep(0.02)\n");
  auto fix = build_fix(dir.write("fix.c",
                                 "#include <string.h>\n"
                                 "/* Inverted: complete when it does NOT end in ';'. */\n"
                                 "int sqlite3_complete(const char *sql) {\n"
                                 "  size_t n = strlen(sql);\n"
                                 "  return n > 0 && sql[n - 1] != ';';\n"
                                 "}\n"),
                       dir.file("fix.so"));
  Child py({"/usr/bin/python3", "-u", script});
  auto first = py.wait_for("tick ", seconds(20));
  REQUIRE(first);
  REQUIRE(first->rfind("tick 1 0 ", 0) == 0);
  const std::string crc = first->substr(9);  // libz's answer: must never change
  REQUIRE(threads_of(py.pid()) == 1);
  auto syms = ctl_run({"symbols", "--pid", std::to_string(py.pid()), "sqlite3_complete"});
  if (syms.out.find("libsqlite3") == std::string::npos) {
    fprintf(stderr, "SKIP: python3 has no libsqlite3 sqlite3_complete loaded (%s)\n", syms.err.c_str());
    std::exit(4);
  }
  for (std::string consistency : {"strict", "entry"}) {
    INFO(consistency);
    auto patched = ctl_run({"patch", "--pid", std::to_string(py.pid()), "--lib", fix, "--object", "libsqlite3.so.0",
                            "--consistency", consistency, "sqlite3_complete"});
    INFO(patched.out << patched.err);
    REQUIRE(patched.exit_code == 0);
    expect_ticks(py, "tick 0 1 " + crc);
    auto reverted = ctl_run({"revert", "--pid", std::to_string(py.pid()), "--all"});
    INFO(reverted.out << reverted.err);
    REQUIRE(reverted.exit_code == 0);
    expect_ticks(py, "tick 1 0 " + crc);
  }
  CHECK(py.running());
}
