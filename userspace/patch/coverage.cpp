#include "patch/coverage.hpp"

#include <dwarf.h>
#include <elfutils/libdw.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <optional>
#include <set>
#include <unordered_map>

#include "arch/arch.hpp"
#include "common/unique_fd.hpp"
#include "patch/engine.hpp"
#include "patch/fixlib.hpp"
#include "process/memory.hpp"
#include "symbols/pattern.hpp"

namespace hotfix {

namespace {

constexpr uint64_t kMaxColdPart = 1 << 16;  // longer cold parts are checked in their first 64 KiB

// ---------------------------------------------------------------- the symbol table side

// The functions of the objects that hold planned functions, by mangled name: clones and
// cold parts are found by prefix ("tax" -> "tax.constprop.0", "tax.cold").
using ByName = std::multimap<std::string, const Function*>;

ByName index_by_name(const SymbolTable& table, const std::set<std::string>& objects) {
  ByName out;
  for (auto& f : table.functions())
    if (objects.count(f.object)) out.emplace(f.mangled, &f);
  return out;
}

// GCC's suffixes for the parts of one function: "cold" is the function's own body, the
// others are clones (lto_priv only renames).
bool is_suffix_word(const std::string& w) {
  return w == "isra" || w == "constprop" || w == "part" || w == "cold" || w == "lto_priv" ||
         (!w.empty() && std::all_of(w.begin(), w.end(), [](char c) { return c >= '0' && c <= '9'; }));
}

// The words after "NAME." in a clone's name ("constprop.0.isra.0" -> those four), or empty
// when `mangled` is not a GCC part of `base`.
std::vector<std::string> suffix_words(const std::string& mangled, const std::string& base) {
  if (mangled.size() <= base.size() + 1 || mangled.compare(0, base.size(), base) != 0 || mangled[base.size()] != '.')
    return {};
  std::vector<std::string> words;
  std::string rest = mangled.substr(base.size() + 1);
  for (size_t at = 0; at <= rest.size();) {
    size_t dot = rest.find('.', at);
    if (dot == std::string::npos) dot = rest.size();
    words.push_back(rest.substr(at, dot - at));
    at = dot + 1;
  }
  if (!std::all_of(words.begin(), words.end(), is_suffix_word)) return {};
  return words;
}

bool is_cold_part(const std::vector<std::string>& words) {
  return !words.empty() && words[0] == "cold";  // "f.cold", "f.cold.12"; "f.part.0.cold" belongs to a clone
}

bool is_clone(const std::vector<std::string>& words) {
  return std::any_of(words.begin(), words.end(), [](auto& w) { return w == "isra" || w == "constprop" || w == "part"; }) &&
         !is_cold_part(words);
}

// Functions of `f`'s object whose name is f's name plus GCC suffixes.
std::vector<std::pair<const Function*, std::vector<std::string>>> parts_of(const ByName& by_name, const Function& f) {
  std::vector<std::pair<const Function*, std::vector<std::string>>> out;
  for (auto it = by_name.lower_bound(f.mangled + "."); it != by_name.end() && it->first.starts_with(f.mangled + ".");
       ++it)
    if (it->second->object == f.object)
      if (auto words = suffix_words(it->first, f.mangled); !words.empty()) out.push_back({it->second, words});
  return out;
}

// A clone or cold part ("checkout_a.cold") counts as the function it was split from.
const Function* whole_function(const ByName& by_name, const Function* f) {
  auto dot = f->mangled.find('.');
  if (dot == std::string::npos) return f;
  std::string base = f->mangled.substr(0, dot);
  if (!is_cold_part(suffix_words(f->mangled, base))) return f;
  for (auto [it, end] = by_name.equal_range(base); it != end; ++it)
    if (it->second->object == f->object) return it->second;
  return f;
}

uint64_t load_bias_of(const SymbolTable& table, const std::string& object) {
  for (auto& o : table.objects())
    if (o.path == object) return o.load_bias;
  return 0;
}

const ObjectInfo* object_info(const SymbolTable& table, const std::string& object) {
  for (auto& o : table.objects())
    if (o.path == object) return &o;
  return nullptr;
}

// ---------------------------------------------------------------- the DWARF side

class DwarfFile {
 public:
  // The DWARF for `object`: its separate debug file if the symbol table used one, else the
  // object itself (through the target's root when the path is in another mount namespace).
  static std::optional<DwarfFile> open(const SymbolTable& table, const std::string& object) {
    std::vector<std::string> paths;
    if (auto* info = object_info(table, object); info && !info->debug_file.empty()) paths.push_back(info->debug_file);
    paths.push_back(object);
    if (table.pid()) paths.push_back(fmt::format("/proc/{}/root{}", table.pid(), object));
    for (auto& path : paths) {
      UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
      if (!fd) continue;
      Dwarf* dw = dwarf_begin(fd.get(), DWARF_C_READ);
      if (!dw) continue;
      Dwarf_CU* cu = nullptr;
      Dwarf_Die cudie;
      uint8_t unit_type = 0;
      if (dwarf_get_units(dw, nullptr, &cu, nullptr, &unit_type, &cudie, nullptr) != 0) {  // no units at all
        dwarf_end(dw);
        continue;
      }
      return DwarfFile(std::move(fd), dw);
    }
    return std::nullopt;
  }
  DwarfFile(DwarfFile&& o) noexcept : fd_(std::move(o.fd_)), dw_(o.dw_) { o.dw_ = nullptr; }
  DwarfFile& operator=(DwarfFile&&) = delete;
  ~DwarfFile() {
    if (dw_) dwarf_end(dw_);
  }
  Dwarf* get() const { return dw_; }

