#include "patch/plan.hpp"

#include <elf.h>
#include <elfutils/libdw.h>
#include <fcntl.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <string_view>

#include "common/unique_fd.hpp"
#include "symbols/pattern.hpp"
#include "patch/hints.hpp"
#include "symbols/stripped.hpp"

namespace hotfix {

namespace {

using NameIndex = std::map<std::string, std::vector<const Function*>>;

// Functions the C runtime puts into every executable and shared object: both the target and
// fix.so have them, and replacing them would be absurd.
bool is_toolchain_function(const std::string& name) {
  static const std::set<std::string> crt = {"frame_dummy", "register_tm_clones", "deregister_tm_clones"};
  if (crt.count(name)) return true;
  // Names starting with '_' are reserved for the implementation (`_init`, `__do_global_dtors_aux`,
  // `_GLOBAL__sub_I_*`); `_Z` starts every mangled C++ (and legacy Rust) name, `_R` a v0 Rust one.
  return name.size() > 1 && name[0] == '_' && name.rfind("_Z", 0) != 0 && !symbols__is_rust(name);
}

// A weak definition in fix.so is an inline function or a template instance the compiler
// emitted because fix.cpp used it; replacing the target's copy by default would patch code
// the user never touched (they can still name it with a pattern).
bool replaces_by_default(const FixSymbol& s) { return s.bind != STB_WEAK && !is_toolchain_function(s.name); }

bool in_patch_dir(const Function& f, const PlanOptions& opts) {
  if (path__is_fix_copy(f.object)) return true;  // a delivered fix copy (memfd), never a target
  return !opts.patch_dir.empty() && f.object.rfind(opts.patch_dir, 0) == 0;
}

// The pool's functions by mangled name and alias, of the names in `wanted` only (indexing
// every name of a process like redis was most of the plan's time).
NameIndex index_by_mangled(const std::vector<const Function*>& pool, const std::set<std::string_view>& wanted) {
  NameIndex index;
  for (const Function* f : pool) {
    if (wanted.count(f->mangled)) index[f->mangled].push_back(f);
    for (auto& alias : f->aliases)
      if (alias != f->mangled && wanted.count(alias)) index[alias].push_back(f);
  }
  return index;
}

Result<std::vector<const Function*>> candidate_pool(const SymbolTable& target, const PlanOptions& opts) {
  std::vector<const Function*> pool;
  if (opts.object.empty()) {
    for (auto& f : target.functions())
      if (!in_patch_dir(f, opts)) pool.push_back(&f);
    return pool;
  }
  // Reuse the pattern module's object matching so --object means the same as in `watch`.
  auto selected = HOTFIX_TRY(symbols__select(target, {"*"}, SelectOptions{opts.object}));
  for (auto& f : selected)
    if (auto* live = target.function_at(f.address); live && live->address == f.address && !in_patch_dir(*live, opts))
      pool.push_back(live);
  return pool;
}

// The paths under which `table` knows the executable (empty when not given).
std::set<std::string> executable_objects(const SymbolTable& table, const std::string& executable) {
  std::set<std::string> out;
  if (executable.empty()) return out;
  std::error_code ec;
  auto exe = std::filesystem::canonical(executable, ec);
  for (auto& o : table.objects()) {
    std::error_code ec2;
    if (o.path == executable || (!ec && std::filesystem::canonical(o.path, ec2) == exe)) out.insert(o.path);
  }
  return out;
}

// "compute(int), calls_address()": what fix.so could replace, for hints.
std::string defined_list(const FixLibrary& fix) {
  std::string defined;
  size_t shown = 0;
  for (auto& s : fix.functions)
    if (replaces_by_default(s) && shown++ < 6) defined += (defined.empty() ? "" : ", ") + symbol__demangle(s.name);
  return defined;
}

// Every target function that fix.so defines a (non-weak, non-toolchain) replacement for.
Result<std::vector<const Function*>> default_targets(const SymbolTable& target, const FixLibrary& fix,
                                                     const PlanOptions& opts) {
  auto pool = HOTFIX_TRY(candidate_pool(target, opts));
  std::set<std::string_view> wanted;
  for (auto& s : fix.functions)
    if (replaces_by_default(s)) wanted.insert(s.name);
  auto index = index_by_mangled(pool, wanted);
  auto exe_objects = executable_objects(target, opts.executable);
  std::vector<const Function*> out;
  for (auto& s : fix.functions) {
    if (!replaces_by_default(s)) continue;
    if (auto it = index.find(s.name); it != index.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      continue;
    }
    // fix.cpp dropped `static` (an unused static function would be discarded by the compiler).
    LocalNameMatcher same_local(s.name);
    for (const Function* f : pool)
      if (same_local(*f) && (exe_objects.empty() || exe_objects.count(f->object))) out.push_back(f);
  }
  if (out.empty()) {
    std::string defined = defined_list(fix);
    std::string hint = defined.empty() ? "fix.so defines no functions at all; copy the buggy function into fix.cpp"
                                       : fmt::format("fix.so defines {}; keep the exact names and signatures of the "
                                                     "functions you fix",
                                                     defined);
    if (auto cxx = hint__cxx_fix_for_c(target, fix); !cxx.empty()) hint = cxx;  // patch/hints.hpp
    else if (auto stripped = symbols__stripped_hint(target); !stripped.empty()) hint = stripped;
    return fail(fmt::format("{} defines no function the target has{}", fix.path,
                            opts.object.empty() ? "" : " in " + opts.object),
                hint);
  }
  return out;
}

Result<std::vector<const Function*>> selected_targets(const SymbolTable& target, const PlanOptions& opts) {
  auto selected = HOTFIX_TRY(symbols__select(target, opts.patterns, SelectOptions{opts.object}));
  std::vector<const Function*> out;
  for (auto& f : selected) {
    const Function* live = target.function_at(f.address);
    if (live && live->address == f.address && !in_patch_dir(*live, opts)) out.push_back(live);
  }
  if (out.empty())
    return fail("the patterns select only functions of earlier fix libraries",
                "name the original functions; hotfix replaces them again in place");
  return out;
}

}  // namespace

void plan__add_needs(const FixLibrary& fix, const PlanOptions& opts, SymbolNeeds& needs) {
  // --object selects with '*' inside the object: every name of it is a candidate.
  if (!opts.object.empty()) needs.everything = true;
  for (auto& text : opts.patterns) {
    auto needle = symbols__pattern_needle(text);
    if (needle.empty()) needs.everything = true;
    needs.names.push_back(text);  // a C name or a mangled one, as the ELF file spells it
    needs.pieces.push_back(needle);
  }
  if (!opts.patterns.empty()) return;
  // default_targets: fix.so's names exactly; a `static` of the same demangled name only in
  // the executable, which a partial table always holds.
  for (auto& s : fix.functions)
    if (replaces_by_default(s)) needs.names.push_back(s.name);
}

namespace {

std::string object_list(const std::vector<const Function*>& fs) {
  std::set<std::string> objects;
  for (auto* f : fs) objects.insert(f->object);
  return objects.size() > 1 ? "restrict the patch to one object with --object"
                            : "they are in the same object, so hotfix cannot tell which one fix.so replaces; "
                              "patch their callers instead";
}

// Two target functions with one mangled name (two `static int helper(int)` in two files):
// fix.so's one definition cannot say which of them it replaces.
Result<void> check_unambiguous(const SymbolTable& target, std::vector<const Function*>& fs) {
  std::sort(fs.begin(), fs.end(), [](auto* a, auto* b) { return a->address < b->address; });
  fs.erase(std::unique(fs.begin(), fs.end()), fs.end());
  std::map<std::string, std::vector<const Function*>> by_name;
  for (auto* f : fs) by_name[f->mangled].push_back(f);
  for (auto& [mangled, group] : by_name) {
    if (group.size() < 2) continue;
    std::string list;
    for (auto* f : group) list += (list.empty() ? "" : "; ") + plan__describe(target, *f);
    return fail(fmt::format("`{}` ({}) names {} functions in the target: {}", group[0]->name, mangled,
                            group.size(), list),
                object_list(group));
  }
  return {};
}

Result<const FixSymbol*> find_replacement(const FixLibrary& fix, const Function& f) {
  std::vector<const FixSymbol*> found;
  for (auto& s : fix.functions)
    if (s.name == f.mangled || std::find(f.aliases.begin(), f.aliases.end(), s.name) != f.aliases.end())
      found.push_back(&s);
  if (found.empty() && f.binding == Binding::local)
    for (auto& s : fix.functions)
      if (LocalNameMatcher(s.name)(f)) found.push_back(&s);
  if (found.size() > 1 && found[0]->value != found[1]->value)
    return fail(fmt::format("{} defines `{}` ({}) twice", fix.path, f.name, found[0]->name),
                "keep one definition per replaced function in fix.so");
  if (!found.empty()) return found[0];
  std::string hint = "fix.so must define it with the same name and signature";
  std::vector<std::string> near;
  if (auto fix_table = SymbolTable::for_file(fix.path)) near = symbols__nearest(*fix_table, f.name);
  if (!near.empty()) {
    std::string names;
    for (auto& n : near) names += (names.empty() ? "`" : "`, `") + n;
    hint = fmt::format("did you mean {}`? {}", names, hint);
  } else if (auto defined = defined_list(fix); !defined.empty()) {
    hint = fmt::format("fix.so defines {}; {}", defined, hint);
  }
  if (auto cxx = hint__cxx_fix_for_c(SymbolTable::from_records({f}), fix); !cxx.empty()) hint = cxx;
  return fail(fmt::format("{} has no replacement for `{}` ({})", fix.path, f.name, f.mangled), hint);
}

uint64_t load_bias_of(const SymbolTable& table, const std::string& object) {
  for (auto& o : table.objects())
    if (o.path == object) return o.load_bias;
  return 0;
}

}  // namespace

std::string plan__source_of(const SymbolTable& table, const Function& f) {
  UniqueFd fd(::open(f.object.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return {};
  Dwarf* dwarf = dwarf_begin(fd.get(), DWARF_C_READ);
  if (!dwarf) return {};
  std::string where;
  Dwarf_Die cu;
  uint64_t file_addr = f.address - load_bias_of(table, f.object);
  if (dwarf_addrdie(dwarf, file_addr, &cu)) {
    Dwarf_Line* line = dwarf_getsrc_die(&cu, file_addr);
    const char* src = line ? dwarf_linesrc(line, nullptr, nullptr) : dwarf_diename(&cu);
    int lineno = 0;
    if (src) where = std::filesystem::path(src).filename().string();
    if (line && dwarf_lineno(line, &lineno) == 0 && !where.empty()) where += fmt::format(":{}", lineno);
  }
  dwarf_end(dwarf);
  return where;
}

std::string plan__describe(const SymbolTable& table, const Function& f) {
  auto src = plan__source_of(table, f);
  return fmt::format("{} in {} at {:#x}{}", f.name, f.object, f.address, src.empty() ? "" : " (" + src + ")");
}

Result<PatchPlan> plan__build(const SymbolTable& target, const FixLibrary& fix, const PlanOptions& opts) {
  auto targets = HOTFIX_TRY(opts.patterns.empty() ? default_targets(target, fix, opts) : selected_targets(target, opts));
  HOTFIX_CHECK(check_unambiguous(target, targets));
  PatchPlan plan{fix.path, {}};
  for (const Function* f : targets) {
    const FixSymbol* replacement = HOTFIX_TRY(find_replacement(fix, *f));
    plan.entries.push_back({*f, replacement->name, replacement->value, replacement->size});
  }
  return plan;
}

}  // namespace hotfix
