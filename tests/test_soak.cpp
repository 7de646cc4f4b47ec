// Soak: hundreds of patch/revert cycles, strict and entry alternating, on a 32-thread target
// whose workers check every result (tests/fixtures/soak_target.c). Nothing may die, no result
// may be wrong, new calls must reach the new code while patched, and what the target holds
// (mappings, fds, RSS, pins, files, the registry's size) must come back to its baseline.
// HOTFIX_SOAK_CYCLES overrides the number of cycles (tools/bench runs 1000).
#include <signal.h>
#include <sys/uio.h>

#include <catch2/catch.hpp>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include "support/harness.hpp"

using namespace hotfix::test;
using namespace std::chrono;

namespace {

long status_kb(pid_t pid, const std::string& key) {
  std::istringstream in(read_file("/proc/" + std::to_string(pid) + "/status"));
  for (std::string line; std::getline(in, line);)
    if (line.rfind(key + ":", 0) == 0) return std::stol(line.substr(key.size() + 1));
  return -1;
}

size_t count_entries(const std::string& dir) {
  std::error_code ec;
  size_t n = 0;
  for (auto it = std::filesystem::directory_iterator(dir, ec); !ec && it != std::filesystem::directory_iterator();
       it.increment(ec))
    ++n;
  return n;
}

// Everything of the target that a finished patch/revert cycle must give back.
struct Footprint {
  size_t mappings = 0;  // file, memfd and BPF map mappings, and executable anonymous ones (islands)
  size_t fds = 0, pins = 0, files = 0;
  long rss_kb = 0;
  uint32_t registry_bytes = 0;  // the registry's encoded length (its header's u32 at offset 8)
  std::string maps;
};

uint32_t registry_bytes(pid_t pid, const std::string& maps) {
  std::istringstream in(maps);
  for (std::string line; std::getline(in, line);) {
    if (line.find("hotfix-registry") == std::string::npos) continue;
    unsigned long start = std::stoul(line.substr(0, line.find('-')), nullptr, 16);
    auto header = read_memory(pid, start, 16);
    if (header.size() < 16) return 0;
    uint32_t len;
    std::memcpy(&len, header.data() + 8, sizeof len);
    return len;
  }
  return 0;
}

Footprint footprint(pid_t pid) {
  Footprint f;
  std::string p = std::to_string(pid);
  f.maps = read_file("/proc/" + p + "/maps");
  // Plain anonymous rw mappings are left out: glibc keeps the malloc arenas that the threads
  // which ran dlopen created, a few per process, not one per cycle (RSS bounds them below).
  std::istringstream in(f.maps);
  for (std::string line; std::getline(in, line);) {
    char perms[8] = "";
    char path[4096] = "";
    std::sscanf(line.c_str(), "%*s %7s %*s %*s %*s %4095[^\n]", perms, path);
    if (path[0] || perms[2] == 'x') ++f.mappings;
  }
  f.fds = count_entries("/proc/" + p + "/fd");
  f.pins = count_entries("/sys/fs/bpf/hotfix/" + p);
  f.files = count_entries("/run/hotfix/" + p);
  f.rss_kb = status_kb(pid, "VmRSS");
  f.registry_bytes = registry_bytes(pid, f.maps);
  return f;
}

struct Soak {
  Child child{{fixture("soak_target")}};
  std::map<std::string, unsigned long> fn;  // name -> entry address
  Soak() {
    for (;;) {
      auto line = child.read_line();
      REQUIRE(line);
      char name[64];
      unsigned long addr;
      if (std::sscanf(line->c_str(), "fn %63s %lx", name, &addr) == 2) fn[name] = addr;
      if (*line == "ready") break;
    }
    REQUIRE(fn.size() == 2);
  }
  ~Soak() {
    child.signal(SIGKILL);
    child.wait();
    std::error_code ec;
    std::filesystem::remove_all("/run/hotfix/" + std::to_string(child.pid()), ec);
    std::filesystem::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(child.pid()), ec);
  }
  pid_t pid() const { return child.pid(); }
  struct Counts {
    long calls = 0, bad = 0, fresh = 0;
  };
  Counts counts() {
    auto reply = child.request("stats");
    Counts c;
    REQUIRE(std::sscanf(reply.c_str(), "ok calls=%ld bad=%ld new=%ld", &c.calls, &c.bad, &c.fresh) == 3);
    return c;
  }
};

RunResult ctl(std::vector<std::string> args) {
  args.insert(args.begin(), hotfix::test::ctl());
  return run(std::move(args), seconds(60));
}

void cycle(Soak& s, const std::string& mode, bool check_new_code) {
  std::string pid = std::to_string(s.pid());
  auto before = s.counts();
  auto p = ctl({"patch", "--pid", pid, "--lib", fixture("soak_fix.so"), "--observe", "0", "--consistency", mode});
  INFO("patch (" << mode << "): exit " << p.exit_code << "\n" << p.out << p.err);
  REQUIRE(p.exit_code == 0);
  if (check_new_code) {  // the workers' next calls run the new code
    auto deadline = steady_clock::now() + seconds(10);
    while (s.counts().fresh == before.fresh && steady_clock::now() < deadline) std::this_thread::sleep_for(milliseconds(2));
    REQUIRE(s.counts().fresh > before.fresh);
  }
  auto r = ctl({"revert", "--pid", pid, "--all", "--consistency", mode});
  INFO("revert (" << mode << "): exit " << r.exit_code << "\n" << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  REQUIRE(s.child.running());
}

}  // namespace

TEST_CASE("hundreds of patch/revert cycles, strict and entry, under load leave the target as it was", "[soak]") {
  require_root();
  int cycles = 300;
  if (const char* n = std::getenv("HOTFIX_SOAK_CYCLES")) cycles = std::atoi(n);
  Soak s;
  // One warm-up cycle: the registry mapping is created once per process and stays.
  cycle(s, "entry", true);
  // Memory held by a revert (a thread was inside the replacement) is released by a later one.
  REQUIRE(ctl({"revert", "--pid", std::to_string(s.pid()), "--all"}).exit_code != 2);
  auto base = footprint(s.pid());
  for (int i = 0; i < cycles; ++i) {
    INFO("cycle " << i);
    cycle(s, i % 2 ? "strict" : "entry", i % 10 == 0);
    if (i % 25 == 0) {
      auto c = s.counts();
      REQUIRE(c.bad == 0);
    }
  }
  auto c = s.counts();
  CHECK(c.bad == 0);
  CHECK(c.calls > 0);
  auto end = footprint(s.pid());
  INFO("maps at the start:\n" << base.maps << "\nmaps at the end:\n" << end.maps);
  CHECK(end.mappings == base.mappings);
  CHECK(end.fds == base.fds);
  CHECK(end.pins == 0);
  CHECK(end.files == base.files);
  CHECK(end.registry_bytes <= base.registry_bytes + 4096);  // compacted, not one record per cycle
  CHECK(end.rss_kb <= base.rss_kb + 8 * 1024);              // no per-cycle leak (malloc may keep a few arenas)
  for (auto& [name, addr] : s.fn) {  // the file's exact bytes at every patched entry
    INFO(name);
    auto file = file_bytes(s.pid(), addr, 16);
    REQUIRE(file.size() == 16);
    CHECK(read_memory(s.pid(), addr, 16) == file);
  }
  REQUIRE(s.child.running());
}
