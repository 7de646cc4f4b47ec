// Signatures and layouts from DWARF (patch/abi_types.hpp): a replacement whose signature or
// whose view of the target's types differs from the target's is refused, naming what differs,
// with the target exactly as it was; an identical one (typedef names aside) is accepted and
// runs; without DWARF the plan says what was not checked and the patch proceeds. Real
// processes (tests/fixtures/abi_ctarget.c, abi_cxxtarget.cpp), fixes built with plain
// gcc/g++ -O2 -g the way a user builds them.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "support/harness.hpp"

using namespace hotfix::test;
using namespace std::chrono;
namespace fs = std::filesystem;

namespace {

struct ScratchDir {
  fs::path path;
  ScratchDir() {
    char tmpl[] = "/tmp/hotfix-abi-types-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    path = tmpl;
    ::chmod(tmpl, 0755);
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& leaf) const { return (path / leaf).string(); }
};

// A fix the way a user builds one: gcc for C, g++ for C++, -O2 -g -shared -fPIC.
std::string build_fix(const ScratchDir& dir, const std::string& name, const std::string& code, bool cxx = false,
                      std::vector<std::string> flags = {"-g"}) {
  std::string src = dir / (name + (cxx ? ".cpp" : ".c")), out = dir / (name + ".so");
  { std::ofstream(src) << code; }
  std::vector<std::string> argv{cxx ? "/usr/bin/g++" : "/usr/bin/gcc", "-O2", "-shared", "-fPIC", src, "-o", out};
  argv.insert(argv.begin() + 2, flags.begin(), flags.end());
  auto r = run(argv);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  REQUIRE(::chmod(out.c_str(), 0644) == 0);
  return out;
}

// A fixture target, its functions' entries, and what a refusal must leave exactly as it was.
struct Target {
  Child child;
  std::vector<unsigned long> entries;

  explicit Target(const std::string& name) : child({fixture(name)}) {
    REQUIRE(child.request("ready").rfind("ok", 0) == 0);
    std::istringstream in(child.request("addrs").substr(3));
    for (std::string a; in >> a;) entries.push_back(std::stoul(a, nullptr, 16));
    REQUIRE(!entries.empty());
  }
  ~Target() {
    child.signal(SIGKILL);
    child.wait();
    std::error_code ec;
    fs::remove_all("/run/hotfix/" + std::to_string(pid()), ec);
    fs::remove_all("/sys/fs/bpf/hotfix/" + std::to_string(pid()), ec);
  }
  pid_t pid() const { return child.pid(); }
  std::string ask(const std::string& what) { return child.request(what); }

  struct Snapshot {
    std::vector<std::vector<unsigned char>> text;
    std::set<std::string> mappings;
    bool operator==(const Snapshot&) const = default;
  };
  Snapshot snapshot() const {
    Snapshot s;
    for (auto e : entries) s.text.push_back(read_memory(pid(), e, 16));
    s.mappings = file_mappings(pid());
    return s;
  }

  RunResult patch(const std::string& lib, std::vector<std::string> extra = {}) {
    std::vector<std::string> args{"patch", "--pid", std::to_string(pid()), "--lib", lib, "--observe", "0"};
    args.insert(args.end(), extra.begin(), extra.end());
    return ctl_run(args);
  }
};

// Refused in one line naming every needle; the answers, the text and the mappings as before.
void expect_refused(Target& t, const std::string& lib, const std::vector<std::string>& needles,
                    const std::vector<std::pair<std::string, std::string>>& answers) {
  auto before = t.snapshot();
  auto r = t.patch(lib);
  INFO("exit " << r.exit_code << "\nstdout: " << r.out << "\nstderr: " << r.err);
  CHECK(r.exit_code == 1);
  CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
  CHECK(r.err.find("--no-abi-check") != std::string::npos);
  for (auto& n : needles) CHECK(r.err.find(n) != std::string::npos);
  CHECK(t.snapshot() == before);
  CHECK(status_field(t.pid(), "TracerPid") == 0);
  for (auto& [command, answer] : answers) CHECK(t.ask(command) == answer);
}

void expect_applied(Target& t, const std::string& lib, const std::string& note,
                    const std::vector<std::pair<std::string, std::string>>& answers, std::vector<std::string> extra = {}) {
  auto r = t.patch(lib, extra);
  INFO("stdout: " << r.out << "\nstderr: " << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.find(note) != std::string::npos);
  CHECK(r.out.find("applied patch") != std::string::npos);
  for (auto& [command, answer] : answers) CHECK(t.ask(command) == answer);
}

}  // namespace

