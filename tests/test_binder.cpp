// The planner (what replaces what) and the binder (fix.so's references to the target's own
// statics), on real ELF files built by tests/fixtures/binder.cmake and a real running target.
#include <gelf.h>
#include <unistd.h>

#include <catch2/catch.hpp>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "patch/binder.hpp"
#include "patch/fixlib.hpp"
#include "patch/plan.hpp"
#include "support/harness.hpp"

using namespace hotfix;
using hotfix::test::Child;
using hotfix::test::fixture;
namespace fs = std::filesystem;

namespace {

// A scratch directory, removed even when a test fails.
struct ScratchDir {
  fs::path path;
  ScratchDir() {
    char tmpl[] = "/tmp/hotfix-binder-XXXXXX";
    REQUIRE(::mkdtemp(tmpl));
    path = tmpl;
  }
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& leaf) const { return (path / leaf).string(); }
};

SymbolTable table_of(const std::string& path) {
  auto t = SymbolTable::for_file(path);
  INFO((t ? "" : t.error().line()));
  REQUIRE(t);
  return std::move(*t);
}

FixLibrary fix_of(const std::string& name) {
  auto f = fixlib__read(fixture(name));
  INFO((f ? "" : f.error().line()));
  REQUIRE(f);
  return std::move(*f);
}

template <typename T>
std::string error_of(const Result<T>& r) {
  REQUIRE_FALSE(r);
  return r.error().line();
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

// Copy `from` to `to` and change its ELF header: a crafted, otherwise valid library.
void copy_with_header(const std::string& from, const std::string& to, void (*edit)(GElf_Ehdr&)) {
  fs::copy_file(from, to);
  auto elf = ElfHandle::open(to, true);
  REQUIRE(elf);
  elf_flagelf(elf->get(), ELF_C_SET, ELF_F_LAYOUT);
  GElf_Ehdr ehdr;
  REQUIRE(gelf_getehdr(elf->get(), &ehdr));
  edit(ehdr);
  REQUIRE(gelf_update_ehdr(elf->get(), &ehdr));
  REQUIRE(elf_update(elf->get(), ELF_C_WRITE) >= 0);
}

const SymbolBinding* binding_for(const BoundLibrary& b, const std::string& symbol) {
  for (auto& x : b.bindings)
    if (x.symbol == symbol) return &x;
  return nullptr;
}

const Function* find_symbol(const std::vector<Function>& list, const std::string& mangled) {
  for (auto& f : list)
    if (f.mangled == mangled) return &f;
  return nullptr;
}

}  // namespace

// Plan options with only patterns set (every other field keeps its default).
PlanOptions patterns_only(std::vector<std::string> patterns) {
  PlanOptions opts;
  opts.patterns = std::move(patterns);
  return opts;
}

TEST_CASE("fix.so validation says what is wrong with the file") {
  ScratchDir dir;
  const std::string target = fixture("bind_target");
  CHECK(fixlib__validate(fixture("bind_fix.so"), target));

  CHECK_THAT(error_of(fixlib__validate(dir / "nope.so", target)), Catch::Contains("does not exist"));

  std::ofstream(dir / "text.so") << "this is not a library\n";
  CHECK_THAT(error_of(fixlib__validate(dir / "text.so", target)), Catch::Contains("is not an ELF file"));

  copy_with_header(fixture("bind_fix.so"), dir / "arm.so", [](GElf_Ehdr& h) { h.e_machine = EM_AARCH64; });
  auto arm = error_of(fixlib__validate(dir / "arm.so", target));
  CHECK_THAT(arm, Catch::Contains("built for aarch64") && Catch::Contains("target runs x86-64"));

  copy_with_header(fixture("bind_fix.so"), dir / "rel.so", [](GElf_Ehdr& h) { h.e_type = ET_REL; });
  CHECK_THAT(error_of(fixlib__validate(dir / "rel.so", target)),
             Catch::Contains("relocatable object") && Catch::Contains("not a shared library"));

  // A PIE is ET_DYN like a library, but dlopen refuses it.
  CHECK_THAT(error_of(fixlib__validate(target, target)), Catch::Contains("position-independent executable"));
}

