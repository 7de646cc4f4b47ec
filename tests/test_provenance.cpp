// `hotfix-ctl build` and the provenance check of `patch` (patch/build.hpp, patch/provenance.hpp)
// on tests/fixtures/prov_target.c, a program built twice with one change (two build-ids) and
// with flags a default build would not use. Fixes are one C function, built either with
// `hotfix-ctl build` or as a user would (plain gcc); every refusal must leave the target as it was.
#include <signal.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "patch/fixlib.hpp"
#include "patch/stamp.hpp"
#include "support/harness.hpp"
#include "symbols/producer.hpp"
#include "symbols/symbols.hpp"

using namespace hotfix::test;
using namespace std::chrono;
namespace fs = std::filesystem;

namespace {

const char* kFix = "int prov_answer(int x) { return x + 1000; }\n";

struct Scratch {
  fs::path path;
  Scratch() {
    char tmpl[] = "/tmp/hotfix-prov-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    path = tmpl;
  }
  ~Scratch() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& leaf) const { return (path / leaf).string(); }
  std::string write(const std::string& leaf, const std::string& text) const {
    std::ofstream(path / leaf) << text;
    return (path / leaf).string();
  }
};

// The running fixture, with what a refusal must leave as it was.
struct Target {
  Child child;
  uint64_t answer = 0;  // the patched function's address (prov_answer)
  explicit Target(const std::string& name = "prov_target", const std::string& function = "prov_answer")
      : child({fixture(name)}) {
    auto ready = child.wait_for("ready");
    REQUIRE(ready);
    auto table = hotfix::SymbolTable::for_pid(child.pid());
    REQUIRE(table);
    for (auto& f : table->functions())
      if (f.name == function) answer = f.address;
    REQUIRE(answer != 0);
  }
  ~Target() {
    child.signal(SIGKILL);
    child.wait();
    std::error_code ec;
    fs::remove_all("/run/hotfix/" + std::to_string(pid()), ec);
    fs::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(pid()), ec);
  }
  pid_t pid() const { return child.pid(); }
  std::string call() { return child.request("call"); }
  std::string p() const { return std::to_string(pid()); }
};

// The target exactly as it was: the file's bytes at the entry, the same file mappings, the old answer.
void expect_untouched(Target& t, const std::set<std::string>& maps_before, const std::string& answer) {
  CHECK(read_memory(t.pid(), t.answer, 16) == file_bytes(t.pid(), t.answer, 16));
  CHECK(file_mappings(t.pid()) == maps_before);
  CHECK(t.call() == answer);
}

std::string build_id_of(const std::string& path) {
  auto table = hotfix::SymbolTable::for_file(path);
  REQUIRE(table);
  return table->objects().front().build_id;
}

std::vector<uint8_t> bytes_of(const std::string& path) {
  auto image = hotfix::fixlib__load(path);
  REQUIRE(image);
  return image->bytes;
}

// The producer of the compile unit that holds `function` in the ELF file at `path`.
hotfix::Producer producer_of(const std::string& path, const std::string& function, bool image) {
  auto table = hotfix::SymbolTable::for_file(path);
  REQUIRE(table);
  uint64_t address = 0;
  for (auto& f : table->functions())
    if (f.name == function) address = f.address;
  REQUIRE(address != 0);
  auto dwarf = image ? hotfix::producer__read_image(bytes_of(path), path)
                     : hotfix::producer__read_file(path, "", table->objects().front().build_id, "");
  auto* unit = dwarf.unit_at(address);
  REQUIRE(unit);
  return unit->producer;
}

// Code-shaping switches a fix must share with the target: -O and -f, minus what build drops.
std::vector<std::string> o_and_f(const hotfix::Producer& p) {
  std::vector<std::string> out;
  for (auto& s : p.switches)
    if ((s.rfind("-O", 0) == 0 || s.rfind("-f", 0) == 0) && s != "-fPIE" && s != "-fpie") out.push_back(s);
  return out;
}

std::string last_O(const hotfix::Producer& p) {
  std::string out;
  for (auto& s : p.switches)
    if (s.rfind("-O", 0) == 0) out = s;
  return out;
}

}  // namespace

