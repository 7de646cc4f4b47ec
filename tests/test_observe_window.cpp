// patch's observe window counts with watch's counting trampolines (observe/liveness.hpp,
// patch/watchstubs.hpp): exact counts from the trampolines (a uprobe only where a trampoline
// cannot go), the file's bytes after the window and after patch + revert, and a patch killed
// anywhere in the window's trampoline steps undone by the next hotfix-ctl.
#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <atomic>
#include <sstream>
#include <thread>

#include "observe/liveness.hpp"
#include "observe/watch.hpp"
#include "patch/registry.hpp"
#include "support/harness.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace std::chrono_literals;

namespace {

Function function_of(pid_t pid, const std::string& name) {
  auto table = SymbolTable::for_pid(pid);
  REQUIRE(table);
  auto fns = symbols__select(*table, {name});
  REQUIRE(fns);
  REQUIRE(fns->size() == 1);
  return fns->front();
}

bool file_bytes_at(pid_t pid, uint64_t address) {
  auto file = file_bytes(pid, address, 16);
  return file.size() == 16 && read_memory(pid, address, 16) == file;
}

// Anonymous executable pages and BPF map mappings of `pid`: what trampolines and counters use.
std::pair<size_t, size_t> stub_memory(pid_t pid) {
  size_t anon_x = 0, maps = 0;
  for (auto& line : lines_of(read_file(fmt::format("/proc/{}/maps", pid)))) {
    std::istringstream f(line);
    std::string range, perms, offset, dev, inode, path;
    f >> range >> perms >> offset >> dev >> inode >> path;
    if (perms == "r-xp" && inode == "0" && path.empty()) ++anon_x;
    if (path.find("bpf-map") != std::string::npos) ++maps;
  }
  return {anon_x, maps};
}

// BPF links this process holds: a Watch's uprobes are attached once their number grows.
size_t own_bpf_links() {
  size_t n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (!d) return 0;
  while (auto* e = ::readdir(d)) {
    char target[128] = "";
    ssize_t len = ::readlinkat(dirfd(d), e->d_name, target, sizeof target - 1);
    if (len > 0 && std::string(target, static_cast<size_t>(len)) == "anon_inode:bpf_link") ++n;
  }
  ::closedir(d);
  return n;
}

bool watches_empty(pid_t pid) {
  auto r = registry__read(pid);
  return r && r->watches.empty();
}

struct Stats {
  Child child{{fixture("stats_target")}};
  pid_t pid() { return child.pid(); }
  Stats() { REQUIRE(child.request("ready").rfind("ok", 0) == 0); }
};

std::vector<std::string> patch_argv(pid_t pid, std::vector<std::string> extra = {}) {
  std::vector<std::string> argv{ctl(), "patch", "--pid", std::to_string(pid), "--lib", fixture("stats_fix.so"), "stats_work"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return argv;
}

}  // namespace

TEST_CASE("the observe window counts exactly with trampolines; a uprobe only where a trampoline cannot go") {
  require_root();
  Stats t;
  Function work = function_of(t.pid(), "stats_work"), tail = function_of(t.pid(), "stats_tail");
  auto memory_before = stub_memory(t.pid());
  // Someone else's uprobe on stats_tail: its entry holds a breakpoint, where no trampoline goes.
  auto other = Watch::attach(t.pid(), {tail}, WatchOptions{.returns = false});
  REQUIRE(other);
  size_t links_before = own_bpf_links();

  // While the window runs: once the trampoline's jump and the window's uprobe are in, the
  // target calls both functions exactly 500 times, and the registry records the trampoline.
  std::atomic<bool> called{false}, recorded{false};
  std::thread caller([&] {
    auto until = std::chrono::steady_clock::now() + 20s;
    while (std::chrono::steady_clock::now() < until &&
           (read_memory(t.pid(), work.address, 1) != std::vector<unsigned char>{0xe9} || own_bpf_links() <= links_before))
      std::this_thread::sleep_for(1ms);
    auto r = registry__read(t.pid());
    recorded = r && r->watches.size() == 1 && r->watch_stub_at(work.address) && !r->watch_stub_at(tail.address);
    called = t.child.request("call 500").rfind("ok", 0) == 0;
  });
  ObserveWindow how{.window = 3s, .adaptive = false};
  auto seen = liveness__observe_window(t.pid(), {work, tail}, how);
  caller.join();
  REQUIRE(seen);
  std::string notes;
  for (auto& n : seen->notes) notes += n + "\n";
  INFO(notes);
  REQUIRE(called);
  CHECK(recorded);
  REQUIRE(seen->functions.size() == 2);
  CHECK(seen->trampolines == 1);
  CHECK(seen->uprobes == 1);
  CHECK(seen->functions[0].trampoline);
  CHECK(seen->functions[0].calls == 500);
  CHECK(seen->functions[0].inflight == 0);  // from the look at every thread after the window: none inside
  CHECK(!seen->functions[1].trampoline);
  CHECK(seen->functions[1].calls == 500);
  CHECK(notes.find("1 function counted by uprobe, not by a trampoline: stats_tail (a breakpoint sits on its entry") !=
        std::string::npos);

  // After the window: the file's bytes, no record, the trampolines' memory freed.
  CHECK(file_bytes_at(t.pid(), work.address));
  CHECK(watches_empty(t.pid()));
  CHECK(stub_memory(t.pid()) == memory_before);
  other->detach();
  CHECK(file_bytes_at(t.pid(), tail.address));
  CHECK(t.child.request("call 3").rfind("ok", 0) == 0);
}

TEST_CASE("default patch observes with trampolines, then patches; revert gives the file's bytes") {
  require_root();
  Stats t;
  Function work = function_of(t.pid(), "stats_work");
  std::string pid = std::to_string(t.pid());
  auto memory_before = stub_memory(t.pid());
  // "call 3" sums three calls of each function: the fix adds 100000 to stats_work's result.
  auto sum3 = [&] {
    auto reply = t.child.request("call 3");
    REQUIRE(reply.rfind("ok ", 0) == 0);
    return std::stol(reply.substr(3));
  };
  CHECK(sum3() < 100000);
  auto r = run(patch_argv(t.pid()));
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("observed for 0.1") != std::string::npos);  // idle: 100 ms, nothing to wait for
  CHECK(r.out.find("s (trampolines):") != std::string::npos);
  CHECK(r.out.find("idle  threads inside: 0") != std::string::npos);  // the look after the stubs are gone
  CHECK(r.out.find("applied patch") != std::string::npos);
  CHECK(watches_empty(t.pid()));
  CHECK(sum3() > 100000);  // new calls run the fix
  auto rev = run({ctl(), "revert", "--pid", pid, "--all"});
  INFO(rev.out << rev.err);
  REQUIRE(rev.exit_code == 0);
  CHECK(file_bytes_at(t.pid(), work.address));
  CHECK(sum3() < 100000);

