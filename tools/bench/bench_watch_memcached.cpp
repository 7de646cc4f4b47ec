// Throughput of Debian's memcached under memaslap (libmemcached-tools: 90% get, 10% set;
// loopback, fixed number of operations), unwatched against `hotfix-ctl watch` on three libc
// functions every request goes through (read, sendmsg, epoll_wait): with default options
// (counting trampolines), with --count uprobe (2% budget), and with --count uprobe
// --max-overhead 100. Interleaved runs, ratios against the unwatched runs beside them.
// Usage: bench_watch_memcached [--quick]   (root; memcached and libmemcached-tools, else SKIP)
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>

#include "service_bench.hpp"

namespace {

constexpr int kPort = 7691;  // this bench's own port (7600-7699)

// Operations/s of one memaslap run ("Run time: 8.1s Ops: 200000 TPS: 24684 Net_rate: ...").
bench::LoadResult memaslap(long ops) {
  std::string cmd = fmt::format("/usr/bin/memcaslap -s 127.0.0.1:{} -T 2 -c 16 -x {} 2>/dev/null", kPort, ops);
  bench::LoadResult out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return out;
  char line[512];
  while (std::fgets(line, sizeof line, p))
    if (const char* tps = std::strstr(line, "TPS: "); tps && std::strstr(line, "Run time:"))
      out.rps["get 90% / set 10%"] = std::atof(tps + 5), out.requests = double(ops);
  ::pclose(p);
  return out;
}

// memcached answers "version" with "VERSION 1.6.18".
bool memcached_answers() {
  int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(kPort);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  char buf[64] = {};
  bool ok = ::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 && ::write(s, "version\r\n", 9) == 9 &&
            ::read(s, buf, sizeof buf - 1) > 0 && std::strncmp(buf, "VERSION", 7) == 0;
  ::close(s);
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  fmt::print("# bench_watch_memcached{}\n\n", quick ? " --quick" : "");
  if (::access("/usr/bin/memcached", X_OK) != 0 || ::access("/usr/bin/memcaslap", X_OK) != 0) {
    fmt::print("SKIP: memcached or memcaslap is not installed (Debian packages memcached, libmemcached-tools)\n");
    return 0;
  }
  if (::geteuid() != 0) {
    fmt::print("SKIP: needs root (ptrace, BPF)\n");
    return 0;
  }
  // As Debian's unit runs it: its own user, 4 worker threads (the default), no UDP.
  bench::Background memcached({"/usr/bin/memcached", "-u", "memcache", "-l", "127.0.0.1", "-p", std::to_string(kPort),
                               "-U", "0", "-m", "64"});
  for (int i = 0; i < 100 && !memcached_answers(); ++i) ::usleep(50000);
  if (!memcached_answers()) {
    fmt::print("bench_watch_memcached: memcached did not answer on 127.0.0.1:{} (port in use?)\n", kPort);
    return 1;
  }
  const std::vector<std::string> libc{"sendmsg", "read", "epoll_wait"};
  const long ops = quick ? 40000 : 200000;
  const int rounds = quick ? 1 : 5;
  std::vector<bench::Mode> modes{
      {"unwatched", {}},
      {"watch (default)", libc},
      {"watch --count uprobe", libc},
      {"watch --count uprobe --max-overhead 100", libc, 0.5},
  };
  modes[2].watch_args.insert(modes[2].watch_args.end(), {"--count", "uprobe"});
  modes[3].watch_args.insert(modes[3].watch_args.end(), {"--count", "uprobe", "--max-overhead", "100"});
  memaslap(ops / 4);  // warm up: fills the cache, so gets hit
  auto results = bench::interleave(memcached.pid(), modes, [&](double scale) { return memaslap(long(ops * scale)); },
                                   rounds);
  fmt::print("## memcached throughput, watched on libc's sendmsg, read, epoll_wait (operations/s; ratio to unwatched)\n\n");
  bench::print_table(modes, results,
                     fmt::format("memcaslap -T 2 -c 16 -x {}, {} round{}", ops, rounds, rounds == 1 ? "" : "s"));
  if (!memcached_answers()) {
    fmt::print("bench_watch_memcached: memcached stopped answering\n");
    return 1;
  }
  return 0;
}
