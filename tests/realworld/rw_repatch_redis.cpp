// The re-patch workflow on Debian's redis-server: a user's fix for PING (plain gcc -O2 -g
// -shared -fPIC) that counts its calls in a FILE-STATIC variable and answers "PONG n"; applied,
// reverted and applied again three times while redis-benchmark keeps the server busy. Every
// new copy has its own counter (starting at 1), the original PONG comes back after each revert.
#include <signal.h>

#include <catch2/catch.hpp>
#include <regex>
#include <thread>

#include "realworld.hpp"

using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

namespace {

const char* kFix = R"(// PING answers "PONG <n>", n counted per loaded copy of this fix
#include <stdio.h>
struct client;
void addReplyStatus(struct client *c, const char *status);

static long pings; /* this copy's own */

void pingCommand(struct client *c) {
  char reply[32];
  snprintf(reply, sizeof reply, "PONG %ld", ++pings);
  addReplyStatus(c, reply);
}
)";

std::string ping(int port) {
  auto r = run({"/usr/bin/redis-cli", "-p", std::to_string(port), "ping"}, seconds(20));
  REQUIRE(r.exit_code == 0);
  return r.out;
}

}  // namespace

TEST_CASE("redis-server: a fix with a file-static counter, applied, reverted and applied again", "[realworld][repatch]") {
  require_root();
  RedisServer redis("hotfix-rw-repatch");
  auto fix = build_fix(redis.dir.write("ping_fix.c", kFix), redis.dir.file("ping_fix.so"));
  const int port = redis.port;
  REQUIRE(ping(port) == "PONG\n");
  const std::string pid = redis.pid();
  // Load the whole time: GET/SET from 4 clients (redis-benchmark's own PINGs would race the checks).
  Child load({"/usr/bin/redis-benchmark", "-p", std::to_string(port), "-c", "4", "-n", "100000000", "-t", "set,get",
              "-q", "-l"});

  for (int round = 0; round < 3; ++round) {
    INFO("round " << round);
    auto patched = ctl_run({"patch", "--pid", pid, "--lib", fix, "--observe", "0"});
    INFO(patched.out << patched.err);
    REQUIRE(patched.exit_code == 0);
    CHECK(ping(port) == "PONG 1\n");  // a fresh copy: its own `pings` starts at 0
    CHECK(ping(port) == "PONG 2\n");
    auto listed = ctl_run({"list", "--pid", pid});
    CHECK(listed.out.find("pingCommand") != std::string::npos);
    auto reverted = ctl_run({"revert", "--pid", pid, "--all"});
    INFO(reverted.out << reverted.err);
    REQUIRE(reverted.exit_code == 0);
    CHECK(ping(port) == "PONG\n");
  }
  auto all = ctl_run({"list", "--pid", pid, "--all"});
  CHECK(std::regex_search(all.out, std::regex("patch 3  reverted  ")));
  CHECK(load.running());
  CHECK(redis.server.running());
  redis.server.signal(SIGTERM);
  CHECK(redis.server.wait(seconds(20)));
}
