// The preserving island (patch/preserve.hpp), on pres_target: hand-written callers that keep
// values in rcx and xmm2 across a call (as GCC's -fipa-ra lets a caller do), and plain fixes
// (gcc -O2 -g -shared -fPIC) that change both. Through the library API: patch__prepare, then
// switches[i].preserve set here (the ABI call-site check computes it in the product), then
// patch__apply.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <regex>
#include <thread>

#include "arch/arch.hpp"
#include "patch/engine.hpp"
#include "patch/preserve.hpp"
#include "observe/patchcount.hpp"
#include "process/maps.hpp"
#include "support/harness.hpp"
#include "symbols/symbols.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t kRcx = 1ull << 1, kRax = 1ull << 0, kXmm2 = 1ull << (9 + 2);

struct Stats {
  long old_ok = 0, new_ok = 0, wrong = 0, caught = 0;
};

struct Target {
  Child child{{fixture("pres_target"), "3"}};
  Target() { REQUIRE(child.wait_for("ready")); }
  ~Target() {
    if (child.running()) child.signal(SIGKILL);
    (void)run({ctl(), "gc"}, 20s);
  }
  pid_t pid() const { return child.pid(); }
  Stats stats() {
    auto line = child.request("stats");
    Stats s;
    REQUIRE(std::sscanf(line.c_str(), "ok old=%ld new=%ld wrong=%ld caught=%ld", &s.old_ok, &s.new_ok, &s.wrong,
                        &s.caught) == 4);
    return s;
  }
  void reset() { REQUIRE(child.request("reset") == "ok"); }
  // Let the workers run until `done` says so (or 10 s); the last stats.
  template <typename F>
  Stats run_until(F done) {
    Stats s;
    for (int i = 0; i < 200; ++i) {
      std::this_thread::sleep_for(50ms);
      s = stats();
      if (done(s)) break;
    }
    return s;
  }
};

PatchOptions options(pid_t pid, const std::string& fix, const std::string& pattern, bool count) {
  PatchOptions o;
  o.pid = pid;
  o.library = fixture(fix);
  o.patterns = {pattern};
  o.count = count;
  o.abi_check = false;  // the call-site check (another part of the product) would set preserve itself
  o.observe = 0ms;
  o.timeout = 5s;
  return o;
}

// Prepare, set the registers to keep, apply. Returns the applied patch's id.
uint32_t apply(pid_t pid, const std::string& fix, const std::string& pattern, uint64_t preserve, bool count = true) {
  auto prepared = patch__prepare(options(pid, fix, pattern, count));
  INFO((prepared ? "" : prepared.error().line()));
  REQUIRE(prepared);
  REQUIRE(prepared->switches.size() == 1);
  auto& s = prepared->switches[0];
  s.preserve = preserve;
  if (preserve) {
    std::string why;
    bool supported = preserve__supported(s, why);
    INFO(why);
    REQUIRE(supported);
  }
  std::vector<std::string> notes;
  auto out = patch__apply(*prepared, [&](const ProgressEvent& e) { notes.push_back(progress_event__describe(e)); });
  INFO((out ? "" : out.error().line()));
  REQUIRE(out);
  REQUIRE(out->functions.size() == 1);
  CHECK(out->functions[0].preserve == preserve);
  if (preserve) CHECK(out->functions[0].island != 0);
  return out->id;
}

std::vector<RevertOutcome> revert(pid_t pid, std::optional<uint32_t> id, Consistency c = Consistency::strict,
                                  std::chrono::milliseconds timeout = 5s) {
  RevertOptions o;
  o.pid = pid;
  if (id) o.ids = {*id};
  else o.all = true;
  o.consistency = c;
  o.timeout = timeout;
  auto out = patch__revert(o, [](const ProgressEvent&) {});
  INFO((out ? "" : out.error().line()));
  REQUIRE(out);
  return *out;
}

const Function& function_named(const SymbolTable& t, const std::string& name) {
  for (auto& f : t.functions())
    if (f.name == name || f.name.starts_with(name + "(")) return f;
  FAIL("no function " << name);
  return t.functions().front();
}

