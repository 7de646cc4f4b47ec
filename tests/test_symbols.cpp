// Symbol tables of real running processes, checked against the ELF files read directly.
#include <catch2/catch.hpp>

#include <elfutils/libdwelf.h>
#include <fcntl.h>
#include <gelf.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>

#include "process/maps.hpp"
#include "support/harness.hpp"
#include "symbols/pattern.hpp"

using namespace hotfix;
using namespace hotfix::test;
namespace fs = std::filesystem;

namespace {

struct ElfSym {
  uint64_t value = 0;
  uint64_t size = 0;
  int bind = 0;
  int type = 0;
};

// What `nm` says: the .symtab of `path`, by name (read with libelf, independently of SymbolTable).
std::map<std::string, ElfSym> nm(const std::string& path) {
  elf_version(EV_CURRENT);
  std::map<std::string, ElfSym> out;
  int fd = ::open(path.c_str(), O_RDONLY);
  REQUIRE(fd >= 0);
  Elf* elf = elf_begin(fd, ELF_C_READ, nullptr);
  REQUIRE(elf);
  Elf_Scn* scn = nullptr;
  while ((scn = elf_nextscn(elf, scn))) {
    GElf_Shdr sh;
    gelf_getshdr(scn, &sh);
    if (sh.sh_type != SHT_SYMTAB) continue;
    Elf_Data* data = elf_getdata(scn, nullptr);
    for (size_t i = 1; i < sh.sh_size / sh.sh_entsize; i++) {
      GElf_Sym s;
      gelf_getsym(data, static_cast<int>(i), &s);
      out[elf_strptr(elf, sh.sh_link, s.st_name)] = {s.st_value, s.st_size, GELF_ST_BIND(s.st_info),
                                                     GELF_ST_TYPE(s.st_info)};
    }
  }
  elf_end(elf);
  ::close(fd);
  return out;
}

std::string build_id(const std::string& path) {
  elf_version(EV_CURRENT);
  int fd = ::open(path.c_str(), O_RDONLY);
  Elf* elf = elf_begin(fd, ELF_C_READ, nullptr);
  const void* id = nullptr;
  ssize_t n = dwelf_elf_gnu_build_id(elf, &id);
  std::string hex;
  for (ssize_t i = 0; i < n; i++) hex += fmt::format("{:02x}", static_cast<const unsigned char*>(id)[i]);
  elf_end(elf);
  ::close(fd);
  return hex;
}

std::vector<unsigned char> file_bytes(const std::string& path, uint64_t offset, size_t len) {
  std::ifstream in(path, std::ios::binary);
  in.seekg(static_cast<std::streamoff>(offset));
  std::vector<unsigned char> buf(len);
  in.read(reinterpret_cast<char*>(buf.data()), static_cast<std::streamsize>(len));
  return buf;
}

const Function* by_mangled(const std::vector<Function>& list, const std::string& mangled) {
  for (auto& f : list)
    if (f.mangled == mangled) return &f;
  return nullptr;
}

// A running fixture that has printed "ready".
struct Running {
  Child child;
  explicit Running(const std::string& name) : child({fixture(name)}) {
    REQUIRE(child.wait_for("ready"));
  }
};

// A private debug root, removed however the test ends.
struct TempDir {
  fs::path path;
  TempDir() {
    std::string tmpl = (fs::temp_directory_path() / "hotfix-debug-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()));
    path = tmpl;
  }
  ~TempDir() { fs::remove_all(path); }
};

}  // namespace

TEST_CASE("a C/C++ process: names, mangled names, sizes, bindings match the ELF file") {
  require_root();
  Running app("sym_app");
  auto table = SymbolTable::for_pid(app.child.pid());
  REQUIRE(table);
  auto elf = nm(fixture("sym_app"));
  const auto& fns = table->functions();

  struct Expect {
    const char* mangled;
    const char* name;
    Binding binding;
  };
  for (auto e : {Expect{"_ZN7pricing8discountEd", "pricing::discount(double)", Binding::global},
                 Expect{"_ZN7pricing6detail11round_centsEd", "pricing::detail::round_cents(double)", Binding::global},
                 Expect{"_ZN5Order3addEi", "Order::add(int)", Binding::weak},
                 Expect{"_ZN5Order3addEd", "Order::add(double)", Binding::weak},
                 Expect{"_ZNK5Order5totalEv", "Order::total() const", Binding::weak},
                 Expect{"_ZNK5OrderclEi", "Order::operator()(int) const", Binding::weak},
                 Expect{"_Z6max_ofIiET_S0_S0_", "int max_of<int>(int, int)", Binding::weak},
                 Expect{"_ZL18file_static_helperi", "file_static_helper(int)", Binding::local},
                 Expect{"_ZN12_GLOBAL__N_111anon_helperEi", "(anonymous namespace)::anon_helper(int)", Binding::local},
                 Expect{"c_add", "c_add", Binding::global}, Expect{"c_static_helper", "c_static_helper", Binding::local},
                 Expect{"main", "main", Binding::global}}) {
    INFO(e.mangled);
    const Function* f = by_mangled(fns, e.mangled);
    REQUIRE(f);
    CHECK(f->name == e.name);
    CHECK(f->binding == e.binding);
    CHECK(f->object == fixture("sym_app"));
    REQUIRE(elf.count(e.mangled));
    CHECK(f->size == elf[e.mangled].size);
    CHECK(f->size > 0);
    CHECK_FALSE(f->exported);  // an executable exports nothing unless linked -rdynamic
  }

  // One load bias for the whole executable: runtime address - st_value is the same everywhere.
  const Function* discount = by_mangled(fns, "_ZN7pricing8discountEd");
  uint64_t bias = discount->address - elf["_ZN7pricing8discountEd"].value;
  for (auto* name : {"main", "c_add", "_ZL18file_static_helperi", "_Z6max_ofIiET_S0_S0_"})
    CHECK(by_mangled(fns, name)->address - elf[name].value == bias);

  // Address and file offset agree: the code at the runtime address is the bytes at the offset.
  for (auto* name : {"_ZN7pricing8discountEd", "main", "_ZL18file_static_helperi", "c_static_helper"}) {
    INFO(name);
    const Function* f = by_mangled(fns, name);
    auto live = read_memory(app.child.pid(), f->address, f->size);
    REQUIRE(live.size() == f->size);
    CHECK(live == file_bytes(fixture("sym_app"), f->offset, f->size));
  }

  // Sorted by address.
  CHECK(std::is_sorted(fns.begin(), fns.end(), [](auto& a, auto& b) { return a.address < b.address; }));
}

TEST_CASE("a shared library's functions: load bias, offset, exported") {
  require_root();
  Running app("sym_app");
  auto table = SymbolTable::for_pid(app.child.pid());
  REQUIRE(table);
  auto lib = fixture("libsym_shapes.so");
  auto elf = nm(lib);
  auto area = symbols__select(*table, {"shapes::area"});
  REQUIRE(area);
  REQUIRE(area->size() == 1);
  const Function& f = area->front();
  CHECK(f.object == lib);
  CHECK(f.name == "shapes::area(double, double)");
  CHECK(f.exported);
  CHECK(f.size == elf["_ZN6shapes4areaEdd"].size);
  auto live = read_memory(app.child.pid(), f.address, f.size);
  CHECK(live == file_bytes(lib, f.offset, f.size));

  auto statics = symbols__select(*table, {"shapes::scale_factor"}, {"libsym_shapes.so"});
  REQUIRE(statics);
  CHECK(statics->front().binding == Binding::local);
  CHECK_FALSE(statics->front().exported);

  // The object list has the executable, the library and libc/libstdc++, each once.
  int shapes_loads = 0;
  bool libstdcxx = false;
  for (auto& o : table->objects()) {
    if (o.path == lib) {
      shapes_loads++;
      CHECK(o.load_bias == f.address - elf["_ZN6shapes4areaEdd"].value);
      CHECK_FALSE(o.build_id.empty());
    }
    libstdcxx = libstdcxx || o.path.find("libstdc++") != std::string::npos;
  }
  CHECK(shapes_loads == 1);
  CHECK(libstdcxx);
}

TEST_CASE("function_at finds the function containing an address") {
  require_root();
  Running app("sym_app");
  auto table = SymbolTable::for_pid(app.child.pid());
  REQUIRE(table);
  const Function* add = by_mangled(table->functions(), "_ZN5Order3addEi");
  REQUIRE(add);
  CHECK(table->function_at(add->address) == add);
  CHECK(table->function_at(add->address + add->size / 2) == add);
  CHECK(table->function_at(add->address + add->size - 1) == add);
  const Function* after = table->function_at(add->address + add->size);
  CHECK(after != add);
  CHECK(table->function_at(1) == nullptr);
  // Every function of the executable finds itself at its last byte.
  for (auto& f : table->functions())
    if (f.object == fixture("sym_app") && f.size) CHECK(table->function_at(f.address + f.size - 1) == &f);
}

TEST_CASE("variables: file statics and globals, with addresses the binder can use") {
  require_root();
  Running app("sym_app");
  auto table = SymbolTable::for_pid(app.child.pid());
  REQUIRE(table);
  auto elf = nm(fixture("sym_app"));
  const Function* counter = by_mangled(table->variables(), "_ZL7counter");
  REQUIRE(counter);
  CHECK(counter->name == "counter");
  CHECK(counter->binding == Binding::local);
  CHECK(counter->size == sizeof(int));
  const Function* c_counter = by_mangled(table->variables(), "c_counter");
  REQUIRE(c_counter);
  CHECK(c_counter->binding == Binding::global);
  // Initialised data: the live value is the one in the file (7), at address = st_value + bias.
  auto live = read_memory(app.child.pid(), c_counter->address, 4);
  REQUIRE(live.size() == 4);
  CHECK(live == file_bytes(fixture("sym_app"), c_counter->offset, 4));
  CHECK(live[0] == 7);
  const Function* main_fn = by_mangled(table->functions(), "main");
  CHECK(c_counter->address - elf["c_counter"].value == main_fn->address - elf["main"].value);
  CHECK(by_mangled(table->functions(), "_ZL7counter") == nullptr);  // data is not code
}

TEST_CASE("for_file: addresses are st_value") {
  auto table = SymbolTable::for_file(fixture("sym_app"));
  REQUIRE(table);
  auto elf = nm(fixture("sym_app"));
  const Function* f = by_mangled(table->functions(), "_ZN5Order3addEd");
  REQUIRE(f);
  CHECK(f->address == elf["_ZN5Order3addEd"].value);
  CHECK(table->pid() == 0);
  CHECK_FALSE(SymbolTable::for_file("/nonexistent/file"));
  auto not_elf = SymbolTable::for_file(HOTFIX_SOURCE_DIR "/CMakeLists.txt");
  REQUIRE_FALSE(not_elf);
  CHECK(not_elf.error().what.find("is not an ELF file") != std::string::npos);
}

TEST_CASE("a stripped binary: static functions come from its debug file, found by build-id") {
  require_root();
  TempDir root;
  auto stripped = fixture("sym_stripped");
  CHECK(nm(stripped).empty());  // really stripped
  Running app("sym_stripped");
  SymbolOptions opts{root.path.string()};

  // Without the debug file there is no trace of the static function.
  auto bare = SymbolTable::for_pid(app.child.pid(), opts);
  REQUIRE(bare);
  CHECK_FALSE(symbols__select(*bare, {"secret_helper"}));

  std::string id = build_id(stripped);
  REQUIRE(id.size() > 2);
  fs::path dest = root.path / ".build-id" / id.substr(0, 2) / (id.substr(2) + ".debug");
  fs::create_directories(dest.parent_path());
  fs::copy_file(fixture("sym_stripped.debug"), dest);

  auto table = SymbolTable::for_pid(app.child.pid(), opts);
  REQUIRE(table);
  auto found = symbols__select(*table, {"secret_helper", "visible_entry"});
  REQUIRE(found);
  REQUIRE(found->size() == 2);
  auto full = nm(fixture("sym_stripped_full"));
  for (auto& f : *found) {
    INFO(f.name);
    CHECK(f.size == full[f.name].size);
    CHECK(f.object == stripped);
    auto live = read_memory(app.child.pid(), f.address, f.size);
    CHECK(live == file_bytes(stripped, f.offset, f.size));
  }
  CHECK(by_mangled(*found, "secret_helper")->binding == Binding::local);
  CHECK(by_mangled(table->variables(), "secret_counter"));
  bool reported = false;
  for (auto& o : table->objects())
    if (o.path == stripped) reported = o.debug_file == dest.string() && o.build_id == id;
  CHECK(reported);
}

TEST_CASE("a stripped binary without build-id: debug file found by .gnu_debuglink") {
  require_root();
  TempDir root;  // empty: the debuglink next to the binary must be what finds it
  Running app("sym_linked");
  auto table = SymbolTable::for_pid(app.child.pid(), SymbolOptions{root.path.string()});
  REQUIRE(table);
  auto found = symbols__select(*table, {"secret_helper"});
  REQUIRE(found);
  CHECK(found->front().size == nm(fixture("sym_linked_full"))["secret_helper"].size);
  auto live = read_memory(app.child.pid(), found->front().address, found->front().size);
  CHECK(live == file_bytes(fixture("sym_linked"), found->front().offset, found->front().size));
  bool reported = false;
  for (auto& o : table->objects())
    if (o.path == fixture("sym_linked")) reported = o.debug_file == fixture("sym_linked.debug");
  CHECK(reported);
}

TEST_CASE("a stripped binary with MiniDebugInfo: functions from .gnu_debugdata") {
  require_root();
  TempDir root;  // empty: no separate debug file anywhere
  CHECK(nm(fixture("sym_minidebug")).empty());
  Running app("sym_minidebug");
  auto table = SymbolTable::for_pid(app.child.pid(), SymbolOptions{root.path.string()});
  REQUIRE(table);
  auto found = symbols__select(*table, {"secret_helper"}, {"sym_minidebug"});
  REQUIRE(found);
  const Function& f = found->front();
  CHECK(f.binding == Binding::local);
  CHECK(f.size == nm(fixture("sym_stripped_full"))["secret_helper"].size);
  CHECK(read_memory(app.child.pid(), f.address, f.size) == file_bytes(fixture("sym_minidebug"), f.offset, f.size));
}

TEST_CASE("hotfix-ctl symbols: table, json, errors") {
  require_root();
  Running app("sym_app");
  std::string pid = std::to_string(app.child.pid());

  auto table = run({ctl(), "symbols", "--pid", pid, "pricing::*", "Order::add"});
  CHECK(table.exit_code == 0);
  CHECK(table.out.starts_with("ADDRESS"));
  CHECK(table.out.find("MANGLED") != std::string::npos);
  CHECK(table.out.find("pricing::discount(double)") != std::string::npos);
  CHECK(table.out.find("_ZN7pricing6detail11round_centsEd") != std::string::npos);
  CHECK(table.out.find("Order::add(double)") != std::string::npos);
  CHECK(table.out.find("Order::total") == std::string::npos);
  CHECK(std::count(table.out.begin(), table.out.end(), '\n') == 1 + 3 + 2);

  auto json = run({ctl(), "symbols", "--pid", pid, "--json", "--object", "sym_app", "file_static_helper"});
  CHECK(json.exit_code == 0);
  CHECK(json.out.starts_with("[\n{\"name\":\"file_static_helper(int)\",\"mangled\":\"_ZL18file_static_helperi\","));
  CHECK(json.out.find("\"binding\":\"local\"") != std::string::npos);
  CHECK(json.out.find("\"exported\":false") != std::string::npos);
  CHECK(json.out.ends_with("}\n]\n"));

  auto all = run({ctl(), "symbols", "--pid", pid});
  CHECK(all.exit_code == 0);
  CHECK(all.out.find("libsym_shapes.so") != std::string::npos);
  CHECK(all.out.find("libc.so.6") != std::string::npos);

  auto typo = run({ctl(), "symbols", "--pid", pid, "pricing::discont"});
  CHECK(typo.exit_code == 1);
  CHECK(typo.out.empty());
  CHECK(typo.err.starts_with("hotfix-ctl: no function matches 'pricing::discont' in pid " + pid + " ("));
  CHECK(typo.err.find("did you mean 'pricing::discount'") != std::string::npos);
  CHECK(std::count(typo.err.begin(), typo.err.end(), '\n') == 1);

  auto object = run({ctl(), "symbols", "--pid", pid, "--object", "libsym_shape.so", "*"});
  CHECK(object.exit_code == 1);
  CHECK(object.err.find("did you mean 'libsym_shapes.so'") != std::string::npos);

  auto bad_pid = run({ctl(), "symbols", "--pid", "999999999"});
  CHECK(bad_pid.exit_code == 1);
  CHECK(bad_pid.err.find("no process with pid 999999999") != std::string::npos);

  CHECK(run({ctl(), "symbols", "--pid", pid, "--bogus"}).exit_code == 2);
  CHECK(run({ctl(), "symbols", "pricing::*"}).exit_code == 2);  // --pid is required
  CHECK(run({ctl(), "symbols", "--pid", "abc"}).exit_code == 2);
  auto help = run({ctl(), "symbols", "--help"});
  CHECK(help.exit_code == 0);
  CHECK(help.out.find("--json") != std::string::npos);
}

TEST_CASE("hotfix-ctl symbols honours HOTFIX_DEBUG_ROOT") {
  require_root();
  TempDir root;
  auto stripped = fixture("sym_stripped");
  std::string id = build_id(stripped);
  fs::path dest = root.path / ".build-id" / id.substr(0, 2) / (id.substr(2) + ".debug");
  fs::create_directories(dest.parent_path());
  fs::copy_file(fixture("sym_stripped.debug"), dest);
  Running app("sym_stripped");
  std::string pid = std::to_string(app.child.pid());

  ::setenv("HOTFIX_DEBUG_ROOT", root.path.c_str(), 1);
  auto found = run({ctl(), "symbols", "--pid", pid, "secret_helper"});
  ::unsetenv("HOTFIX_DEBUG_ROOT");
  CHECK(found.exit_code == 0);
  CHECK(found.out.find("secret_helper") != std::string::npos);
  CHECK(found.out.find("local") != std::string::npos);
}

TEST_CASE("libc names users expect: free (not cfree), memcpy at the implementation its IFUNC picked") {
  require_root();
  Child app({fixture("libc_names")});
  REQUIRE(app.request("ready").rfind("ok", 0) == 0);
  auto table = SymbolTable::for_pid(app.pid());
  REQUIRE(table);
  auto libc = [](const Function& f) { return f.object.find("/libc.so.6") != std::string::npos; };

  // cfree (a compat version of free at its address) selects free, shown as free.
  auto freed = symbols__select(*table, {"cfree"}, SelectOptions{"libc.so.6"});
  REQUIRE(freed);
  REQUIRE(freed->size() == 1);
  CHECK(freed->front().name == "free");

  // memcpy's IFUNC is at the implementation: inside libc's text, not the resolver, and the
  // slot the loader filled for libc itself holds the same address.
  auto memcpys = symbols__select(*table, {"memcpy"}, SelectOptions{"libc.so.6"});
  REQUIRE(memcpys);
  const Function* ifunc = nullptr;
  for (auto& f : *memcpys)
    if (f.ifunc) ifunc = &f;
  REQUIRE(ifunc);
  CHECK(libc(*ifunc));
  CHECK(ifunc->resolver != 0);
  CHECK(ifunc->address != ifunc->resolver);
  CHECK(ifunc->size > 0);  // from the implementation's symbol or its .eh_frame FDE
  // Its file offset is where the implementation's bytes are.
  CHECK(read_memory(app.pid(), ifunc->address, 16) == file_bytes(app.pid(), ifunc->address, 16));

  // The table says what it is; --json carries both addresses.
  auto out = run({ctl(), "symbols", "--pid", std::to_string(app.pid()), "--object", "libc.so.6", "memcpy", "--json"});
  CHECK(out.exit_code == 0);
  CHECK(out.out.find(fmt::format("\"resolver\":{}", ifunc->resolver)) != std::string::npos);
}

TEST_CASE("hotfix-ctl symbols cuts long names in the table, --wide and --json keep them") {
  require_root();
  Child app({fixture("libc_names")});
  REQUIRE(app.request("ready").rfind("ok", 0) == 0);
  const std::string name = "a_function_with_a_name_so_long_that_no_table_column_should_ever_have_to_show_it_whole_one";
  std::string pid = std::to_string(app.pid());
  auto table = run({ctl(), "symbols", "--pid", pid, name});
  CHECK(table.exit_code == 0);
  CHECK(table.out.find(name) == std::string::npos);
  CHECK(table.out.find(name.substr(0, 59) + "\u2026") != std::string::npos);
  auto wide = run({ctl(), "symbols", "--pid", pid, name, "--wide"});
  CHECK(wide.out.find(name) != std::string::npos);
  auto json = run({ctl(), "symbols", "--pid", pid, name, "--json"});
  CHECK(json.out.find(name) != std::string::npos);
}

// A partial table (issue 11 section 7) holds exactly what a full one holds for the objects it
// reads, lists every object, and still answers function_at for the others by reading them then.
TEST_CASE("a partial table reads the objects its needs name, the others when function_at reaches them") {
  require_root();
  Running app("sym_app");
  auto full = SymbolTable::for_pid(app.child.pid());
  REQUIRE(full);
  const std::string lib = fixture("libsym_shapes.so");
  auto partial_with = [&](SymbolNeeds needs) {
    auto t = SymbolTable::for_pid_needing(app.child.pid(), needs);
    REQUIRE(t);
    REQUIRE(t->objects().size() == full->objects().size());
    std::set<std::string> read;
    for (size_t i = 0; i < t->objects().size(); i++) {
      CHECK(t->objects()[i].path == full->objects()[i].path);
      CHECK(t->objects()[i].load_bias == full->objects()[i].load_bias);
      CHECK(t->objects()[i].build_id == full->objects()[i].build_id);
      if (t->objects()[i].symbols_read) read.insert(t->objects()[i].path);
    }
    // The functions of the objects read, exactly as the full table has them, in order.
    std::vector<const Function*> expected;
    for (auto& f : full->functions())
      if (read.count(f.object)) expected.push_back(&f);
    REQUIRE(t->functions().size() == expected.size());
    for (size_t i = 0; i < expected.size(); i++) {
      INFO(expected[i]->mangled);
      CHECK(t->functions()[i].mangled == expected[i]->mangled);
      CHECK(t->functions()[i].address == expected[i]->address);
      CHECK(t->functions()[i].size == expected[i]->size);
      CHECK(t->functions()[i].aliases == expected[i]->aliases);
    }
    return std::make_pair(std::move(*t), read);
  };

  SECTION("a name: its object and the executable") {
    auto [t, read] = partial_with(SymbolNeeds{{"_ZN6shapes4areaEdd"}, {}, {}, false});
    CHECK(read == std::set<std::string>{fixture("sym_app"), lib});
    CHECK(t.partial());
    // A function of libstdc++, left out: function_at reads libstdc++ and finds it.
    const Function* far = nullptr;
    for (auto& f : full->functions())
      if (f.object.find("libstdc++") != std::string::npos && f.size > 16) far = &f;
    REQUIRE(far);
    CHECK(t.objects_read_later() == 0);
    const Function* found = t.function_at(far->address + 8);
    REQUIRE(found);
    CHECK(found->mangled == far->mangled);
    CHECK(found->address == far->address);
    CHECK(found->size == far->size);
    CHECK(t.objects_read_later() == 1);
    CHECK(t.function_at(far->address + 8) == found);  // read once
    CHECK(t.functions().size() < full->functions().size());  // functions() never lists it
  }
  SECTION("an identifier inside a local's mangled name") {
    auto [t, read] = partial_with(SymbolNeeds{{}, {"scale_factor"}, {}, false});
    CHECK(read.count(lib));
    CHECK(symbols__select(t, {"shapes::scale_factor"}, {"libsym_shapes.so"}));
  }
  SECTION("a fallback's piece counts only where nothing defines the name") {
    auto [defined, read1] = partial_with(SymbolNeeds{{}, {}, {{"_ZN6shapes4areaEdd", "no_such_piece"}}, false});
    CHECK(read1 == std::set<std::string>{fixture("sym_app")});
    auto [undefined, read2] = partial_with(SymbolNeeds{{}, {}, {{"_ZN6shapes12no_such_nameEv", "scale_factor"}}, false});
    CHECK(read2.count(lib));
  }
  SECTION("nothing needed: only the executable") {
    auto [t, read] = partial_with(SymbolNeeds{{"no_such_symbol_anywhere"}, {}, {}, false});
    CHECK(read == std::set<std::string>{fixture("sym_app")});
  }
  SECTION("everything: a full table") {
    auto [t, read] = partial_with(SymbolNeeds{{}, {}, {}, true});
    CHECK_FALSE(t.partial());
    CHECK(t.functions().size() == full->functions().size());
  }
}
