// hotfix-ctl watch's counting trampolines (patch/watchstubs.hpp) against real processes: exact
// counts, the file's bytes back after unwatch and after a SIGKILLed watch, a thread parked inside
// a trampoline holding its memory, and never a trampoline where someone else's breakpoint sits.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <map>
#include <sstream>
#include <thread>

#include "patch/registry.hpp"
#include "support/harness.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace std::chrono_literals;

namespace {

// The value after "key": in a flat JSON object text, up to the next ',' or '}'.
std::string field(const std::string& obj, const std::string& key) {
  auto at = obj.find("\"" + key + "\":");
  if (at == std::string::npos) return {};
  at += key.size() + 3;
  auto end = obj.find_first_of(",}", at);
  std::string v = obj.substr(at, end - at);
  if (v.size() >= 2 && v.front() == '"') v = v.substr(1, v.size() - 2);
  return v;
}

// Calls by mangled name, from the final JSON report.
std::map<std::string, long> final_totals(const std::string& out) {
  std::string last;
  for (auto& line : lines_of(out))
    if (line.find("\"final\":true") != std::string::npos) last = line;
  std::map<std::string, long> rows;
  for (size_t at = last.find("{\"name\""); at != std::string::npos; at = last.find("{\"name\"", at + 1)) {
    std::string obj = last.substr(at, last.find('}', at) - at + 1);
    rows[field(obj, "mangled")] = std::stol(field(obj, "total"));
  }
  return rows;
}

struct WatchCtl {
  Child child;
  std::string banner, notes;
  WatchCtl(pid_t pid, std::vector<std::string> extra)
      : child([&] {
          std::vector<std::string> argv{ctl(), "watch", "--pid", std::to_string(pid), "--json", "--interval", "0.2"};
          argv.insert(argv.end(), extra.begin(), extra.end());
          return argv;
        }()) {
    auto line = child.read_stderr_line(30s);
    while (line && (line->rfind("note: ", 0) == 0 || line->rfind("progress: ", 0) == 0)) {
      notes += *line + "\n";
      line = child.read_stderr_line(30s);
    }
    REQUIRE(line);
    banner = *line;
    INFO(banner << child.drain_stderr());
    REQUIRE(banner.find("watching") != std::string::npos);
  }
  std::map<std::string, long> stop() {
    child.signal(SIGINT);
    std::string out;
    for (int i = 0; i < 400 && child.running(); ++i) out += child.drain_stdout();
    auto code = child.wait(60s);
    out += child.drain_stdout();
    INFO(out << child.drain_stderr());
    REQUIRE(code == 0);
    return final_totals(out);
  }
};

struct Entry {
  std::string name;
  uint64_t address = 0;
};

std::vector<Entry> entries(pid_t pid, const std::vector<std::string>& patterns) {
  auto table = SymbolTable::for_pid(pid);
  REQUIRE(table);
  auto fns = symbols__select(*table, patterns);
  REQUIRE(fns);
  std::vector<Entry> out;
  for (auto& f : *fns) out.push_back({f.name, f.address});
  return out;
}

// Every entry holds what its file holds (16 bytes: more than any jump covers).
void require_file_bytes(pid_t pid, const std::vector<Entry>& es) {
  for (auto& e : es) {
    INFO(e.name);
    auto file = file_bytes(pid, e.address, 16);
    REQUIRE(file.size() == 16);
    CHECK(read_memory(pid, e.address, 16) == file);
  }
}

bool is_jump(pid_t pid, const Entry& e) { return read_memory(pid, e.address, 1) == std::vector<unsigned char>{0xe9}; }

Registry registry_of(pid_t pid) {
  auto r = registry__read(pid);
  REQUIRE(r);
  return *r;
}

bool mapped_at(pid_t pid, uint64_t address) {
  return read_file(fmt::format("/proc/{}/maps", pid)).find(fmt::format("{:x}-", address)) != std::string::npos;
}

struct Calls {
  Child child{{fixture("calls")}};
  pid_t pid() { return child.pid(); }
  Calls() {
    REQUIRE(child.request("ready").rfind("ok", 0) == 0);
    REQUIRE(child.request("load") == "ok");
  }
  void call(const std::string& name, long n) { REQUIRE(child.request(fmt::format("call {} {}", name, n)).rfind("ok", 0) == 0); }
};

struct Tramp {
  Child child{{fixture("tramp_target")}};
  pid_t pid() { return child.pid(); }
  Tramp() { REQUIRE(child.request("ready").rfind("ok", 0) == 0); }
};

}  // namespace

