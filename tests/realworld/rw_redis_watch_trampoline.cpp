// Default `watch` (counting trampolines, no trap) on hot functions of Debian's redis-server
// while redis-benchmark drives it: redis keeps serving, every function counts calls, and after
// the watch the text holds the file's bytes again. Throughput is measured in tools/bench
// (bench_watch_cost), not asserted here.
#include <signal.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <regex>

#include "patch/registry.hpp"
#include "realworld.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

TEST_CASE("redis: default watch counts hot functions with trampolines under load, then restores the file's bytes",
          "[realworld][redis][watch]") {
  require_root();
  require_program("/usr/bin/redis-server", "redis-server");
  require_program("/usr/bin/redis-cli", "redis-tools");
  require_program("/usr/bin/redis-benchmark", "redis-tools");
  int port = free_port();
  REQUIRE(port > 0);
  Child redis({"/usr/bin/redis-server", "--port", std::to_string(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no"});
  REQUIRE(wait_for_port(port));
  const std::vector<std::string> hot{"processCommand", "dictFind", "addReply", "readQueryFromClient", "call"};
  auto table = SymbolTable::for_pid(redis.pid());
  REQUIRE(table);
  auto fns = symbols__select(*table, hot);
  REQUIRE(fns);
  REQUIRE(fns->size() == hot.size());
  Child load({"/usr/bin/redis-benchmark", "-p", std::to_string(port), "-c", "8", "-n", "100000000", "-t",
              "set,get,ping", "-q", "-l"});
  std::vector<std::string> argv{ctl(), "watch", "--pid", std::to_string(redis.pid()),
                                "--duration", "3", "--json"};
  argv.insert(argv.end(), hot.begin(), hot.end());
  auto r = run(argv, seconds(120));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(std::regex_search(r.err, std::regex("via trampolines")));
  std::string last;
  for (auto& line : lines_of(r.out))
    if (line.find("\"final\":true") != std::string::npos) last = line;
  INFO(last);
  for (auto& name : hot) {
    INFO(name);
    std::smatch m;
    REQUIRE(std::regex_search(last, m, std::regex("\"name\":\"" + name + "\"[^}]*\"total\":([0-9]+)")));
    CHECK(std::stol(m[1]) > 0);
  }
  CHECK(redis.running());
  CHECK(load.running());
  auto ping = run({"/usr/bin/redis-cli", "-p", std::to_string(port), "ping"}, seconds(20));
  CHECK(ping.out == "PONG\n");
  for (auto& f : *fns) {
    INFO(f.name);
    auto file = file_bytes(redis.pid(), f.address, 16);
    REQUIRE(file.size() == 16);
    CHECK(read_memory(redis.pid(), f.address, 16) == file);
  }
  // Nothing of the watch stays mapped: not the counters, not the registry it had to create.
  std::ifstream maps("/proc/" + std::to_string(redis.pid()) + "/maps");
  std::string all((std::istreambuf_iterator<char>(maps)), std::istreambuf_iterator<char>());
  CHECK(all.find("bpf-map") == std::string::npos);
  CHECK(!registry__locate(redis.pid()));
  load.signal(SIGTERM);
}
