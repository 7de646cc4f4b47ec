#include "patch/preflight.hpp"

#include <elf.h>
#include <fcntl.h>
#include <gelf.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <string_view>
#include <unordered_set>

#include "patch/binder.hpp"
#include "patch/fixlib.hpp"
#include "process/maps.hpp"

namespace hotfix {
namespace {

namespace fs = std::filesystem;

std::string in_root(pid_t pid, const std::string& path) { return fmt::format("/proc/{}/root{}", pid, path); }

// What the loader needs to know of one ELF object.
struct DynamicInfo {
  std::string soname;
  std::vector<std::string> needed, rpath, runpath;
  std::vector<std::string> defined;  // .dynsym definitions (bare names)
  int elf_class = 0, machine = 0;
};

std::vector<std::string> split_path_list(const std::string& list) {
  std::vector<std::string> out;
  std::stringstream in(list);
  for (std::string d; std::getline(in, d, ':');)
    if (!d.empty()) out.push_back(d);
  return out;
}

// `only`: the .dynsym definitions worth keeping (the names fix.so needs); null: all.
Result<DynamicInfo> read_dynamic(const std::string& file, const std::unordered_set<std::string_view>* only = nullptr) {
  auto elf = HOTFIX_TRY(ElfHandle::open(file));
  DynamicInfo out;
  GElf_Ehdr eh;
  if (!gelf_getehdr(elf.get(), &eh)) return fail(fmt::format("{} has no ELF header", file));
  out.elf_class = eh.e_ident[EI_CLASS], out.machine = eh.e_machine;
  for (Elf_Scn* scn = elf_nextscn(elf.get(), nullptr); scn; scn = elf_nextscn(elf.get(), scn)) {
    GElf_Shdr sh;
    if (!gelf_getshdr(scn, &sh) || !sh.sh_entsize) continue;
    Elf_Data* data = elf_getdata(scn, nullptr);
    if (!data) continue;
    size_t n = sh.sh_size / sh.sh_entsize;
    if (sh.sh_type == SHT_DYNAMIC) {
      for (size_t i = 0; i < n; ++i) {
        GElf_Dyn d;
        if (!gelf_getdyn(data, static_cast<int>(i), &d)) continue;
        const char* s = nullptr;
        if (d.d_tag == DT_NEEDED || d.d_tag == DT_SONAME || d.d_tag == DT_RPATH || d.d_tag == DT_RUNPATH)
          s = elf_strptr(elf.get(), sh.sh_link, d.d_un.d_val);
        if (!s) continue;
        if (d.d_tag == DT_NEEDED) out.needed.push_back(s);
        if (d.d_tag == DT_SONAME) out.soname = s;
        if (d.d_tag == DT_RPATH) out.rpath = split_path_list(s);
        if (d.d_tag == DT_RUNPATH) out.runpath = split_path_list(s);
      }
    } else if (sh.sh_type == SHT_DYNSYM) {
      for (size_t i = 1; i < n; ++i) {
        GElf_Sym sym;
        if (!gelf_getsym(data, static_cast<int>(i), &sym) || sym.st_shndx == SHN_UNDEF) continue;
        if (GELF_ST_BIND(sym.st_info) == STB_LOCAL) continue;
        const char* name = elf_strptr(elf.get(), sh.sh_link, sym.st_name);
        if (name && *name && (!only || only->count(std::string_view(name).substr(0, std::string_view(name).find('@')))))
          out.defined.push_back(name);
      }
    }
  }
  return out;
}

// soname -> path from the target's /etc/ld.so.cache (glibc's "glibc-ld.so.cache1.1" format,
// alone or after the old "ld.so-1.7.0" table).
std::vector<std::pair<std::string, std::string>> read_ld_cache(pid_t pid) {
  std::ifstream in(in_root(pid, "/etc/ld.so.cache"), std::ios::binary);
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::pair<std::string, std::string>> out;
  constexpr std::string_view kOld = "ld.so-1.7.0", kNew = "glibc-ld.so.cache1.1";
  size_t base = 0;
  if (data.compare(0, kOld.size(), kOld) == 0 && data.size() >= 16) {
    uint32_t nlibs;
    std::memcpy(&nlibs, data.data() + 12, 4);
    base = (16 + size_t(nlibs) * 12 + 7) & ~size_t(7);
  }
  if (data.size() < base + 48 || data.compare(base, kNew.size(), kNew) != 0) return out;
  uint32_t nlibs;
  std::memcpy(&nlibs, data.data() + base + 20, 4);
  auto str = [&](uint32_t off) -> std::string {
    size_t at = base + off;
    if (at >= data.size()) return {};
    return std::string(data.c_str() + at, strnlen(data.c_str() + at, data.size() - at));
  };
  for (uint32_t i = 0; i < nlibs; ++i) {
    size_t e = base + 48 + size_t(i) * 24;
    if (e + 24 > data.size()) break;
    uint32_t key, value;
    std::memcpy(&key, data.data() + e + 4, 4);
    std::memcpy(&value, data.data() + e + 8, 4);
    out.emplace_back(str(key), str(value));
  }
  return out;
}

std::string target_env(pid_t pid, const std::string& key) {
  std::ifstream in(fmt::format("/proc/{}/environ", pid), std::ios::binary);
  for (std::string kv; std::getline(in, kv, '\0');)
    if (kv.rfind(key + "=", 0) == 0) return kv.substr(key.size() + 1);
  return {};
}

class Preflight {
 public:
  explicit Preflight(const PreflightInput& in) : in_(in) {}