TEST_CASE("signatures: a changed parameter count, parameter type or return type is refused, the target untouched",
          "[abi-types]") {
  require_root();
  ScratchDir dir;
  Target t("abi_ctarget");
  const std::vector<std::pair<std::string, std::string>> unchanged{{"scale", "ok 42"}};
  SECTION("the issue's int scale(int) for long scale(long, long)") {
    expect_refused(t, build_fix(dir, "issue", "int scale(int a) { return a * 2; }\n"),
                   {"the replacement of scale does not match the target",
                    "scale returns 'long int' (8 bytes, integer) in the target but 'int' (4 bytes, integer) in fix.so"},
                   unchanged);
  }
  SECTION("parameter count") {
    expect_refused(t, build_fix(dir, "count", "long scale(long a) { return a * 2; }\n"),
                   {"scale takes 2 parameters in the target but 1 in fix.so"}, unchanged);
  }
  SECTION("a parameter's type") {
    expect_refused(t, build_fix(dir, "param", "long scale(long a, double b) { return a * (long)b; }\n"),
                   {"parameter 2 ('b') of scale is 'long int' (8 bytes, integer) in the target but 'double' (8 bytes, "
                    "floating point) in fix.so"},
                   unchanged);
  }
  SECTION("the return type") {
    expect_refused(t, build_fix(dir, "ret", "int scale(long a, long b) { return a * b; }\n"),
                   {"scale returns 'long int' (8 bytes, integer) in the target but 'int' (4 bytes, integer)"}, unchanged);
  }
}

TEST_CASE("signatures: C++'s return type, which the mangled name does not carry, is compared", "[abi-types]") {
  require_root();
  ScratchDir dir;
  Target t("abi_cxxtarget");
  expect_refused(t, build_fix(dir, "price", "namespace shop { int price(long x) { return x * 20; } }\n", true),
                 {"shop::price(long) returns 'long int' (8 bytes, integer) in the target but 'int' (4 bytes, integer)"},
                 {{"price", "ok 50"}});
}

TEST_CASE("signatures: an identical signature is accepted and applied; so are the same types under other typedef "
          "names", "[abi-types]") {
  require_root();
  ScratchDir dir;
  Target t("abi_ctarget");
  SECTION("the same declaration") {
    expect_applied(t, build_fix(dir, "same", "long scale(long a, long b) { return a * (b + 1000); }\n"),
                   "types: signatures and 0 types of 1 function match", {{"scale", "ok 6042"}, {"total", "ok 6"}});
  }
  SECTION("other typedef names, a typedef'd and const-qualified struct") {
    expect_applied(t,
                   build_fix(dir, "typedefs",
                             "typedef long amount_t;\ntypedef int count_t;\n"
                             "typedef struct order { count_t id; count_t qty; count_t unit; } order_t;\n"
                             "typedef const order_t corder;\n"
                             "amount_t order_total(corder* o) { return o->id + o->qty + o->unit + 100; }\n"),
                   "types: signatures and 1 type of 1 function match", {{"total", "ok 106"}, {"scale", "ok 42"}});
  }
  SECTION("a recursive type (a list node pointing to its own kind) is compared once") {
    expect_applied(t,
                   build_fix(dir, "recursive",
                             "struct node { int value; struct node* next; };\n"
                             "long list_sum(const struct node* n) { long s = 100; for (; n; n = n->next) s += n->value; "
                             "return s; }\n"),
                   "types: signatures and 1 type of 1 function match", {{"list", "ok 106"}, {"total", "ok 6"}});
  }
}