TEST_CASE("plan: by default every function fix.so defines that the target has, by mangled name") {
  auto target = table_of(fixture("bind_target"));
  auto fix = fix_of("bind_fix.so");
  auto plan = plan__build(target, fix);
  INFO((plan ? "" : plan.error().line()));
  REQUIRE(plan);
  // Not helper (fix.so only declares it), not calls_address (the target lacks it), and none
  // of the C runtime's _init/_fini/frame_dummy that both files contain.
  REQUIRE(plan->entries.size() == 1);
  auto& e = plan->entries[0];
  CHECK(e.target.mangled == "_Z7computei");
  CHECK(e.replacement == "_Z7computei");
  const FixSymbol* fixed = nullptr;
  for (auto& s : fix.functions)
    if (s.name == "_Z7computei") fixed = &s;
  REQUIRE(fixed);
  CHECK(e.replacement_value == fixed->value);
  CHECK(e.replacement_size == fixed->size);
  CHECK(e.replacement_size > 0);
}

TEST_CASE("plan: patterns restrict the set; a target function without replacement is an error") {
  auto target = table_of(fixture("bind_target"));
  auto fix = fix_of("bind_fix.so");

  auto plan = plan__build(target, fix, patterns_only({"compute"}));
  REQUIRE(plan);
  REQUIRE(plan->entries.size() == 1);
  CHECK(plan->entries[0].target.name.find("compute") != std::string::npos);

  auto missing = error_of(plan__build(target, fix, patterns_only({"compute_total"})));
  CHECK_THAT(missing, Catch::Contains("has no replacement for `compute_total(int)`") &&
                          Catch::Contains("compute(int)"));

  // Pattern errors come from the shared pattern language, with its own suggestion.
  CHECK_THAT(error_of(plan__build(target, fix, patterns_only({"comptue"}))), Catch::Contains("comptue"));
}

TEST_CASE("plan: a static name defined twice in the target is refused, listing both") {
  auto target = table_of(fixture("bind_twins"));
  auto fix = fix_of("bind_twins_fix.so");
  for (auto patterns : {std::vector<std::string>{}, std::vector<std::string>{"helper"}}) {
    PlanOptions opts = patterns_only(patterns);
    opts.executable = fixture("bind_twins");
    auto err = error_of(plan__build(target, fix, opts));
    CHECK_THAT(err, Catch::Contains("`helper(int)` (_ZL6helperi) names 2 functions") &&
                        Catch::Contains("bind_twins_a.cpp:") && Catch::Contains("bind_twins_b.cpp:") &&
                        Catch::Contains("same object"));
  }
}

TEST_CASE("plan: a fix.so that replaces nothing the target has is refused") {
  auto err = error_of(plan__build(table_of(fixture("bind_twins")), fix_of("bind_fix.so")));
  CHECK_THAT(err, Catch::Contains("defines no function the target has") && Catch::Contains("compute(int)"));
}

