// Debian's redis-server links libssl and libcrypto: `watch '*'` covers ~20,000 functions, some
// of which the kernel refuses to probe (libcrypto's lock-prefixed *_up_ref, glibc's AVX entry
// points). The watch must attach through uprobe_multi (no fallback), name the refused functions
// in one note, report, and leave redis serving with no watch link behind. Times are printed,
// not asserted (tools/bench and docs/performance.md hold speed).
#include <bpf/bpf.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <regex>

#include "observe/watch.hpp"
#include "realworld.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

namespace {

std::set<uint32_t> watch_links() { return bpf_links_of("watch_"); }

}  // namespace

TEST_CASE("redis: watch '*' starts and ends, skips and names what the kernel refuses, leaves nothing",
          "[realworld][redis][watch]") {
  require_root();
  require_program("/usr/bin/redis-server", "redis-server");
  require_program("/usr/bin/redis-cli", "redis-tools");
  int port = free_port();
  Child redis({"/usr/bin/redis-server", "--port", std::to_string(port), "--save", "", "--appendonly", "no"});
  REQUIRE(wait_for_port(port));
  auto links_before = watch_links();

  auto began = steady_clock::now();
  auto r = run({ctl(), "watch", "--pid", std::to_string(redis.pid()), "*", "--duration", "1", "--json"}, seconds(240));
  double total_s = duration<double>(steady_clock::now() - began).count();
  INFO(r.err.substr(0, 4000));
  REQUIRE(r.exit_code == 0);
  std::smatch m;
  std::string err = r.err;
  REQUIRE(std::regex_search(err, m, std::regex("watching ([0-9]+) functions in pid [0-9]+ \\(redis-server\\) via (\\S+), attached in ([0-9.]+) ms")));
  long watched = std::stol(m[1]);
  CHECK(m[2] == "uprobe_multi");  // a refused offset is no reason to fall back to perf uprobes
  double attach_ms = std::stod(m[3]);
  CHECK(watched > 5000);
  // If libcrypto is mapped, its lock-prefixed reference counters are named as skipped.
  if (read_file(fmt::format("/proc/{}/maps", redis.pid())).find("libcrypto") != std::string::npos) {
    auto note = err.find("note: skipped ");
    REQUIRE(note != std::string::npos);
    std::string line = err.substr(note, err.find('\n', note) - note);
    CHECK(line.find("OSSL_DECODER_up_ref (libcrypto.so") != std::string::npos);
    CHECK(line.find("ENOTSUPP") != std::string::npos);
  }
  // An attach that took over a second said how far it was on stderr (the line comes at the
  // first batch after one second; the margin covers the banner's own bookkeeping).
  if (attach_ms > 1500) CHECK(err.find("progress: attaching: ") != std::string::npos);
  CHECK(r.out.find("\"final\":true") != std::string::npos);
  CHECK(run({"/usr/bin/redis-cli", "-p", std::to_string(port), "ping"}).out == "PONG\n");
  for (uint32_t id : watch_links())  // a concurrent test_watch may hold its own
    CHECK(std::find(links_before.begin(), links_before.end(), id) != links_before.end());
  std::printf("redis watch '*': %ld functions, attached in %.0f ms, whole run (1 s watch) %.1f s\n", watched, attach_ms,
              total_s);
}
