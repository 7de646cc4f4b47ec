// The overhead budget (observe/budget.hpp): the decision on its own, Watch::reduce on a real
// process (counts stay exact for what is kept), and default `hotfix-ctl watch` on a function
// called millions of times a second: it moves to a counting trampoline with one line (with
// --count uprobe; by default it has one from the start), the target goes on.
#include <signal.h>

#include <catch2/catch.hpp>

#include "observe/budget.hpp"
#include "observe/watch.hpp"
#include "support/harness.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace std::chrono_literals;

namespace {

const ProbeCost kCost{.entry_ns = 1000, .return_ns = 1000};  // 1 us each: 10k calls/s = 1% of a CPU

unsigned long progress_of(Child& c) {
  auto reply = c.request("progress");
  REQUIRE(reply.rfind("ok ", 0) == 0);
  return std::stoul(reply.substr(3));
}

// The "calls" value of `name`'s row in one JSON report line ("" if absent).
std::string interval_calls(const std::string& line, const std::string& name) {
  auto at = line.find("\"mangled\":\"" + name + "\"");
  if (at == std::string::npos) return {};
  auto c = line.find("\"calls\":", at);
  return line.substr(c + 8, line.find_first_of(",}", c) - c - 8);
}

}  // namespace

TEST_CASE("the budget cuts the hottest function first, return probe before entry probe") {
  std::vector<FunctionLoad> load{{"hot", 50000, ProbeState::entry_and_return},  // 10%
                                 {"warm", 1500, ProbeState::entry_and_return},  // 0.3%
                                 {"cold", 10, ProbeState::entry_and_return}};
  auto d = budget__decide(load, kCost, 2.0);
  CHECK(d.before_pct == Approx(10.302));
  CHECK(d.actions[0] == BudgetAction::drop);  // 5% with the entry probe alone: still too much
  CHECK(d.actions[1] == BudgetAction::keep);
  CHECK(d.actions[2] == BudgetAction::keep);
  CHECK(d.after_pct <= 2.0);
  auto line = budget__line(load, d, kCost, 2.0);
  CHECK(line.find("dropped the probes of hot") != std::string::npos);
  CHECK(line.find('\n') == std::string::npos);

  // 1.5%+ with returns: only the return probe goes, the count stays.
  std::vector<FunctionLoad> mild{{"mild", 15000, ProbeState::entry_and_return}};
  auto m = budget__decide(mild, kCost, 2.0);
  CHECK(m.actions[0] == BudgetAction::drop_return);
  CHECK(budget__line(mild, m, kCost, 2.0).find("return probes (still counted) of mild") != std::string::npos);

  // With trampolines plugged in, a hot function moves instead of being dropped.
  ProbeCost with_tramp = kCost;
  with_tramp.trampoline_ns = 5;
  auto t = budget__decide(load, with_tramp, 2.0);
  CHECK(t.actions[0] == BudgetAction::move_to_trampoline);

  // Within budget: nothing changes, no line.
  auto none = budget__decide(load, kCost, 100.0);
  CHECK(!none.changed());
  CHECK(budget__line(load, none, kCost, 100.0).empty());
}

TEST_CASE("the measured probe cost is positive and cached for the boot") {
  require_root();
  auto c = probe_cost__measured();
  REQUIRE(c);
  CHECK(c->entry_ns > 0);
  CHECK(c->return_ns > 0);
  auto again = probe_cost__measured();
  REQUIRE(again);
  CHECK(again->cached);
  CHECK(again->entry_ns == Approx(c->entry_ns).epsilon(1e-3));
}

TEST_CASE("Watch::reduce drops a return probe or a whole function and keeps the rest exact") {
  require_root();
  Child calls{{fixture("calls")}};
  REQUIRE(calls.request("ready").rfind("ok", 0) == 0);
  auto table = SymbolTable::for_pid(calls.pid());
  REQUIRE(table);
  auto fns = symbols__select(*table, {"c_add", "scale(int)", "pricing::discount"});
  REQUIRE(fns);
  REQUIRE(fns->size() == 3);
  auto watch = Watch::attach(calls.pid(), *fns, WatchOptions{.returns = true});
  REQUIRE(watch);
  auto index = [&](const std::string& name) {
    for (size_t i = 0; i < watch->functions().size(); ++i)
      if (watch->functions()[i].name.find(name) == 0) return i;
    FAIL("no " << name);
    return size_t{0};
  };
  size_t add = index("c_add"), scale = index("scale"), discount = index("pricing::discount");
  auto call = [&](const std::string& name, long n) {
    REQUIRE(calls.request(fmt::format("call {} {}", name, n)).rfind("ok", 0) == 0);
  };
  call("c_add", 100), call("scale(int)", 50), call("pricing::discount", 20);
  std::vector<ProbeCut> cuts(3, ProbeCut::keep);
  cuts[add] = ProbeCut::drop_return;
  cuts[scale] = ProbeCut::drop;
  REQUIRE(watch->reduce(cuts));
  CHECK(watch->return_probes(add) == ReturnProbes::budget);
  CHECK(!watch->observed(scale));
  CHECK(watch->observed(add));
  call("c_add", 7), call("scale(int)", 9), call("pricing::discount", 3);
  auto counts = watch->read();
  REQUIRE(counts);
  CHECK((*counts)[add].calls == 107);        // still counted after its return probe went
  CHECK((*counts)[scale].calls == 50);       // frozen: no probe any more
  CHECK((*counts)[discount].calls == 23);    // untouched
  CHECK((*counts)[discount].returns == 23);  // its return probe still there
  watch->detach();
  REQUIRE(calls.request("quit").rfind("ok", 0) == 0);
}