TEST_CASE("binder: extern declarations bind to the target's file statics (offline, on the file)") {
  ScratchDir dir;
  const std::string exe = fixture("bind_target");
  auto target = table_of(exe);
  const Function* g_calls = find_symbol(target.variables(), "_ZL7g_calls");
  const Function* helper = find_symbol(target.functions(), "_ZL6helperi");
  REQUIRE(g_calls);
  REQUIRE(helper);

  for (auto lib : {"bind_fix.so", "bind_fix_now.so", "bind_fix_cmake.so"}) {
    SECTION(lib) {
      const std::string out = dir / "run/1234/1-fix.so";  // parent directories do not exist yet
      auto bound = binder__prepare(target, exe, fixture(lib), out);
      INFO((bound ? "" : bound.error().line()));
      REQUIRE(bound);
      CHECK(bound->path == out);
      REQUIRE(bound->bindings.size() == 2);
      REQUIRE(binding_for(*bound, "g_calls"));
      REQUIRE(binding_for(*bound, "_Z6helperi"));
      CHECK(binding_for(*bound, "g_calls")->target.mangled == "_ZL7g_calls");
      CHECK(binding_for(*bound, "_Z6helperi")->target.mangled == "_ZL6helperi");

      // g_calls: one GOT slot and one data word; helper: a PLT slot or (-fno-plt) a GOT slot.
      REQUIRE(bound->fixups.size() == 3);
      int got = 0, absolute = 0;
      for (auto& f : bound->fixups) {
        const Function* want = f.symbol == "g_calls" ? g_calls : helper;
        CHECK(f.value == want->address);
        CHECK(f.loader_value == 0);
        got += f.kind == arch::RelocKind::got;
        absolute += f.kind == arch::RelocKind::absolute64;
      }
      CHECK(got == 2);
      CHECK(absolute == 1);

      // The copy differs from fix.so in exactly the two st_info bytes, now WEAK.
      auto original = slurp(fixture(lib)), copy = slurp(out);
      REQUIRE(original.size() == copy.size());
      size_t differing = 0;
      for (size_t i = 0; i < copy.size(); ++i) differing += original[i] != copy[i];
      CHECK(differing == 2);
      auto rewritten = fixlib__read(out);
      REQUIRE(rewritten);
      for (auto& s : rewritten->dynsyms)
        if (s.name == "g_calls" || s.name == "_Z6helperi") CHECK((!s.defined && s.bind == STB_WEAK));
      CHECK(fs::status(out).permissions() == (fs::perms::owner_read | fs::perms::owner_write));

      // The final stores: 8 bytes of the value at load base + r_offset.
      auto writes = binder__writes(bound->fixups, 0x7f0000000000);
      REQUIRE(writes.size() == 3);
      for (size_t i = 0; i < writes.size(); ++i) {
        CHECK(writes[i].address == 0x7f0000000000 + bound->fixups[i].offset);
        uint64_t v = 0;
        REQUIRE(writes[i].bytes.size() == sizeof v);
        std::memcpy(&v, writes[i].bytes.data(), sizeof v);
        CHECK(v == bound->fixups[i].value);
      }
    }
  }
}

TEST_CASE("binder: C statics bind by their plain names") {
  ScratchDir dir;
  const std::string exe = fixture("bind_ctarget");
  auto target = table_of(exe);
  auto bound = binder__prepare(target, exe, fixture("bind_cfix.so"), dir / "c-fix.so");
  INFO((bound ? "" : bound.error().line()));
  REQUIRE(bound);
  REQUIRE(bound->bindings.size() == 2);
  REQUIRE(binding_for(*bound, "g_calls"));
  REQUIRE(binding_for(*bound, "helper"));
  CHECK(binding_for(*bound, "g_calls")->target.binding == Binding::local);
  CHECK(binding_for(*bound, "helper")->target.binding == Binding::local);
  CHECK(binding_for(*bound, "helper")->target.address == find_symbol(target.functions(), "helper")->address);
}

TEST_CASE("binder: a plain C++ fix that calls std::to_string binds (its template digit table is its own)") {
  ScratchDir dir;
  const std::string exe = fixture("bind_str_target");
  Child child({exe});
  REQUIRE(child.wait_for("n=42"));
  auto table = SymbolTable::for_pid(child.pid());  // with the libstdc++ it runs
  REQUIRE(table);
  auto bound = binder__prepare(*table, exe, fixture("bind_fix_to_string.so"), dir / "fix.so");
  INFO((bound ? "" : bound.error().line()));
  REQUIRE(bound);
  for (auto& b : bound->bindings) CHECK(b.symbol.find("__digits") == std::string::npos);  // never bound to the target's
}

