// Hit counting around a patch: pinned counters, old-code probes, `stats` and `gc`.
// Real BPF, real processes; every test removes its pins even when it fails (PinGuard).
#include <bpf/bpf.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <signal.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <regex>
#include <thread>

#include "arch/arch.hpp"
#include "observe/patchcount.hpp"
#include "support/harness.hpp"
#include "symbols/symbols.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace std::chrono;
namespace fs = std::filesystem;

namespace {

// Removes every pin of `pid` on scope exit, whatever happened.
struct PinGuard {
  pid_t pid;
  ~PinGuard() {
    for (uint32_t id : patchcount__ids(pid)) (void)patchcount__remove(pid, id);
  }
};

struct Target {
  Child child{{fixture("stats_target")}};
  bool collect;  // false: the test checks what `hotfix-ctl gc` finds after the target died
  explicit Target(bool collect_on_exit = true) : collect(collect_on_exit) {
    REQUIRE(ask("ready").rfind("ok", 0) == 0);  // exec'd and running: symbols are there
  }
  // Whatever a test left patched dies with the target; gc takes its pins and copies away.
  ~Target() {
    child.signal(SIGKILL);
    child.wait();
    if (collect) (void)patchcount__gc();
  }
  pid_t pid() const { return child.pid(); }
  std::string ask(const std::string& cmd) { return child.request(cmd); }
};

Function function_of(pid_t pid, const std::string& name) {
  auto table = SymbolTable::for_pid(pid);
  REQUIRE(table);
  for (auto& f : table->functions())
    if (f.name == name) return f;
  FAIL("no function " << name << " in pid " << pid);
  return {};
}

// Old-code probes on `names` (indexes 0..), as the engine attaches them after a patch.
size_t attach_old(pid_t pid, uint32_t id, const std::vector<std::string>& names) {
  std::vector<OldCodeExits> exits;
  for (uint32_t i = 0; i < names.size(); ++i) {
    auto e = patchcount__old_exits(pid, function_of(pid, names[i]), i);
    REQUIRE(e);
    exits.push_back(*e);
  }
  auto n = patchcount__attach_old(pid, id, exits);
  REQUIRE(n);
  return *n;
}

PatchHits read_hits(pid_t pid, uint32_t id) {
  auto h = patchcount__read(pid, id);
  REQUIRE(h);
  REQUIRE(h->has_value());
  return **h;
}

uint32_t link_id_of_pin(const std::string& path) {
  int fd = bpf_obj_get(path.c_str());
  REQUIRE(fd >= 0);
  bpf_link_info info{};
  uint32_t len = sizeof info;
  REQUIRE(bpf_obj_get_info_by_fd(fd, &info, &len) == 0);
  ::close(fd);
  return info.id;
}

// A released link's id disappears once the kernel has freed it (possibly deferred).
bool link_gone(uint32_t id) {
  for (int i = 0; i < 200; ++i) {
    int fd = bpf_link_get_fd_by_id(id);
    if (fd < 0) return true;
    ::close(fd);
    std::this_thread::sleep_for(milliseconds(10));
  }
  return false;
}

uint64_t json_u64(const std::string& json, const std::string& key, size_t nth = 0) {
  std::regex re("\"" + key + "\":([0-9]+)");
  auto it = std::sregex_iterator(json.begin(), json.end(), re);
  for (size_t i = 0; i < nth && it != std::sregex_iterator(); ++i) ++it;
  REQUIRE(it != std::sregex_iterator());
  return std::stoull((*it)[1]);
}

// Apply stats_fix.so to the target; returns the patch id (1 for a fresh target).
uint32_t patch(pid_t pid, const std::string& consistency = "strict") {
  auto r = ctl_run({"patch", "--pid", std::to_string(pid), "--lib", fixture("stats_fix.so"), "--consistency", consistency});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  return 1;
}

// `hotfix-ctl patch` creates the counters and attaches the old-code probes itself.
void require_engine_counts(pid_t pid, uint32_t id) {
  auto h = patchcount__read(pid, id);
  REQUIRE(h);
  REQUIRE(h->has_value());
}

}  // namespace