PlannedSwitch switch_for(const SymbolTable& t, const std::string& name, uint64_t preserve) {
  PlannedSwitch s;
  s.entry.target = function_named(t, name);
  s.preserve = preserve;
  return s;
}

uint64_t entry_of(pid_t pid, const std::string& name) {
  auto table = SymbolTable::for_pid(pid);
  REQUIRE(table);
  return function_named(*table, name).address;
}

bool mapped(pid_t pid, uint64_t page) {
  auto maps = process__read_maps(pid);
  REQUIRE(maps);
  for (auto& m : *maps)
    if (m.start <= page && page < m.end) return true;
  return false;
}

}  // namespace

TEST_CASE("the preserving island: its code keeps the registers and the ABI", "[preserve]") {
  auto island = arch::encode_preserving_island(0x10000, kRcx | kXmm2, 0x20000);
  auto text = arch::disassemble(std::span(island.bytes.data(), island.code_size), 0x10000, 32);
  INFO(text);
  CHECK(text.find("push rbp") != std::string::npos);
  CHECK(text.find("rcx") != std::string::npos);
  CHECK(text.find("xmm2") != std::string::npos);
  CHECK(text.find("call qword ptr [rip") != std::string::npos);
  CHECK(text.find("leave") != std::string::npos);
  // Nothing before the call writes an argument register: only rbp, rsp and the stores.
  CHECK(text.substr(0, text.find("call")).find("mov rcx") == std::string::npos);
  CHECK(island.unwind_offset % 8 == 0);
  CHECK(island.bytes.size() == arch::preserving_island_size(kRcx | kXmm2));
  CHECK(arch::preserving_island_size(arch::preservable_registers()) < 1024);
}

TEST_CASE("preserve__supported decides from the function's DWARF", "[preserve]") {
  auto table = SymbolTable::for_file(fixture("pres_target"));
  REQUIRE(table);
  std::string why;
  CHECK(preserve__supported(switch_for(*table, "pres_add", kRcx | kXmm2), why));
  CHECK(preserve__supported(switch_for(*table, "pres_nothing", kRax | kRcx), why));  // void: rax may be kept
  CHECK_FALSE(preserve__supported(switch_for(*table, "pres_many", kRcx), why));
  CHECK(why.find("on the stack") != std::string::npos);
  CHECK_FALSE(preserve__supported(switch_for(*table, "pres_by_value", kRcx), why));
  CHECK(why.find("32-byte aggregate") != std::string::npos);
  CHECK_FALSE(preserve__supported(switch_for(*table, "pres_wide", kRcx), why));
  CHECK(why.find("long double") != std::string::npos);
  CHECK_FALSE(preserve__supported(switch_for(*table, "pres_add", kRax | kRcx), why));
  CHECK(why.find("returns a value") != std::string::npos);

  // Without DWARF: refused, saying how to get it.
  auto dir = std::filesystem::temp_directory_path() / fmt::format("hotfix-preserve-{}", getpid());
  std::filesystem::create_directories(dir);
  auto stripped = (dir / "pres_target").string();
  auto r = run({"/usr/bin/objcopy", "--strip-debug", fixture("pres_target"), stripped});
  REQUIRE(r.exit_code == 0);
  auto bare = SymbolTable::for_file(stripped);
  REQUIRE(bare);
  auto s = switch_for(*bare, "pres_add", kRcx);
  s.entry.target.object = stripped;
  ::setenv("HOTFIX_DEBUG_ROOT", dir.c_str(), 1);  // no separate debug file there either
  CHECK_FALSE(preserve__supported(s, why));
  ::unsetenv("HOTFIX_DEBUG_ROOT");
  CHECK(why.find("no DWARF") != std::string::npos);
  CHECK(why.find("-g") != std::string::npos);
  std::filesystem::remove_all(dir);
}

