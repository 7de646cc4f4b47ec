// hotfix-ctl watch's counting trampolines (patch/watchstubs.hpp) against real processes: exact
// counts, the file's bytes back after unwatch and after a SIGKILLed watch, a thread parked inside
// a trampoline holding its memory, and never a trampoline where someone else's breakpoint sits.
#include <elf.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
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
  std::string object;
};

std::vector<Entry> entries(pid_t pid, const std::vector<std::string>& patterns) {
  auto table = SymbolTable::for_pid(pid);
  REQUIRE(table);
  auto fns = symbols__select(*table, patterns);
  REQUIRE(fns);
  std::vector<Entry> out;
  for (auto& f : *fns) out.push_back({f.name, f.address, f.object});
  return out;
}

const Entry& named(const std::vector<Entry>& es, const std::string& name) {
  auto it = std::find_if(es.begin(), es.end(), [&](auto& e) { return e.name == name; });
  REQUIRE(it != es.end());
  return *it;
}

// e_type of an ELF file: ET_DYN for a PIE executable or a shared library.
int elf_type(const std::string& path) {
  std::string head = read_file(path).substr(0, sizeof(Elf64_Ehdr));
  REQUIRE(head.size() == sizeof(Elf64_Ehdr));
  Elf64_Ehdr eh;
  std::memcpy(&eh, head.data(), sizeof eh);
  return eh.e_type;
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
  // What the kinds are: both programs are PIE (Debian's gcc default), callee_work is in a
  // dlopen'ed shared library, rip_first's first instruction is a rip-relative load.
  CHECK(elf_type(fixture("calls")) == ET_DYN);
  CHECK(elf_type(fixture("tramp_target")) == ET_DYN);
  CHECK(named(es, "callee_work").object.ends_with("/libcallee.so"));
  CHECK(named(es, "c_add").object == fixture("calls"));
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

TEST_CASE("a SIGKILLed watch's trampolines are removed by the next hotfix-ctl on the pid: list, watch, patch, gc") {
  require_root();
  Calls calls;
  auto es = entries(calls.pid(), {"c_add", "callee_work"});
  const std::string pid = std::to_string(calls.pid());
  std::vector<std::pair<uint64_t, uint64_t>> pages;
  for (std::string next : {"list", "watch", "patch", "gc"}) {
    INFO(next);
    uint32_t owner = 0;
    {
      WatchCtl watch(calls.pid(), {"c_add", "callee_work"});
      for (auto& e : es) CHECK(is_jump(calls.pid(), e));
      pages = registry_of(calls.pid()).watches.at(0).pages;
      owner = static_cast<uint32_t>(watch.child.pid());
      watch.child.signal(SIGKILL);
      REQUIRE(watch.child.wait(20s));
    }
    calls.call("c_add", 10);  // the orphaned trampolines still count and return correctly
    for (auto& e : es) CHECK(is_jump(calls.pid(), e));
    RunResult r;
    if (next == "list") r = run({ctl(), "list", "--pid", pid});
    if (next == "watch") r = run({ctl(), "watch", "--pid", pid, "c_add", "--duration", "0.3"});
    if (next == "patch") r = run({ctl(), "patch", "--pid", pid, "--lib", fixture("calls_fix.so"), "c_add", "--observe", "0"});
    if (next == "gc") r = run({ctl(), "gc"});  // host-wide: it recovers every live pid a journal names
    INFO(r.out << r.err);
    CHECK(r.exit_code == 0);
    CHECK((r.out + r.err).find(fmt::format("removed what an ended watch (pid {}) left in pid {}", owner, pid)) !=
          std::string::npos);
    if (next == "patch") {  // the patch went in over the file's bytes: new calls run the fix
      CHECK(calls.child.request("call c_add 1") == "ok 1001");
      require_file_bytes(calls.pid(), {named(es, "callee_work")});
      auto rev = run({ctl(), "revert", "--pid", pid, "--all"});
      INFO(rev.out << rev.err);
      REQUIRE(rev.exit_code == 0);
    }
    require_file_bytes(calls.pid(), es);
    CHECK(registry_of(calls.pid()).watches.empty());
    for (auto& [a, len] : pages) CHECK(!mapped_at(calls.pid(), a));
    CHECK(calls.child.request("call c_add 5") == "ok 5");
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

TEST_CASE("another tool's perf uprobe, on an entry or under the jump, keeps trampolines and patches off it") {
  require_root();
  Tramp tramp;
  auto es = entries(tramp.pid(), {"c_count", "two_step", "rip_first"});
  const Entry &count = named(es, "c_count"), &two = named(es, "two_step"), &rip = named(es, "rip_first");
  // What perf and bpftrace make: perf uprobe events, one on c_count's entry, one on two_step's
  // second instruction (two_step+2, inside the 5 bytes an entry jump covers).
  std::string path;
  auto at_count = file_offset(tramp.pid(), count.address, path);
  auto at_two = file_offset(tramp.pid(), two.address, path);
  auto on_entry = std::make_unique<ForeignUprobe>(path, at_count);
  auto under_jump = std::make_unique<ForeignUprobe>(path, at_two + 2);
  if (on_entry->fd < 0 || under_jump->fd < 0) {
    WARN("SKIP: cannot create a uprobe perf event: " << std::strerror(errno));
    return;
  }
  auto byte = [&](const Entry& e, size_t at) { return read_memory(tramp.pid(), e.address + at, 1).at(0); };
  for (int i = 0; i < 200 && (byte(count, 0) != 0xcc || byte(two, 2) != 0xcc); ++i) std::this_thread::sleep_for(10ms);
  REQUIRE(byte(count, 0) == 0xcc);
  REQUIRE(byte(two, 2) == 0xcc);
  {
    WatchCtl watch(tramp.pid(), {"c_count", "two_step", "rip_first"});
    INFO(watch.notes << watch.banner);
    CHECK(watch.notes.find("2 functions counted by uprobe, not by a trampoline") != std::string::npos);
    CHECK(watch.notes.find("c_count (a breakpoint sits on its entry") != std::string::npos);
    CHECK(watch.notes.find("two_step (a breakpoint sits at +0x2, among its first bytes") != std::string::npos);
    CHECK(watch.banner.find("trampolines (1) and uprobe_multi (2)") != std::string::npos);
    CHECK(is_jump(tramp.pid(), rip));
    CHECK(byte(count, 0) == 0xcc);  // shared by both uprobes
    CHECK(byte(two, 0) == 0xcc);    // watch's own uprobe
    CHECK(byte(two, 2) == 0xcc);    // the other tool's, never written over
    CHECK(tramp.child.request("call c_count 40") == "ok 40");
    CHECK(tramp.child.request("call two_step 30") == "ok 30");
    CHECK(tramp.child.request("call rip_first 20") == "ok 22");
    auto rows = watch.stop();
    CHECK(rows["c_count"] == 40);
    CHECK(rows["two_step"] == 30);
    CHECK(rows["rip_first"] == 20);
  }
  require_file_bytes(tramp.pid(), {rip});
  CHECK(byte(two, 0) == file_bytes(tramp.pid(), two.address, 1).at(0));
  CHECK(byte(two, 2) == 0xcc);
  // patch does not write its jump over the other tool's breakpoint either: one line, nothing changed.
  auto before = read_memory(tramp.pid(), two.address, 16);
  auto maps_before = file_mappings(tramp.pid());
  const std::string pid = std::to_string(tramp.pid());
  auto refused = run({ctl(), "patch", "--pid", pid, "--lib", fixture("tramp_fix.so"), "two_step", "--observe", "0"});
  INFO(refused.out << refused.err);
  CHECK(refused.exit_code == 1);
  CHECK(lines_of(refused.err).size() == 1);
  CHECK(refused.err.find("cannot patch two_step: a breakpoint sits at +0x2") != std::string::npos);
  CHECK(read_memory(tramp.pid(), two.address, 16) == before);
  CHECK(file_mappings(tramp.pid()) == maps_before);
  CHECK(status_field(tramp.pid(), "TracerPid") == 0);
  CHECK(tramp.child.request("call two_step 3") == "ok 3");
  // The other tool gone, the bytes are the file's, and the same patch goes in and out.
  on_entry.reset();
  under_jump.reset();
  require_file_bytes(tramp.pid(), es);
  auto applied = run({ctl(), "patch", "--pid", pid, "--lib", fixture("tramp_fix.so"), "two_step", "--observe", "0"});
  INFO(applied.out << applied.err);
  REQUIRE(applied.exit_code == 0);
  CHECK(tramp.child.request("call two_step 3") == "ok 1002");
  REQUIRE(run({ctl(), "revert", "--pid", pid, "--all"}).exit_code == 0);
  require_file_bytes(tramp.pid(), es);
  CHECK(tramp.child.request("call two_step 3") == "ok 3");
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
  CHECK(!registry__locate(calls.pid()));  // a watch that ends leaves no registry it made
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
    CHECK(!registry__locate(calls.pid()));  // the registry the watch made went with it
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
