// A quick patch reads only the symbols it needs (issue 11 section 7), on Debian's redis-server
// (18 objects: libcrypto, libssl, libstdc++, libsystemd, ...): a user's C fix for PING, which
// calls redis and libc. The plan from a partial read must be the plan from reading everything
// (HOTFIX_READ_ALL_SYMBOLS=1), line for line; an error must still speak of the whole process
// (a typo of a libcrypto function is answered with its name, though the fix needs nothing
// there); and the patch, applied this way under redis-benchmark, answers.
#include <signal.h>

#include <catch2/catch.hpp>
#include <regex>
#include <sstream>

#include "realworld.hpp"

using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

namespace {

const char* kFix = R"(#include <stdio.h>
struct client;
void addReplyStatus(struct client *c, const char *status);

void pingCommand(struct client *c) {
  char reply[32];
  snprintf(reply, sizeof reply, "PONG %s", "fixed");
  addReplyStatus(c, reply);
}
)";

// The plan's lines without the note about what was read.
std::string plan_lines(const std::string& out) {
  std::istringstream in(out);
  std::string line, kept;
  while (std::getline(in, line))
    if (line.find("  symbols: ") != 0) kept += line + "\n";
  return kept;
}

std::string ping(int port) {
  auto r = run({"/usr/bin/redis-cli", "-p", std::to_string(port), "ping"}, seconds(20));
  REQUIRE(r.exit_code == 0);
  return r.out;
}

}  // namespace

TEST_CASE("redis-server: a patch reads the symbols of the objects it concerns, and plans as if it had read all",
          "[realworld][symbols]") {
  require_root();
  RedisServer redis("hotfix-rw-symbols");
  auto fix = build_fix(redis.dir.write("ping_fix.c", kFix), redis.dir.file("ping_fix.so"));
  const int port = redis.port;
  const std::string pid = redis.pid();

  auto partial = ctl_run({"patch", "--pid", pid, "--lib", fix, "--observe", "0", "--dry-run"});
  INFO(partial.out << partial.err);
  REQUIRE(partial.exit_code == 0);
  std::smatch m;
  REQUIRE(std::regex_search(partial.out, m, std::regex(R"(symbols: read (\d+) of (\d+) objects up front)")));
  CHECK(std::stoi(m[1]) < std::stoi(m[2]));
  CHECK(std::stoi(m[2]) >= 10);  // libcrypto, libssl, libstdc++, libsystemd, ... are mapped
  auto all = ctl_run({"patch", "--pid", pid, "--lib", fix, "--observe", "0", "--dry-run"}, "HOTFIX_READ_ALL_SYMBOLS=1");
  INFO(all.out << all.err);
  REQUIRE(all.exit_code == 0);
  CHECK(all.out.find("symbols: read") == std::string::npos);
  CHECK(plan_lines(partial.out) == plan_lines(all.out));

  // The fix needs nothing of libcrypto, yet the typo is answered from libcrypto's names.
  auto typo = ctl_run({"patch", "--pid", pid, "--lib", fix, "--observe", "0", "--dry-run", "EVP_DigestInt"});
  CHECK(typo.exit_code == 1);
  CHECK(typo.err.find("did you mean 'EVP_DigestInit'") != std::string::npos);
  INFO(typo.err);

  Child load({"/usr/bin/redis-benchmark", "-p", std::to_string(port), "-c", "4", "-n", "100000000", "-t", "set,get",
              "-q", "-l"});
  auto patched = ctl_run({"patch", "--pid", pid, "--lib", fix, "--observe", "0"});
  INFO(patched.out << patched.err);
  REQUIRE(patched.exit_code == 0);
  CHECK(ping(port) == "PONG fixed\n");
  auto reverted = ctl_run({"revert", "--pid", pid, "--all"});
  REQUIRE(reverted.exit_code == 0);
  CHECK(ping(port) == "PONG\n");
  CHECK(load.running());
  CHECK(redis.server.running());
  redis.server.signal(SIGTERM);
  CHECK(redis.server.wait(seconds(20)));
}
