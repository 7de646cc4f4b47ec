// The -fipa-ra check at every call site (patch/abi_check.hpp), on abics_target: hand-written
// asm callers whose register use is certain (tests/fixtures/abics_asm.S) and C ones at -O2,
// patched with a plain C fix whose replacements call the target's audit() through the PLT.
// A refusal names the caller and leaves the target exactly as it was; an acceptance runs the
// new code and nothing goes wrong; --no-abi-check shows the danger is real.
#include <catch2/catch.hpp>
#include <filesystem>
#include <regex>
#include <sstream>
#include <thread>

#include "support/harness.hpp"

using namespace hotfix::test;
using namespace std::chrono;

namespace {

std::vector<std::string> patch_args(pid_t pid, const std::string& fn, std::vector<std::string> extra = {}) {
  std::vector<std::string> a = {"patch", "--pid", std::to_string(pid), "--lib", fixture("abics_fix.so"), fn};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

struct Counts {
  long old_n = -1, new_n = -1, bad_n = -1;
};

Counts stats(Child& c, const std::string& caller) {
  c.send("stats " + caller);
  auto line = c.wait_for(caller + " old=");
  Counts n;
  if (line) std::sscanf(line->c_str() + caller.size(), " old=%ld new=%ld bad=%ld", &n.old_n, &n.new_n, &n.bad_n);
  return n;
}

// Wait until `caller` has produced `more` results since `from` (the workers run continuously).
Counts after_more(Child& c, const std::string& caller, const Counts& from, long more = 2000) {
  Counts n;
  for (int i = 0; i < 200; ++i) {
    n = stats(c, caller);
    if (n.old_n + n.new_n + n.bad_n >= from.old_n + from.new_n + from.bad_n + more) break;
    std::this_thread::sleep_for(milliseconds(20));
  }
  return n;
}

// The text of abics_target, for "left exactly as it was".
std::vector<unsigned char> text_of(pid_t pid) {
  std::istringstream maps(read_file("/proc/" + std::to_string(pid) + "/maps"));
  std::vector<unsigned char> out;
  for (std::string line; std::getline(maps, line);) {
    if (line.find("r-xp") == std::string::npos || line.find("abics_target") == std::string::npos) continue;
    unsigned long lo = 0, hi = 0;
    std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi);
    auto bytes = read_memory(pid, lo, hi - lo);
    out.insert(out.end(), bytes.begin(), bytes.end());
  }
  return out;
}

struct Target {
  Child child{{fixture("abics_target")}};
  Target() { REQUIRE(child.wait_for("ready")); }
  pid_t pid() const { return child.pid(); }
};

void cleanup(pid_t pid) {
  std::error_code ec;
  std::filesystem::remove_all("/run/hotfix/" + std::to_string(pid), ec);
}

// Refused, with the caller and the registers named, and the target as it was.
void expect_refused(const std::string& fn, const std::vector<std::string>& needles) {
  Target t;
  auto text = text_of(t.pid());
  auto maps = file_mappings(t.pid());
  auto r = ctl_run(patch_args(t.pid(), fn));
  INFO("exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code == 1);
  auto err = lines_of(r.err);
  REQUIRE(err.size() == 1);
  for (auto& n : needles) CHECK(err[0].find(n) != std::string::npos);
  CHECK(err[0].find("-fcall-saved") == std::string::npos);  // no flag works for a fix that calls audit()
  CHECK(text_of(t.pid()) == text);
  CHECK(file_mappings(t.pid()) == maps);
  cleanup(t.pid());
}

}  // namespace

TEST_CASE("a caller that keeps rcx live across the call: refused, naming it; --no-abi-check shows why") {
  require_root();
  SECTION("refused") {
    expect_refused("t_live", {"t_live changes rcx, rdi", "keeps rcx", "c_live+0x3 (abics_asm.S:", "the call at 0x",
                              "c_live reads rcx at c_live+0x8", "replace c_live in fix.so as well"});
  }
  SECTION("with --no-abi-check the caller really computes wrong results") {
    Target t;
    auto r = ctl_run(patch_args(t.pid(), "t_live", {"--no-abi-check", "--consistency", "entry"}));
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    CHECK(r.out.find("abi: not checked: --no-abi-check was given") != std::string::npos);
    auto start = stats(t.child, "c_live");
    auto n = after_more(t.child, "c_live", start);
    CHECK(n.bad_n > start.bad_n);  // rcx is audit()'s now, not 3x
    cleanup(t.pid());
  }
  SECTION("the advice works: with the caller replaced too, the patch applies and every result is right") {
    Target t;
    auto r = ctl_run({"patch", "--pid", std::to_string(t.pid()), "--lib", fixture("abics_fix_caller.so")});
    INFO(r.out << r.err);
    REQUIRE(r.exit_code == 0);
    CHECK(r.out.find("abi: c_live: ") != std::string::npos);
    auto start = stats(t.child, "c_live");
    auto n = after_more(t.child, "c_live", start);
    CHECK(n.new_n > start.new_n);
    CHECK(n.bad_n == 0);
    REQUIRE(ctl_run({"revert", "--pid", std::to_string(t.pid()), "--all"}).exit_code == 0);
    cleanup(t.pid());
  }
}

TEST_CASE("a leaf replacement: the -fcall-saved advice is given only where it works, and it does") {
  require_root();
  Target t;
  auto text = text_of(t.pid());
  auto r = ctl_run({"patch", "--pid", std::to_string(t.pid()), "--lib", fixture("abics_fix_leaf.so")});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("keeps rcx") != std::string::npos);
  CHECK(r.err.find("rebuild fix.so with `-fcall-saved-rcx`") != std::string::npos);
  CHECK(text_of(t.pid()) == text);
  r = ctl_run({"patch", "--pid", std::to_string(t.pid()), "--lib", fixture("abics_fix_leaf_saved.so")});
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("abi: t_live: 1 call site checked, none keeps rdx live") != std::string::npos);
  auto start = stats(t.child, "c_live");
  auto n = after_more(t.child, "c_live", start);
  CHECK(n.new_n > start.new_n);
  CHECK(n.bad_n == 0);
  REQUIRE(ctl_run({"revert", "--pid", std::to_string(t.pid()), "--all"}).exit_code == 0);
  cleanup(t.pid());
}

