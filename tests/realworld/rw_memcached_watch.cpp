// Default `watch` on three libc functions of Debian's memcached (sendmsg, read, epoll_wait)
// while memaslap (libmemcached-tools) drives it: every function counts calls, memcached keeps
// serving, and libc's text holds the file's bytes again -- after watch ends, and after a
// SIGKILLed watch once `hotfix-ctl gc` has run. Throughput is measured in tools/bench
// (bench_watch_memcached), not asserted here.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <regex>

#include "patch/registry.hpp"
#include "realworld.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace hotfix::test::realworld;
using namespace std::chrono;

namespace {

const std::vector<std::string> kLibc{"sendmsg", "read", "epoll_wait"};

// One memcached text-protocol exchange on a fresh connection: what came back ("" on failure).
std::string memcached_say(int port, const std::string& request) {
  int s = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  timeval tv{10, 0};
  ::setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string reply;
  if (::connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0 &&
      ::write(s, request.data(), request.size()) == static_cast<ssize_t>(request.size())) {
    char buf[512];
    // Replies end with "\r\n"; a get's with "END\r\n".
    for (ssize_t n; (n = ::read(s, buf, sizeof buf)) > 0;) {
      reply.append(buf, static_cast<size_t>(n));
      if (reply.ends_with("END\r\n") || (request.rfind("get", 0) != 0 && reply.ends_with("\r\n"))) break;
    }
  }
  ::close(s);
  return reply;
}

// memcached still stores and returns a value.
void require_serving(int port, const std::string& value) {
  CHECK(memcached_say(port, "set rw_key 0 0 " + std::to_string(value.size()) + "\r\n" + value + "\r\n") == "STORED\r\n");
  CHECK(memcached_say(port, "get rw_key\r\n") ==
        "VALUE rw_key 0 " + std::to_string(value.size()) + "\r\n" + value + "\r\nEND\r\n");
}

struct Entry {
  std::string name;
  uint64_t address = 0;
};

// Every entry holds what libc's file holds (16 bytes: more than any jump covers).
void require_file_bytes(pid_t pid, const std::vector<Entry>& es) {
  for (auto& e : es) {
    INFO(e.name);
    auto file = file_bytes(pid, e.address, 16);
    REQUIRE(file.size() == 16);
    CHECK(read_memory(pid, e.address, 16) == file);
  }
}

}  // namespace

TEST_CASE("memcached: default watch counts libc's sendmsg, read, epoll_wait under load; the text is the file's after it "
          "ends and after a killed watch and gc",
          "[realworld][memcached][watch]") {
  require_root();
  require_program("/usr/bin/memcached", "memcached");
  require_program("/usr/bin/memcaslap", "libmemcached-tools");
  int port = free_port();
  REQUIRE(port > 0);
  // As Debian's unit runs it: its own user, 4 worker threads, TCP on loopback only.
  Child memcached({"/usr/bin/memcached", "-u", "memcache", "-l", "127.0.0.1", "-p", std::to_string(port), "-U", "0",
                   "-m", "64"});
  REQUIRE(wait_for_port(port));
  auto table = SymbolTable::for_pid(memcached.pid());
  REQUIRE(table);
  auto fns = symbols__select(*table, kLibc);
  REQUIRE(fns);
  std::vector<Entry> es;
  for (auto& f : *fns) {
    CHECK(f.object.find("libc.so") != std::string::npos);
    es.push_back({f.name, f.address});
  }
  REQUIRE(es.size() == kLibc.size());
  require_file_bytes(memcached.pid(), es);
  Child load({"/usr/bin/memcaslap", "-s", "127.0.0.1:" + std::to_string(port), "-T", "2", "-c", "16", "-t", "120s"});

  SECTION("watch ends: counts for all three, memcached serving, the file's bytes") {
    std::vector<std::string> argv{ctl(), "watch", "--pid", std::to_string(memcached.pid()), "--duration", "3", "--json"};
    argv.insert(argv.end(), kLibc.begin(), kLibc.end());
    auto r = run(argv, seconds(120));
    INFO(r.err);
    REQUIRE(r.exit_code == 0);
    CHECK(r.err.find("via trampolines,") != std::string::npos);  // all three: no uprobe fallback
    std::string last;
    for (auto& line : lines_of(r.out))
      if (line.find("\"final\":true") != std::string::npos) last = line;
    INFO(last);
    for (auto& name : kLibc) {
      INFO(name);
      std::smatch m;
      REQUIRE(std::regex_search(last, m, std::regex("\"name\":\"" + name + "\"[^}]*\"total\":([0-9]+)")));
      CHECK(std::stol(m[1]) > 0);
    }
    CHECK(load.running());
    require_serving(port, "after-watch");
    require_file_bytes(memcached.pid(), es);
    auto reg = registry__read(memcached.pid());
    REQUIRE(reg);
    CHECK(reg->watches.empty());
  }

  SECTION("watch is SIGKILLed: memcached keeps serving through the orphaned trampolines, and gc restores the file's bytes") {
    std::vector<std::string> argv{ctl(), "watch", "--pid", std::to_string(memcached.pid())};
    argv.insert(argv.end(), kLibc.begin(), kLibc.end());
    {
      Child watch(argv);
      std::optional<std::string> banner;
      while (auto line = watch.read_stderr_line(60s))
        if (line->rfind("watching", 0) == 0) {
          banner = line;
          break;
        }
      REQUIRE(banner);
      CHECK(banner->find("via trampolines,") != std::string::npos);
      for (auto& e : es) {
        INFO(e.name);
        CHECK(read_memory(memcached.pid(), e.address, 1) == std::vector<unsigned char>{0xe9});  // the entry jump
      }
      watch.signal(SIGKILL);
      REQUIRE(watch.wait(20s));
    }
    // Nobody removes them yet: memcached runs through the trampolines of a dead watch.
    require_serving(port, "orphaned");
    CHECK(read_memory(memcached.pid(), es[0].address, 1) == std::vector<unsigned char>{0xe9});
    auto gc = run({ctl(), "gc"}, seconds(120));
    INFO(gc.out << gc.err);
    CHECK(gc.exit_code == 0);
    require_file_bytes(memcached.pid(), es);
    auto reg = registry__read(memcached.pid());
    REQUIRE(reg);
    CHECK(reg->watches.empty());
    CHECK(load.running());
    require_serving(port, "after-gc");
  }
  CHECK(memcached.running());
  load.signal(SIGTERM);
}
