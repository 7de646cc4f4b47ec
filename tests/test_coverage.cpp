// Coverage (patch/coverage.hpp): every other place that runs a patched function's code is
// found and named -- inlined copies, clones, aliases -- and a .cold part that branches into
// the entry bytes is refused. Real processes (tests/fixtures/cov_target.c, built -O2 -g), real
// patches; every refusal leaves the target exactly as it was.
#include <signal.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <map>
#include <regex>
#include <set>

#include "support/harness.hpp"
#include "symbols/symbols.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace std::chrono;

namespace {

const std::vector<std::string> kFunctions = {"tax", "checkout_a", "scale", "scale.constprop.0", "price", "hot", "hot.cold"};

struct Target {
  Child child{{fixture("cov_target")}};
  std::map<std::string, uint64_t> fn;
  Target() {
    REQUIRE(ask("ready").rfind("ok", 0) == 0);
    auto table = SymbolTable::for_pid(pid());
    REQUIRE(table);
    for (auto& f : table->functions())
      if (f.object.find("cov_target") != std::string::npos) {
        fn[f.mangled] = f.address;
        for (auto& alias : f.aliases) fn[alias] = f.address;
      }
    for (auto& name : kFunctions) {
      INFO("cov_target lacks " << name << " (did the compiler inline, clone or split differently?)");
      REQUIRE(fn.count(name));
    }
  }
  ~Target() {
    child.signal(SIGKILL);
    child.wait();
    std::error_code ec;
    std::filesystem::remove_all("/run/hotfix/" + std::to_string(pid()), ec);
    std::filesystem::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(pid()), ec);
  }
  pid_t pid() const { return child.pid(); }
  std::string ask(const std::string& cmd) { return child.request(cmd); }
  long answer(const std::string& cmd) {
    auto r = ask(cmd);
    REQUIRE(r.rfind("ok ", 0) == 0);
    return std::stol(r.substr(3));
  }
};

struct Snapshot {
  std::map<std::string, std::vector<unsigned char>> text;
  std::set<std::string> mappings;
};

Snapshot snapshot(Target& t) {
  Snapshot s;
  for (auto& name : kFunctions) s.text[name] = read_memory(t.pid(), t.fn.at(name), 16);
  s.mappings = file_mappings(t.pid());
  return s;
}

// Exactly as before: same text, same mappings, no tracer, no registry, old answers.
void expect_untouched(Target& t, const Snapshot& before) {
  auto after = snapshot(t);
  for (auto& [name, bytes] : before.text) {
    INFO(name);
    CHECK(after.text.at(name) == bytes);
  }
  CHECK(after.mappings == before.mappings);
  CHECK(status_field(t.pid(), "TracerPid") == 0);
  CHECK(read_file("/proc/" + std::to_string(t.pid()) + "/maps").find("hotfix-registry") == std::string::npos);
  CHECK(t.answer("tax 1000") == 70);
  CHECK(t.answer("hot 5") == 6);
  CHECK(t.answer("hot -5") == 1);
  CHECK(t.answer("price 2") == 7);
}

// --no-abi-check: the fixes are compiled the plain way, and GCC may vectorise a replacement
// (checkout_a) or use another register (scale) where the original did not; their callers
// cannot rely on that (noipa, or through pointers), and the -fipa-ra check is tested elsewhere.
RunResult patch(Target& t, const std::string& fix, std::vector<std::string> more = {}) {
  std::vector<std::string> args = {"patch", "--pid", std::to_string(t.pid()), "--lib", fixture(fix), "--observe", "0",
                                   "--no-abi-check"};
  args.insert(args.end(), more.begin(), more.end());
  return ctl_run(args);
}

