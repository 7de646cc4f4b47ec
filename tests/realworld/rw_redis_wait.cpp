// Debian's redis-server under redis-benchmark load: a strict patch of aeMain -- the event
// loop, which never returns -- with a user-written fix fails after --timeout, naming aeMain
// early with the way out, stops redis only a few times a second meanwhile (the attempt count),
// and leaves redis untouched and serving. The throughput ratio during the wait is printed
// (not asserted: speed belongs to tools/bench).
#include <unistd.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>

#include "realworld.hpp"

using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

namespace {

const char* kFix = R"(/* The event loop with the same body, as a user would rebuild it from redis's ae.c. */
struct aeEventLoop;
extern int aeProcessEvents(struct aeEventLoop *eventLoop, int flags);
#define AE_ALL_EVENTS ((1 << 0) | (1 << 1))
#define AE_CALL_BEFORE_SLEEP (1 << 3)
#define AE_CALL_AFTER_SLEEP (1 << 4)
void aeMain(struct aeEventLoop *eventLoop) {
  for (;;) aeProcessEvents(eventLoop, AE_ALL_EVENTS | AE_CALL_BEFORE_SLEEP | AE_CALL_AFTER_SLEEP);
}
)";

// The lines of /proc/PID/maps that map a file (the heap's anonymous ones grow under load).
std::string file_maps(pid_t pid) {
  std::istringstream in(read_file("/proc/" + std::to_string(pid) + "/maps"));
  std::string out;
  for (std::string line; std::getline(in, line);)
    if (line.find(" /") != std::string::npos) out += line + "\n";
  return out;
}

// The first bytes of aeMain in redis's memory (nm -D value + the executable's load base).
std::vector<unsigned char> ae_main_text(pid_t pid) {
  auto nm = run({"/usr/bin/nm", "-D", "/usr/bin/redis-server"});
  std::smatch m;
  REQUIRE(std::regex_search(nm.out, m, std::regex("([0-9a-f]+) T aeMain\n")));
  uint64_t value = std::stoull(m[1], nullptr, 16);
  std::string exe = std::filesystem::canonical("/usr/bin/redis-server").string();  // a symlink on Debian
  std::istringstream maps(read_file("/proc/" + std::to_string(pid) + "/maps"));
  for (std::string line; std::getline(maps, line);)
    if (line.find(exe) != std::string::npos && line.find(" 00000000 ") != std::string::npos)
      return read_memory(pid, std::stoull(line.substr(0, line.find('-')), nullptr, 16) + value, 16);
  FAIL("redis-server is not mapped");
  return {};
}

long tracer_of(pid_t pid) {
  std::smatch m;
  std::string status = read_file("/proc/" + std::to_string(pid) + "/status");
  return std::regex_search(status, m, std::regex("TracerPid:\\s*([0-9]+)")) ? std::stol(m[1]) : -1;
}

// requests/s of one redis-benchmark SET run (0 if it failed).
double benchmark(int port, int requests) {
  auto r = run({"/usr/bin/redis-benchmark", "-p", std::to_string(port), "-t", "set", "-n", std::to_string(requests),
                "-c", "16", "-q"});
  std::smatch m;
  std::string out = r.out;
  return r.exit_code == 0 && std::regex_search(out, m, std::regex("SET: ([0-9.]+) requests per second"))
             ? std::stod(m[1])
             : 0;
}

}  // namespace

TEST_CASE("redis: a strict patch of the event loop is named early, stops redis rarely, and leaves it serving",
          "[realworld][redis]") {
  require_root();
  require_program("/usr/bin/redis-server", "redis-server");
  require_program("/usr/bin/redis-benchmark", "redis-tools");
  ScratchDir dir("rw_redis_wait");
  auto fix = build_fix(dir.write("fix_aemain.c", kFix), dir.file("fix_aemain.so"));
  int port = free_port();
  Child redis({"/usr/bin/redis-server", "--port", std::to_string(port), "--save", "", "--appendonly", "no"});
  REQUIRE(wait_for_port(port));
  const int kRequests = 40000;
  double normal = benchmark(port, kRequests);
  REQUIRE(normal > 0);
  std::string maps_before = file_maps(redis.pid());
  auto text_before = ae_main_text(redis.pid());

  Child patch({ctl(), "patch", "--pid", std::to_string(redis.pid()), "--lib", fix, "aeMain", "--timeout", "3",
               "--observe", "0"});
  REQUIRE(patch.wait_for("attempt 1:", seconds(30)));  // waiting now
  auto began = steady_clock::now();
  double waiting = benchmark(port, kRequests);
  double bench_s = duration<double>(steady_clock::now() - began).count();
  auto early = patch.wait_for("at the same place on each of the last", seconds(30));
  auto code = patch.wait(seconds(60));
  std::string out = patch.drain_stdout(), err = patch.drain_stderr();
  INFO("stdout: " << out << "\nstderr: " << err);
  REQUIRE(early);
  CHECK(early->find("inside aeMain") != std::string::npos);
  CHECK(early->find("--consistency entry") != std::string::npos);
  REQUIRE(code);
  CHECK(*code == 1);
  CHECK(err.find("inside aeMain") != std::string::npos);
  CHECK(err.find("--consistency entry") != std::string::npos);
  std::smatch m;
  REQUIRE(std::regex_search(err, m, std::regex("of ([0-9]+) attempts in 3000 ms")));
  int attempts = std::stoi(m[1]);
  CHECK(attempts <= 50 * 3 + 5);
  std::printf("redis aeMain, --timeout 3: %d stops of redis; SET %.0f req/s normal, %.0f req/s while waiting "
              "(ratio %.2f, benchmark %.1f s of the 3 s window)\n",
              attempts, normal, waiting, normal > 0 ? waiting / normal : 0.0, bench_s);
  CHECK(waiting > 0);  // it kept serving

  // Nothing changed: no fix mapped, no tracer, still serving.
  CHECK(file_maps(redis.pid()) == maps_before);
  CHECK(ae_main_text(redis.pid()) == text_before);
  CHECK(tracer_of(redis.pid()) == 0);
  auto ping = run({"/usr/bin/redis-cli", "-p", std::to_string(port), "ping"});
  CHECK(ping.out == "PONG\n");
}
