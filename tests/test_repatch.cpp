// The same fix can always be applied again (issue 7 §3): after a revert, stacked on itself,
// after a hotfix-ctl killed right after dlopen (its copy left loaded), for a fix with a
// file-static variable; and a target's registry stays bounded however many patches it takes.
// Real `patchee` processes (tests/fixtures/patchee.cpp) and real hotfix-ctl runs.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <thread>

#include "patch/binder.hpp"
#include "patch/registry.hpp"
#include "support/harness.hpp"

using namespace hotfix;
using namespace hotfix::test;
using namespace std::chrono;
namespace fs = std::filesystem;

namespace {

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string maps_of(pid_t pid) { return slurp("/proc/" + std::to_string(pid) + "/maps"); }

long tracer_of(pid_t pid) {
  std::istringstream in(slurp("/proc/" + std::to_string(pid) + "/status"));
  for (std::string line; std::getline(in, line);)
    if (line.rfind("TracerPid:", 0) == 0) return std::stol(line.substr(10));
  return -1;
}

// A scratch directory, removed even when a test fails.
struct Scratch {
  fs::path path;
  Scratch() {
    char tmpl[] = "/tmp/hotfix-repatch-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    path = tmpl;
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& leaf) const { return (path / leaf).string(); }
};

// fix_fstatic as a user builds it: plain g++, its own `static long fsink`.
std::string build_fstatic(const Scratch& dir) {
  std::string out = dir / "fix_fstatic.so";
  auto r = run({"/usr/bin/g++", "-O2", "-g", "-shared", "-fPIC", "-I" HOTFIX_SOURCE_DIR "/tests/fixtures",
                HOTFIX_SOURCE_DIR "/tests/fixtures/patchee_fix_fstatic.cpp", "-o", out});
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  return out;
}

struct Patchee {
  Child child;
  Patchee() : child({fixture("patchee")}) { REQUIRE(child.wait_for("ready")); }
  ~Patchee() {
    child.signal(SIGKILL);
    child.wait();
    std::error_code ec;
    fs::remove_all("/run/hotfix/" + std::to_string(pid()), ec);
    fs::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(pid()), ec);
  }
  pid_t pid() const { return child.pid(); }
  long value(const std::string& cmd, const std::string& key) {
    auto reply = child.request(cmd);
    auto at = reply.find(key + "=");
    INFO(reply);
    REQUIRE(at != std::string::npos);
    return std::stol(reply.substr(at + key.size() + 1));
  }
};

int json_int(const std::string& json, const std::string& key) {
  std::smatch m;
  if (!std::regex_search(json, m, std::regex("\"" + key + "\":([0-9]+)"))) return -1;
  return std::stoi(m[1]);
}

int patch(Patchee& p, const std::string& lib, std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"patch", "--pid", std::to_string(p.pid()), "--lib", lib, "--json"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = ctl_run(args);
  INFO("patch " << lib << ": exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  int id = json_int(r.out, "id");
  REQUIRE(id > 0);
  REQUIRE(tracer_of(p.pid()) == 0);
  return id;
}

void revert_all(Patchee& p, std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"revert", "--pid", std::to_string(p.pid()), "--all"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = ctl_run(args);
  INFO("revert: exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  REQUIRE(tracer_of(p.pid()) == 0);
}

// New calls of tick_value run a FRESH copy of fix_fstatic: its own fsink starts at 0, so two
// ticks return the new value and add 1 + 2 to the target's g_counter.
void require_fresh_fstatic(Patchee& p) {
  long before = p.value("counter", "counter");
  CHECK(p.value("tick", "tick") == 1005);
  CHECK(p.value("tick", "tick") == 1005);
  CHECK(p.value("counter", "counter") - before == 3);
}

void require_old_tick(Patchee& p) {
  long before = p.value("counter", "counter");
  CHECK(p.value("tick", "tick") == 5);
  CHECK(p.value("counter", "counter") == before);
}

// The index of the crash point `name` in a `patch` run (HOTFIX_CRASH_LIST), so the test does
// not depend on how many points other steps add.
long crash_index(const std::vector<std::string>& patch_args, const std::string& name) {
  std::vector<std::string> argv = {"/usr/bin/env", "HOTFIX_CRASH_LIST=1", ctl()};
  argv.insert(argv.end(), patch_args.begin(), patch_args.end());
  auto r = run(argv, seconds(120));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  for (auto& line : lines_of(r.err)) {
    long k;
    char point[256];
    if (std::sscanf(line.c_str(), "crashpoint %ld %255[^\n]", &k, point) == 2 && name == point) return k;
  }
  FAIL("no crash point '" << name << "' in: " << r.err);
  return 0;
}

// Run `patch` and SIGKILL it (HOTFIX_CRASH_AT) right after its dlopen: the copy stays loaded,
// nothing points at it, no record names it.
void patch_killed_after_dlopen(Patchee& p, const std::string& lib, long k) {
  auto r = run({"/usr/bin/env", "HOTFIX_CRASH_AT=" + std::to_string(k), ctl(), "patch", "--pid", std::to_string(p.pid()),
                "--lib", lib, "--observe", "0"},
               seconds(120));
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 128 + SIGKILL);
  for (int i = 0; i < 200 && tracer_of(p.pid()) != 0; ++i) std::this_thread::sleep_for(milliseconds(10));
  REQUIRE(tracer_of(p.pid()) == 0);
}

size_t copies_mapped(pid_t pid, const std::string& name) {
  std::set<std::string> paths;
  for (auto& line : lines_of(maps_of(pid)))
    if (auto at = line.find("/memfd:hotfix:"); at != std::string::npos && line.find(name) != std::string::npos)
      paths.insert(line.substr(at));
  return paths.size();
}

}  // namespace