TEST_CASE("exit points: every ret and every jump out of the function, never a jump inside it", "[stats][arch]") {
  // 0: cmp edi,1; 3: je +8 (to 13); 5: jmp rel32 out; 10: ret; 11: jmp short back to 0;
  // 13: jmp [rip+0]; 19: jmp rax; 21: jmp [rax*8+0x1000]; 28: jne far out; 34: ret
  std::vector<uint8_t> code = {0x83, 0xff, 0x01,                    // cmp edi, 1
                               0x74, 0x08,                          // je 13
                               0xe9, 0x00, 0x10, 0x00, 0x00,        // jmp +0x1000 (out)
                               0xc3,                                // ret
                               0xeb, 0xf3,                          // jmp 0 (inside)
                               0xff, 0x25, 0x00, 0x00, 0x00, 0x00,  // jmp [rip+0] (GOT tail call)
                               0xff, 0xe0,                          // jmp rax (unknown)
                               0xff, 0x24, 0xc5, 0x00, 0x10, 0x00, 0x00,  // jmp [rax*8+0x1000] (table)
                               0x0f, 0x85, 0x00, 0x10, 0x00, 0x00,  // jne out (conditional tail call)
                               0xc3};                               // ret
  auto e = arch::exit_points(code, 0x400000);
  CHECK(e.offsets == std::vector<uint64_t>{5, 10, 13, 34});
  CHECK(e.unresolved == 2);
  CHECK(e.decoded_all);
}

TEST_CASE("counters are pinned, mmappable, readable with bpftool, and removed without a trace", "[stats][map]") {
  require_root();
  Target t;
  PinGuard guard{t.pid()};
  auto c = patchcount__create(t.pid(), 7, 3);
  REQUIRE(c);
  CHECK(fs::exists(c->new_hits_path));
  CHECK(fs::exists(c->old_hits_path));
  struct stat st;
  REQUIRE(::stat(c->new_hits_path.c_str(), &st) == 0);
  CHECK(st.st_uid == ::getuid());  // chowned to the target's user: root here

  // Emulate the islands: the same mapping the target will make, one atomic add per call.
  void* mem = ::mmap(nullptr, c->mmap_size(), PROT_READ | PROT_WRITE, MAP_SHARED, c->new_hits.get(), 0);
  REQUIRE(mem != MAP_FAILED);
  auto* slots = static_cast<uint64_t*>(mem);
  for (int i = 0; i < 1234; ++i) __atomic_fetch_add(&slots[1 * PatchCounters::value_stride / 8], 1, __ATOMIC_RELAXED);
  __atomic_fetch_add(&slots[2], 5, __ATOMIC_RELAXED);
  ::munmap(mem, c->mmap_size());
  c->new_hits.reset();
  c->old_hits.reset();

  auto h = read_hits(t.pid(), 7);
  REQUIRE(h.functions.size() == 3);
  CHECK(h.functions[0].new_hits == 0);
  CHECK(h.functions[1].new_hits == 1234);
  CHECK(h.functions[2].new_hits == 5);
  CHECK(h.exit_probes == 0);

  auto dump = run({"/usr/sbin/bpftool", "map", "dump", "pinned", c->new_hits_path, "-j"});
  INFO(dump.out << dump.err);
  REQUIRE(dump.exit_code == 0);
  CHECK(std::regex_search(dump.out, std::regex(R"("key":1,"value":1234)")));

  CHECK_FALSE(patchcount__create(t.pid(), 7, 3));  // one set per patch
  REQUIRE(patchcount__remove(t.pid(), 7));
  CHECK_FALSE(fs::exists(patchcount__dir(t.pid(), 7)));
  CHECK_FALSE(fs::exists(fmt::format("{}/{}", kPinRoot, t.pid())));
  auto none = patchcount__read(t.pid(), 7);
  REQUIRE(none);
  CHECK_FALSE(none->has_value());
}

TEST_CASE("old-code probes count every call exactly once, through rets and tail jumps, after hotfix-ctl is gone",
          "[stats][old]") {
  require_root();
  Target t;
  PinGuard guard{t.pid()};
  REQUIRE(patchcount__create(t.pid(), 3, 2));
  size_t probes = attach_old(t.pid(), 3, {"stats_work", "stats_tail"});
  CHECK(probes == 5);  // stats_work: 3 rets; stats_tail: 2 tail jumps
  uint32_t link = link_id_of_pin(patchcount__dir(t.pid(), 3) + "/old_exits");
  // Nothing here holds the link or the program any more: only the pin keeps them.
  REQUIRE(t.ask("call 1000").rfind("ok", 0) == 0);
  auto h = read_hits(t.pid(), 3);
  CHECK(h.functions[0].old_hits == 1000);
  CHECK(h.functions[1].old_hits == 1000);
  CHECK(h.functions[0].new_hits == 0);
  CHECK(h.exit_probes == 5);
  auto dump = run({"/usr/sbin/bpftool", "map", "dump", "pinned", patchcount__dir(t.pid(), 3) + "/old_hits", "-j"});
  CHECK(std::regex_search(dump.out, std::regex(R"("key":0,"value":1000)")));

  REQUIRE(patchcount__remove(t.pid(), 3));  // unpinning detaches
  CHECK(link_gone(link));
  REQUIRE(t.ask("call 10").rfind("ok", 0) == 0);
  CHECK_FALSE(fs::exists(fmt::format("{}/{}", kPinRoot, t.pid())));
}

