// Patch hit counting (old-code exit probes) and `stats --callers` sampling skip an offset the
// kernel refuses to probe and name it, as watch does, instead of failing whole
// (tests/fixtures/unprobeable.c: refcount_up starts with a lock-prefixed instruction, ENOTSUPP).
#include <catch2/catch.hpp>
#include <filesystem>

#include "observe/callers.hpp"
#include "observe/patchcount.hpp"
#include "support/harness.hpp"
#include "symbols/pattern.hpp"
#include "symbols/symbols.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace std::chrono;

namespace {

struct Unprobeable {
  Child child{{fixture("unprobeable")}};
  pid_t pid() { return child.pid(); }
  Unprobeable() { REQUIRE(child.request("ready").rfind("ok", 0) == 0); }
  ~Unprobeable() {
    std::error_code ec;
    std::filesystem::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(child.pid()), ec);
  }
};

std::vector<Function> select(pid_t pid) {
  auto table = SymbolTable::for_pid(pid);
  REQUIRE(table);
  auto fns = symbols__select(*table, {"refcount_up", "plain_count"});
  REQUIRE(fns);
  REQUIRE(fns->size() == 2);
  if ((*fns)[0].name != "refcount_up") std::swap((*fns)[0], (*fns)[1]);
  return *fns;
}

}  // namespace

TEST_CASE("callers sampling skips the entry the kernel refuses, names it, and samples the rest") {
  require_root();
  Unprobeable target;
  auto fns = select(target.pid());
  std::vector<CallerProbe> probes{{0, fns[0].object, fns[0].offset}, {1, fns[1].object, fns[1].offset}};
  std::vector<std::string> skipped;
  auto stacks = callers__sample(target.pid(), probes, milliseconds(300),
                                [&] { REQUIRE(target.child.request("call 100").rfind("ok", 0) == 0); }, &skipped);
  REQUIRE(stacks);
  REQUIRE(skipped.size() == 1);
  CHECK(skipped[0].find("unprobeable+0x") != std::string::npos);
  uint64_t sampled = 0;
  for (auto& s : *stacks) {
    CHECK(s.function == 1);
    sampled += s.count;
  }
  CHECK(sampled == 100);
}

TEST_CASE("old-code exit probes skip the offset the kernel refuses, name it, and count the rest") {
  require_root();
  Unprobeable target;
  auto fns = select(target.pid());
  auto counters = patchcount__create(target.pid(), 1, 2);
  REQUIRE(counters);
  // Probes where the kernel refuses one (refcount_up's first instruction) beside good ones.
  std::vector<OldCodeExits> exits{{0, fns[0].object, {fns[0].offset}}, {1, fns[1].object, {fns[1].offset}}};
  std::vector<std::string> skipped;
  auto probes = patchcount__attach_old(target.pid(), 1, exits, &skipped);
  INFO((probes ? "" : probes.error().line()));
  REQUIRE(probes);
  CHECK(*probes == 1);
  REQUIRE(skipped.size() == 1);
  CHECK(skipped[0].find("unprobeable+0x") != std::string::npos);
  REQUIRE(target.child.request("call 50").rfind("ok", 0) == 0);
  auto hits = patchcount__read(target.pid(), 1);
  REQUIRE(hits);
  REQUIRE(*hits);
  REQUIRE((*hits)->functions.size() == 2);
  CHECK((*hits)->functions[0].old_hits == 0);
  CHECK((*hits)->functions[1].old_hits == 50);
  REQUIRE(patchcount__remove(target.pid(), 1));
}