TEST_CASE("default watch counts exactly with trampolines: C, C++, shared library, PIE, rip-relative prologue") {
  require_root();
  Calls calls;
  Tramp tramp;
  const std::vector<std::string> names{"c_add", "pricing::discount", "Order::add", "scale(double)", "callee_work"};
  auto es = entries(calls.pid(), names);
  auto tes = entries(tramp.pid(), {"rip_first", "c_count"});
  {
    WatchCtl watch(calls.pid(), names);
    WatchCtl twatch(tramp.pid(), {"rip_first", "c_count"});
    INFO(watch.notes << twatch.notes);
    CHECK(watch.banner.find("5 functions") != std::string::npos);
    CHECK(watch.banner.find("via trampolines,") != std::string::npos);  // no trap anywhere
    CHECK(twatch.banner.find("via trampolines,") != std::string::npos);
    for (auto& e : es) CHECK(is_jump(calls.pid(), e));
    for (auto& e : tes) CHECK(is_jump(tramp.pid(), e));
    CHECK(registry_of(calls.pid()).watches.size() == 1);
    calls.call("c_add", 1001);
    calls.call("pricing::discount", 13);
    calls.call("Order::add", 21);
    calls.call("scale(double)", 55);
    calls.call("callee_work", 144);
    // The relocated rip-relative load still reads tramp_value (3): 3 + 99 for the last call.
    CHECK(tramp.child.request("call rip_first 100") == "ok 102");
    CHECK(tramp.child.request("call c_count 77") == "ok 77");
    auto rows = watch.stop();
    CHECK(rows["c_add"] == 1001);
    CHECK(rows["_ZN7pricing8discountEdi"] == 13);
    CHECK(rows["_ZN5Order3addEi"] == 21);
    CHECK(rows["_Z5scaled"] == 55);
    CHECK(rows["callee_work"] == 144);
    auto trows = twatch.stop();
    CHECK(trows["rip_first"] == 100);
    CHECK(trows["c_count"] == 77);
  }
  // Unwatched: the file's bytes, no record, no trampoline page; the functions still work.
  require_file_bytes(calls.pid(), es);
  require_file_bytes(tramp.pid(), tes);
  CHECK(registry_of(calls.pid()).watches.empty());
  CHECK(tramp.child.request("call rip_first 2") == "ok 4");
  calls.call("c_add", 3);
}

TEST_CASE("watch --count uprobe counts with uprobes, as before") {
  require_root();
  Calls calls;
  WatchCtl watch(calls.pid(), {"c_add", "--count", "uprobe"});
  CHECK(watch.banner.find("uprobe_multi") != std::string::npos);
  CHECK(read_memory(calls.pid(), entries(calls.pid(), {"c_add"})[0].address, 1)[0] == 0xcc);
  calls.call("c_add", 250);
  CHECK(watch.stop()["c_add"] == 250);
  CHECK(run({ctl(), "watch", "--pid", std::to_string(calls.pid()), "c_add", "--count", "int3"}).exit_code == 2);
}

TEST_CASE("a SIGKILLed watch's trampolines are removed by the next hotfix-ctl on the pid") {
  require_root();
  Calls calls;
  auto es = entries(calls.pid(), {"c_add", "callee_work"});
  std::vector<std::pair<uint64_t, uint64_t>> pages;
  for (const char* next : {"list", "watch"}) {
    INFO(next);
    {
      WatchCtl watch(calls.pid(), {"c_add", "callee_work"});
      for (auto& e : es) CHECK(is_jump(calls.pid(), e));
      pages = registry_of(calls.pid()).watches.at(0).pages;
      watch.child.signal(SIGKILL);
      REQUIRE(watch.child.wait(20s));
    }
    calls.call("c_add", 10);  // the orphaned trampolines still count and return correctly
    for (auto& e : es) CHECK(is_jump(calls.pid(), e));
    RunResult r = std::string(next) == "list"
                      ? run({ctl(), "list", "--pid", std::to_string(calls.pid())})
                      : run({ctl(), "watch", "--pid", std::to_string(calls.pid()), "c_add", "--duration", "0.3"});
    INFO(r.out << r.err);
    CHECK(r.exit_code == 0);
    CHECK(r.err.find("removed what an ended watch") != std::string::npos);
    require_file_bytes(calls.pid(), es);
    CHECK(registry_of(calls.pid()).watches.empty());
    for (auto& [a, len] : pages) CHECK(!mapped_at(calls.pid(), a));
    calls.call("c_add", 5);
  }
}

TEST_CASE("a thread parked inside a trampoline holds its memory until it leaves") {
  require_root();
  Tramp tramp;
  auto es = entries(tramp.pid(), {"park_first"});
  WatchCtl watch(tramp.pid(), {"park_first"});
  CHECK(watch.banner.find("via trampolines,") != std::string::npos);
  auto pages = registry_of(tramp.pid()).watches.at(0).pages;
  REQUIRE(pages.size() == 1);
  // park_first blocks in the read(2) its trampoline makes: its pc is inside the trampoline.
  REQUIRE(tramp.child.request("park") == "ok");
  watch.child.signal(SIGINT);
  // Removal restores the entry at once, but cannot free the page while the thread is inside.
  std::optional<std::string> waiting;
  for (auto line = watch.child.read_stderr_line(30s); line && !waiting; line = watch.child.read_stderr_line(30s))
    if (line->find("waiting to free the trampolines") != std::string::npos) waiting = line;
  REQUIRE(waiting);
  CHECK(waiting->find("inside") != std::string::npos);
  require_file_bytes(tramp.pid(), es);
  CHECK(watch.child.running());
  CHECK(mapped_at(tramp.pid(), pages[0].first));
  REQUIRE(tramp.child.request("release") == "ok");
  std::string out;
  for (int i = 0; i < 400 && watch.child.running(); ++i) out += watch.child.drain_stdout();
  REQUIRE(watch.child.wait(60s) == 0);
  out += watch.child.drain_stdout();
  CHECK(final_totals(out)["park_first"] == 1);
  CHECK(!mapped_at(tramp.pid(), pages[0].first));
  CHECK(registry_of(tramp.pid()).watches.empty());
}