TEST_CASE("without the island, the fix breaks the -fipa-ra caller (teeth)", "[preserve][process]") {
  require_root();
  Target t;
  uint32_t id = apply(t.pid(), "pres_fix.so", "pres_add", 0, false);
  t.reset();
  auto s = t.run_until([](const Stats& s) { return s.wrong > 0 && s.new_ok + s.wrong > 1000; });
  CHECK(s.wrong > 0);  // rcx and xmm2 changed under the caller: its results are wrong
  revert(t.pid(), id);
}

TEST_CASE("the island keeps rcx and xmm2 for the caller, counts, and reverts", "[preserve][process]") {
  require_root();
  Target t;
  uint64_t entry = entry_of(t.pid(), "pres_add");
  auto original = file_bytes(t.pid(), entry, arch::entry_jump_size());
  REQUIRE(read_memory(t.pid(), entry, original.size()) == original);
  uint32_t id = apply(t.pid(), "pres_fix.so", "pres_add", kRcx | kXmm2, true);
  t.reset();
  auto s = t.run_until([](const Stats& s) { return s.new_ok > 200000; });
  INFO("old " << s.old_ok << " new " << s.new_ok << " wrong " << s.wrong);
  CHECK(s.new_ok > 200000);  // new calls run the fix, under load on 3 threads
  CHECK(s.wrong == 0);       // and every caller's result is right
  CHECK(s.old_ok == 0);

  auto hits = patchcount__read(t.pid(), id);
  REQUIRE(hits);
  REQUIRE(*hits);
  REQUIRE((*hits)->functions.size() == 1);
  CHECK((*hits)->functions[0].new_hits >= static_cast<uint64_t>(s.new_ok));  // the counting island still counts

  auto registry = registry__read(t.pid());
  REQUIRE(registry);
  auto* record = registry->find(id);
  REQUIRE(record);
  uint64_t island_page = record->functions[0].island & ~0xfffull;
  CHECK(record->functions[0].preserve == (kRcx | kXmm2));
  CHECK(record->functions[0].frame != 0);  // pres_target is C++: its libgcc_s unwinder knows the island
  auto out = revert(t.pid(), id);
  REQUIRE(out.size() == 1);
  CHECK(out[0].released);
  CHECK(read_memory(t.pid(), entry, original.size()) == original);  // the bytes are back
  CHECK_FALSE(mapped(t.pid(), island_page));
  t.reset();
  s = t.run_until([](const Stats& s) { return s.old_ok > 1000; });
  CHECK(s.wrong == 0);
  CHECK(s.new_ok == 0);
  CHECK(t.child.request("throw") == "ok caught");
}

TEST_CASE("a C++ exception thrown in the replacement unwinds through the island", "[preserve][process]") {
  require_root();
  Target t;
  uint32_t id = apply(t.pid(), "pres_fix_throw.so", "pres_throwing", kRcx | kXmm2, true);
  auto registry = registry__read(t.pid());
  REQUIRE(registry);
  REQUIRE(registry->find(id));
  CHECK(registry->find(id)->functions[0].frame != 0);  // registered with the target's libgcc_s
  t.reset();
  auto s = t.run_until([](const Stats& s) { return s.caught > 10000; });
  CHECK(s.caught > 10000);  // thrown in fix.so, through the island, caught in pres_catcher
  CHECK(s.wrong == 0);
  CHECK(t.child.running());
  // Entry consistency: the workers are always somewhere in the fix's throw.
  auto out = revert(t.pid(), id, Consistency::entry);
  REQUIRE(out.size() == 1);
  INFO(out[0].held_by);
  CHECK(out[0].released);  // deregistered, then unmapped
  INFO(out[0].note);
  CHECK(out[0].note.find("stays mapped") == std::string::npos);
  // The unwinder holds nothing stale: exceptions of the target still work, and none is new.
  CHECK(t.child.request("throw") == "ok caught");
  t.reset();
  s = t.run_until([](const Stats& s) { return s.old_ok > 1000; });
  CHECK(s.caught == 0);
  CHECK(s.wrong == 0);
}