void expect_refused(const RunResult& r, const std::vector<std::string>& needles) {
  INFO("exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code == 1);
  auto err = lines_of(r.err);
  REQUIRE(err.size() == 1);
  for (auto& n : needles) CHECK(err[0].find(n) != std::string::npos);
}

// checkout_a(n) with a tax rate of `percent`.
long checkout(int n, int percent) {
  long sum = 0;
  for (int i = 0; i < n; ++i) sum += (i * 100 + n) * percent / 100;
  return sum;
}

bool has_place(const std::string& json, const std::string& function, const std::string& kind, const std::string& in) {
  std::regex re("\\{\"function\":\"" + function + "\",\"kind\":\"" + kind + "\",\"in\":\"" + std::regex_replace(in, std::regex("\\."), "\\.") +
                "\",\"file\":(\"[^\"]+\"|null),\"line\":([0-9]+|null)\\}");
  return std::regex_search(json, re);
}

}  // namespace

TEST_CASE("an inlined copy is refused by default, naming the function that inlined it", "[coverage][inlined]") {
  require_root();
  Target t;
  auto before = snapshot(t);
  auto r = patch(t, "cov_fix_tax.so");
  expect_refused(r, {"tax is inlined into checkout_a (cov_target.c:", "nothing was changed", "--allow-uncovered"});
  expect_untouched(t, before);
  CHECK(t.answer("checkout 10") == checkout(10, 7));
  // A dry run refuses the same way: it shows what patch would do.
  expect_refused(patch(t, "cov_fix_tax.so", {"--dry-run"}), {"inlined into checkout_a"});
  expect_untouched(t, before);
}

TEST_CASE("an inlined copy is covered when the fix replaces its container too", "[coverage][inlined]") {
  require_root();
  Target t;
  auto r = patch(t, "cov_fix_tax_checkout.so");
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("coverage: covered: tax is inlined into checkout_a (cov_target.c:") != std::string::npos);
  CHECK(r.out.find("not covered") == std::string::npos);
  CHECK(t.answer("tax 1000") == 80);
  CHECK(t.answer("checkout 10") == checkout(10, 8));  // the inlined copy is gone with its container
  auto list = ctl_run({"list", "--pid", std::to_string(t.pid()), "--json"});
  CHECK(list.out.find("\"uncovered\":[]") != std::string::npos);
}

TEST_CASE("a container an earlier patch replaced is still named, with what was not searched", "[coverage][inlined]") {
  require_root();
  Target t;
  auto first = patch(t, "cov_fix_tax_checkout.so", {"checkout_a"});
  INFO(first.out << first.err);
  REQUIRE(first.exit_code == 0);
  CHECK(t.answer("checkout 10") == checkout(10, 8));
  expect_refused(patch(t, "cov_fix_tax.so"),
                 {"tax is inlined into checkout_a (cov_target.c:", "checkout_a is replaced by patch 1, whose own code was not searched"});
  CHECK(t.answer("tax 1000") == 70);
}