 private:
  DwarfFile(UniqueFd fd, Dwarf* dw) : fd_(std::move(fd)), dw_(dw) {}
  UniqueFd fd_;
  Dwarf* dw_ = nullptr;
};

std::optional<uint64_t> die_pc(Dwarf_Die* d) {
  Dwarf_Addr a = 0;
  if (dwarf_hasattr(d, DW_AT_entry_pc) && dwarf_entrypc(d, &a) == 0) return a;
  if (dwarf_hasattr(d, DW_AT_low_pc) && dwarf_lowpc(d, &a) == 0) return a;
  if (dwarf_hasattr(d, DW_AT_ranges)) {
    Dwarf_Addr base = 0, start = 0, end = 0;
    if (dwarf_ranges(d, 0, &base, &start, &end) > 0) return start;
  }
  return std::nullopt;
}

bool has_code(Dwarf_Die* d) {
  return dwarf_hasattr(d, DW_AT_low_pc) || dwarf_hasattr(d, DW_AT_ranges) || dwarf_hasattr(d, DW_AT_entry_pc);
}

// The abstract instance a concrete or inlined DIE stands for (itself when it has none).
std::optional<Dwarf_Die> origin_of(Dwarf_Die* d) {
  Dwarf_Attribute at;
  Dwarf_Die o;
  if (dwarf_attr(d, DW_AT_abstract_origin, &at) && dwarf_formref_die(&at, &o)) return o;
  return std::nullopt;
}

std::string string_attr(Dwarf_Die* d, unsigned name) {
  Dwarf_Attribute at;
  const char* s = dwarf_attr_integrate(d, name, &at) ? dwarf_formstring(&at) : nullptr;
  return s ? s : "";
}

std::string base_name(const char* path) { return path ? std::filesystem::path(path).filename().string() : ""; }

// Who a planned function is in DWARF: the offsets of its abstract and concrete DIEs, and what
// identifies it from another unit (C++ inline functions have an abstract DIE per unit that
// inlines them; a `static inline` from a header too, with the same declaration).
struct Identity {
  size_t index = 0;  // into the planned list
  uint64_t file_addr = 0;
  std::set<Dwarf_Off> offsets;
  std::string linkage, name, decl_file;
  int decl_line = 0;
  Dwarf_Off unit = 0;         // the unit that holds its concrete DIE
  bool main_file = false;     // declared in that unit's own source file, not in a header
};

std::optional<Dwarf_Die> concrete_die(Dwarf* dw, uint64_t addr) {
  Dwarf_Die cu;
  bool found = dwarf_addrdie(dw, addr, &cu) != nullptr;
  if (!found) {  // no .debug_aranges (clang): ask each unit
    Dwarf_CU* it = nullptr;
    uint8_t type = 0;
    Dwarf_Die cudie;
    while (!found && dwarf_get_units(dw, it, &it, nullptr, &type, &cudie, nullptr) == 0)
      if (dwarf_haspc(&cudie, addr) == 1) cu = cudie, found = true;
  }
  if (!found) return std::nullopt;
  Dwarf_Die* scopes = nullptr;
  int n = dwarf_getscopes(&cu, addr, &scopes);
  std::optional<Dwarf_Die> out;
  for (int i = 0; i < n && !out; ++i)
    if (dwarf_tag(&scopes[i]) == DW_TAG_subprogram && die_pc(&scopes[i]) == addr) out = scopes[i];
  free(scopes);
  return out;
}

std::optional<Identity> identity_of(Dwarf* dw, uint64_t file_addr, size_t index) {
  auto die = concrete_die(dw, file_addr);
  if (!die) return std::nullopt;
  Identity id;
  id.index = index;
  id.file_addr = file_addr;
  id.offsets.insert(dwarf_dieoffset(&*die));
  Dwarf_Die abstract = *die;
  if (auto o = origin_of(&*die)) abstract = *o, id.offsets.insert(dwarf_dieoffset(&abstract));
  id.linkage = string_attr(&abstract, DW_AT_linkage_name);
  if (id.linkage.empty()) id.linkage = string_attr(&abstract, DW_AT_MIPS_linkage_name);
  id.name = string_attr(&abstract, DW_AT_name);
  id.decl_file = base_name(dwarf_decl_file(&abstract));
  dwarf_decl_line(&abstract, &id.decl_line);
  Dwarf_Die cudie;
  if (dwarf_diecu(&*die, &cudie, nullptr, nullptr)) {
    id.unit = dwarf_dieoffset(&cudie);
    id.main_file = !id.decl_file.empty() && id.decl_file == base_name(dwarf_diename(&cudie));
  }
  return id;
}

// Was any unit of this object compiled by link-time optimisation (GCC names such units
// "<artificial>" and its producer "GNU GIMPLE")? Then inlining crosses units.
bool has_lto_units(Dwarf* dw) {
  Dwarf_CU* cu = nullptr;
  uint8_t type = 0;
  Dwarf_Die cudie;
  while (dwarf_get_units(dw, cu, &cu, nullptr, &type, &cudie, nullptr) == 0) {
    const char* name = dwarf_diename(&cudie);
    if (name && std::string_view(name) == "<artificial>") return true;
    if (string_attr(&cudie, DW_AT_producer).starts_with("GNU GIMPLE")) return true;
  }
  return false;
}

// The units an inlined copy of `ids` can be in: without LTO, a function defined in a unit's
// own source file can only be inlined in that unit; one from a header (an inline function, a
// template) can be inlined in any unit that includes it. Empty: every unit.
std::set<Dwarf_Off> units_to_walk(Dwarf* dw, const std::vector<Identity>& ids) {
  std::set<Dwarf_Off> out;
  for (auto& id : ids) {
    if (!id.main_file || !id.unit) return {};
    out.insert(id.unit);
  }
  if (!out.empty() && has_lto_units(dw)) return {};
  return out;
}

// One walk over every unit of one object, looking for the planned functions' other places.
class Walk {
 public:
  Walk(const SymbolTable& table, const ByName& by_name, uint64_t bias, std::vector<Identity> ids)
      : table_(table), by_name_(by_name), bias_(bias), ids_(std::move(ids)) {
    for (size_t i = 0; i < ids_.size(); ++i)
      for (auto off : ids_[i].offsets) matched_[off] = static_cast<int>(i);
  }

