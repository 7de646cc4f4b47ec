// Debian's redis-server, idle: its main thread sits in epoll_wait with aeMain on its stack,
// entered at start-up, long before hotfix looks. One look at every thread (observe/inside.hpp)
// counts it inside -- reading the blocked threads without stopping them --, watch --inflight
// shows it from the first sample, the observe window of a dry-run patch reports it, and redis
// is never left stopped or traced and goes on serving. (Debian's aeMain calls a private clone
// of aeProcessEvents, as gdb shows: the exported aeProcessEvents has no frame on that stack,
// and is never called -- the look must say 0 for it, known, not unknown.)
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <regex>

#include "observe/inside.hpp"
#include "realworld.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

namespace {

void check_untouched(pid_t pid) {
  for (auto& entry : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task")) {
    std::string status = read_file(entry.path().string() + "/status");
    INFO(entry.path() << ":\n" << status);
    CHECK(status.find("TracerPid:\t0\n") != std::string::npos);
    CHECK(status.find("State:\tt") == std::string::npos);
    CHECK(status.find("State:\tT") == std::string::npos);
  }
}

bool pong(int port) {
  auto r = run({"/usr/bin/redis-cli", "-p", std::to_string(port), "ping"}, seconds(10));
  return r.exit_code == 0 && r.out == "PONG\n";
}

long inflight_in(const std::string& json, const std::string& name) {
  std::smatch m;
  if (!std::regex_search(json, m, std::regex("\"name\":\"" + name + "\"[^}]*\"inflight\":(-?[0-9]+)"))) return -1;
  return std::stol(m[1]);
}

}  // namespace

TEST_CASE("redis: the idle event loop is inside aeMain and aeProcessEvents from the first look", "[realworld][redis]") {
  require_root();
  require_program("/usr/bin/redis-server", "redis-server");
  require_program("/usr/bin/redis-cli", "redis-tools");
  int port = free_port();
  Child redis({"/usr/bin/redis-server", "--port", std::to_string(port), "--save", "", "--appendonly", "no"});
  REQUIRE(wait_for_port(port));
  REQUIRE(pong(port));

  SECTION("one look, the blocked threads read without stopping them") {
    auto table = SymbolTable::for_pid(redis.pid());
    REQUIRE(table);
    auto fs = symbols__select(*table, {"aeMain", "aeProcessEvents"});
    REQUIRE(fs);
    REQUIRE(fs->size() == 2);
    auto began = steady_clock::now();
    auto s = inside__snapshot(redis.pid(), *fs);
    double look_ms = duration<double, std::milli>(steady_clock::now() - began).count();
    INFO((s ? "" : s.error().line()));
    REQUIRE(s);
    for (auto& n : s->notes) INFO(n);
    size_t main_loop = (*fs)[0].name == "aeMain" ? 0 : 1, events = 1 - main_loop;
    CHECK(s->functions[main_loop].threads == 1);  // the main thread, only it
    CHECK(s->functions[main_loop].known());
    CHECK(s->functions[events].threads == 0);  // the clone runs, not the exported aeProcessEvents
    CHECK(s->functions[events].known());
    std::printf("redis idle: %zu threads looked at, %zu read without stopping, %zu stopped (longest %.3f ms); "
                "snapshot %.1f ms (libdw's module view included)\n",
                s->looked_at, s->read_blocked, s->stopped, duration<double, std::milli>(s->longest_stop).count(), look_ms);
    CHECK(s->read_blocked >= 1);
  }

  SECTION("watch --inflight shows it in the first sample") {
    auto r = run({ctl(), "watch", "--pid", std::to_string(redis.pid()), "aeMain", "aeProcessEvents", "--inflight", "--json", "--interval", "0.3", "--duration", "1"},
                 seconds(60));
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    auto lines = lines_of(r.out);
    REQUIRE(!lines.empty());
    CHECK(inflight_in(lines.front(), "aeMain") == 1);  // entered once, at start-up: only the look sees it
    CHECK(inflight_in(lines.front(), "aeProcessEvents") == 0);
  }

  SECTION("a dry-run patch's observe window reports the thread inside") {
    ScratchDir dir("rw_redis_inside");
    auto fix = build_fix(dir.write("fix.c", "struct aeEventLoop;\nvoid aeMain(struct aeEventLoop *l) { (void)l; for (;;) {} }\n"),
                         dir.file("fix.so"));
    auto r = run({ctl(), "patch", "--pid", std::to_string(redis.pid()), "--lib", fix, "aeMain", "--dry-run",
                  "--observe", "0.2"},
                 seconds(120));
    INFO(r.out << r.err);
    CHECK(std::regex_search(r.out, std::regex("aeMain +[0-9.]+ calls/s +live +threads inside: 1\n")));
  }

  check_untouched(redis.pid());
  CHECK(pong(port));  // still serving
}