TEST_CASE("a thread returning through the island holds strict revert and release", "[preserve][process]") {
  require_root();
  Target t;
  uint32_t id = apply(t.pid(), "pres_fix_wait.so", "pres_wait", kRcx | kXmm2, false);
  auto registry = registry__read(t.pid());
  REQUIRE(registry);
  uint64_t island_page = registry->find(id)->functions[0].island & ~0xfffull;
  // The replacement tail-calls usleep: while it sleeps, its return address is in the island.
  // Long enough that it is still asleep after both reverts below on a loaded machine.
  REQUIRE(t.child.request("wait 12000000 21") == "ok");
  std::this_thread::sleep_for(300ms);
  REQUIRE(t.child.request("waited") == "ok waited=none");

  RevertOptions strict;
  strict.pid = t.pid();
  strict.ids = {id};
  strict.timeout = 400ms;
  auto refused = patch__revert(strict, [](const ProgressEvent&) {});
  REQUIRE_FALSE(refused);  // strict: a thread will return into the island
  INFO(refused.error().line());
  CHECK(refused.error().line().find("island") != std::string::npos);
  auto entry = revert(t.pid(), id, Consistency::entry);
  REQUIRE(entry.size() == 1);
  CHECK_FALSE(entry[0].released);
  INFO(entry[0].held_by);
  CHECK(entry[0].held_by.find("island") != std::string::npos);
  CHECK(mapped(t.pid(), island_page));
  REQUIRE(t.child.request("waited") == "ok waited=none");  // it was inside all along

  std::string waited;
  for (int i = 0; i < 400 && (waited = t.child.request("waited")) == "ok waited=none"; ++i)
    std::this_thread::sleep_for(50ms);
  CHECK(waited == "ok waited=42 right=1");  // back through the island, rcx and xmm2 intact
  auto released = revert(t.pid(), std::nullopt);
  CHECK(!mapped(t.pid(), island_page));
  CHECK(t.child.running());
}

TEST_CASE("a refused patch deregisters the island's unwind information and unmaps it", "[preserve][process]") {
  require_root();
  Target t;
  auto islands = [&] {  // anonymous executable mappings: where islands live
    std::set<std::string> out;
    for (auto& l : lines_of(read_file(fmt::format("/proc/{}/maps", t.pid()))))
      if (l.find(" r-xp 00000000 00:00 0") != std::string::npos) out.insert(l);
    return out;
  };
  uint64_t entry = entry_of(t.pid(), "pres_wait");
  auto text = read_memory(t.pid(), entry, 16);
  auto before = islands();
  // A thread inside the old pres_wait for the whole strict timeout: the switch is refused
  // after the island was written and its frame registered.
  REQUIRE(t.child.request("wait 4000000 3") == "ok");
  std::this_thread::sleep_for(200ms);
  auto opts = options(t.pid(), "pres_fix_wait.so", "pres_wait", true);
  opts.timeout = 500ms;
  auto prepared = patch__prepare(opts);
  REQUIRE(prepared);
  prepared->switches[0].preserve = kRcx | kXmm2;
  auto out = patch__apply(*prepared, [](const ProgressEvent&) {});
  REQUIRE_FALSE(out);
  INFO(out.error().line());
  CHECK(out.error().line().find("nothing was changed") != std::string::npos);
  CHECK(prepared->switches[0].frame != 0);  // it had been registered
  CHECK(read_memory(t.pid(), entry, 16) == text);
  CHECK(islands() == before);  // deregistered, then unmapped
  CHECK(t.child.request("throw") == "ok caught");  // libgcc holds nothing stale
  std::string waited;
  for (int i = 0; i < 200 && (waited = t.child.request("waited")) == "ok waited=none"; ++i)
    std::this_thread::sleep_for(50ms);
  // It ran the old pres_wait, whose usleep changes rcx and xmm2 under this hand-written
  // caller (only the island keeps them): that it came back is what counts here.
  CHECK(waited.starts_with("ok waited="));
  CHECK(waited != "ok waited=none");
}