TEST_CASE("build: compiles with the target's -O and -f flags and stamps its build-id") {
  require_root();
  Scratch dir;
  Target t;
  auto src = dir.write("fix.c", kFix);
  auto built = ctl_run({"build", "--pid", t.p(), "-o", dir / "fix.so", src});
  INFO(built.out << built.err);
  REQUIRE(built.exit_code == 0);

  auto target = producer_of(fixture("prov_target"), "prov_answer", false);
  auto fix = producer_of(dir / "fix.so", "prov_answer", true);
  INFO("target: " << target.text << "\nfix:    " << fix.text);
  REQUIRE(target.family == "GCC");
  for (auto& s : o_and_f(target)) {
    INFO(s);
    CHECK(std::find(fix.switches.begin(), fix.switches.end(), s) != fix.switches.end());
  }
  CHECK(last_O(fix) == last_O(target));
  CHECK(last_O(target) == "-O1");  // the fixture's own flags win over CMake's, and build kept that order
  CHECK(std::find(fix.switches.begin(), fix.switches.end(), "-fPIC") != fix.switches.end());

  auto stamps = hotfix::stamp__read(bytes_of(dir / "fix.so"));
  REQUIRE(stamps);
  REQUIRE(stamps->size() == 1);
  CHECK(stamps->front().build_id == build_id_of(fixture("prov_target")));
  CHECK(stamps->front().build_id != build_id_of(fixture("prov_target_v2")));
  CHECK(built.out.find("stamped for build-id " + stamps->front().build_id) != std::string::npos);
  // No temporary stamp source is left behind by a real build.
  CHECK(built.out.find("/tmp/hotfix-build-") != std::string::npos);
  for (auto& line : lines_of(built.out))
    if (auto at = line.find("/tmp/hotfix-build-"); at != std::string::npos) {
      auto end = line.find('/', at + 5);
      CHECK(!fs::exists(line.substr(at, end - at)));
    }
}