  auto up = run(patch_argv(t.pid(), {"--count", "uprobe", "--dry-run", "--observe", "0.2"}));
  INFO(up.out << up.err);
  REQUIRE(up.exit_code == 0);
  CHECK(up.out.find("observed for 0.2") != std::string::npos);
  CHECK(up.out.find("s (uprobes):") != std::string::npos);
  CHECK(run(patch_argv(t.pid(), {"--count", "bogus"})).exit_code == 2);
  CHECK(file_bytes_at(t.pid(), work.address));
  CHECK(stub_memory(t.pid()).first == memory_before.first);  // no trampoline page left (the patch's counters went with revert)
}

TEST_CASE("a patch killed at any crash point of its observe window's trampolines is undone by the next hotfix-ctl") {
  require_root();
  Stats t;
  Function work = function_of(t.pid(), "stats_work");
  std::string pid = std::to_string(t.pid());
  auto with_env = [&](const std::string& env) {
    std::vector<std::string> argv{"/usr/bin/env", env};
    auto p = patch_argv(t.pid(), {"--dry-run", "--observe", "0.2"});
    argv.insert(argv.end(), p.begin(), p.end());
    return run(argv, 60s);
  };
  // A window leaves no registry behind (it made one and nothing else recorded anything), so
  // every run reaches the same crash points in the same order.
  REQUIRE(run(patch_argv(t.pid(), {"--dry-run", "--observe", "0.2"})).exit_code == 0);
  REQUIRE(!registry__locate(t.pid()));
  auto listed = with_env("HOTFIX_CRASH_LIST=1");
  INFO(listed.out << listed.err);
  REQUIRE(listed.exit_code == 0);
  auto memory_before = stub_memory(t.pid());
  // "crashpoint K NAME": the window's own point and the trampolines' steps.
  std::vector<std::pair<int, std::string>> points;
  for (auto& line : lines_of(listed.err)) {
    int k = 0;
    char name[128] = "";
    if (std::sscanf(line.c_str(), "crashpoint %d %127[^\n]", &k, name) == 2 &&
        (std::string(name).rfind("watch:", 0) == 0 || std::string(name).rfind("observe:", 0) == 0))
      points.push_back({k, name});
  }
  REQUIRE(points.size() >= 8);
  bool saw_window = false;
  for (auto& [k, name] : points) {
    saw_window |= name == "observe: in the window";
    auto killed = with_env("HOTFIX_CRASH_AT=" + std::to_string(k));
    INFO("crash point " << k << " (" << name << "): " << killed.err);
    CHECK(killed.exit_code == 128 + SIGKILL);
    auto rec = run({ctl(), "recover", "--pid", pid}, 60s);
    INFO(rec.out << rec.err);
    REQUIRE(rec.exit_code == 0);
    CHECK(file_bytes_at(t.pid(), work.address));
    CHECK(watches_empty(t.pid()));
    CHECK(stub_memory(t.pid()) == memory_before);
    CHECK(!registry__locate(t.pid()));
    REQUIRE(t.child.request("call 2").rfind("ok", 0) == 0);
  }
  CHECK(saw_window);
  // And the next patch goes through.
  auto r = run(patch_argv(t.pid()));
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  REQUIRE(run({ctl(), "revert", "--pid", pid, "--all"}).exit_code == 0);
  CHECK(file_bytes_at(t.pid(), work.address));
}