TEST_CASE("patch__apply refuses a preserve set the island cannot keep, changing nothing", "[preserve][process]") {
  require_root();
  Target t;
  uint64_t entry = entry_of(t.pid(), "pres_add");
  auto text = read_memory(t.pid(), entry, 16);
  auto maps = file_mappings(t.pid());
  auto prepared = patch__prepare(options(t.pid(), "pres_fix.so", "pres_add", true));
  REQUIRE(prepared);
  prepared->switches[0].preserve = kRax | kRcx;  // rax holds pres_add's result
  auto out = patch__apply(*prepared, [](const ProgressEvent&) {});
  REQUIRE_FALSE(out);
  INFO(out.error().line());
  CHECK(out.error().line().find("returns a value") != std::string::npos);
  CHECK(read_memory(t.pid(), entry, 16) == text);
  CHECK(file_mappings(t.pid()) == maps);  // fix.so was never loaded
  auto s = t.run_until([](const Stats& s) { return s.old_ok > 1000; });
  CHECK(s.wrong == 0);
}

// Run by the test below in a fresh process (crash points read their variables once): apply
// pres_fix_throw.so with a preserving island to $PRES_PID.
TEST_CASE("preserve crash child", "[.preserve-crash-child]") {
  pid_t pid = static_cast<pid_t>(std::atol(std::getenv("PRES_PID")));
  auto prepared = patch__prepare(options(pid, "pres_fix_throw.so", "pres_throwing", true));
  REQUIRE(prepared);
  prepared->switches[0].preserve = kRcx | kXmm2;
  REQUIRE(patch__apply(*prepared, [](const ProgressEvent&) {}));
}

TEST_CASE("killed after registering the island's frame: recovery keeps its page", "[preserve][process][crash]") {
  require_root();
  Target t;
  auto islands = [&] {
    std::set<std::string> out;
    for (auto& l : lines_of(read_file(fmt::format("/proc/{}/maps", t.pid()))))
      if (l.find(" r-xp 00000000 00:00 0") != std::string::npos) out.insert(l);
    return out;
  };
  uint64_t entry = entry_of(t.pid(), "pres_throwing");
  auto text = read_memory(t.pid(), entry, 16);
  auto child = [&](const std::string& var, const std::string& value) {
    ::setenv("PRES_PID", std::to_string(t.pid()).c_str(), 1);
    ::setenv(var.c_str(), value.c_str(), 1);
    auto r = run({"/proc/self/exe", "[.preserve-crash-child]"}, 60s);
    ::unsetenv(var.c_str());
    return r;
  };
  // Where the kill lands: the first crash point after the registration, counted on a second
  // run (the first one also creates the registry, which adds points).
  int k = 0;
  for (int run_no = 0; run_no < 2; ++run_no) {
    auto listed = child("HOTFIX_CRASH_LIST", "1");
    std::smatch m;
    REQUIRE(std::regex_search(listed.err, m, std::regex("crashpoint ([0-9]+) patch: before frame registration")));
    k = std::stoi(m[1]) + 1;
    auto reverted = revert(t.pid(), std::nullopt, Consistency::entry);  // the workers are always throwing
    for (int i = 0; i < 50 && !reverted.empty() && !reverted.back().released; ++i) {
      std::this_thread::sleep_for(100ms);
      reverted = revert(t.pid(), std::nullopt, Consistency::entry);  // gives back held memory
    }
  }
  auto before = islands();
  auto killed = child("HOTFIX_CRASH_AT", std::to_string(k));
  CHECK(killed.exit_code == 128 + SIGKILL);
  // The next hotfix-ctl recovers: the text is as it was, the page with the frame stays.
  auto r = run({ctl(), "revert", "--pid", std::to_string(t.pid()), "--all", "--consistency", "entry"});
  INFO(r.out << r.err);
  CHECK(r.err.find("recovered an interrupted") != std::string::npos);
  CHECK(r.err.find("kept") != std::string::npos);
  CHECK(read_memory(t.pid(), entry, 16) == text);
  auto after = islands();
  CHECK(after.size() == before.size() + 1);
  CHECK(t.child.request("throw") == "ok caught");  // libgcc reads only mapped memory
  t.reset();
  auto s = t.run_until([](const Stats& s) { return s.old_ok > 1000; });
  CHECK(s.wrong == 0);
  CHECK(s.caught == 0);
}