TEST_CASE("build --dry-run prints the command and compiles nothing") {
  require_root();
  Scratch dir;
  auto src = dir.write("fix.c", kFix);
  auto r = ctl_run({"build", "--binary", fixture("prov_target"), "-o", dir / "fix.so", src, "--dry-run", "--",
                    "-DEXTRA=1"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(!fs::exists(dir / "fix.so"));
  std::string command;
  for (auto& line : lines_of(r.out))
    if (line.find(" -shared -fPIC -g ") != std::string::npos) command = line;
  REQUIRE(!command.empty());
  CHECK(command.rfind("gcc", 0) == 0);
  for (auto& part : {"-O1", "-fno-omit-frame-pointer", "-fwrapv", src.c_str(), "-o", "-DEXTRA=1"}) {
    INFO(part);
    CHECK(command.find(part) != std::string::npos);
  }
  CHECK(command.find("-fPIE") == std::string::npos);
  CHECK(command.rfind("-DEXTRA=1") > command.find(" -o "));  // extra arguments come last: they win
  // The printed command is the one build would run: run it, and the stamp is there.
  auto stamp_at = command.find("/tmp/hotfix-build-");
  REQUIRE(stamp_at != std::string::npos);
  auto stamp_source = command.substr(stamp_at, command.find(' ', stamp_at) - stamp_at);
  auto ran = run({"/bin/sh", "-c", command});
  INFO(ran.err);
  REQUIRE(ran.exit_code == 0);
  auto stamps = hotfix::stamp__read(bytes_of(dir / "fix.so"));
  REQUIRE(stamps);
  REQUIRE(stamps->size() == 1);
  CHECK(stamps->front().build_id == build_id_of(fixture("prov_target")));
  fs::remove_all(fs::path(stamp_source).parent_path());

  auto json = ctl_run({"build", "--binary", fixture("prov_target"), "-o", dir / "fix.so", src, "--dry-run", "--json"});
  REQUIRE(json.exit_code == 0);
  CHECK(json.out.find("\"build_id\":\"" + build_id_of(fixture("prov_target")) + "\"") != std::string::npos);
  CHECK(json.out.find("\"flags\":[") != std::string::npos);
  CHECK(json.out.find("\"dry_run\":true") != std::string::npos);
  auto at = json.out.find("\"stamp_source\":\"") + 16;
  fs::remove_all(fs::path(json.out.substr(at, json.out.find('"', at) - at)).parent_path());
}

TEST_CASE("build: a target without DWARF gets plain defaults and still the stamp") {
  require_root();
  Scratch dir;
  auto stripped = dir / "prov_stripped";
  auto strip = run({"/usr/bin/objcopy", "--strip-debug", fixture("prov_target"), stripped});
  REQUIRE(strip.exit_code == 0);
  auto src = dir.write("fix.c", kFix);
  auto r = ctl_run({"build", "--binary", stripped, "-o", dir / "fix.so", src});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find("no DW_AT_producer for " + stripped) != std::string::npos);
  CHECK(r.out.find("plain defaults (-O2)") != std::string::npos);
  auto stamps = hotfix::stamp__read(bytes_of(dir / "fix.so"));
  REQUIRE(stamps);
  REQUIRE(stamps->size() == 1);
  CHECK(stamps->front().build_id == build_id_of(fixture("prov_target")));  // strip keeps the build-id
}

TEST_CASE("patch: a fix stamped for this build is applied and runs") {
  require_root();
  Scratch dir;
  Target t;
  REQUIRE(t.call() == "ok 42");
  auto built = ctl_run({"build", "--pid", t.p(), "-o", dir / "fix.so", dir.write("fix.c", kFix)});
  INFO(built.out << built.err);
  REQUIRE(built.exit_code == 0);
  auto patched = ctl_run({"patch", "--pid", t.p(), "--lib", dir / "fix.so", "--observe", "0"});
  INFO(patched.out << patched.err);
  REQUIRE(patched.exit_code == 0);
  CHECK(patched.out.find("  provenance: built for this binary (build-id " + build_id_of(fixture("prov_target"))) !=
        std::string::npos);
  CHECK(patched.out.find("  toolchain: GCC ") != std::string::npos);
  CHECK(t.call() == "ok 1041");
  auto reverted = ctl_run({"revert", "--pid", t.p(), "--all"});
  INFO(reverted.out << reverted.err);
  REQUIRE(reverted.exit_code == 0);
  CHECK(t.call() == "ok 42");
}

TEST_CASE("patch: a fix stamped for another build of the program is refused, target untouched") {
  require_root();
  Scratch dir;
  Target t;  // build 1 runs; the fix is built for build 2 (PROV_STEP=2), installed under the same name
  fs::copy_file(fixture("prov_target_v2"), dir / "prov_target");
  auto built = ctl_run({"build", "--binary", dir / "prov_target", "-o", dir / "fix.so", dir.write("fix.c", kFix)});
  INFO(built.out << built.err);
  REQUIRE(built.exit_code == 0);
  auto maps = file_mappings(t.pid());
  auto patched = ctl_run({"patch", "--pid", t.p(), "--lib", dir / "fix.so", "--observe", "0"});
  INFO(patched.out << patched.err);
  CHECK(patched.exit_code == 1);
  CHECK(patched.err.find("fix.so was built for another build of " + fixture("prov_target")) != std::string::npos);
  CHECK(patched.err.find(build_id_of(fixture("prov_target"))) != std::string::npos);
  CHECK(patched.err.find(build_id_of(fixture("prov_target_v2"))) != std::string::npos);
  CHECK(patched.err.find("hotfix-ctl build --pid " + t.p()) != std::string::npos);
  expect_untouched(t, maps, "ok 42");
}

TEST_CASE("patch: an unstamped fix gets the note, and is applied") {
  require_root();
  Scratch dir;
  Target t;
  auto fix = dir / "fix.so";
  auto cc = run({"/usr/bin/gcc", "-O2", "-g", "-shared", "-fPIC", dir.write("fix.c", kFix), "-o", fix});
  REQUIRE(cc.exit_code == 0);
  auto patched = ctl_run({"patch", "--pid", t.p(), "--lib", fix, "--observe", "0"});
  INFO(patched.out << patched.err);
  REQUIRE(patched.exit_code == 0);
  CHECK(patched.out.find("  provenance: fix.so is not stamped for a build; build it with hotfix-ctl build to have "
                         "this checked\n") != std::string::npos);
  // Plain -O2 where the target has -O1 -fno-omit-frame-pointer -fwrapv: a note, not a refusal.
  CHECK(patched.out.find("other flags (none ABI-changing)") != std::string::npos);
  CHECK(t.call() == "ok 1041");
  auto json = ctl_run({"patch", "--pid", t.p(), "--lib", fix, "--observe", "0", "--dry-run", "--json"});
  CHECK(json.out.find("{\"check\":\"provenance\",\"text\":\"fix.so is not stamped for a build") != std::string::npos);
}

TEST_CASE("patch: a fix compiled with -fshort-enums for a target without it is refused, target untouched") {
  require_root();
  Scratch dir;
  Target t;
  auto fix = dir / "fix.so";
  auto cc = run({"/usr/bin/gcc", "-O2", "-g", "-shared", "-fPIC", "-fshort-enums",
                 dir.write("fix.c", "enum prov_color { prov_red, prov_green };\n"
                                    "int prov_color_value(enum prov_color c) { return (int)c + 100; }\n"),
                 "-o", fix});
  REQUIRE(cc.exit_code == 0);
  auto maps = file_mappings(t.pid());
  auto patched = ctl_run({"patch", "--pid", t.p(), "--lib", fix, "--observe", "0"});
  INFO(patched.out << patched.err);
  CHECK(patched.exit_code == 1);
  CHECK(patched.err.find("fix.so was compiled with -fshort-enums and the target's prov_color_value") !=
        std::string::npos);
  CHECK(patched.err.find("without -fshort-enums") != std::string::npos);
  expect_untouched(t, maps, "ok 42");
}

TEST_CASE("patch: a fix from another compiler family is refused") {
  require_root();
  if (run({"/bin/sh", "-c", "command -v /usr/bin/clang"}).exit_code != 0) {
    WARN("SKIP: no clang to build a fix with another compiler");
    return;
  }
  Scratch dir;
  Target t;
  auto fix = dir / "fix.so";
  auto cc = run({"/usr/bin/clang", "-O2", "-g", "-shared", "-fPIC", dir.write("fix.c", kFix), "-o", fix});
  REQUIRE(cc.exit_code == 0);
  auto maps = file_mappings(t.pid());
  auto patched = ctl_run({"patch", "--pid", t.p(), "--lib", fix, "--observe", "0"});
  INFO(patched.out << patched.err);
  CHECK(patched.exit_code == 1);
  CHECK(patched.err.find("fix.so was compiled by clang ") != std::string::npos);
  CHECK(patched.err.find("another compiler family") != std::string::npos);
  expect_untouched(t, maps, "ok 42");
}

TEST_CASE("hotfix_add_patch(FOR_BINARY) builds what hotfix-ctl build builds, and patch accepts it") {
  require_root();
  Scratch dir;
  auto built = ctl_run({"build", "--binary", fixture("prov_target"), "-o", dir / "fix.so", dir.write("fix.c", kFix)});
  REQUIRE(built.exit_code == 0);
  auto cmake_fix = fixture("prov_fix_cmake.so");
  auto by_ctl = producer_of(dir / "fix.so", "prov_answer", true);
  auto by_cmake = producer_of(cmake_fix, "prov_answer", true);
  INFO("hotfix-ctl build: " << by_ctl.text << "\nhotfix_add_patch: " << by_cmake.text);
  std::set<std::string> a, b;
  for (auto& s : o_and_f(by_ctl)) a.insert(s);
  for (auto& s : o_and_f(by_cmake)) b.insert(s);
  b.erase("-fvisibility=default");  // CMake's visibility preset: the default anyway
  CHECK(a == b);
  CHECK(last_O(by_ctl) == last_O(by_cmake));
  auto stamps = hotfix::stamp__read(bytes_of(cmake_fix));
  REQUIRE(stamps);
  REQUIRE(stamps->size() == 1);
  CHECK(stamps->front().build_id == build_id_of(fixture("prov_target")));

  Target t;
  auto patched = ctl_run({"patch", "--pid", t.p(), "--lib", cmake_fix, "--observe", "0"});
  INFO(patched.out << patched.err);
  REQUIRE(patched.exit_code == 0);
  CHECK(patched.out.find("  provenance: built for this binary (build-id ") != std::string::npos);
  CHECK(t.call() == "ok 1041");
}

TEST_CASE("patch: a C++ fix built with another _GLIBCXX_USE_CXX11_ABI is refused, the same ABI applied") {
  require_root();
  Scratch dir;
  const char* fix_source =
      "#include <string>\n"
      "int prov_count(int) { std::string s(\"digits\"); return static_cast<int>(s.size()) - 1 + 1000; }\n";
  auto src = dir.write("fix.cpp", fix_source);
  auto old_abi = dir / "fix_old_abi.so", same_abi = dir / "fix.so";
  REQUIRE(run({"/usr/bin/g++", "-O2", "-g", "-shared", "-fPIC", "-D_GLIBCXX_USE_CXX11_ABI=0", src, "-o", old_abi})
              .exit_code == 0);
  REQUIRE(run({"/usr/bin/g++", "-O2", "-g", "-shared", "-fPIC", src, "-o", same_abi}).exit_code == 0);
  Target t("prov_target_cxx", "prov_count(int)");
  REQUIRE(t.call() == "ok 5");
  auto maps = file_mappings(t.pid());
  auto refused = ctl_run({"patch", "--pid", t.p(), "--lib", old_abi, "--observe", "0"});
  INFO(refused.out << refused.err);
  CHECK(refused.exit_code == 1);
  CHECK(refused.err.find("fix.so was compiled with _GLIBCXX_USE_CXX11_ABI=0 and the target's prov_count(int)") !=
        std::string::npos);
  CHECK(refused.err.find("with _GLIBCXX_USE_CXX11_ABI=1") != std::string::npos);
  expect_untouched(t, maps, "ok 5");
  auto applied = ctl_run({"patch", "--pid", t.p(), "--lib", same_abi, "--observe", "0"});
  INFO(applied.out << applied.err);
  REQUIRE(applied.exit_code == 0);
  CHECK(t.call() == "ok 1005");
}