TEST_CASE("callers that keep nothing live: accepted (the fix calls the target through its PLT) and the new code runs") {
  require_root();
  Target t;
  auto r = ctl_run(patch_args(t.pid(), "t_dead", {"--dry-run"}));
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  // rcx comes from audit() alone: the fix's PLT call was followed into the target.
  CHECK(r.out.find("abi: t_dead: 2 call sites checked, none keeps rcx, rdi live") != std::string::npos);
  r = ctl_run(patch_args(t.pid(), "t_dead"));
  REQUIRE(r.exit_code == 0);
  for (const char* caller : {"c_dead", "c_dead2"}) {
    auto start = stats(t.child, caller);
    auto n = after_more(t.child, caller, start);
    CHECK(n.new_n > start.new_n);
    CHECK(n.bad_n == 0);
  }
  for (const char* other : {"c_live", "c_top", "c_ttop", "c_switch"}) CHECK(stats(t.child, other).bad_n == 0);
  REQUIRE(ctl_run({"revert", "--pid", std::to_string(t.pid()), "--all"}).exit_code == 0);
  cleanup(t.pid());
}

TEST_CASE("the caller's caller relies on the register: refused") {
  require_root();
  expect_refused("t_deep", {"keeps rcx", "c_mid+0x0", "c_mid still holds rcx when it returns",
                            "c_top reads rcx at c_top+0x7"});
}

TEST_CASE("a tail call inherits the liveness of the tail-caller's callers: refused") {
  require_root();
  expect_refused("t_tail", {"keeps rcx", "c_tailer+0x1", "c_tailer still holds rcx when it returns",
                            "c_ttop reads rcx"});
}

TEST_CASE("a jump table after the call: conservatively refused") {
  require_root();
  expect_refused("t_sw", {"c_switch+0x0", "`jmp rdx` (an indirect jump hotfix cannot follow)"});
}
