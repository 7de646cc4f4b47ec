// `hotfix-ctl build --pid` on Debian's redis-server: Debian strips it (no DWARF, no dbgsym
// installed), so the producer is missing and build says so and uses plain defaults; the stamp
// still carries redis's build-id, and `patch` accepts it for that process (dry run) and refuses
// a fix built for another program (python3).
#include <catch2/catch.hpp>
#include <filesystem>

#include "patch/fixlib.hpp"
#include "patch/stamp.hpp"
#include "realworld.hpp"
#include "symbols/symbols.hpp"

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

std::string build_id_of(const std::string& path) {
  auto table = hotfix::SymbolTable::for_file(path);
  REQUIRE(table);
  return table->objects().front().build_id;
}

}  // namespace

TEST_CASE("redis: build --pid names the missing producer, stamps redis's build-id, patch accepts it",
          "[realworld][redis]") {
  require_root();
  require_program("/usr/bin/redis-server", "redis-server");
  ScratchDir dir("rw_build_redis");
  auto src = dir.write("fix_aemain.c", kFix);
  int port = free_port();
  Child redis({"/usr/bin/redis-server", "--port", std::to_string(port), "--save", "", "--appendonly", "no"});
  REQUIRE(wait_for_port(port));
  std::string pid = std::to_string(redis.pid());
  std::string exe = std::filesystem::canonical("/proc/" + pid + "/exe").string();
  std::string build_id = build_id_of(exe);
  REQUIRE(!build_id.empty());

  auto built = ctl_run({"build", "--pid", pid, "-o", dir.file("fix.so"), src});
  INFO(built.out << built.err);
  REQUIRE(built.exit_code == 0);
  CHECK(built.out.find("note: no DW_AT_producer for " + exe) != std::string::npos);
  CHECK(built.out.find("building with plain defaults (-O2)") != std::string::npos);
  CHECK(built.out.find("stamped for build-id " + build_id) != std::string::npos);
  auto image = hotfix::fixlib__load(dir.file("fix.so"));
  REQUIRE(image);
  auto stamps = hotfix::stamp__read(image->bytes);
  REQUIRE(stamps);
  REQUIRE(stamps->size() == 1);
  CHECK(stamps->front().build_id == build_id);

  auto patched = ctl_run({"patch", "--pid", pid, "--lib", dir.file("fix.so"), "aeMain", "--dry-run", "--observe", "0"});
  INFO(patched.out << patched.err);
  REQUIRE(patched.exit_code == 0);
  CHECK(patched.out.find("  provenance: built for this binary (build-id " + build_id) != std::string::npos);
  CHECK(patched.out.find("  toolchain: not compared: no DW_AT_producer for ") != std::string::npos);

  if (std::filesystem::exists("/usr/bin/python3")) {  // a fix built for another program
    auto other = ctl_run({"build", "--binary", "/usr/bin/python3", "-o", dir.file("fix_py.so"), src});
    INFO(other.out << other.err);
    REQUIRE(other.exit_code == 0);
    auto refused = ctl_run({"patch", "--pid", pid, "--lib", dir.file("fix_py.so"), "aeMain", "--dry-run",
                            "--observe", "0"});
    INFO(refused.out << refused.err);
    CHECK(refused.exit_code == 1);
    CHECK(refused.err.find("fix.so was built for " + std::filesystem::canonical("/usr/bin/python3").string()) !=
          std::string::npos);
    CHECK(refused.err.find(build_id) != std::string::npos);
  }
  auto ping = run({"/usr/bin/redis-cli", "-p", std::to_string(port), "ping"});
  CHECK(ping.out == "PONG\n");
}