  struct Found {
    size_t index;  // into the planned list
    std::string kind;
    const Function* in;
    std::string file;
    int line;
  };

  // Every unit, or only `units` when not empty.
  void run(Dwarf* dw, const std::set<Dwarf_Off>& units) {
    Dwarf_CU* cu = nullptr;
    uint8_t type = 0;
    Dwarf_Die cudie;
    while (dwarf_get_units(dw, cu, &cu, nullptr, &type, &cudie, nullptr) == 0) {
      if (type != DW_UT_compile && type != DW_UT_partial && type != DW_UT_skeleton) continue;  // type units hold no code
      if (!units.empty() && !units.count(dwarf_dieoffset(&cudie))) continue;
      ++units_walked;
      files_ = nullptr;
      nfiles_ = 0;
      if (dwarf_getsrcfiles(&cudie, &files_, &nfiles_) != 0) files_ = nullptr;
      children(&cudie);
    }
  }

  std::vector<Found> found;
  size_t dies = 0, units_walked = 0;

 private:
  void children(Dwarf_Die* parent) {
    Dwarf_Die child;
    if (dwarf_child(parent, &child) != 0) return;
    do {
      ++dies;
      switch (dwarf_tag(&child)) {
        case DW_TAG_namespace:
        case DW_TAG_module:
          children(&child);
          break;
        case DW_TAG_subprogram:
          if (!has_code(&child)) break;  // declarations and abstract instances hold no code
          concrete(&child);
          children(&child);
          break;
        case DW_TAG_inlined_subroutine:
          if (!has_code(&child)) break;
          inlined(&child);
          children(&child);
          break;
        case DW_TAG_lexical_block:
          if (has_code(&child)) children(&child);
          break;
        default:
          break;  // types, variables, parameters, call sites: no code inside
      }
    } while (dwarf_siblingof(&child, &child) == 0);
  }

