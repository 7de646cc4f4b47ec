// Throughput of Debian's redis-server under redis-benchmark (SET, GET, PING; loopback, fixed -n),
// unwatched against `hotfix-ctl watch` on five hot functions: with default options (counting
// trampolines, 2% budget), with --count uprobe (the budget cuts the hottest probes), and with
// --count uprobe --max-overhead 100 (what uprobes cost when nothing cuts them). Interleaved
// runs, ratios against the unwatched runs beside them (service_bench.hpp).
// Usage: bench_watch_redis [--quick]   (root; redis-server and redis-tools, else SKIP)
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "service_bench.hpp"

namespace {

constexpr int kPort = 7690;  // this bench's own port (7600-7699)

// requests/s per test from redis-benchmark --csv ("\"SET\",\"81234.56\",...").
bench::LoadResult redis_benchmark(long n) {
  std::string cmd = fmt::format("/usr/bin/redis-benchmark -p {} -c 8 -n {} -t set,get,ping --csv 2>/dev/null", kPort, n);
  bench::LoadResult out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return out;
  char line[512];
  while (std::fgets(line, sizeof line, p)) {
    char name[64];
    double rps = 0;
    if (std::sscanf(line, "\"%63[^\"]\",\"%lf\"", name, &rps) == 2) out.rps[name] = rps, out.requests += double(n);
  }
  ::pclose(p);
  return out;
}

bool redis_answers() { return ::system(fmt::format("/usr/bin/redis-cli -p {} ping >/dev/null 2>&1", kPort).c_str()) == 0; }

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  fmt::print("# bench_watch_redis{}\n\n", quick ? " --quick" : "");
  for (const char* p : {"/usr/bin/redis-server", "/usr/bin/redis-benchmark", "/usr/bin/redis-cli"})
    if (::access(p, X_OK) != 0) {
      fmt::print("SKIP: {} is not installed (Debian packages redis-server, redis-tools)\n", p);
      return 0;
    }
  if (::geteuid() != 0) {
    fmt::print("SKIP: needs root (ptrace, BPF)\n");
    return 0;
  }
  bench::Background redis({"/usr/bin/redis-server", "--port", std::to_string(kPort), "--bind", "127.0.0.1", "--save",
                           "", "--appendonly", "no"});
  for (int i = 0; i < 100 && !redis_answers(); ++i) ::usleep(50000);
  if (!redis_answers()) {
    fmt::print("bench_watch_redis: redis-server did not answer on 127.0.0.1:{} (port in use?)\n", kPort);
    return 1;
  }
  // The five hot functions of issue 11's case, all exported by Debian's redis 7.0: every
  // command goes through processCommand, looks its key up (lookupKey -> dictFind, which also
  // runs for the command table), and replies (addReply -> _addReplyToBufferOrList).
  const std::vector<std::string> hot{"processCommand", "lookupKey", "dictFind", "addReply", "_addReplyToBufferOrList"};
  const long n = quick ? 20000 : 100000;
  const int rounds = quick ? 1 : 5;
  std::vector<bench::Mode> modes{
      {"unwatched", {}},
      {"watch (default)", hot},
      {"watch --count uprobe", hot},
      {"watch --count uprobe --max-overhead 100", hot, 0.2},
  };
  modes[2].watch_args.insert(modes[2].watch_args.end(), {"--count", "uprobe"});
  modes[3].watch_args.insert(modes[3].watch_args.end(), {"--count", "uprobe", "--max-overhead", "100"});
  redis_benchmark(n / 4);  // warm up (allocations, page cache)
  auto results = bench::interleave(redis.pid(), modes, [&](double scale) { return redis_benchmark(long(n * scale)); },
                                   rounds);
  fmt::print("## redis-server throughput, watched on {} hot functions (requests/s; ratio to unwatched)\n\n", hot.size());
  bench::print_table(modes, results,
                     fmt::format("redis-benchmark -c 8 -n {} -t set,get,ping, {} round{}", n, rounds, rounds == 1 ? "" : "s"));
  if (!redis_answers()) {
    fmt::print("bench_watch_redis: redis-server stopped answering\n");
    return 1;
  }
  return 0;
}
