// Which threads have a function on their stack: real threads of tests/fixtures/cons_threads.c,
// parked at known places and stopped with ptrace (as the patch engine stops them).
#include <elfutils/libdwfl.h>
#include <fmt/format.h>
#include <sys/ptrace.h>
#include <sys/wait.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "patch/consistency.hpp"
#include "process/maps.hpp"
#include "support/harness.hpp"

using namespace hotfix;
using namespace hotfix::test;

namespace {

// The fixture, with its functions' addresses and its named threads' ids.
struct Fixture {
  Child child;
  std::map<std::string, uint64_t> fn;
  std::map<std::string, pid_t> tid;

  explicit Fixture(int pool = 0) : child({fixture("cons_threads"), std::to_string(pool)}) {
    for (;;) {
      auto line = child.read_line();
      REQUIRE(line);
      std::istringstream in(*line);
      std::string kind, name, value;
      in >> kind >> name >> value;
      if (kind == "fn") fn[name] = std::stoull(value, nullptr, 16);
      else if (kind == "tid") tid[name] = std::stoi(value);
      else if (kind == "ready") break;
    }
    wait_parked(pool);
  }
  pid_t pid() const { return child.pid(); }

  // The whole function `name`, its size from the symbol table (elfutils).
  AddressRange range(const std::string& name) const {
    static const Dwfl_Callbacks cb{dwfl_linux_proc_find_elf, dwfl_standard_find_debuginfo, nullptr, nullptr};
    Dwfl* d = dwfl_begin(&cb);
    REQUIRE(dwfl_linux_proc_report(d, pid()) == 0);
    dwfl_report_end(d, nullptr, nullptr);
    uint64_t addr = fn.at(name);
    GElf_Sym sym;
    GElf_Off off = 1;
    const char* found = dwfl_module_addrinfo(dwfl_addrmodule(d, addr), addr, &off, &sym, nullptr, nullptr, nullptr);
    REQUIRE(found != nullptr);
    REQUIRE(std::string(found) == name);
    REQUIRE(off == 0);
    AddressRange r{addr, addr + sym.st_size, name};
    dwfl_end(d);
    REQUIRE(r.end > r.begin);
    return r;
  }