TEST_CASE("binder: refuses what it cannot bind, and leaves no file behind") {
  ScratchDir dir;
  const std::string out = dir / "fix.so";

  auto missing = error_of(binder__prepare(table_of(fixture("bind_target")), fixture("bind_target"),
                                          fixture("bind_needs_missing.so"), out));
  CHECK_THAT(missing, Catch::Contains("fix.so needs `no_such_counter`, which the target does not define"));

  auto twins = error_of(binder__prepare(table_of(fixture("bind_twins")), fixture("bind_twins"),
                                        fixture("bind_twins_needs.so"), out));
  CHECK_THAT(twins, Catch::Contains("fix.so needs `counter`, which names 2 symbols in the target") &&
                        Catch::Contains("bind_twins at 0x"));

  auto tls = error_of(binder__prepare(table_of(fixture("bind_target")), fixture("bind_target"),
                                      fixture("bind_fix_tls.so"), out));
  CHECK_THAT(tls, Catch::Contains("thread-local variable `t_calls`"));

  // A fix that copied the static (or defined the variable) would count in a private copy.
  for (auto lib : {"bind_fix_copy.so", "bind_fix_defines.so"}) {
    auto copy = error_of(binder__prepare(table_of(fixture("bind_target")), fixture("bind_target"), fixture(lib), out));
    CHECK_THAT(copy, Catch::Contains("fix.so defines its own `g_calls`") && Catch::Contains("private copy") &&
                         Catch::Contains("extern"));
  }

  CHECK_FALSE(fs::exists(out));
  CHECK(fs::is_empty(dir.path));
}

namespace {
uint64_t parse_base(const std::string& reply) {
  auto at = reply.find("base=");
  REQUIRE(at != std::string::npos);
  return std::stoull(reply.substr(at + 5), nullptr, 16);
}
}  // namespace

TEST_CASE("binder end to end: the fixed compute() in the live target uses its static counter and helper") {
  hotfix::test::require_root();
  for (auto lib : {"bind_fix.so", "bind_fix_now.so", "bind_fix_cmake.so"}) {
    SECTION(lib) {
      ScratchDir dir;
      Child target({fixture("bind_target")});
      REQUIRE(target.wait_for("ready"));
      CHECK(target.request("compute 5") == "ok value=10 calls=1 helper_calls=1");

      // Without the binder the dynamic linker cannot see the statics at all.
      CHECK_THAT(target.request(std::string("load ") + fixture(lib)),
                 Catch::StartsWith("err") && Catch::Contains("undefined symbol"));

      auto table = SymbolTable::for_pid(target.pid());
      REQUIRE(table);
      auto bound = binder__prepare(*table, fmt::format("/proc/{}/exe", target.pid()), fixture(lib),
                                   dir / fmt::format("{}/1-fix.so", target.pid()));
      INFO((bound ? "" : bound.error().line()));
      REQUIRE(bound);
      std::string bound_names;
      for (auto& b : bound->bindings) bound_names += b.symbol + " -> " + b.target.mangled + " in " + b.target.object + "; ";
      INFO(bound_names);
      REQUIRE(bound->fixups.size() == 3);

      // The target loads the copy itself, as hotfix's injected dlopen(RTLD_NOW) will.
      auto loaded = target.request("load " + bound->path);
      REQUIRE_THAT(loaded, Catch::StartsWith("ok base="));
      uint64_t base = parse_base(loaded);
      auto from_maps = binder__load_base(target.pid(), bound->path);
      REQUIRE(from_maps);
      CHECK(*from_maps == base);

      auto applied = binder__apply(target.pid(), base, bound->fixups);
      INFO((applied ? "" : applied.error().line()));
      REQUIRE(applied);
      // Applying twice is harmless (the slots already hold the values).
      CHECK(binder__apply(target.pid(), base, bound->fixups));

      // The fix's compute: helper(5) + 1 through the target's helper, counting in its g_calls.
      CHECK(target.request("call _Z7computei 5") == "ok value=11 calls=2 helper_calls=2");
      // The target's own code sees the same counter.
      CHECK(target.request("compute 1") == "ok value=2 calls=3 helper_calls=3");
      // The R_X86_64_64 data word points at the live static too.
      CHECK(target.request("ptr _Z13calls_addressv") == "ok same=1");
    }
  }
}