  Result<void> run() {
    auto fix = HOTFIX_TRY(read_dynamic(in_.library));
    fix_class_ = fix.elf_class, fix_machine_ = fix.machine;
    // Only the names fix.so needs are looked up in what the loaded objects define: keeping
    // every export of every object (libcrypto alone has thousands) was most of the check.
    for (auto& s : HOTFIX_TRY(fixlib__read(*in_.image)).dynsyms)
      if (!s.defined && !s.name.empty()) needed_names_.insert(s.name.substr(0, s.name.find('@')));
    for (auto& n : needed_names_) needed_.insert(n);
    HOTFIX_CHECK(read_loaded());
    HOTFIX_CHECK(resolve_needed(fix, in_.loaded_from_dir, "fix.so"));
    return check_symbols();
  }

 private:
  Result<void> read_loaded() {
    auto maps = HOTFIX_TRY(process__read_maps(in_.pid));
    std::set<std::string> seen;
    for (auto& m : maps) {
      if (!m.file_backed() || !seen.insert(m.path).second) continue;
      auto info = read_dynamic(in_root(in_.pid, m.path), &needed_);
      if (!info) continue;  // a data file, a font: not an object the loader knows
      loaded_names_.insert(fs::path(m.path).filename().string());
      if (!info->soname.empty()) loaded_names_.insert(info->soname);
      add_defined(*info);
    }
    return {};
  }

  void add_defined(const DynamicInfo& info) {
    for (auto& d : info.defined) defined_.insert(d.substr(0, d.find('@')));
  }

  // Where the target's loader looks for `name` needed by an object with these paths, in its order.
  std::optional<std::string> find(const std::string& name, const DynamicInfo& by, const std::string& origin) {
    auto usable = [&](const std::string& path) {
      auto info = read_dynamic(in_root(in_.pid, path));
      return info && info->elf_class == fix_class_ && info->machine == fix_machine_;
    };
    if (name.find('/') != std::string::npos) return usable(name) ? std::optional(name) : std::nullopt;
    auto expand = [&](std::string dir) {
      for (const char* o : {"$ORIGIN", "${ORIGIN}"})
        if (auto at = dir.find(o); at != std::string::npos) dir.replace(at, std::strlen(o), origin);
      return dir;
    };
    std::vector<std::string> dirs;
    if (by.runpath.empty())
      for (auto& d : by.rpath) dirs.push_back(expand(d));
    for (auto& d : split_path_list(target_env(in_.pid, "LD_LIBRARY_PATH"))) dirs.push_back(d);
    for (auto& d : by.runpath) dirs.push_back(expand(d));
    for (auto& d : dirs)
      if (usable(d + "/" + name)) return d + "/" + name;
    if (!cache_read_) cache_ = read_ld_cache(in_.pid), cache_read_ = true;
    for (auto& [soname, path] : cache_)
      if (soname == name && usable(path)) return path;
    for (const char* d : {"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"})
      if (usable(std::string(d) + "/" + name)) return std::string(d) + "/" + name;
    return std::nullopt;
  }

  Result<void> resolve_needed(const DynamicInfo& by, const std::string& origin, const std::string& who) {
    for (auto& name : by.needed) {
      if (loaded_names_.count(name) || !visited_.insert(name).second) continue;
      auto path = find(name, by, origin);
      if (!path)
        return fail(fmt::format("{} needs {} (DT_NEEDED), which process {} would not find: it is not loaded, and not in "
                                "{}'s RPATH/RUNPATH, the target's LD_LIBRARY_PATH, its /etc/ld.so.cache or the default "
                                "directories (inside /proc/{}/root); dlopen would fail",
                                who, name, in_.pid, who, in_.pid),
                    "install that library where the service can load it, or link fix.so only against libraries the "
                    "service already uses (`ldd` on fix.so, `cat /proc/PID/maps`)");
      auto info = HOTFIX_TRY(read_dynamic(in_root(in_.pid, *path), &needed_));
      add_defined(info);
      HOTFIX_CHECK(resolve_needed(info, fs::path(*path).parent_path().string(), name));
    }
    return {};
  }

  Result<void> check_symbols() {
    auto fix = HOTFIX_TRY(fixlib__read(*in_.image));
    // The binder's own refusals (a symbol nothing defines, an ambiguous one) come first, and
    // its bindings are symbols the loader need not find (bound in memory: no file is written).
    auto bound = HOTFIX_TRY(binder__bind(*in_.table, in_.executable, *in_.image));
    std::unordered_set<std::string> by_binder;
    for (auto& b : bound.bindings) by_binder.insert(b.symbol);
    for (auto& s : fix.dynsyms) {
      if (s.defined || s.index == 0 || s.name.empty() || s.bind == STB_WEAK || by_binder.count(s.name)) continue;
      if (defined_.count(s.name.substr(0, s.name.find('@')))) continue;
      return fail(fmt::format("fix.so needs `{}`, which no object loaded in process {} nor any library fix.so needs "
                              "exports: dlopen(RTLD_NOW) would fail with \"undefined symbol\"",
                              symbol__demangle(s.name), in_.pid),
                  "declare only functions and variables the service has; a symbol of a library the service loaded "
                  "privately (dlopen RTLD_LOCAL) or hides is not visible to fix.so");
    }
    return {};
  }

  const PreflightInput& in_;
  int fix_class_ = 0, fix_machine_ = 0;
  std::set<std::string> loaded_names_, visited_;
  std::unordered_set<std::string> defined_;
  std::unordered_set<std::string> needed_names_;  // what fix.so leaves undefined (bare names)
  std::unordered_set<std::string_view> needed_;   // views of needed_names_
  std::vector<std::pair<std::string, std::string>> cache_;
  bool cache_read_ = false;
};

}  // namespace

Result<void> preflight__check(const PreflightInput& in) { return Preflight(in).run(); }

}  // namespace hotfix