TEST_CASE("gc removes the pins and patch files of a process that is gone, and a live one's orphans", "[stats][gc]") {
  require_root();
  auto dead = std::make_unique<Target>(false);
  pid_t dead_pid = dead->pid();
  PinGuard dead_guard{dead_pid};
  Target live;
  PinGuard live_guard{live.pid()};
  REQUIRE(patchcount__create(dead_pid, 1, 2));
  attach_old(dead_pid, 1, {"stats_work", "stats_tail"});
  uint32_t link = link_id_of_pin(patchcount__dir(dead_pid, 1) + "/old_exits");
  REQUIRE(patchcount__create(live.pid(), 1, 1));
  std::string files = fmt::format("{}{}", kPatchDir, dead_pid);
  fs::create_directories(files);
  { std::ofstream(files + "/1-fix.so") << "x"; }

  dead.reset();  // killed and reaped
  auto r = ctl_run({"gc"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.out.find(patchcount__dir(dead_pid, 1)) != std::string::npos);
  CHECK(r.out.find(files) != std::string::npos);
  CHECK_FALSE(fs::exists(fmt::format("{}/{}", kPinRoot, dead_pid)));
  CHECK_FALSE(fs::exists(files));
  CHECK(link_gone(link));
  // No committed patch of the live process stands behind its pins: an orphan, removed too
  // (test_crashpoints "gc keeps the state of a committed patch" shows what it keeps).
  CHECK(r.out.find(patchcount__dir(live.pid(), 1)) != std::string::npos);
  CHECK_FALSE(fs::exists(patchcount__dir(live.pid(), 1)));
  auto again = ctl_run({"gc"});
  CHECK(again.out.find("nothing to remove") != std::string::npos);
}

TEST_CASE("a patched target that exits leaves pins and files that gc removes; nothing else is left", "[stats][gc][e2e]") {
  require_root();
  auto t = std::make_unique<Target>();
  pid_t pid = t->pid();
  PinGuard guard{pid};
  uint32_t id = patch(pid, "entry");
  require_engine_counts(pid, id);
  uint32_t link = link_id_of_pin(patchcount__dir(pid, id) + "/old_exits");
  std::string files = fmt::format("{}{}", kPatchDir, pid);
  CHECK_FALSE(fs::exists(files));  // fix copies live in the target (a memfd), never on disk
  t.reset();
  auto r = ctl_run({"gc"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  CHECK_FALSE(fs::exists(fmt::format("{}/{}", kPinRoot, pid)));
  CHECK_FALSE(fs::exists(files));
  CHECK(link_gone(link));
}

TEST_CASE("a thread inside during an entry-mode patch is counted as an old-code hit; new calls are not",
          "[stats][e2e]") {
  require_root();
  Target t;
  PinGuard guard{t.pid()};
  REQUIRE(t.ask("block") == "ok blocked");
  uint32_t id = patch(t.pid(), "entry");
  require_engine_counts(t.pid(), id);
  REQUIRE(t.ask("release") == "ok released");
  REQUIRE(t.ask("call 500").rfind("ok", 0) == 0);
  auto r = ctl_run({"stats", "--pid", std::to_string(t.pid()), "--json"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(json_u64(r.out, "old_hits", 0) == 1);    // stats_work: the blocked call, finished in the old code
  CHECK(json_u64(r.out, "new_hits", 0) == 500);  // every later call entered the replacement
  CHECK(json_u64(r.out, "old_hits", 1) == 0);    // stats_tail: nobody was inside
  CHECK(json_u64(r.out, "new_hits", 1) == 500);
  auto table = ctl_run({"stats", "--pid", std::to_string(t.pid())});
  CHECK(table.out.find("old hits: uprobe on returns of the old code") != std::string::npos);
}

TEST_CASE("stats shows exactly N new-code hits of a patched function", "[stats][e2e]") {
  require_root();
  Target t;
  PinGuard guard{t.pid()};
  uint32_t id = patch(t.pid());
  require_engine_counts(t.pid(), id);
  REQUIRE(t.ask("call 777").rfind("ok", 0) == 0);
  auto r = ctl_run({"stats", "--pid", std::to_string(t.pid()), "--json"});
  INFO(r.out << r.err);
  CHECK(json_u64(r.out, "new_hits", 0) == 777);
  CHECK(json_u64(r.out, "new_hits", 1) == 777);
  auto prom = ctl_run({"stats", "--pid", std::to_string(t.pid()), "--prometheus"});
  CHECK(prom.out.find(fmt::format("hotfix_new_hits_total{{pid=\"{}\",patch=\"{}\",function=\"stats_work\"}} 777", t.pid(), id)) !=
        std::string::npos);
  auto rev = ctl_run({"revert", "--pid", std::to_string(t.pid()), "--id", std::to_string(id)});
  REQUIRE(rev.exit_code == 0);
  CHECK_FALSE(fs::exists(patchcount__dir(t.pid(), id)));
}

TEST_CASE("stats --json and --prometheus show the pinned counts of a patch", "[stats][cli]") {
  require_root();
  Target t;
  PinGuard guard{t.pid()};
  uint32_t id = patch(t.pid());
  REQUIRE(t.ask("call 42").rfind("ok", 0) == 0);
  std::string pid = std::to_string(t.pid());
  auto j = ctl_run({"stats", "--pid", pid, "--json"});
  INFO(j.out << j.err);
  REQUIRE(j.exit_code == 0);
  CHECK(j.out.rfind(fmt::format("{{\"pid\":{},", pid), 0) == 0);
  CHECK(json_u64(j.out, "new_hits") == 42);
  auto p = ctl_run({"stats", "--pid", pid, "--prometheus"});
  INFO(p.out);
  CHECK(p.out.find("# TYPE hotfix_new_hits_total counter") != std::string::npos);
  CHECK(p.out.find(fmt::format("hotfix_new_hits_total{{pid=\"{}\",patch=\"{}\",function=\"stats_work\"}} 42", pid, id)) !=
        std::string::npos);
  CHECK(p.out.find("# TYPE hotfix_old_hits_total counter") != std::string::npos);
  auto tbl = ctl_run({"stats", "--pid", pid, "--interval", "0.2", "--duration", "0.5"});
  CHECK(tbl.exit_code == 0);
  CHECK(tbl.out.find("rates per second over the last") != std::string::npos);
}

TEST_CASE("stats --callers names each caller of the replacement with its exact count", "[stats][callers]") {
  require_root();
  Target t;
  PinGuard guard{t.pid()};
  patch(t.pid());
  Child stats({ctl(), "stats", "--pid", std::to_string(t.pid()), "--callers", "--duration", "2", "--json"});
  auto line = stats.read_stderr_line();
  REQUIRE(line);
  REQUIRE(line->find("sampling callers") != std::string::npos);
  REQUIRE(t.ask("callers 30 10").rfind("ok", 0) == 0);
  REQUIRE(stats.wait(seconds(30)) == 0);
  std::string out = stats.drain_stdout();
  INFO(out);
  CHECK(std::regex_search(out, std::regex(R"("count":30,"frames":\["caller_a\+0x[0-9a-f]+")")));
  CHECK(std::regex_search(out, std::regex(R"("count":10,"frames":\["caller_b\+0x[0-9a-f]+")")));
}

TEST_CASE("stats refuses clearly: usage, no such pid, no such patch", "[stats][cli]") {
  require_root();
  CHECK(ctl_run({"stats"}).exit_code == 2);
  CHECK(ctl_run({"stats", "--pid", "1", "--json", "--prometheus"}).exit_code == 2);
  CHECK(ctl_run({"stats", "--pid", "1", "--interval", "-1"}).exit_code == 2);
  auto gone = ctl_run({"stats", "--pid", "999999"});
  CHECK(gone.exit_code == 1);
  CHECK(gone.err.find("999999") != std::string::npos);
  Target t;
  PinGuard guard{t.pid()};
  auto none = ctl_run({"stats", "--pid", std::to_string(t.pid()), "--id", "9"});
  CHECK(none.exit_code == 1);
  CHECK(none.err.find("no patch 9") != std::string::npos);
  auto empty = ctl_run({"stats", "--pid", std::to_string(t.pid())});
  CHECK(empty.exit_code == 0);
  CHECK(empty.out.find("no active patches") != std::string::npos);
}