TEST_CASE("a fix with a file-static variable applies again after revert and stacked on itself", "[repatch]") {
  require_root();
  Scratch dir;
  auto lib = build_fstatic(dir);
  Patchee p;
  require_old_tick(p);
  for (int round = 0; round < 3; ++round) {
    INFO("round " << round);
    patch(p, lib, {"--observe", "0"});
    require_fresh_fstatic(p);
    // The same fix again on top while the first copy is loaded: that copy's `fsink` is not
    // a target variable the fix would shadow.
    patch(p, lib, {"--observe", "0"});
    require_fresh_fstatic(p);
    CHECK(copies_mapped(p.pid(), "fix_fstatic.so") == 2);
    revert_all(p);
    require_old_tick(p);
    CHECK(copies_mapped(p.pid(), "fix_fstatic.so") == 0);
  }
}

TEST_CASE("the same fix applies again while a killed patch's copy is still loaded", "[repatch][crash]") {
  require_root();
  Scratch dir;
  auto fstatic = build_fstatic(dir);
  for (auto lib : {fstatic, fixture("fix_v1.so")}) {
    SECTION(fs::path(lib).filename().string()) {
      Patchee p;
      long k = crash_index({"patch", "--pid", std::to_string(p.pid()), "--lib", lib, "--observe", "0"},
                           "patch: after dlopen");
      revert_all(p);  // the listing run applied it: back to the file's code
      REQUIRE(copies_mapped(p.pid(), fs::path(lib).filename().string()) == 0);
      patch_killed_after_dlopen(p, lib, k);
      const auto name = fs::path(lib).filename().string();
      REQUIRE(copies_mapped(p.pid(), name) == 1);  // the leftover, until the next verb recovers it
      // Before: the new copy got the leftover's name (same id: no record), dlopen returned the
      // leftover's handle, and every later patch failed with "... is not loaded". Now the next
      // patch first rolls the interrupted one back (journal), then loads a fresh copy.
      for (int round = 0; round < 3; ++round) {
        INFO("round " << round);
        int id = patch(p, lib, {"--observe", "0"});
        CHECK(copies_mapped(p.pid(), name) == 1);
        if (lib == fstatic) require_fresh_fstatic(p);
        else CHECK(p.child.request("tick") == "ok tick=5");  // fix_v1 does not replace tick_value
        auto listed = ctl_run({"list", "--pid", std::to_string(p.pid())});
        CHECK(listed.out.find("patch " + std::to_string(id) + "  active") != std::string::npos);
        revert_all(p);
        if (lib == fstatic) require_old_tick(p);
        CHECK(copies_mapped(p.pid(), name) == 0);
      }
    }
  }
}

