// Names users expect, on Debian's redis-server: `watch memcpy free --object libc.so.6` counts
// the calls that really happen while redis-cli stores values (memcpy is an IFUNC: before it
// was resolved to its implementation, the resolver was probed and counted 0), and glibc's free
// is shown as free, not as its compat alias cfree (redis itself allocates with jemalloc).
#include <signal.h>

#include <catch2/catch.hpp>
#include <fmt/format.h>
#include <regex>

#include "realworld.hpp"

using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

namespace {

// Sum of "total" over the rows of a JSON watch line whose name is `name`.
long total_of(const std::string& line, const std::string& name) {
  long sum = 0;
  std::regex row("\\{\"name\":\"" + name + "\"[^}]*\"total\":([0-9]+)");
  for (auto it = std::sregex_iterator(line.begin(), line.end(), row); it != std::sregex_iterator(); ++it)
    sum += std::stol((*it)[1]);
  return sum;
}

}  // namespace

TEST_CASE("redis-server: watch memcpy (an IFUNC) and free count real calls, under their usual names") {
  require_root();
  require_program("/usr/bin/redis-server", "redis-server");
  require_program("/usr/bin/redis-cli", "redis-tools");
  int port = free_port();
  Child redis({"/usr/bin/redis-server", "--port", std::to_string(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no"});
  REQUIRE(wait_for_port(port));

  Child watch({ctl(), "watch", "--pid", std::to_string(redis.pid()), "memcpy", "free", "--object", "libc.so.6", "--json",
               "--interval", "60", "--max-overhead", "1e6"});
  auto banner = watch.read_stderr_line(seconds(30));
  while (banner && banner->rfind("note: ", 0) == 0) banner = watch.read_stderr_line(seconds(30));
  REQUIRE(banner);
  INFO(*banner);
  REQUIRE(banner->find("watching") != std::string::npos);
  // 200 SETs of a 1000-byte value: each copies its value (memcpy) and frees buffers.
  std::string value(1000, 'x');
  for (int i = 0; i < 200; ++i)
    REQUIRE(run({"/usr/bin/redis-cli", "-p", std::to_string(port), "set", fmt::format("k{}", i), value}, seconds(20))
                .exit_code == 0);
  watch.signal(SIGINT);
  REQUIRE(watch.wait(seconds(20)) == 0);
  std::string out = watch.drain_stdout();
  std::string last = out.substr(out.rfind("{\"time\""));
  INFO(last);
  CHECK(last.find("\"final\":true") != std::string::npos);
  CHECK(total_of(last, "memcpy") >= 200);
  // Debian's redis allocates with jemalloc, so glibc's free is rarely called: its name is checked.
  CHECK(last.find("{\"name\":\"free\"") != std::string::npos);
  CHECK(last.find("cfree") == std::string::npos);
  auto ping = run({"/usr/bin/redis-cli", "-p", std::to_string(port), "ping"});
  CHECK(ping.out.find("PONG") != std::string::npos);
}