TEST_CASE("observe window with --count uprobe: the budget moves a very hot function to a trampoline") {
  require_root();
  Child spin{{fixture("budget_spin")}};
  REQUIRE(spin.request("ready").rfind("ok", 0) == 0);
  Function hot = function_of(spin.pid(), "spin_hot"), cold = function_of(spin.pid(), "spin_cold");
  ObserveWindow how{.window = 1s, .adaptive = false, .trampolines = false};
  auto seen = liveness__observe_window(spin.pid(), {hot, cold}, how);
  REQUIRE(seen);
  std::string notes;
  for (auto& n : seen->notes) notes += n + "\n";
  INFO(notes);
  CHECK(notes.find("moved to trampoline counting spin_hot") != std::string::npos);
  REQUIRE(seen->functions.size() == 2);
  CHECK(seen->functions[0].trampoline);
  // Counted on after the move, by the trampoline: more calls than a uprobe (a trap of >= 1 us
  // each) could ever see in a second.
  CHECK(seen->functions[0].calls > 1000000);
  CHECK(!seen->functions[1].trampoline);
  CHECK(seen->functions[1].calls > 0);
  CHECK(file_bytes_at(spin.pid(), hot.address));
  CHECK(file_bytes_at(spin.pid(), cold.address));
  CHECK(watches_empty(spin.pid()));
  REQUIRE(spin.request("quit").rfind("ok", 0) == 0);
}

TEST_CASE("a thread parked in a window's trampoline holds its page, not the patch; the next hotfix-ctl frees it") {
  require_root();
  Child t{{fixture("tramp_target")}};
  REQUIRE(t.request("ready").rfind("ok", 0) == 0);
  Function park = function_of(t.pid(), "park_first");
  std::string pid = std::to_string(t.pid());
  auto memory_before = stub_memory(t.pid());
  // Once the window's jump is in, a thread enters park_first through the trampoline and blocks
  // in the read(2) that the trampoline's relocated instructions make: its pc is in the page.
  std::atomic<bool> parked{false};
  std::thread parker([&] {
    auto until = std::chrono::steady_clock::now() + 30s;
    while (std::chrono::steady_clock::now() < until &&
           read_memory(t.pid(), park.address, 1) != std::vector<unsigned char>{0xe9})
      std::this_thread::sleep_for(1ms);
    parked = t.request("park") == "ok";
  });
  auto r = run({ctl(), "patch", "--pid", pid, "--lib", fixture("tramp_fix.so"), "park_first", "--observe", "1.5",
                "--no-abi-check", "--consistency", "entry"});
  parker.join();
  INFO(r.out << r.err);
  REQUIRE(parked);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("s (trampolines):") != std::string::npos);
  CHECK(r.out.find("the trampolines' memory stays mapped") != std::string::npos);
  CHECK(r.out.find("applied patch") != std::string::npos);
  CHECK(read_memory(t.pid(), park.address, 1) == std::vector<unsigned char>{0xe9});  // the patch's jump
  CHECK(stub_memory(t.pid()).first > memory_before.first);  // the held page (and the patch's own)

  // The parked thread leaves through the old code; the next hotfix-ctl frees the page and keeps
  // the patch's jump (not "someone else's change").
  REQUIRE(t.request("release") == "ok");
  auto listed = run({ctl(), "list", "--pid", pid});
  INFO(listed.out << listed.err);
  REQUIRE(listed.exit_code == 0);
  CHECK(listed.err.find("removed what an ended watch") != std::string::npos);
  CHECK(listed.err.find("was changed since") == std::string::npos);
  CHECK(watches_empty(t.pid()));
  auto rev = run({ctl(), "revert", "--pid", pid, "--all"});
  INFO(rev.out << rev.err);
  REQUIRE(rev.exit_code == 0);
  CHECK(file_bytes_at(t.pid(), park.address));
}