TEST_CASE("dlopen returning an object it already had is refused, never bound", "[repatch][binder]") {
  require_root();
  Scratch dir;
  Child target({fixture("bind_target")});
  REQUIRE(target.wait_for("ready"));
  auto table = SymbolTable::for_pid(target.pid());
  REQUIRE(table);
  const std::string pid_dir = dir / std::to_string(target.pid());
  const std::string copy = pid_dir + "/1-fix.so";
  auto bound = binder__prepare(*table, fmt::format("/proc/{}/exe", target.pid()), fixture("bind_fix.so"), copy);
  INFO((bound ? "" : bound.error().line()));
  REQUIRE(bound);
  REQUIRE_THAT(target.request("load " + copy), Catch::StartsWith("ok base="));
  REQUIRE(binder__load_base(target.pid(), copy));

  // A new file under the same name (what a second patch with the same id wrote): glibc's
  // dlopen matches the name and returns the old object; its file is now "(deleted)".
  auto again = binder__prepare(*table, fmt::format("/proc/{}/exe", target.pid()), fixture("bind_fix.so"), copy);
  REQUIRE(again);
  auto first = target.request("load " + copy);
  REQUIRE_THAT(first, Catch::StartsWith("ok base="));
  auto refused = binder__load_base(target.pid(), copy);
  REQUIRE_FALSE(refused);
  CHECK_THAT(refused.error().line(), Catch::Contains("already loaded"));
  // The engine never reuses a name the target has mapped.
  auto fresh = binder__copy_path(target.pid(), dir.path.string() + "/", 1, "/anywhere/fix.so");
  CHECK(fresh != copy);
  CHECK(fresh == pid_dir + "/1.2-fix.so");
}

TEST_CASE("the registry stays bounded over hundreds of patch/revert cycles", "[repatch][registry]") {
  require_root();
  Patchee p;
  const std::string pid = std::to_string(p.pid());
  const int cycles = 150;  // ~0.5 s a cycle on a loaded machine  // the bound over thousands is registry__compact's unit test (test_registry)
  size_t size_at_fill = 0, list_all_at_fill = 0;
  for (int i = 1; i <= cycles; ++i) {
    INFO("cycle " << i);
    patch(p, fixture("fix_v1.so"), {"c_answer", "--observe", "0", "--consistency", "entry"});
    revert_all(p, {"--consistency", "entry"});
    if (i == 120) {  // every kept record's id has 3 digits from here on: their size no longer changes
      auto r = registry__read(p.pid());
      REQUIRE(r);
      size_at_fill = registry__encode(*r).size();
      list_all_at_fill = lines_of(ctl_run({"list", "--pid", pid, "--all"}).out).size();
    }
  }
  auto r = registry__read(p.pid());
  REQUIRE(r);
  CHECK(r->next_id == static_cast<uint32_t>(cycles + 1));
  CHECK(registry__encode(*r).size() <= size_at_fill + 16);  // 30 patches later (one record is ~300 bytes)
  CHECK(r->patches.size() == kKeptReleased);
  CHECK(r->pruned.count == cycles - kKeptReleased);

  auto all = ctl_run({"list", "--pid", pid, "--all"});
  REQUIRE(all.exit_code == 0);
  CHECK(lines_of(all.out).size() == list_all_at_fill);
  CHECK(all.out.find(std::to_string(cycles - kKeptReleased) + " older patch(es), ids 1.." +
                     std::to_string(cycles - kKeptReleased)) != std::string::npos);
  auto active = ctl_run({"list", "--pid", pid});
  REQUIRE(active.exit_code == 0);
  CHECK(active.out.find("has no active hotfix patches") != std::string::npos);
  CHECK(active.out.find("patch 1 ") == std::string::npos);
  auto pruned_revert = ctl_run({"revert", "--pid", pid, "--id", "1"});
  CHECK(pruned_revert.exit_code == 1);
  CHECK(pruned_revert.err.find("summarised") != std::string::npos);

  // The next patch works and runs the new code; `list` shows exactly it.
  int id = patch(p, fixture("fix_v1.so"), {"c_answer", "--observe", "0", "--consistency", "entry"});
  CHECK(id == cycles + 1);
  active = ctl_run({"list", "--pid", pid});
  CHECK(lines_of(active.out).size() == 4);  // header, the patch, its function, the "not shown" note
  CHECK(active.out.find("patch " + std::to_string(id) + "  active") != std::string::npos);
}
