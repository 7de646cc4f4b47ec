#include "patch/abi_types.hpp"

#include <elfutils/libdw.h>

#include <map>
#include <set>
#include <memory>

#include "patch/engine.hpp"
#include "patch/fixlib.hpp"
#include "symbols/dwarf_types.hpp"

namespace hotfix {

namespace {

constexpr const char* kNoTargetDwarf = "the target has no DWARF (install the -dbgsym package or build with -g)";
constexpr const char* kNoFixDwarf = "fix.so has no DWARF (build it with -g)";
constexpr const char* kHint =
    "build fix.so from the target's own sources and headers (the same version) with the same compiler options, "
    "or pass --no-abi-check if the difference is intended and harmless";

struct DwarfDeleter {
  void operator()(Dwarf* d) const { dwarf_end(d); }
};

// fix.so's DWARF, read from the bytes that were checked (never the file again).
struct FixDwarf {
  std::optional<ElfHandle> elf;
  std::unique_ptr<Dwarf, DwarfDeleter> dwarf;
};

FixDwarf fix_dwarf__open(const FixImage& fix) {
  FixDwarf out;
  auto elf = ElfHandle::open_memory(fix.bytes, fix.path);
  if (!elf) return out;
  out.elf.emplace(std::move(*elf));
  out.dwarf.reset(dwarf_begin_elf(out.elf->get(), DWARF_C_READ, nullptr));
  return out;
}

// The target's DWARF for one object, and what has been read of it.
struct TargetDwarf {
  std::optional<ObjectDwarf> object;
  std::unique_ptr<DwarfIndex> index;         // null: no DWARF
  std::unique_ptr<TypeComparer> comparer;
  std::string missing;  // why there is no index
};

const ObjectInfo* object_of(const SymbolTable& table, const Function& f) {
  for (auto& o : table.objects())
    if (o.path == f.object) return &o;
  return nullptr;
}

// What was checked, and what could not be, for the plan.
struct Tally {
  size_t functions = 0, variables = 0;
  std::map<std::string, std::vector<std::string>> unchecked;  // reason -> functions
  std::set<std::string> not_compared;

  size_t types = 0;

  void add_notes(std::vector<PlanNote>& notes) const {
    if (functions)
      notes.push_back({"types", fmt::format("signatures and {} type{} of {} function{}{} match", types, types == 1 ? "" : "s",
                                            functions, functions == 1 ? "" : "s",
                                            variables ? fmt::format(" and {} shared variable{}", variables,
                                                                    variables == 1 ? "" : "s")
                                                      : "")});
    for (auto& [reason, fns] : unchecked) notes.push_back({"types", fmt::format("not checked for {}: {}", join(fns), reason)});
    if (!not_compared.empty()) {
      std::vector<std::string> list(not_compared.begin(), not_compared.end());
      notes.push_back({"types", fmt::format("not compared: {}", join(list))});
    }
  }

  static std::string join(const std::vector<std::string>& items) {
    std::string out;
    for (auto& i : items) out += (out.empty() ? "" : ", ") + i;
    return out;
  }
};

class TypeCheck {
 public:
  explicit TypeCheck(PreparedPatch& p) : p_(p), fix_(fix_dwarf__open(p.fix)), fix_index_(fix_.dwarf.get()) {
    if (fix_.dwarf) fix_index_.read_all();  // a fix library is small; its declarations may be anywhere in it
  }

  Result<void> run() {
    for (auto& s : p_.switches) HOTFIX_CHECK(function(s.entry));
    if (tally_.functions) HOTFIX_CHECK(shared_variables());
    for (auto& [path, t] : targets_)
      if (t.comparer) {
        tally_.types += t.comparer->types_compared();
        tally_.not_compared.insert(t.comparer->not_compared().begin(), t.comparer->not_compared().end());
      }
    tally_.add_notes(p_.notes);
    return {};
  }

 private:
  TargetDwarf& target_for(const Function& f) {
    auto [it, fresh] = targets_.try_emplace(f.object);
    if (!fresh) return it->second;
    it->second.missing = kNoTargetDwarf;
    const ObjectInfo* info = object_of(p_.table, f);
    if (!info) return it->second;
    auto object = ObjectDwarf::open(p_.options.pid, *info);
    if (!object) it->second.missing = fmt::format("the target's DWARF cannot be read: {}", object.error().what);
    if (!object || !object->dwarf()) return it->second;
    it->second.object.emplace(std::move(*object));
    it->second.index = std::make_unique<DwarfIndex>(it->second.object->dwarf());
    if (fix_.dwarf) it->second.comparer = std::make_unique<TypeComparer>(*it->second.index, fix_index_);
    return it->second;
  }

  Result<void> unchecked(const std::string& reason, const Function& fn) {
    tally_.unchecked[reason].push_back(fn.name);
    return {};
  }

  Result<void> function(const PlanEntry& e) {
    const Function& fn = e.target;
    TargetDwarf& t = target_for(fn);
    if (!t.index) return unchecked(t.missing, fn);
    if (!fix_.dwarf) return unchecked(kNoFixDwarf, fn);
    auto tdie = t.index->subprogram_at(t.object->dwarf_address(fn.address));
    if (!tdie) return unchecked("the target's DWARF does not describe it", fn);
    auto fdie = fix_index_.subprogram_at(e.replacement_value);
    if (!fdie) return unchecked("fix.so's DWARF does not describe it", fn);
    if (auto lang = dwarf__foreign_language(*tdie); !lang.empty())
      return unchecked(fmt::format("the target's code is {}, whose types are not compared", lang), fn);
    if (auto d = t.comparer->signatures(*tdie, *fdie, fn.name))
      return fail(fmt::format("the replacement of {} does not match the target: {}", fn.name, d->text), kHint);
    tally_.functions++;
    return {};
  }

  // Variables fix.so declares and the patched functions' compilation units define: the same
  // data seen through two definitions of its type.
  Result<void> shared_variables() {
    for (auto& [name, fdie] : fix_index_.declared_variables())
      for (auto& [path, t] : targets_) {
        if (!t.comparer) continue;
        auto tdie = t.index->variable(name);
        if (!tdie) continue;
        if (auto d = t.comparer->variables(*tdie, fdie, name))
          return fail(fmt::format("fix.so's view of the target's variable '{}' does not match the target: {}", name, d->text),
                      kHint);
        tally_.variables++;
        break;
      }
    return {};
  }

  PreparedPatch& p_;
  FixDwarf fix_;
  DwarfIndex fix_index_;
  std::map<std::string, TargetDwarf> targets_;  // by object path
  Tally tally_;
};

}  // namespace

Result<void> abi__check_types(PreparedPatch& p) { return TypeCheck(p).run(); }

}  // namespace hotfix