TEST_CASE("--allow-uncovered applies anyway; patch, list and stats report the place, the share is never 100%",
          "[coverage][inlined][stats]") {
  require_root();
  Target t;
  auto r = patch(t, "cov_fix_tax.so", {"--allow-uncovered", "--json"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(has_place(r.out, "tax", "inlined", "checkout_a"));
  CHECK(std::regex_search(r.out, std::regex("\"file\":\"cov_target\\.c\",\"line\":[1-9][0-9]*")));
  // The override is audited like --allow-untrusted-lib.
  auto audit = read_file("/var/log/hotfix/audit.log");
  CHECK(std::regex_search(audit, std::regex("\"verb\":\"patch\"[^\n]*\"pid\":" + std::to_string(t.pid()) +
                                            ",[^\n]*\"result\":\"ok\"[^\n]*\"uncovered\":1,")));
  CHECK(t.answer("tax 1000") == 80);
  // What the report says: the inlined copy still computes the old result.
  CHECK(t.answer("checkout 10") == checkout(10, 7));

  auto list = ctl_run({"list", "--pid", std::to_string(t.pid()), "--json"});
  CHECK(has_place(list.out, "tax", "inlined", "checkout_a"));
  auto table = ctl_run({"list", "--pid", std::to_string(t.pid())});
  CHECK(table.out.find("uncovered: tax is inlined into checkout_a (cov_target.c:") != std::string::npos);

  for (int i = 0; i < 20; ++i) CHECK(t.answer("tax 100") == 8);  // only new-code hits: the share would be 100%
  auto stats = ctl_run({"stats", "--pid", std::to_string(t.pid())});
  INFO(stats.out << stats.err);
  REQUIRE(stats.exit_code == 0);
  // The new-share column (the next one is the function's part of the patch's calls).
  CHECK(std::regex_search(stats.out, std::regex("\n  tax +[0-9]+ +0 +[0-9.]+ +[0-9.]+ +<100%\\* ")));
  CHECK(stats.out.find("neither redirected nor counted") != std::string::npos);
  CHECK(stats.out.find("uncovered: tax is inlined into checkout_a") != std::string::npos);
  auto sj = ctl_run({"stats", "--pid", std::to_string(t.pid()), "--json"});
  CHECK(has_place(sj.out, "tax", "inlined", "checkout_a"));
  CHECK(sj.out.find("\"unreached_places\":1") != std::string::npos);
  CHECK(sj.out.find("neither redirected nor counted") != std::string::npos);
}

TEST_CASE("a .constprop clone is reported", "[coverage][clone]") {
  require_root();
  Target t;
  auto before = snapshot(t);
  long old_scale = t.answer("scale 5");
  expect_refused(patch(t, "cov_fix_scale.so"),
                 {"scale has a clone scale.constprop.0 (cov_clone.c:", "called from use_scale", "nothing was changed"});
  expect_untouched(t, before);
  auto r = patch(t, "cov_fix_scale.so", {"--allow-uncovered", "--dry-run", "--json"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(has_place(r.out, "scale", "clone", "scale.constprop.0"));
  expect_untouched(t, before);
  CHECK(t.answer("scale 5") == old_scale);
}

TEST_CASE("a clone is covered when the fix replaces every caller of it", "[coverage][clone]") {
  require_root();
  Target t;
  long old_scale = t.answer("scale 5");
  auto r = patch(t, "cov_fix_scale_callers.so");
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("coverage: covered: scale has a clone scale.constprop.0") != std::string::npos);
  CHECK(t.answer("scale 5") == old_scale + 2);  // both calls run the new scale (+1 each)
}

TEST_CASE("a branch from the .cold part into the entry bytes is refused", "[coverage][cold]") {
  require_root();
  Target t;
  auto before = snapshot(t);
  expect_refused(patch(t, "cov_fix_hot.so"), {"cannot patch hot", "cold part hot.cold", "branches to +1"});
  expect_untouched(t, before);
  // Not something --allow-uncovered lets through: the jump itself would break that branch.
  expect_refused(patch(t, "cov_fix_hot.so", {"--allow-uncovered"}), {"cold part hot.cold"});
  expect_untouched(t, before);
}

TEST_CASE("an alias is reported, and covered when the pattern names it too", "[coverage][alias]") {
  require_root();
  Target t;
  auto before = snapshot(t);
  expect_refused(patch(t, "cov_fix_price.so"), {"price is also named price_alias", "nothing was changed"});
  expect_untouched(t, before);
  auto r = patch(t, "cov_fix_price.so", {"--allow-uncovered", "--dry-run", "--json"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(has_place(r.out, "price", "alias", "price_alias"));
  // Only the primary name in the pattern: still refused (the alias matches it too, but alone
  // it is not named).
  expect_refused(patch(t, "cov_fix_price.so", {"price", "--dry-run"}), {"price_alias"});
  auto both = patch(t, "cov_fix_price.so", {"price", "price_alias"});
  INFO(both.out << both.err);
  REQUIRE(both.exit_code == 0);
  CHECK(both.out.find("coverage: covered: price is also named price_alias") != std::string::npos);
  CHECK(t.answer("price 2") == 8);  // through the alias: the new code
}