  // Which planned function an abstract origin is, or -1 (cached per DIE).
  int match(Dwarf_Die* origin) {
    Dwarf_Off off = dwarf_dieoffset(origin);
    if (auto it = matched_.find(off); it != matched_.end()) return it->second;
    int m = -1;
    std::string linkage = string_attr(origin, DW_AT_linkage_name);
    if (linkage.empty()) linkage = string_attr(origin, DW_AT_MIPS_linkage_name);
    std::string name = linkage.empty() ? string_attr(origin, DW_AT_name) : "";
    for (size_t i = 0; i < ids_.size() && m < 0; ++i) {
      auto& id = ids_[i];
      if (!linkage.empty()) {
        if (linkage == id.linkage) m = static_cast<int>(i);
        continue;
      }
      // No linkage name (C): the same function only if declared at the same place.
      if (name.empty() || name != id.name || id.decl_line == 0) continue;
      int line = 0;
      dwarf_decl_line(origin, &line);
      if (line == id.decl_line && base_name(dwarf_decl_file(origin)) == id.decl_file) m = static_cast<int>(i);
    }
    matched_[off] = m;
    return m;
  }

  std::string file_of(Dwarf_Die* d) {
    Dwarf_Attribute at;
    Dwarf_Word idx = 0;
    if (!files_ || !dwarf_attr(d, DW_AT_call_file, &at) || dwarf_formudata(&at, &idx) != 0 || idx >= nfiles_) return "";
    return base_name(dwarf_filesrc(files_, idx, nullptr, nullptr));
  }

  void inlined(Dwarf_Die* d) {
    auto origin = origin_of(d);
    int m = origin ? match(&*origin) : -1;
    if (m < 0) return;
    auto pc = die_pc(d);
    const Function* in = pc ? table_.function_at(*pc + bias_) : nullptr;
    if (!in) return;  // code no symbol covers (stripped local): nothing we could name or replace
    Dwarf_Attribute at;
    Dwarf_Word line = 0;
    if (dwarf_attr(d, DW_AT_call_line, &at)) dwarf_formudata(&at, &line);
    const Function* whole = whole_function(by_name_, in);
    if (whole->address == ids_[m].file_addr + bias_) return;  // inlined into itself (recursion): its own body
    found.push_back({ids_[m].index, "inlined", whole, file_of(d), static_cast<int>(line)});
  }

  // An out-of-line instance of a planned function elsewhere than its entry: a clone.
  void concrete(Dwarf_Die* d) {
    auto origin = origin_of(d);
    int m = origin ? match(&*origin) : -1;
    if (m < 0) return;
    auto pc = die_pc(d);
    if (!pc || *pc == ids_[m].file_addr) return;  // the function itself
    const Function* at = table_.function_at(*pc + bias_);
    if (!at || at->address != *pc + bias_) return;
    int line = 0;
    dwarf_decl_line(d, &line);
    found.push_back({ids_[m].index, "clone", at, base_name(dwarf_decl_file(d)), line});
  }

