// Debian's redis-server is stripped and ships no DWARF: the coverage check cannot look for
// inlined copies of a patched function there, and the plan says so in one note (with how to
// get debug info), while clones and aliases are still checked from the symbol table. A dry
// run: redis is untouched.
#include <catch2/catch.hpp>

#include "realworld.hpp"

using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

namespace {

const char* kFix = R"(/* The event loop with the same body, as a user would rebuild it from redis's ae.c. */
struct aeEventLoop;
extern int aeProcessEvents(struct aeEventLoop *eventLoop, int flags);
void aeMain(struct aeEventLoop *eventLoop) {
  for (;;) aeProcessEvents(eventLoop, (1 << 0) | (1 << 1) | (1 << 3) | (1 << 4));
}
)";

}  // namespace

TEST_CASE("redis: without DWARF the plan says inlined copies could not be looked for", "[realworld][redis][coverage]") {
  require_root();
  require_program("/usr/bin/redis-server", "redis-server");
  ScratchDir dir("rw_coverage_redis");
  auto fix = build_fix(dir.write("fix_aemain.c", kFix), dir.file("fix_aemain.so"));
  int port = free_port();
  Child redis({"/usr/bin/redis-server", "--port", std::to_string(port), "--save", "", "--appendonly", "no"});
  REQUIRE(wait_for_port(port));
  auto maps_before = file_mappings(redis.pid());
  auto r = run({ctl(), "patch", "--pid", std::to_string(redis.pid()), "--lib", fix, "aeMain", "--observe", "0",
                "--dry-run"});
  INFO("stdout: " << r.out << "\nstderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  if (r.out.find("coverage: searched the DWARF") != std::string::npos) {
    WARN("redis-server has debug info here (its -dbgsym is installed): inlined copies were looked for");
  } else {
    auto note = r.out.find("coverage: inlined copies of aeMain could not be looked for:");
    REQUIRE(note != std::string::npos);
    auto line = r.out.substr(note, r.out.find('\n', note) - note);
    CHECK(line.find("redis") != std::string::npos);
    CHECK(line.find("no DWARF") != std::string::npos);
    CHECK(line.find("-dbgsym") != std::string::npos);
  }
  CHECK(r.out.find("dry run: nothing was changed") != std::string::npos);
  CHECK(file_mappings(redis.pid()) == maps_before);
  auto ping = run({"/usr/bin/redis-cli", "-p", std::to_string(port), "ping"});
  CHECK(ping.out == "PONG\n");
}