TEST_CASE("layouts: a struct, a bitfield or an enum that differs from the target's is refused, naming the type, the "
          "member and both values", "[abi-types]") {
  require_root();
  ScratchDir dir;
  Target t("abi_ctarget");
  const std::vector<std::pair<std::string, std::string>> unchanged{{"total", "ok 6"}, {"flags", "ok 9"}, {"color", "ok 2"}};
  auto total_fix = [&](const std::string& name, const std::string& order) {
    return build_fix(dir, name, order + "long order_total(const struct order* o) { return o->id + o->unit + 100; }\n");
  };
  SECTION("the issue's struct order that lost a member") {
    expect_refused(t, total_fix("lost", "struct order { int id; int unit; };\n"),
                   {"struct order: member 'unit' is at offset 8 in the target but at offset 4 in fix.so"}, unchanged);
  }
  SECTION("a member removed at the end") {
    expect_refused(t, build_fix(dir, "removed", "struct order { int id; int qty; };\n"
                                               "long order_total(const struct order* o) { return o->id + o->qty; }\n"),
                   {"struct order: member 'unit' (at offset 8 in the target) is not in fix.so"}, unchanged);
  }
  SECTION("members reordered") {
    expect_refused(t, total_fix("reordered", "struct order { int qty; int id; int unit; };\n"),
                   {"struct order: member 'id' is at offset 0 in the target but at offset 4 in fix.so"}, unchanged);
  }
  SECTION("a member retyped") {
    expect_refused(t, build_fix(dir, "retyped", "struct order { int id; int qty; float unit; };\n"
                                               "long order_total(const struct order* o) { return o->id + (long)o->unit; }\n"),
                   {"struct order: member 'unit' is 'int' (4 bytes, integer) in the target but 'float' (4 bytes, "
                    "floating point) in fix.so"},
                   unchanged);
  }
  SECTION("the size changed") {
    expect_refused(t, total_fix("size", "struct __attribute__((aligned(32))) order { int id; int qty; int unit; };\n"),
                   {"struct order is 12 bytes in the target but 32 bytes in fix.so"}, unchanged);
  }
  SECTION("a bitfield changed") {
    expect_refused(t, build_fix(dir, "bitfield", "struct flags { unsigned mode : 2; unsigned level : 4; };\n"
                                                "int flag_level(const struct flags* f) { return f->level + 100; }\n"),
                   {"struct flags: member 'mode' is a 3-bit field at bit 0 in the target but a 2-bit field at bit 0 in "
                    "fix.so"},
                   unchanged);
  }
  SECTION("an enum's values changed") {
    expect_refused(t, build_fix(dir, "enum", "enum color { RED, BLUE, GREEN };\n"
                                            "int color_code(enum color c) { return (int)c + 100; }\n"),
                   {"enum color: enumerator 'GREEN' is 1 in the target but 2 in fix.so"}, unchanged);
  }
  SECTION("a variable the fix binds to, through its own struct order") {
    expect_refused(t, build_fix(dir, "variable", "struct order { int id; int unit; };\nextern struct order g_last_order;\n"
                                                "long last_total(void) { return g_last_order.id + g_last_order.unit; }\n"),
                   {"fix.so's view of the target's variable 'g_last_order' does not match the target",
                    "struct order: member 'unit' is at offset 8 in the target but at offset 4 in fix.so"},
                   {{"last", "ok 7"}});
  }
}

namespace {

// The target's class Shape (with `extra_virtual` added, `scaled` as scaled_area's declaration)
// and a replacement `function` after it.
std::string shape_fix(const std::string& extra_virtual, const std::string& function,
                      const std::string& scaled = "long scaled_area(int k) const;") {
  return "namespace shop {\nstruct Shape {\n  Shape(int w, int h) : w(w), h(h) {}\n  virtual ~Shape() {}\n"
         "  virtual int area() const { return w * h; }\n" + extra_virtual +
         "  virtual int perimeter() const { return 2 * (w + h); }\n  " + scaled + "\n  int w, h;\n};\n" + function +
         "\n}\n";
}
std::string measure_fix(const std::string& extra_virtual, const std::string& body) {
  return shape_fix(extra_virtual, "int measure(const Shape& s) { " + body + " }");
}

}  // namespace