  const SymbolTable& table_;
  const ByName& by_name_;
  uint64_t bias_;
  std::vector<Identity> ids_;
  std::unordered_map<Dwarf_Off, int> matched_;
  Dwarf_Files* files_ = nullptr;
  size_t nfiles_ = 0;
};

// file:line of the code at `file_addr` (the line table), for places DWARF has no DIE for.
std::pair<std::string, int> source_at(Dwarf* dw, uint64_t file_addr) {
  Dwarf_Die cu;
  if (!dw || !dwarf_addrdie(dw, file_addr, &cu)) return {};
  Dwarf_Line* line = dwarf_getsrc_die(&cu, file_addr);
  int n = 0;
  if (!line || dwarf_lineno(line, &n) != 0) return {};
  return {base_name(dwarf_linesrc(line, nullptr, nullptr)), n};
}

// ---------------------------------------------------------------- who calls a clone

// The code of an object's functions, read from its file (what the process mapped).
class ObjectCode {
 public:
  ObjectCode(const SymbolTable& table, const std::string& object) {
    fd_.reset(::open(object.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd_ && table.pid()) fd_.reset(::open(fmt::format("/proc/{}/root{}", table.pid(), object).c_str(), O_RDONLY | O_CLOEXEC));
  }
  std::optional<std::vector<uint8_t>> of(const Function& f) {
    if (!fd_ || f.size == 0 || f.offset == 0) return std::nullopt;
    std::vector<uint8_t> bytes(std::min<uint64_t>(f.size, 1 << 20));
    if (::pread(fd_.get(), bytes.data(), bytes.size(), static_cast<off_t>(f.offset)) != static_cast<ssize_t>(bytes.size()))
      return std::nullopt;
    return bytes;
  }

 private:
  UniqueFd fd_;
};

constexpr uint64_t kMaxCallerScan = 64 << 20;  // bytes of code searched for a clone's callers at most

// The address ranges of the unit holding `file_addr` (file addresses), empty if unknown.
std::vector<std::pair<uint64_t, uint64_t>> unit_ranges(Dwarf* dw, uint64_t file_addr) {
  std::vector<std::pair<uint64_t, uint64_t>> out;
  Dwarf_Die cu;
  if (!dw || !dwarf_addrdie(dw, file_addr, &cu)) return out;
  Dwarf_Addr base = 0, start = 0, end = 0;
  for (ptrdiff_t off = 0; (off = dwarf_ranges(&cu, off, &base, &start, &end)) > 0;) out.push_back({start, end});
  return out;
}

// The functions with a direct call or jump to `clone`: those of its unit when DWARF says
// which they are (a clone is local to its unit), else every function of its object.
// nullopt when the code could not be read or is too large to search.
std::optional<std::vector<const Function*>> callers_of(const SymbolTable& table, const ByName& by_name, Dwarf* dw,
                                                       uint64_t bias, ObjectCode& code, const Function& clone) {
  auto ranges = unit_ranges(dw, clone.address - bias);
  auto in_unit = [&](const Function& f) {
    if (ranges.empty()) return true;
    uint64_t a = f.address - bias;
    return std::any_of(ranges.begin(), ranges.end(), [&](auto& r) { return a >= r.first && a < r.second; });
  };
  std::set<const Function*> callers;
  uint64_t scanned = 0;
  for (auto& f : table.functions()) {
    if (f.object != clone.object || f.address == clone.address || !in_unit(f)) continue;
    if ((scanned += f.size) > kMaxCallerScan) return std::nullopt;
    auto bytes = code.of(f);
    if (!bytes) {
      if (f.size) return std::nullopt;
      continue;
    }
    if (arch::branches_to(*bytes, f.address, clone.address)) callers.insert(whole_function(by_name, &f));
  }
  return std::vector<const Function*>(callers.begin(), callers.end());
}

// ---------------------------------------------------------------- putting it together

struct Collector {
  const std::vector<Function>& planned;
  std::set<uint64_t> planned_at;
  CoverageFindings out;
  std::set<std::tuple<size_t, std::string, std::string, std::string, uint32_t>> seen;

