// Debian's python3 with libsqlite3 and libz, which ship without DWARF (their -dbgsym packages
// are not installed): a user's C fix for sqlite3_complete gets the one-line "types: not
// checked" note in the plan (dry run), naming the function and how to get the DWARF.
#include <catch2/catch.hpp>

#include "realworld.hpp"

using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

TEST_CASE("python3: the types check says libsqlite3 has no DWARF, and the dry run proceeds") {
  require_root();
  require_program("/usr/bin/python3", "python3");
  ScratchDir dir("rw-abi-types");
  auto script = dir.write("loop.py",
                          "import sqlite3, time, zlib\n"
                          "while True:\n"
                          "    print('tick %d %d' % (sqlite3.complete_statement('select 1;'), zlib.crc32(b'x')), flush=True)\n"
                          "    time.sleep(0.05)\n");
  auto fix = build_fix(dir.write("fix.c",
                                 "#include <string.h>\n"
                                 "int sqlite3_complete(const char *sql) {\n"
                                 "  size_t n = strlen(sql);\n"
                                 "  return n > 0 && sql[n - 1] == ';';\n"
                                 "}\n"),
                       dir.file("fix.so"));
  Child py({"/usr/bin/python3", "-u", script});
  REQUIRE(py.wait_for("tick ", seconds(20)));
  auto r = run({ctl(), "patch", "--pid", std::to_string(py.pid()), "--lib", fix, "--object", "libsqlite3.so.0",
                "--dry-run", "--observe", "0", "sqlite3_complete"},
               seconds(120));
  INFO(r.out << r.err);
  if (r.err.find("defines no function the target has") != std::string::npos) {
    fprintf(stderr, "SKIP: python3 has no libsqlite3 sqlite3_complete loaded (%s)\n", r.err.c_str());
    std::exit(4);
  }
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("  types: not checked for sqlite3_complete: the target has no DWARF (install the -dbgsym package "
                   "or build with -g)\n") != std::string::npos);
  CHECK(r.out.find("dry run: nothing was changed") != std::string::npos);
  CHECK(py.running());
}