TEST_CASE("no trampoline where someone else's breakpoint sits: that function is counted by uprobe") {
  require_root();
  Calls calls;
  auto es = entries(calls.pid(), {"c_add", "scale(int)"});
  WatchCtl other(calls.pid(), {"c_add", "--count", "uprobe"});  // someone else's uprobe on c_add
  {
    WatchCtl watch(calls.pid(), {"c_add", "scale(int)"});
    INFO(watch.notes);
    CHECK(watch.notes.find("1 function counted by uprobe, not by a trampoline: c_add (a breakpoint sits on its entry") !=
          std::string::npos);
    CHECK(watch.banner.find("trampolines (1) and uprobe_multi (1)") != std::string::npos);
    CHECK(read_memory(calls.pid(), es[0].address, 1)[0] == 0xcc);
    CHECK(is_jump(calls.pid(), es[1]));
    calls.call("c_add", 31);
    calls.call("scale(int)", 17);
    auto rows = watch.stop();
    CHECK(rows["c_add"] == 31);
    CHECK(rows["_Z5scalei"] == 17);
  }
  CHECK(other.stop()["c_add"] == 31);
  require_file_bytes(calls.pid(), es);
}

namespace {

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

size_t crash_points(const std::string& err) {
  size_t n = 0;
  for (auto& line : lines_of(err)) n += line.rfind("crashpoint ", 0) == 0;
  return n;
}

}  // namespace

TEST_CASE("a watch killed at any crash point is undone by the next hotfix-ctl: the file's bytes, no memory left") {
  require_root();
  Calls calls;
  auto es = entries(calls.pid(), {"c_add", "callee_work"});
  auto before = stub_memory(calls.pid());
  std::vector<std::string> watch{ctl(), "watch", "--pid", std::to_string(calls.pid()), "c_add", "callee_work",
                                 "--duration", "0.3", "--json"};
  auto with_env = [&](const std::string& env) {
    std::vector<std::string> argv{"/usr/bin/env", env};
    argv.insert(argv.end(), watch.begin(), watch.end());
    return run(argv, 60s);
  };
  auto listed = with_env("HOTFIX_CRASH_LIST=1");
  REQUIRE(listed.exit_code == 0);
  size_t points = crash_points(listed.err);
  INFO(listed.err);
  REQUIRE(points >= 8);
  for (size_t k = 1; k <= points; ++k) {
    auto r = with_env("HOTFIX_CRASH_AT=" + std::to_string(k));
    INFO("crash point " << k << ": " << r.err);
    auto rec = run({ctl(), "recover", "--pid", std::to_string(calls.pid())}, 60s);
    INFO(rec.out << rec.err);
    REQUIRE(rec.exit_code == 0);
    require_file_bytes(calls.pid(), es);
    CHECK(registry_of(calls.pid()).watches.empty());
    CHECK(stub_memory(calls.pid()) == before);
    calls.call("c_add", 2);
    calls.call("callee_work", 2);
  }
}

TEST_CASE("registry: watch records round-trip, and a registry without them reads as before") {
  Registry r;
  r.next_id = 3;
  WatchRecord w;
  w.owner = 4242;
  w.owner_start = 987654;
  w.counters = 0x7f0000001000;
  w.counters_len = 0x1000;
  w.pages = {{0x7f0000100000, 0x1000}};
  w.stubs = {{"_Z5scalei", 0x555555554000, 0x7f0000100000, {0x55, 0x48, 0x89, 0xe5, 0x53}, {0xe9, 1, 2, 3, 4}}};
  r.watches.push_back(w);
  auto back = registry__decode(registry__encode(r));
  REQUIRE(back);
  REQUIRE(back->watches.size() == 1);
  auto& b = back->watches[0];
  CHECK(b.owner == 4242);
  CHECK(b.owner_start == 987654);
  CHECK(b.counters == w.counters);
  CHECK(b.pages == w.pages);
  REQUIRE(b.stubs.size() == 1);
  CHECK(b.stubs[0].name == "_Z5scalei");
  CHECK(b.stubs[0].original == w.stubs[0].original);
  CHECK(b.stubs[0].written == w.stubs[0].written);
  CHECK(back->watch_stub_at(0x555555554000) != nullptr);
  r.watches.clear();
  auto old = registry__decode(registry__encode(r));
  REQUIRE(old);
  CHECK(old->watches.empty());
}