TEST_CASE("watch by uprobes moves a very hot function to a trampoline in one line; the target keeps going") {
  require_root();
  Child spin{{fixture("budget_spin")}};
  REQUIRE(spin.request("ready").rfind("ok", 0) == 0);
  auto table = SymbolTable::for_pid(spin.pid());
  REQUIRE(table);
  auto hot = symbols__select(*table, {"spin_hot"});
  REQUIRE(hot);
  REQUIRE(hot->size() == 1);
  uint64_t entry = hot->front().address;
  Child watch{{ctl(), "watch", "--pid", std::to_string(spin.pid()), "spin_hot", "spin_cold", "--json", "--interval",
               "0.3", "--count", "uprobe"}};  // the budget is the uprobes'; trampolines cost a few ns
  // Lines on stderr until the budget's note (notes and the banner come first).
  std::string err, budget_line;
  for (int i = 0; i < 20 && budget_line.empty(); ++i) {
    auto line = watch.read_stderr_line(30s);
    if (!line) break;
    err += *line + "\n";
    if (line->find("overhead budget") != std::string::npos) budget_line = *line;
  }
  INFO(err);
  REQUIRE(!budget_line.empty());
  CHECK(budget_line.find("moved to trampoline counting spin_hot") != std::string::npos);
  CHECK(budget_line.find("spin_cold") == std::string::npos);

  // The target's own progress goes on, and the watch still counts spin_hot (by its trampoline:
  // the jump is at its entry) and spin_cold (by uprobe).
  auto before = progress_of(spin);
  std::string reports;
  for (int i = 0; i < 4; ++i) {
    auto line = watch.read_line(10s);
    REQUIRE(line);
    reports += *line + "\n";
  }
  CHECK(progress_of(spin) > before);
  INFO(reports);
  CHECK(read_memory(spin.pid(), entry, 1) == std::vector<unsigned char>{0xe9});
  std::string last = reports.substr(reports.rfind("{\"time\""));
  CHECK(interval_calls(last, "spin_hot") != "0");
  CHECK(!interval_calls(last, "spin_hot").empty());
  watch.signal(SIGINT);
  REQUIRE(watch.wait(20s) == 0);
  auto file = file_bytes(spin.pid(), entry, 16);
  CHECK(read_memory(spin.pid(), entry, 16) == file);  // the trampoline is gone
  REQUIRE(spin.request("quit").rfind("ok", 0) == 0);
}

TEST_CASE("patch's default observe window on an idle target is not extended; a fixed one is kept") {
  require_root();
  Child target{{fixture("benchp_target")}};
  REQUIRE(target.request("ready").rfind("ok", 0) == 0);
  auto dry = run({ctl(), "patch", "--pid", std::to_string(target.pid()), "--lib", fixture("benchp_fix.so"), "bp_trivial"});
  INFO(dry.out << dry.err);
  REQUIRE(dry.exit_code == 0);
  CHECK(dry.out.find("observed for 0.1") != std::string::npos);  // 100 ms: nothing to wait for
  CHECK(dry.out.find("extended") == std::string::npos);
  REQUIRE(run({ctl(), "revert", "--pid", std::to_string(target.pid()), "--all"}).exit_code == 0);
  auto fixed = run({ctl(), "patch", "--pid", std::to_string(target.pid()), "--lib", fixture("benchp_fix.so"),
                    "--dry-run", "--observe", "0.3", "bp_trivial"});
  INFO(fixed.out << fixed.err);
  REQUIRE(fixed.exit_code == 0);
  CHECK(fixed.out.find("observed for 0.3") != std::string::npos);
}