  explicit Collector(const std::vector<Function>& p) : planned(p) {
    for (auto& f : p) planned_at.insert(f.address);
  }
  void add(size_t index, const std::string& kind, const Function& in, const std::string& in_name,
           const std::string& file, int line, bool covered, const std::string& function = {}) {
    uint32_t l = line > 0 ? static_cast<uint32_t>(line) : 0;
    if (!seen.insert({index, kind, in_name, file, l}).second) return;  // unrolled loops repeat a copy
    out.places.push_back({UncoveredPlace{function.empty() ? planned[index].name : function, kind, in_name, file, l},
                          covered, "", in.address});
  }
};

void find_in_object(const SymbolTable& table, const ByName& by_name, const std::string& object, Dwarf* dw,
                    const std::vector<size_t>& indexes, Collector& c) {
  uint64_t bias = load_bias_of(table, object);
  std::set<uint64_t> clones_seen;
  struct Clone {
    size_t index;
    const Function* fn;
    std::string file;
    int line;
  };
  std::vector<Clone> clones;
  if (dw) {
    std::vector<Identity> ids;
    for (size_t i : indexes)
      if (auto id = identity_of(dw, c.planned[i].address - bias, i)) ids.push_back(std::move(*id));
    auto start = std::chrono::steady_clock::now();
    auto units = units_to_walk(dw, ids);
    Walk walk(table, by_name, bias, std::move(ids));
    walk.run(dw, units);
    c.out.units += walk.units_walked;
    c.out.walk_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    c.out.dies += walk.dies;
    c.out.searched.push_back(object);
    for (auto& f : walk.found) {
      if (f.kind == "clone") {
        if (clones_seen.insert(f.in->address).second) clones.push_back({f.index, f.in, f.file, f.line});
        continue;
      }
      c.add(f.index, f.kind, *f.in, f.in->name, f.file, f.line, c.planned_at.count(f.in->address) > 0);
    }
  } else {
    c.out.without_dwarf.push_back(object);
  }
  for (size_t i : indexes)  // clones the symbol table names (all of them when there is no DWARF)
    for (auto& [part, words] : parts_of(by_name, c.planned[i]))
      if (is_clone(words) && clones_seen.insert(part->address).second) {
        auto [file, line] = source_at(dw, part->address - bias);
        clones.push_back({i, part, file, line});
      }
  ObjectCode code(table, object);
  for (auto& k : clones) {
    if (c.planned_at.count(k.fn->address)) {
      c.add(k.index, "clone", *k.fn, k.fn->name, k.file, k.line, true);
      continue;
    }
    // A clone is reached only through direct calls in its own unit (its signature changed, so
    // nothing else can call it): covered when the patch replaces every one of its callers.
    auto callers = callers_of(table, by_name, dw, bias, code, *k.fn);
    bool all_replaced = callers && !callers->empty() &&
                        std::all_of(callers->begin(), callers->end(), [&](auto* f) { return c.planned_at.count(f->address) > 0; });
    std::string names;
    for (auto* f : callers ? *callers : std::vector<const Function*>{}) names += (names.empty() ? "" : ", ") + f->name;
    std::string detail = !callers ? "its callers could not be read"
                         : names.empty() ? "no direct caller found (its address may be taken)"
                                         : "called from " + names;
    c.add(k.index, "clone", *k.fn, k.fn->name, k.file, k.line, all_replaced);
    c.out.places.back().detail = detail;
  }
}

// Every other name at a planned function's address: the name it is patched as is the one
// the user knows, the others are its aliases.
void find_aliases(const SymbolTable& table, const std::map<std::string, std::optional<DwarfFile>>& dwarf,
                  const std::vector<std::string>& patched_as,
                  const std::function<bool(const std::string&)>& alias_in_patch, Collector& c) {
  for (size_t i = 0; i < c.planned.size(); ++i) {
    const Function& f = c.planned[i];
    if (f.aliases.empty()) continue;
    std::vector<std::string> names = f.aliases;
    names.push_back(f.mangled);
    std::string me = i < patched_as.size() && std::count(names.begin(), names.end(), patched_as[i]) ? patched_as[i]
                                                                                                    : f.mangled;
    auto& dw = dwarf.at(f.object);
    auto [file, line] = source_at(dw ? dw->get() : nullptr, f.address - load_bias_of(table, f.object));
    for (auto& alias : names)
      if (alias != me) c.add(i, "alias", f, symbols__demangle(alias), file, line, alias_in_patch(alias), symbols__demangle(me));
  }
}

}  // namespace

std::string coverage__describe(const UncoveredPlace& u) {
  std::string where = u.file.empty() ? "" : u.line ? fmt::format(" ({}:{})", u.file, u.line) : fmt::format(" ({})", u.file);
  if (u.kind == "inlined") return fmt::format("{} is inlined into {}{}", u.function, u.in, where);
  if (u.kind == "clone") return fmt::format("{} has a clone {}{}", u.function, u.in, where);
  return fmt::format("{} is also named {}{}", u.function, u.in, where);
}

CoverageFindings coverage__find(const SymbolTable& table, const std::vector<Function>& planned,
                                const std::function<bool(const std::string&)>& alias_in_patch,
                                const std::vector<std::string>& patched_as) {
  Collector c(planned);
  std::map<std::string, std::vector<size_t>> by_object;
  for (size_t i = 0; i < planned.size(); ++i) by_object[planned[i].object].push_back(i);
  std::set<std::string> objects;
  for (auto& [o, _] : by_object) objects.insert(o);
  ByName by_name = index_by_name(table, objects);
  // Each object's DWARF is opened once: a debug file's sections may be compressed, and
  // elfutils inflates them on every open (most of the cost for libc's debug file).
  std::map<std::string, std::optional<DwarfFile>> dwarf;
  for (auto& [object, indexes] : by_object) {
    auto& dw = dwarf.emplace(object, DwarfFile::open(table, object)).first->second;
    find_in_object(table, by_name, object, dw ? dw->get() : nullptr, indexes, c);
  }
  find_aliases(table, dwarf, patched_as, alias_in_patch, c);
  return std::move(c.out);
}

namespace {

// The `.cold` part of each planned function is part of its body: no branch from it may land
// inside the overwritten entry bytes (arch::check_entry only sees the hot part).
Result<void> check_cold_parts(PreparedPatch& p, const ByName& by_name, const ProcessMemory& mem) {
  for (auto& s : p.switches) {
    const Function& f = s.entry.target;
    for (auto& [part, words] : parts_of(by_name, f)) {
      if (!is_cold_part(words)) continue;
      auto code = HOTFIX_TRY(mem.read(part->address, std::max<uint64_t>(1, std::min(part->size, kMaxColdPart))));
      auto why = arch::check_branches_into_entry(code, part->address, f.address, s.check.covered);
      if (!why.empty())
        return fail(fmt::format("cannot patch {}: its cold part {}: {}", f.name, part->name, why),
                    "patch its callers instead, or leave it out with a narrower pattern");
      p.notes.push_back({"coverage", fmt::format("{} (the cold part of {}) has no branch into the entry bytes",
                                                 part->name, f.name)});
    }
  }
  return {};
}

// Is an alias (an ELF name) part of the patch? Named by a pattern, or, with no pattern (the
// patch is "everything fix.so replaces"), defined by fix.so.
std::function<bool(const std::string&)> alias_rule(const PreparedPatch& p) {
  if (p.options.patterns.empty()) {
    std::set<std::string> defined;
    if (auto fix = fixlib__read(p.fix))
      for (auto& s : fix->functions) defined.insert(s.name);
    return [defined](const std::string& alias) { return defined.count(alias) > 0; };
  }
  std::vector<Pattern> patterns;
  for (auto& t : p.options.patterns) patterns.push_back(Pattern::parse(t));
  return [patterns](const std::string& alias) {
    Function named;  // the alias alone: a pattern that matches only the primary name does not count
    named.mangled = alias;
    named.name = symbols__demangle(alias);
    return std::any_of(patterns.begin(), patterns.end(), [&](const Pattern& pt) { return pt.matches(named); });
  };
}

std::string no_dwarf_note(const PreparedPatch& p, const std::vector<std::string>& objects) {
  std::string names;
  for (auto& s : p.switches)
    if (std::find(objects.begin(), objects.end(), s.entry.target.object) != objects.end())
      names += (names.empty() ? "" : ", ") + s.entry.target.name;
  std::string list;
  for (auto& o : objects) list += (list.empty() ? "" : ", ") + o;
  return fmt::format("inlined copies of {} could not be looked for: {} {} no DWARF (install its debug symbols, e.g. "
                     "Debian's -dbgsym package under /usr/lib/debug, found by build-id; or rebuild with -g); clones and "
                     "aliases were checked from the symbol table",
                     names, list, objects.size() > 1 ? "have" : "has");
}

std::string described(const CoveragePlace& c) {
  return coverage__describe(c.place) + (c.detail.empty() ? "" : ", " + c.detail);
}

std::string kinds_hint(const std::vector<CoveragePlace>& places) {
  std::set<std::string> kinds;
  for (auto& c : places) kinds.insert(c.place.kind);
  std::vector<std::string> ways;
  if (kinds.count("inlined")) ways.push_back("copy the functions that inlined it into fix.so too (they are replaced then)");
  if (kinds.count("clone")) ways.push_back("copy every caller of each clone into fix.so too");
  if (kinds.count("alias")) ways.push_back("name every alias in the patterns (or define it in fix.so)");
  std::string out;
  for (auto& w : ways) out += (out.empty() ? "" : "; ") + w;
  return out + "; or pass --allow-uncovered to apply anyway (those places keep the old code, and calls there are "
               "neither redirected nor counted)";
}

}  // namespace

Result<void> coverage__check(PreparedPatch& p) {
  std::vector<Function> planned;
  std::vector<std::string> patched_as;
  std::set<std::string> objects;
  for (auto& s : p.switches) {
    planned.push_back(s.entry.target);
    patched_as.push_back(s.entry.replacement);
    objects.insert(s.entry.target.object);
  }
  ByName by_name = index_by_name(p.table, objects);
  auto mem = HOTFIX_TRY(ProcessMemory::open(p.options.pid));
  HOTFIX_CHECK(check_cold_parts(p, by_name, mem));

  auto found = coverage__find(p.table, planned, alias_rule(p), patched_as);
  std::vector<CoveragePlace> uncovered;
  size_t covered = 0;
  for (auto& c : found.places) {
    if (c.covered) {
      ++covered;
      p.notes.push_back({"coverage", fmt::format("covered: {}, which the patch replaces too", described(c))});
    } else {
      uncovered.push_back(c);
    }
  }
  if (!found.without_dwarf.empty()) p.notes.push_back({"coverage", no_dwarf_note(p, found.without_dwarf)});
  if (!found.searched.empty())
    p.notes.push_back({"coverage", fmt::format("searched the DWARF of {} object(s) ({} unit(s), {} entries, {:.1f} ms): "
                                               "{} place(s) elsewhere run the patched code, {} covered",
                                               found.searched.size(), found.units, found.dies, found.walk_ms,
                                               found.places.size(), covered)});
  if (uncovered.empty()) return {};
  for (auto& c : uncovered)  // its old body no longer runs, but what replaced it was not searched
    if (const PatchRecord* top = c.place.kind == "alias" ? nullptr : p.registry.top_at(c.in_address))
      c.detail += fmt::format("{}{} is replaced by patch {}, whose own code was not searched", c.detail.empty() ? "" : "; ",
                              c.place.in, top->id);
  if (!p.options.allow_uncovered) {
    constexpr size_t kShown = 8;
    std::string list;
    for (size_t i = 0; i < std::min(kShown, uncovered.size()); ++i)
      list += (list.empty() ? "" : "; ") + described(uncovered[i]);
    if (uncovered.size() > kShown) list += fmt::format("; and {} more", uncovered.size() - kShown);
    return fail(fmt::format("{} place(s) run the patched code where the entry jump does not reach or changes more "
                            "than asked: {}; nothing was changed",
                            uncovered.size(), list),
                kinds_hint(uncovered));
  }
  for (auto& c : uncovered) {
    p.notes.push_back({"coverage", fmt::format("NOT covered (--allow-uncovered): {}: {}", described(c),
                                               c.place.kind == "alias" ? "its callers get the new code too"
                                                                       : "those calls keep the old code and are not counted")});
    p.uncovered.push_back(c.place);
  }
  return {};
}

}  // namespace hotfix