TEST_CASE("layouts: a C++ class with a virtual method added is refused; the same class is accepted and applied",
          "[abi-types]") {
  require_root();
  ScratchDir dir;
  Target t("abi_cxxtarget");
  SECTION("a virtual method added") {
    expect_refused(t,
                   build_fix(dir, "virtual", measure_fix("  virtual int scaled(int k) const { return k * w * h; }\n",
                                                         "return s.scaled(1) + 1000;"), true),
                   {"struct shop::Shape: virtual method 'perimeter' is in vtable slot 3 in the target but slot 4 in "
                    "fix.so"},
                   {{"measure", "ok 12"}});
  }
  SECTION("the same class") {
    expect_applied(t, build_fix(dir, "same", measure_fix("", "return s.area() + 1000;"), true),
                   "types: signatures and 1 type of 1 function match", {{"measure", "ok 1012"}, {"price", "ok 50"}});
  }
  SECTION("a member function whose return type changed") {
    expect_refused(t,
                   build_fix(dir, "method", shape_fix("", "int Shape::scaled_area(int k) const { return k * w * h + 1000; }",
                                                      "int scaled_area(int k) const;"), true),
                   {"shop::Shape::scaled_area(int) const returns 'long int' (8 bytes, integer) in the target but 'int' "
                    "(4 bytes, integer) in fix.so"},
                   {{"scaled", "ok 24"}});
  }
  SECTION("the same member function") {
    expect_applied(t,
                   build_fix(dir, "method", shape_fix("", "long Shape::scaled_area(int k) const { return 1000L + k * w * h; }"),
                             true),
                   "types: signatures and 1 type of 1 function match", {{"scaled", "ok 1024"}, {"measure", "ok 12"}});
  }
}

TEST_CASE("no DWARF: the plan says in one line what was not checked and how to get it, and the patch applies",
          "[abi-types]") {
  require_root();
  ScratchDir dir;
  const char* fix = "long scale(long a, long b) { return a * (b + 1000); }\n";
  SECTION("a target without DWARF") {
    Target t("abi_ctarget_nodwarf");
    expect_applied(t, build_fix(dir, "fix", fix),
                   "  types: not checked for scale: the target has no DWARF (install the -dbgsym package or build "
                   "with -g)\n",
                   {{"scale", "ok 6042"}});
  }
  SECTION("a fix.so built without -g") {
    Target t("abi_ctarget");
    expect_applied(t, build_fix(dir, "fix", fix, false, {}),
                   "  types: not checked for scale: fix.so has no DWARF (build it with -g)\n", {{"scale", "ok 6042"}});
  }
}

TEST_CASE("--no-abi-check skips the comparison and the plan says so", "[abi-types]") {
  require_root();
  ScratchDir dir;
  Target t("abi_ctarget");
  auto before = t.snapshot();
  auto r = t.patch(build_fix(dir, "issue", "int scale(int a) { return a * 2; }\n"), {"--no-abi-check", "--dry-run"});
  INFO(r.out << r.err);
  CHECK(r.exit_code == 0);
  CHECK(r.out.find("  abi: not checked: --no-abi-check was given\n") != std::string::npos);
  CHECK(r.out.find("types:") == std::string::npos);
  CHECK(t.snapshot() == before);
  CHECK(t.ask("scale") == "ok 42");
}

TEST_CASE("the target's DWARF is found where `symbols` finds it: a separate debug file by build-id under "
          "HOTFIX_DEBUG_ROOT", "[abi-types]") {
  require_root();
  ScratchDir dir;
  auto notes = run({"/usr/bin/readelf", "-n", fixture("abi_ctarget_nodwarf")});
  auto at = notes.out.find("Build ID: ");
  REQUIRE(at != std::string::npos);
  std::string id = notes.out.substr(at + 10, notes.out.find('\n', at) - at - 10);
  fs::create_directories(dir.path / ".build-id" / id.substr(0, 2));
  std::string debug = dir / (".build-id/" + id.substr(0, 2) + "/" + id.substr(2) + ".debug");
  REQUIRE(run({"/usr/bin/objcopy", "--only-keep-debug", fixture("abi_ctarget"), debug}).exit_code == 0);
  struct DebugRoot {  // set for the hotfix-ctl runs below, unset however the test ends
    explicit DebugRoot(const std::string& root) { ::setenv("HOTFIX_DEBUG_ROOT", root.c_str(), 1); }
    ~DebugRoot() { ::unsetenv("HOTFIX_DEBUG_ROOT"); }
  } root(dir.path.string());
  Target t("abi_ctarget_nodwarf");
  expect_refused(t, build_fix(dir, "lost", "struct order { int id; int unit; };\n"
                                           "long order_total(const struct order* o) { return o->id + o->unit; }\n"),
                 {"struct order: member 'unit' is at offset 8 in the target but at offset 4 in fix.so"}, {{"total", "ok 6"}});
}
