#include "patch/binder.hpp"

#include "common/paths.hpp"

#include <elf.h>
#include <fcntl.h>
#include <gelf.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>

#include "common/unique_fd.hpp"
#include "patch/plan.hpp"
#include "process/maps.hpp"
#include "symbols/pattern.hpp"

namespace hotfix {

namespace {

namespace fs = std::filesystem;

struct Candidate {
  const Function* symbol;
  bool is_function;
};

// The target's symbols, indexed for the binder's two questions: "can the dynamic linker
// bind this name by itself?" and "which target symbol is this name?".
struct TargetIndex {
  std::set<std::string> executable;  // the main executable's object path(s) as the table spells them
  bool in_executable(const Function& f) const { return executable.count(f.object) > 0; }
  std::unordered_set<std::string> exported;
  std::unordered_multimap<std::string, Candidate> by_name;
  std::vector<Candidate> locals;
};


std::string without_deleted(std::string path) {
  const std::string tag = " (deleted)";
  if (path.ends_with(tag)) path.resize(path.size() - tag.size());
  return path;
}

std::string canonical_or_same(const std::string& path) {
  std::error_code ec;
  auto c = fs::canonical(path, ec);
  return ec ? path : c.string();
}

// Hand-binding a symbol the dynamic linker can bind would be wrong for IFUNCs (memcpy) and
// versioned symbols, so "exported" errs on the safe side: besides .dynsym definitions, any
// global symbol of a shared library counts (the static linker turns hidden ones into locals;
// only an executable keeps globals out of .dynsym).
bool dynamically_visible(const TargetIndex& index, const Function& f) {
  return f.exported || (f.binding != Binding::local && !index.in_executable(f));
}

// Only the names fix.so asks about (`wanted`) go into `exported` and `by_name`: those are the
// only questions asked, and indexing every name of every object cost more than all the rest
// of a patch (issue 11 §7).
void add_symbols(TargetIndex& index, const std::vector<Function>& symbols, bool is_function,
                 const std::set<std::string>& fix_copies, const std::unordered_set<std::string>& wanted) {
  auto add_name = [&](const Function& f, const std::string& n) {
    // Dynamic symbol names may carry a version ("memcpy@GLIBC_2.14"); the binder compares bare names.
    auto at = n.find('@');
    auto it = wanted.find(at == std::string::npos ? n : n.substr(0, at));
    if (it == wanted.end()) return;
    if (dynamically_visible(index, f)) index.exported.insert(*it);
    index.by_name.emplace(*it, Candidate{&f, is_function});
  };
  std::string_view last_object;  // the table groups by address, objects in runs: skip repeats
  bool last_is_copy = false;
  for (auto& f : symbols) {
    // The target's own symbols: those of loaded fix copies (recorded ones, and any object
    // named like one: a delivered memfd or an older build's copy on disk) are left out.
    if (f.object != last_object) {
      last_object = f.object;
      last_is_copy = fix_copies.count(f.object) || path__is_fix_copy(f.object);
    }
    if (last_is_copy) continue;
    add_name(f, f.mangled);
    for (auto& alias : f.aliases) add_name(f, alias);
    if (f.binding == Binding::local) index.locals.push_back({&f, is_function});
  }
}

// The names the binder looks up: what fix.so leaves undefined, and the variables it defines
// that could be private copies of the target's.
std::unordered_set<std::string> wanted_names(const FixLibrary& fix) {
  std::unordered_set<std::string> out;
  for (auto& s : fix.dynsyms)
    if (!s.defined && s.index != 0 && !s.name.empty()) out.insert(s.name);
  for (auto& v : fix.variables) out.insert(v.name);
  return out;
}

// Points into `target`, which outlives the index.
TargetIndex index_target(const SymbolTable& target, const std::string& executable, const FixLibrary& fix,
                         const std::set<std::string>& fix_copies) {
  TargetIndex index;
  std::string exe = canonical_or_same(executable);
  for (auto& o : target.objects())
    if (o.path == executable || canonical_or_same(o.path) == exe) index.executable.insert(o.path);
  auto wanted = wanted_names(fix);
  add_symbols(index, target.functions(), true, fix_copies, wanted);
  add_symbols(index, target.variables(), false, fix_copies, wanted);
  return index;
}

bool type_fits(const FixSymbol& wanted, const Candidate& c) {
  if (wanted.type == STT_FUNC || wanted.type == STT_GNU_IFUNC) return c.is_function;
  if (wanted.type == STT_OBJECT) return !c.is_function;
  return true;  // STT_NOTYPE: an undefined reference often does not say
}

struct Resolution {
  std::vector<Candidate> candidates;  // 0 = unresolved, 1 = bound, more = ambiguous
};

// Same mangled name first (a C static `helper`, a non-exported global), else a LOCAL symbol
// whose demangled name matches: C++ marks internal linkage with `L` in the mangled name
// (`_ZL6helperi`, `_ZN2nsL1xE`), which the demangled forms do not show.
Resolution resolve(const TargetIndex& index, const FixSymbol& wanted) {
  Resolution r;
  auto [lo, hi] = index.by_name.equal_range(wanted.name);
  for (auto it = lo; it != hi; ++it)
    if (type_fits(wanted, it->second)) r.candidates.push_back(it->second);
  if (r.candidates.empty()) {
    LocalNameMatcher same_local(wanted.name);
    for (auto& c : index.locals)
      if (type_fits(wanted, c) && same_local(*c.symbol)) r.candidates.push_back(c);
  }
  // Aliases put one symbol into the index several times.
  std::sort(r.candidates.begin(), r.candidates.end(), [](auto& a, auto& b) { return a.symbol < b.symbol; });
  r.candidates.erase(std::unique(r.candidates.begin(), r.candidates.end(),
                                 [](auto& a, auto& b) { return a.symbol == b.symbol; }),
                     r.candidates.end());
  // The code the user fixes almost always lives in the executable; a library's private
  // helper of the same name is not what fix.cpp means.
  bool any_in_exe = std::any_of(r.candidates.begin(), r.candidates.end(),
                                [&](auto& c) { return index.in_executable(*c.symbol); });
  if (any_in_exe) std::erase_if(r.candidates, [&](auto& c) { return !index.in_executable(*c.symbol); });
  return r;
}

Error ambiguity_error(const SymbolTable& target, const FixSymbol& wanted, const Resolution& r) {
  std::string list;
  for (auto& c : r.candidates) list += (list.empty() ? "" : "; ") + plan__describe(target, *c.symbol);
  return Error{fmt::format("fix.so needs `{}`, which names {} symbols in the target: {}",
                           symbol__demangle(wanted.name), r.candidates.size(), list),
               "hotfix will not guess which one fix.so means; make the fix work without it (e.g. patch a "
               "caller that can pass it in)",
               1};
}

Error unresolved_error(const SymbolTable& target, const FixLibrary& fix, const std::vector<std::string>& missing) {
  std::string first = symbol__demangle(missing.front());
  std::string what = fmt::format("fix.so needs `{}`{}, which the target does not define", first,
                                 missing.size() > 1 ? fmt::format(" (and {} more)", missing.size() - 1) : "");
  std::string hint = "declare only functions and variables the service has, with their exact names and types";
  auto near = symbols__nearest(target, first);
  if (!near.empty()) hint = fmt::format("did you mean `{}`? {}", near.front(), hint);
  std::set<std::string> loaded;
  for (auto& o : target.objects()) loaded.insert(fs::path(o.path).filename().string());
  std::string unloaded;
  for (auto& n : fix.needed)
    if (!loaded.count(n)) unloaded += (unloaded.empty() ? "" : ", ") + n;
  if (!unloaded.empty())
    hint += fmt::format("; fix.so also links {}, which the target has not loaded: link fix.so only against "
                        "libraries the service uses",
                        unloaded);
  return Error{what, hint, 1};
}

// Compiler-made data (`completed.0`, `__dso_handle`, `__TMC_END__`) is in every object and
// belongs to it; only the user's own variables can shadow the target's. Vague-linkage data
// (weak, or GNU unique: a template's static member or a function-local static of an inline
// function, such as std::to_string's digit table `__to_chars_10_impl<unsigned>(...)::__digits`)
// is instantiated alike in every object that uses it, so fix.so's own copy is no private copy
// of the service's live state.
bool is_user_variable(const FixSymbol& s) {
  if (s.bind == STB_WEAK || s.bind == STB_GNU_UNIQUE || s.name.find('.') != std::string::npos) return false;
  return !(s.name[0] == '_' && s.name.rfind("_Z", 0) != 0);
}

// fix.cpp that copied `static int g_calls;` (or defined `int g_calls;`) along with the buggy
// function would count in a private copy: it loads and runs, and is silently wrong.
Result<void> check_no_private_copies(const TargetIndex& index, const FixLibrary& fix) {
  for (auto& v : fix.variables) {
    if (!is_user_variable(v)) continue;
    const Function* shadowed = nullptr;
    auto [lo, hi] = index.by_name.equal_range(v.name);
    for (auto it = lo; it != hi && !shadowed; ++it)
      if (!it->second.is_function) shadowed = it->second.symbol;
    LocalNameMatcher same_local(v.name);
    for (auto& c : index.locals)
      if (!shadowed && !c.is_function && same_local(*c.symbol)) shadowed = c.symbol;
    if (shadowed)
      return fail(fmt::format("fix.so defines its own `{}`, a variable the target already has ({} in {}): the "
                              "fixed code would use a private copy, not the service's live one",
                              symbol__demangle(v.name), shadowed->name, shadowed->object),
                  fmt::format("declare it `extern` in fix.cpp instead of defining it (remove `static` and "
                              "any initializer)"));
  }
  return {};
}

Result<std::vector<Fixup>> fixups_for(const FixLibrary& fix, const std::map<size_t, Function>& bound) {
  std::vector<Fixup> out;
  for (auto& rel : fix.relocs) {
    auto it = bound.find(rel.symbol);
    if (it == bound.end()) continue;
    const std::string& name = fix.dynsyms[rel.symbol].name;
    auto kind = arch::reloc_kind(rel.type);
    if (kind == arch::RelocKind::unsupported)
      return fail(fmt::format("fix.so refers to `{}` through a {} relocation, which hotfix cannot bind by hand",
                              symbol__demangle(name), arch::reloc_name(rel.type)),
                  "rebuild fix.so with -fPIC and use the variable or function directly");
    uint64_t addend = kind == arch::RelocKind::absolute64 ? static_cast<uint64_t>(rel.addend) : 0;
    out.push_back({rel.offset, it->second.address + addend, addend, kind, name});
  }
  return out;
}

// Removes a temporary file unless the work succeeded.
struct TempFile {
  std::string path;
  bool keep = false;
  ~TempFile() {
    if (!keep) ::unlink(path.c_str());
  }
};

// Only the st_info bytes of the given .dynsym entries change: the layout stays exactly fix.so's.
Result<void> weaken_symbols(std::vector<uint8_t>& bytes, const std::string& name, const std::vector<size_t>& indices) {
  if (indices.empty()) return {};
  auto elf = HOTFIX_TRY(ElfHandle::open_memory(bytes, name));
  bool is64 = gelf_getclass(elf.get()) == ELFCLASS64;
  size_t info_at = is64 ? offsetof(Elf64_Sym, st_info) : offsetof(Elf32_Sym, st_info);
  for (Elf_Scn* scn = nullptr; (scn = elf_nextscn(elf.get(), scn));) {
    GElf_Shdr shdr;
    if (!gelf_getshdr(scn, &shdr) || shdr.sh_type != SHT_DYNSYM) continue;
    Elf_Data* data = elf_getdata(scn, nullptr);
    for (size_t i : indices) {
      GElf_Sym sym;
      uint64_t at = shdr.sh_offset + i * shdr.sh_entsize + info_at;
      if (!data || !gelf_getsym(data, static_cast<int>(i), &sym) || shdr.sh_entsize == 0 || at >= bytes.size() ||
          (i + 1) * shdr.sh_entsize > shdr.sh_size)
        return fail(fmt::format("cannot read dynamic symbol {} of {}: {}", i, name, elf_errmsg(-1)));
      bytes[at] = static_cast<uint8_t>(GELF_ST_INFO(STB_WEAK, GELF_ST_TYPE(sym.st_info)));
    }
  }
  return {};
}

Result<void> write_copy(const std::vector<uint8_t>& bytes, const std::string& out_path) {
  std::error_code ec;
  auto parent = fs::path(out_path).parent_path();
  // Only a directory made here becomes root's alone: never one that was there (/tmp!).
  if (!parent.empty() && !fs::exists(parent, ec)) {
    fs::create_directories(parent, ec);
    if (!ec) fs::permissions(parent, fs::perms::owner_all, ec);
  }
  if (ec) return fail(fmt::format("cannot create {}: {}", parent.string(), ec.message()));
  TempFile tmp{fmt::format("{}.tmp.{}", out_path, ::getpid())};
  UniqueFd fd(::open(tmp.path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!fd || ::write(fd.get(), bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size()))
    return fail(fmt::format("cannot write {}: {}", tmp.path, errno_text(errno)));
  if (::rename(tmp.path.c_str(), out_path.c_str()) != 0)
    return fail(fmt::format("cannot create {}: {}", out_path, errno_text(errno)));
  tmp.keep = true;
  return {};
}

uint64_t load_u64(const std::vector<uint8_t>& bytes) {
  uint64_t v = 0;
  std::memcpy(&v, bytes.data(), std::min(bytes.size(), sizeof v));
  return v;
}

}  // namespace

Result<BoundLibrary> binder__bind(const SymbolTable& target, const std::string& executable, const FixImage& image,
                                  const std::set<std::string>& fix_copies) {
  auto fix = HOTFIX_TRY(fixlib__read(image));
  auto index = index_target(target, executable, fix, fix_copies);
  HOTFIX_CHECK(check_no_private_copies(index, fix));
  std::map<size_t, Function> bound;
  std::vector<std::string> missing;
  for (auto& s : fix.dynsyms) {
    if (s.defined || s.index == 0 || s.name.empty() || index.exported.count(s.name)) continue;
    if (s.type == STT_TLS)
      return fail(fmt::format("fix.so uses the thread-local variable `{}`, which hotfix cannot bind",
                              symbol__demangle(s.name)),
                  "pass the value as a parameter, or export the variable from the service");
    auto r = resolve(index, s);
    if (r.candidates.size() > 1) return std::unexpected(ambiguity_error(target, s, r));
    if (r.candidates.size() == 1) bound.emplace(s.index, *r.candidates.front().symbol);
    // A weak reference nobody defines (__gmon_start__) is meant to stay 0.
    else if (s.bind != STB_WEAK) missing.push_back(s.name);
  }
  if (!missing.empty()) return std::unexpected(unresolved_error(target, fix, missing));
  BoundLibrary out;
  out.fixups = HOTFIX_TRY(fixups_for(fix, bound));
  std::vector<size_t> weak;
  for (auto& [i, f] : bound) {
    out.bindings.push_back({fix.dynsyms[i].name, f});
    if (fix.dynsyms[i].bind != STB_WEAK) weak.push_back(i);
  }
  out.bytes = image.bytes;
  HOTFIX_CHECK(weaken_symbols(out.bytes, image.path, weak));
  return out;
}

void binder__add_needs(const FixLibrary& fix, SymbolNeeds& needs) {
  for (auto& s : fix.dynsyms) {
    if (s.defined || s.index == 0 || s.name.empty()) continue;
    std::string bare = s.name.substr(0, s.name.find('@'));
    needs.names.push_back(bare);
    // resolve(): a LOCAL symbol of the same demangled name, only when nothing has the name itself.
    needs.fallbacks.push_back({bare, symbols__pattern_needle(symbol__demangle(bare))});
  }
  // check_no_private_copies: the variable by name, or a local of the same demangled name.
  for (auto& v : fix.variables) {
    if (!is_user_variable(v)) continue;
    auto piece = symbols__pattern_needle(symbol__demangle(v.name));
    if (piece.empty()) needs.everything = true;
    needs.names.push_back(v.name);
    needs.pieces.push_back(piece);
  }
}

Result<BoundLibrary> binder__prepare(const SymbolTable& target, const std::string& executable,
                                     const std::string& fix_path, const std::string& out_path,
                                     const std::set<std::string>& fix_copies) {
  auto out = HOTFIX_TRY(binder__bind(target, executable, HOTFIX_TRY(fixlib__load(fix_path)), fix_copies));
  HOTFIX_CHECK(write_copy(out.bytes, out_path));
  out.path = out_path;
  return out;
}

std::vector<MemoryWrite> binder__writes(const std::vector<Fixup>& fixups, uint64_t load_base) {
  std::vector<MemoryWrite> out;
  for (auto& f : fixups) {
    MemoryWrite w{load_base + f.offset, std::vector<uint8_t>(sizeof f.value), f.loader_value};
    // The target runs on this machine: its words have our byte order.
    std::memcpy(w.bytes.data(), &f.value, sizeof f.value);
    out.push_back(std::move(w));
  }
  return out;
}

Result<void> binder__apply(pid_t pid, uint64_t load_base, const std::vector<Fixup>& fixups) {
  auto writes = binder__writes(fixups, load_base);
  if (writes.empty()) return {};
  UniqueFd mem(::open(fmt::format("/proc/{}/mem", pid).c_str(), O_RDWR | O_CLOEXEC));
  if (!mem) return fail(fmt::format("cannot open the memory of pid {}: {}", pid, errno_text(errno)), "run as root");
  auto read_at = [&](uint64_t addr) -> Result<std::vector<uint8_t>> {
    std::vector<uint8_t> buf(8);
    if (::pread(mem.get(), buf.data(), buf.size(), static_cast<off_t>(addr)) != static_cast<ssize_t>(buf.size()))
      return fail(fmt::format("cannot read pid {} at {:#x}: {}", pid, addr, errno_text(errno)));
    return buf;
  };
  // Check every slot before the first store: a slot the dynamic linker filled itself means
  // the copy was loaded differently than planned, and a half-bound library must not run.
  for (size_t i = 0; i < writes.size(); ++i) {
    uint64_t now = load_u64(HOTFIX_TRY(read_at(writes[i].address)));
    if (now != writes[i].expected && now != load_u64(writes[i].bytes))
      return fail(fmt::format("the slot for `{}` at {:#x} holds {:#x}, expected {:#x}: the dynamic linker bound it "
                              "differently than planned",
                              fixups[i].symbol, writes[i].address, now, writes[i].expected),
                  "load the rewritten copy with dlopen(RTLD_NOW) and pass its load base");
  }
  for (auto& w : writes)
    if (::pwrite(mem.get(), w.bytes.data(), w.bytes.size(), static_cast<off_t>(w.address)) !=
        static_cast<ssize_t>(w.bytes.size()))
      return fail(fmt::format("cannot write pid {} at {:#x}: {}", pid, w.address, errno_text(errno)));
  for (size_t i = 0; i < writes.size(); ++i)
    if (HOTFIX_TRY(read_at(writes[i].address)) != writes[i].bytes)
      return fail(fmt::format("the slot for `{}` at {:#x} did not keep its new value", fixups[i].symbol,
                              writes[i].address));
  return {};
}

namespace {

// l_addr of an object whose first PT_LOAD (file offset 0) is mapped at `start`: that address
// minus the segment's page-aligned p_vaddr.
Result<uint64_t> load_base_at(uint64_t start, Elf* elf, const std::string& name) {
  size_t count = 0;
  elf_getphdrnum(elf, &count);
  uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  for (size_t i = 0; i < count; ++i) {
    GElf_Phdr ph;
    if (gelf_getphdr(elf, static_cast<int>(i), &ph) && ph.p_type == PT_LOAD) return start - (ph.p_vaddr & ~(page - 1));
  }
  return fail(fmt::format("{} has no loadable segment", name));
}

}  // namespace

Result<uint64_t> binder__load_base(pid_t pid, const std::string& mapped, std::span<const uint8_t> bytes) {
  auto maps = HOTFIX_TRY(process__read_maps(pid));
  auto first = std::find_if(maps.begin(), maps.end(), [&](auto& m) {
    return (m.path == mapped || m.path == mapped + " (deleted)") && m.offset == 0;
  });
  if (first == maps.end()) return fail(fmt::format("{} is not loaded in pid {}", mapped, pid));
  auto elf = HOTFIX_TRY(ElfHandle::open_memory(bytes, mapped));
  return load_base_at(first->start, elf.get(), mapped);
}

std::string binder__copy_path(pid_t pid, const std::string& patch_dir, uint32_t id, const std::string& library) {
  std::string dir = fmt::format("{}{}/", patch_dir, pid);
  std::string name = fs::path(library).filename().string();
  std::set<std::string> mapped;  // as /proc/PID/maps spells them, " (deleted)" removed
  if (auto maps = process__read_maps(pid))
    for (auto& m : *maps) mapped.insert(without_deleted(m.path));
  for (unsigned n = 1;; ++n) {
    std::string path = n == 1 ? fmt::format("{}{}-{}", dir, id, name) : fmt::format("{}{}.{}-{}", dir, id, n, name);
    std::error_code ec;
    if (!mapped.count(path) && !fs::exists(fs::symlink_status(path, ec))) return path;
  }
}

namespace {

struct FileMapping {
  uint64_t start = 0, offset = 0;
  unsigned dev_major = 0, dev_minor = 0;
  uint64_t inode = 0;
};

// /proc/PID/maps with what process__read_maps leaves out: the device and inode of each mapping.
Result<std::vector<FileMapping>> file_mappings(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/maps", pid));
  if (!in) return fail(fmt::format("cannot read the mappings of pid {}", pid), "is it still running?");
  std::vector<FileMapping> out;
  for (std::string line; std::getline(in, line);) {
    FileMapping m;
    unsigned long long start, end, offset, inode;
    char perms[8];
    if (std::sscanf(line.c_str(), "%llx-%llx %7s %llx %x:%x %llu", &start, &end, perms, &offset, &m.dev_major,
                    &m.dev_minor, &inode) != 7 || inode == 0)
      continue;
    m.start = start, m.offset = offset, m.inode = inode;
    out.push_back(m);
  }
  return out;
}

}  // namespace

Result<uint64_t> binder__load_base(pid_t pid, const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return fail(fmt::format("cannot stat {}: {}", path, errno_text(errno)));
  auto maps = HOTFIX_TRY(file_mappings(pid));
  auto first = std::find_if(maps.begin(), maps.end(), [&](auto& m) {
    return m.inode == st.st_ino && m.dev_major == major(st.st_dev) && m.dev_minor == minor(st.st_dev) && m.offset == 0;
  });
  if (first == maps.end())
    return fail(fmt::format("{} is not loaded in pid {}: its dlopen returned an object the target had already loaded "
                            "(under the same name or from the same file) instead of mapping this copy",
                            path, pid),
                "nothing was changed; retry the patch (every copy gets a fresh name), and see `hotfix-ctl list` for "
                "copies left loaded");
  auto elf = HOTFIX_TRY(ElfHandle::open(path));
  return load_base_at(first->start, elf.get(), path);
}

}  // namespace hotfix
