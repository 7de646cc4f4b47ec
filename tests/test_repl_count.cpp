// New-code hits counted at the replacement's own entry (patch/apply.cpp,
// write_replacement_trampoline): a fix whose new outer() calls its own inner() and, through a
// pointer taken inside fix.so, its own viaptr() -- calls that never pass the target's entry
// jumps -- still counts every one of them, exactly. Revert and a killed hotfix-ctl leave the
// target's text as the file has it.
#include <signal.h>

#include <catch2/catch.hpp>
#include <map>
#include <string>
#include <vector>

#include "observe/patchcount.hpp"
#include "support/harness.hpp"
#include "symbols/pattern.hpp"
#include "symbols/symbols.hpp"

using namespace hotfix::test;
using namespace std::chrono;

namespace {

struct Target {
  Child child{{fixture("repl_target")}};
  pid_t pid = child.pid();
  std::map<std::string, uint64_t> entry;
  std::map<std::string, std::vector<unsigned char>> original;
  Target() {
    REQUIRE(child.request("ready").rfind("ok ", 0) == 0);
    auto table = hotfix::SymbolTable::for_pid(pid);
    REQUIRE(table);
    for (const char* name : {"outer", "inner", "viaptr"}) {
      auto found = hotfix::symbols__select(*table, {name});
      REQUIRE(found);
      REQUIRE(found->size() == 1);
      entry[name] = found->front().address;
      original[name] = file_bytes(pid, entry[name], 16);
      REQUIRE(original[name].size() == 16);
    }
  }
  std::vector<std::string> patch_args() const {
    return {"patch", "--pid", std::to_string(pid), "--lib", fixture("repl_fix.so"), "--observe", "0"};
  }
  // The target's text at every patched entry is the file's again.
  void expect_text_restored() {
    for (auto& [name, addr] : entry) {
      INFO(name);
      CHECK(read_memory(pid, addr, 16) == original[name]);
    }
  }
  hotfix::PatchHits hits(uint32_t id) {
    auto h = hotfix::patchcount__read(pid, id);
    REQUIRE(h);
    REQUIRE(h->has_value());
    return **h;
  }
};

uint64_t new_hits(const hotfix::PatchHits& h, size_t function) {
  REQUIRE(function < h.functions.size());
  return h.functions[function].new_hits;
}

}  // namespace

TEST_CASE("calls between replacements and through pointers taken in fix.so are counted exactly") {
  require_root();
  Target t;
  REQUIRE(t.child.request("outer 3") == "ok 134");  // old: 3*10+1 + 3+100
  auto r = ctl_run(t.patch_args());
  INFO("patch: " << r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.err.find("are not counted") == std::string::npos);
  REQUIRE(t.child.request("outer 3") == "ok 1035");  // new: 3*10+2 + 3+1000

  // 1,000 more calls of outer from the target; each makes one call of inner (PLT) and one of
  // viaptr (pointer) inside fix.so.
  REQUIRE(t.child.request("loop 1000 3") == "ok 1035000");
  auto list = ctl_run({"list", "--pid", std::to_string(t.pid), "--json"});
  INFO("list: " << list.out << list.err);
  REQUIRE(list.exit_code == 0);
  auto h = t.hits(1);
  REQUIRE(h.functions.size() == 3);
  // Function order is the plan's; find each by its record through stats --json.
  auto stats = ctl_run({"stats", "--pid", std::to_string(t.pid), "--json"});
  INFO("stats: " << stats.out << stats.err);
  REQUIRE(stats.exit_code == 0);
  for (const char* name : {"outer", "inner", "viaptr"}) {
    INFO(name);
    auto at = stats.out.find(std::string("\"name\":\"") + name + "\"");
    REQUIRE(at != std::string::npos);
    auto hits_at = stats.out.find("\"new_hits\":", at);
    REQUIRE(hits_at != std::string::npos);
    CHECK(std::stoull(stats.out.substr(hits_at + 11)) == 1001);
  }
  // A direct call from the target into a replacement is counted once, not twice (no island
  // counts it as well).
  REQUIRE(t.child.request("inner 3") == "ok 32");
  uint64_t total = 0;
  for (size_t i = 0; i < 3; ++i) total += new_hits(t.hits(1), i);
  CHECK(total == 3 * 1001 + 1);

  // Callers can still be sampled: the uprobe goes past the trampoline's jump.
  auto callers = ctl_run({"stats", "--pid", std::to_string(t.pid), "--callers", "--duration", "0.3"});
  INFO("callers: " << callers.out << callers.err);
  CHECK(callers.exit_code == 0);
  REQUIRE(t.child.request("outer 3") == "ok 1035");  // the target survived the sampling

  auto rv = ctl_run({"revert", "--pid", std::to_string(t.pid), "--all"});
  INFO("revert: " << rv.out << rv.err);
  REQUIRE(rv.exit_code == 0);
  REQUIRE(t.child.request("outer 3") == "ok 134");
  t.expect_text_restored();
}

TEST_CASE("a hotfix-ctl killed right after writing a trampoline leaves the target as it was") {
  require_root();
  Target t;
  auto listed = ctl_run(t.patch_args(), "HOTFIX_CRASH_LIST=1");
  REQUIRE(listed.exit_code == 0);
  int k = 0;
  for (auto& line : lines_of(listed.err))
    if (line.find("patch: trampoline written") != std::string::npos) {
      k = std::stoi(line.substr(line.find(' ') + 1));
      break;
    }
  INFO(listed.err);
  REQUIRE(k > 0);
  REQUIRE(ctl_run({"revert", "--pid", std::to_string(t.pid), "--all"}).exit_code == 0);
  REQUIRE(t.child.request("outer 3") == "ok 134");

  auto killed = ctl_run(t.patch_args(), "HOTFIX_CRASH_AT=" + std::to_string(k));
  CHECK(killed.exit_code == 128 + SIGKILL);
  REQUIRE(t.child.request("outer 3") == "ok 134");  // no jump was written: the old code runs
  auto rec = ctl_run({"recover", "--pid", std::to_string(t.pid)});
  INFO("recover: " << rec.out << rec.err);
  CHECK(rec.exit_code == 0);
  t.expect_text_restored();
  CHECK(status_field(t.pid, "TracerPid") == 0);
  REQUIRE(t.child.request("outer 3") == "ok 134");
  // And a patch after recovery works and counts as before.
  auto again = ctl_run(t.patch_args());
  INFO("patch again: " << again.out << again.err);
  REQUIRE(again.exit_code == 0);
  REQUIRE(t.child.request("loop 10 3") == "ok 10350");
}