  // Every thread but the spinner and the main thread sleeps in its final system call.
  void wait_parked(int pool) {
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    for (;;) {
      int sleeping = 0;
      auto threads = process__list_threads(pid());
      REQUIRE(threads);
      for (pid_t t : *threads) sleeping += state(t) == 'S';
      // main + parked, other, stale, hidden + the pool; the spinner runs
      if (int(threads->size()) == 6 + pool && sleeping >= 5 + pool) return;
      REQUIRE(std::chrono::steady_clock::now() < deadline);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  char state(pid_t t) const {
    std::ifstream in(fmt::format("/proc/{}/task/{}/stat", pid(), t));
    std::string s;
    std::getline(in, s);
    auto p = s.rfind(')');
    return p == std::string::npos || p + 2 >= s.size() ? '?' : s[p + 2];
  }
};

// Stops every thread of a process with ptrace for the length of a scope; detaches on
// destruction, so a failing assertion never leaves the fixture traced.
// (Test-local until userspace/process provides the engine's stop/resume.)
struct StopWorld {
  std::vector<pid_t> seized;
  std::vector<StoppedThread> threads;

  explicit StopWorld(pid_t pid) {
    auto tids = process__list_threads(pid);
    REQUIRE(tids);
    for (pid_t t : *tids) {
      REQUIRE(ptrace(PTRACE_SEIZE, t, 0, 0) == 0);
      seized.push_back(t);
    }
    for (pid_t t : seized) REQUIRE(ptrace(PTRACE_INTERRUPT, t, 0, 0) == 0);
    for (pid_t t : seized) {
      int status = 0;
      REQUIRE(waitpid(t, &status, __WALL) == t);
      REQUIRE(WIFSTOPPED(status));
      StoppedThread st;
      st.tid = t;
      REQUIRE(arch::regs__read(t, st.regs));
      threads.push_back(st);
    }
  }
  ~StopWorld() {
    for (pid_t t : seized) ptrace(PTRACE_DETACH, t, 0, 0);
  }
  std::vector<StoppedThread> only(std::initializer_list<pid_t> tids) const {
    std::vector<StoppedThread> out;
    for (const auto& t : threads)
      for (pid_t want : tids)
        if (t.tid == want) out.push_back(t);
    REQUIRE(out.size() == tids.size());
    return out;
  }
  std::vector<StoppedThread> all_but(pid_t tid) const {
    std::vector<StoppedThread> out;
    for (const auto& t : threads)
      if (t.tid != tid) out.push_back(t);
    return out;
  }
};

std::vector<Blocker> strict(const Fixture& f, const std::vector<StoppedThread>& threads,
                            std::initializer_list<const char*> fns, ConsistencyStats* stats = nullptr) {
  std::vector<AddressRange> ranges;
  for (const char* n : fns) ranges.push_back(f.range(n));
  auto checker = ConsistencyChecker::create(f.pid(), ranges);
  REQUIRE(checker);
  auto blockers = checker->check(threads);
  REQUIRE(blockers);
  consistency__name_threads(*blockers);
  if (stats) *stats = checker->last_stats();
  return *blockers;
}

}  // namespace

TEST_CASE("strict: only the thread executing inside target_fn blocks it, at its caller frame") {
  require_root();
  Fixture f;
  AddressRange target = f.range("target_fn");
  StopWorld world(f.pid());
  // (the "hidden" thread cannot be unwound fully; it has its own test below)
  auto blockers = strict(f, world.all_but(f.tid["hidden"]), {"target_fn"});
  REQUIRE(blockers.size() == 1);
  const Blocker& b = blockers[0];
  CHECK(b.tid == f.tid["parked"]);
  CHECK(b.thread_name == "parked");
  CHECK(b.function == "target_fn");
  CHECK(b.frame >= 1);  // read <- inner <- target_fn: frame #2 unless read is inlined
  CHECK(b.frame <= 3);
  CHECK(target.contains(b.pc - 1));  // a return address into target_fn
  CHECK_FALSE(b.unwind_incomplete);
  CHECK(blocker__describe(b) == fmt::format("thread {} (parked) is inside target_fn (frame #{}, pc {:#x})", b.tid,
                                            b.frame, b.pc));

  // The one-shot form agrees.
  auto once = consistency__check_strict(f.pid(), world.all_but(f.tid["hidden"]), {target});
  REQUIRE(once);
  REQUIRE(once->size() == 1);
  CHECK((*once)[0].tid == b.tid);
  CHECK((*once)[0].frame == b.frame);
}

TEST_CASE("strict: a function on no stack blocks nobody; others block their own threads") {
  require_root();
  Fixture f;
  StopWorld world(f.pid());
  ConsistencyStats stats;
  CHECK(strict(f, world.threads, {"unused_fn"}, &stats).empty());
  CHECK(stats.threads == world.threads.size());
  CHECK(stats.unwound == 0);  // nothing on any stack points into unused_fn: the scan clears all

  auto other = strict(f, world.threads, {"other_fn"});
  REQUIRE(other.size() == 1);
  CHECK(other[0].tid == f.tid["other"]);
  CHECK(other[0].frame >= 1);

  auto spin = strict(f, world.threads, {"spin_fn"});  // a busy thread: frame 0
  REQUIRE(spin.size() == 1);
  CHECK(spin[0].tid == f.tid["spinner"]);
  CHECK(spin[0].frame == 0);

  auto two = strict(f, world.all_but(f.tid["hidden"]), {"other_fn", "inner", "unused_fn"});
  REQUIRE(two.size() == 2);
  std::map<pid_t, std::string> by_tid;
  for (const auto& b : two) by_tid[b.tid] = b.function;
  CHECK(by_tid[f.tid["other"]] == "other_fn");
  CHECK(by_tid[f.tid["parked"]] == "inner");

  // The same function twice (aliases) is one range.
  auto dup = strict(f, world.all_but(f.tid["hidden"]), {"inner", "inner"});
  REQUIRE(dup.size() == 1);
  CHECK(dup[0].function == "inner");
}

TEST_CASE("a checker for a process that does not exist is a clear error") {
  auto checker = ConsistencyChecker::create(999999999, {AddressRange{0x1000, 0x1010, "f"}});
  REQUIRE_FALSE(checker);
  CHECK(checker.error().what.find("999999999") != std::string::npos);
}

TEST_CASE("strict: a stale return address under an uninitialised buffer is not a live frame") {
  require_root();
  Fixture f;
  StopWorld world(f.pid());
  ConsistencyStats stats;
  auto blockers = strict(f, world.only({f.tid["stale"]}), {"target_fn"}, &stats);
  CHECK(stats.candidates == 1);  // the scan did see the stale word (else this test proves nothing)
  CHECK(stats.unwound == 1);
  CHECK(blockers.empty());  // and the unwind proved it dead
}

TEST_CASE("strict: when the unwind stops early, what it could not reach blocks") {
  require_root();
  Fixture f;
  StopWorld world(f.pid());
  ConsistencyStats stats;
  // hidden: the same stale word as above, but the unwinder cannot get past nocfi_call
  auto blockers = strict(f, world.only({f.tid["hidden"]}), {"target_fn"}, &stats);
  CHECK(stats.unwound == 1);
  REQUIRE(blockers.size() == 1);
  CHECK(blockers[0].tid == f.tid["hidden"]);
  CHECK(blockers[0].function == "target_fn");
  CHECK(blockers[0].unwind_incomplete);
  CHECK(f.range("target_fn").contains(blockers[0].pc - 1));
  CHECK(blocker__describe(blockers[0]).find("assumed live") != std::string::npos);
  // ...but a function nowhere on its stack still clears it, without unwinding.
  CHECK(strict(f, world.only({f.tid["hidden"]}), {"unused_fn"}, &stats).empty());
  CHECK(stats.unwound == 0);
}

TEST_CASE("entry: only a pc inside the overwritten bytes blocks") {
  require_root();
  Fixture f;
  StopWorld world(f.pid());
  AddressRange spin = f.range("spin_fn");  // a 6-byte loop: its pc is always in the first 5 bytes
  REQUIRE(spin.end - spin.begin == 6);
  spin.end = spin.begin + 5;
  auto blockers = consistency__check_entry(world.threads, {spin});
  CHECK(blockers.size() == 1);
  CHECK(blockers[0].thread_name.empty());  // named later, out of the stop window
  CHECK(blocker__describe(blockers[0]).find("(spinner) is inside spin_fn (frame #0") != std::string::npos);
  consistency__name_threads(blockers);
  REQUIRE(blockers.size() == 1);
  CHECK(blockers[0].tid == f.tid["spinner"]);
  CHECK(blockers[0].thread_name == "spinner");
  CHECK(blockers[0].frame == 0);
  CHECK(spin.contains(blockers[0].pc));

  // target_fn is live on the parked thread's stack, but no pc is in its first bytes.
  AddressRange target = f.range("target_fn");
  target.end = target.begin + 5;
  CHECK(consistency__check_entry(world.threads, {target}).empty());
}

TEST_CASE("one checker serves several stops (retries), and its timings") {
  require_root();
  constexpr int kPool = 100;
  Fixture f(kPool);
  auto checker = ConsistencyChecker::create(f.pid(), {f.range("unused_fn")});
  REQUIRE(checker);
  auto candidates = ConsistencyChecker::create(f.pid(), {f.range("pool_fn")});
  REQUIRE(candidates);
  for (int round = 0; round < 3; ++round) {
    StopWorld world(f.pid());
    auto clear = checker->check(world.threads);
    REQUIRE(clear);
    CHECK(clear->empty());
    auto clear_stats = checker->last_stats();
    CHECK(clear_stats.unwound == 0);

    auto pool = candidates->check(world.threads);
    REQUIRE(pool);
    CHECK(pool->size() == size_t(kPool));
    auto pool_stats = candidates->last_stats();
    CHECK(pool_stats.unwound == size_t(kPool));
    double n = double(world.threads.size());
    fmt::print(
        "round {}: {} threads; all clear: total {:.0f} us (maps {:.0f} us, {:.2f} us/thread scan, {} KiB stacks);"
        " {} candidates: total {:.0f} us ({:.1f} us/thread unwind)\n",
        round, world.threads.size(), clear_stats.total_us, clear_stats.maps_us, clear_stats.scan_us / n,
        clear_stats.stack_bytes / 1024, pool_stats.candidates, pool_stats.total_us,
        pool_stats.unwind_us / double(pool_stats.unwound));
  }
}

TEST_CASE("a thread created after the checker: its new stack is found") {
  require_root();
  Fixture f;
  auto checker = ConsistencyChecker::create(f.pid(), {f.range("target_fn")});
  REQUIRE(checker);
  f.child.send("spawn");
  auto line = f.child.wait_for("tid late");
  REQUIRE(line);
  pid_t late = std::stoi(line->substr(9));
  f.wait_parked(1);  // the late thread sleeps in read() too
  StopWorld world(f.pid());
  auto blockers = checker->check(world.all_but(f.tid["hidden"]));
  REQUIRE(blockers);
  CHECK(checker->last_stats().maps_reread);
  CHECK(checker->last_stats().unwound == 3);  // parked, late (its new stack was scanned) and stale
  REQUIRE(blockers->size() == 2);
  std::set<pid_t> tids{(*blockers)[0].tid, (*blockers)[1].tid};
  CHECK(tids == std::set<pid_t>{f.tid["parked"], late});
  // The next check (a retry) needs no new read.
  REQUIRE(checker->check(world.all_but(f.tid["hidden"])));
  CHECK_FALSE(checker->last_stats().maps_reread);
}
