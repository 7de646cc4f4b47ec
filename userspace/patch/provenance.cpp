// Two questions about fix.so before anything is loaded:
//  1. the stamp: was it built for the build of the object it patches (build-id)?
//  2. the toolchain: was the code of each replacement compiled like the code it replaces
//     (DW_AT_producer of the two compile units: compiler, major version, ABI-changing flags)?
// A no is a refusal naming what differs; what cannot be checked, or differs harmlessly, is a note.
#include "patch/provenance.hpp"

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include "patch/engine.hpp"
#include "patch/stamp.hpp"
#include "symbols/producer.hpp"

namespace hotfix {

namespace {

std::string basename_of(const std::string& path) { return std::filesystem::path(path).filename().string(); }

const ObjectInfo* object_info(const SymbolTable& table, const std::string& path) {
  for (auto& o : table.objects())
    if (o.path == path) return &o;
  return nullptr;
}

// The objects the plan patches, in plan order, each once.
std::vector<const ObjectInfo*> patched_objects(const PreparedPatch& p) {
  std::vector<const ObjectInfo*> out;
  for (auto& s : p.switches) {
    auto* o = object_info(p.table, s.entry.target.object);
    if (o && std::find(out.begin(), out.end(), o) == out.end()) out.push_back(o);
  }
  return out;
}

std::string rebuild_hint(const PreparedPatch& p, const char* how = "rebuild it against the running binary") {
  return fmt::format("{}: hotfix-ctl build --pid {} -o fix.so SOURCES...", how, p.options.pid);
}

// ---------------------------------------------------------------- the stamp

Result<void> check_stamp(PreparedPatch& p) {
  auto stamps = stamp__read(p.fix.bytes);
  if (!stamps || stamps->empty()) {
    p.notes.push_back({"provenance", "fix.so is not stamped for a build; build it with hotfix-ctl build to have this checked"});
    return {};
  }
  auto objects = patched_objects(p);
  for (auto& stamp : *stamps)
    for (auto* o : objects)
      if (!o->build_id.empty() && o->build_id == stamp.build_id) {
        p.notes.push_back({"provenance", fmt::format("built for this binary (build-id {}, {})", stamp.build_id, o->path)});
        return {};
      }
  const Stamp& stamp = stamps->front();
  // Name the object the stamp means: the patched one with its name, else the first patched one.
  const ObjectInfo* named = nullptr;
  for (auto* o : objects)
    if (basename_of(o->path) == basename_of(stamp.object)) named = o;
  if (!named && !objects.empty()) named = objects.front();
  if (!named) return {};
  if (named->build_id.empty()) {
    p.notes.push_back({"provenance", fmt::format("fix.so is stamped for build-id {} of {}, but the running {} has no "
                                                 "build-id: not checked",
                                                 stamp.build_id, stamp.object, named->path)});
    return {};
  }
  if (basename_of(named->path) == basename_of(stamp.object))
    return fail(fmt::format("fix.so was built for another build of {}: it is stamped with build-id {}, the running {} "
                            "has build-id {}",
                            named->path, stamp.build_id, named->path, named->build_id),
                rebuild_hint(p));
  return fail(fmt::format("fix.so was built for {} (build-id {}), but the functions it replaces here are in {} "
                          "(build-id {})",
                          stamp.object, stamp.build_id, named->path, named->build_id),
              rebuild_hint(p, "rebuild it for the object it patches (build --object NAME)"));
}

// ---------------------------------------------------------------- the toolchain

// Switches whose difference is worth a note: code generation, not paths, warnings or -g.
std::set<std::string> codegen_switches(const Producer& p) {
  std::set<std::string> out;
  for (auto& s : p.switches) {
    bool codegen = s.rfind("-O", 0) == 0 || s.rfind("-m", 0) == 0 || s.rfind("--param", 0) == 0 ||
                   (s.rfind("-f", 0) == 0 && s != "-fPIC" && s != "-fpic" && s != "-fPIE" && s != "-fpie" &&
                    s != "-fno-PIE" && s != "-fno-pie" && s.find("prefix-map") == std::string::npos &&
                    s.rfind("-fdiagnostics", 0) != 0 && s.rfind("-fdebug-", 0) != 0);
    if (codegen) out.insert(s);
  }
  return out;
}

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (auto& s : v) out += (out.empty() ? "" : " ") + s;
  return out;
}

bool c_family(const Producer& p) { return p.family == "GCC" || p.family == "clang"; }

// "1" when the names show the C++11 std::string/std::list (std::__cxx11::), "0" when they show
// the old ones, "" when they show neither or both.
std::string cxx11_abi_of(const std::vector<std::string>& mangled) {
  bool new_abi = false, old_abi = false;
  for (auto& m : mangled) {
    if (!m.starts_with("_Z")) continue;
    if (m.find("St7__cxx11") != std::string::npos || m.find("B5cxx11") != std::string::npos) {
      new_abi = true;
      continue;
    }
    if (m.find("Ss") == std::string::npos && m.find("basic_string") == std::string::npos) continue;
    std::string d = symbols__demangle(m);
    if (d.find("std::string") != std::string::npos || d.find("std::basic_string<") != std::string::npos) old_abi = true;
  }
  return new_abi == old_abi ? "" : new_abi ? "1" : "0";
}

struct Sides {
  const Producer* target = nullptr;
  const Producer* fix = nullptr;
  std::string function;  // the first replaced function compiled this way, for messages
  std::string unit;      // its compile unit
};

Result<void> compare(PreparedPatch& p, const Sides& s, const std::string& target_abi, const std::string& fix_abi) {
  const Producer& t = *s.target;
  const Producer& f = *s.fix;
  std::string where = fmt::format("the target's {}{}", s.function, s.unit.empty() ? "" : " (" + s.unit + ")");
  if (!c_family(t) || !c_family(f)) {
    p.notes.push_back({"toolchain", fmt::format("not compared: {} is {} ({}), fix.so's code is {} ({})", where,
                                                source_language__name(t.language), producer__compiler(t),
                                                source_language__name(f.language), producer__compiler(f))});
    return {};
  }
  if (t.family != f.family || (t.major && f.major && t.major != f.major))
    return fail(fmt::format("fix.so was compiled by {} and {} by {}: {}", producer__compiler(f), where,
                            producer__compiler(t),
                            t.family != f.family ? "another compiler family" : "another major version"),
                rebuild_hint(p, "rebuild it with the target's compiler"));
  for (auto& flag : producer__abi_flags()) {
    std::string tv = producer__abi_value(t, flag), fv = producer__abi_value(f, flag);
    if (std::string(flag.name) == "_GLIBCXX_USE_CXX11_ABI") {
      if (tv.empty()) tv = target_abi;
      if (fv.empty()) fv = fix_abi;
      if (tv.empty() || fv.empty() || tv == fv) continue;
      return fail(fmt::format("fix.so was compiled with _GLIBCXX_USE_CXX11_ABI={} and {} with _GLIBCXX_USE_CXX11_ABI={}: "
                              "{}, so the two disagree on every shared object of those types",
                              fv, where, tv, flag.effect),
                  rebuild_hint(p, "rebuild it with the target's flags"));
    }
    if (!t.switches_recorded || !f.switches_recorded || tv == fv) continue;
    auto say = [](const std::string& v, const char* name) { return v.empty() ? fmt::format("without {}", name) : "with " + v; };
    return fail(fmt::format("fix.so was compiled {} and {} {}: {}, so the two disagree on the ABI", say(fv, flag.name),
                            where, say(tv, flag.name), flag.effect),
                rebuild_hint(p, "rebuild it with the target's flags"));
  }
  if (!t.switches_recorded || !f.switches_recorded) {
    p.notes.push_back({"toolchain", fmt::format("{} like {}; flags not compared: {} did not record its switches",
                                                producer__compiler(f), where, t.switches_recorded ? "fix.so" : "the target")});
    return {};
  }
  auto ts = codegen_switches(t), fs = codegen_switches(f);
  std::vector<std::string> only_fix, only_target;
  std::set_difference(fs.begin(), fs.end(), ts.begin(), ts.end(), std::back_inserter(only_fix));
  std::set_difference(ts.begin(), ts.end(), fs.begin(), fs.end(), std::back_inserter(only_target));
  bool same_standard = t.language != f.language || t.standard == f.standard;
  if (only_fix.empty() && only_target.empty() && same_standard) {
    p.notes.push_back({"toolchain", fmt::format("{} with the flags of {}", producer__compiler(f), where)});
    return {};
  }
  std::string diff;
  if (!same_standard) diff = fmt::format("language {} (the target {})", f.standard, t.standard);
  if (!only_fix.empty()) diff += (diff.empty() ? "" : "; ") + fmt::format("fix.so has {}", joined(only_fix));
  if (!only_target.empty()) diff += (diff.empty() ? "" : "; ") + fmt::format("the target has {}", joined(only_target));
  p.notes.push_back({"toolchain", fmt::format("{} like {}, other flags (none ABI-changing): {}", producer__compiler(f),
                                              where, diff)});
  return {};
}

std::vector<std::string> target_names(const SymbolTable& table, const std::string& object) {
  std::vector<std::string> out;
  for (auto* list : {&table.functions(), &table.variables()})
    for (auto& f : *list)
      if (f.object == object) out.push_back(f.mangled);
  return out;
}

std::vector<std::string> fix_names(const PreparedPatch& p) {
  std::vector<std::string> out;
  auto fix = fixlib__read(p.fix);
  if (!fix) return out;
  for (auto* list : {&fix->functions, &fix->variables, &fix->dynsyms})
    for (auto& s : *list) out.push_back(s.name);
  return out;
}

Result<void> check_toolchain(PreparedPatch& p) {
  ObjectProducers fix = producer__read_image(p.fix.bytes, p.fix.path);
  if (fix.units.empty() || !fix.dominant()) {
    p.notes.push_back({"toolchain", fmt::format("not compared: {}", fix.why_none.empty() ? "fix.so names no compiler"
                                                                                         : fix.why_none)});
    return {};
  }
  std::map<std::string, ObjectProducers> targets;  // by object path, each read once
  std::map<std::pair<const Producer*, const Producer*>, Sides> pairs;
  std::vector<std::pair<const Producer*, const Producer*>> order;
  std::set<std::string> undescribed;
  for (auto& s : p.switches) {
    const Function& fn = s.entry.target;
    auto* info = object_info(p.table, fn.object);
    if (!info) continue;
    auto it = targets.find(fn.object);
    if (it == targets.end())
      it = targets.emplace(fn.object, producer__read_file(fn.object, fmt::format("/proc/{}/root{}", p.options.pid,
                                                                                 fn.object),
                                                          info->build_id, info->debug_file)).first;
    const ObjectProducers& dw = it->second;
    const CompileUnit* tu = dw.unit_at(fn.address - info->load_bias);
    const Producer* tp = tu && !tu->producer.text.empty() ? &tu->producer : dw.dominant();
    if (!tp) {
      if (undescribed.insert(fn.object).second)
        p.notes.push_back({"toolchain", fmt::format("not compared: no DW_AT_producer for {}: {}", fn.object,
                                                    dw.why_none.empty() ? "its DWARF names no compiler" : dw.why_none)});
      continue;
    }
    const CompileUnit* fu = fix.unit_at(s.entry.replacement_value);
    const Producer* fp = fu && !fu->producer.text.empty() ? &fu->producer : fix.dominant();
    auto key = std::make_pair(tp, fp);
    if (!pairs.count(key)) {
      pairs[key] = Sides{tp, fp, fn.name, tu ? tu->name : ""};
      order.push_back(key);
    }
  }
  if (order.empty()) return {};
  std::string fix_abi = cxx11_abi_of(fix_names(p));
  for (auto& key : order) {
    const Function& first = std::find_if(p.switches.begin(), p.switches.end(), [&](const PlannedSwitch& s) {
                              return s.entry.target.name == pairs[key].function;
                            })->entry.target;
    std::string target_abi = cxx11_abi_of(target_names(p.table, first.object));
    HOTFIX_CHECK(compare(p, pairs[key], target_abi, fix_abi));
  }
  return {};
}

}  // namespace

Result<void> provenance__check(PreparedPatch& p) {
  HOTFIX_CHECK(check_stamp(p));
  HOTFIX_CHECK(check_toolchain(p));
  return {};
}

}  // namespace hotfix
