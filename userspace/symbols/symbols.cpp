// Symbol tables of ELF objects, read with libdwfl: it picks the best symbol table of a
// file (.symtab, else the separate debug file's, else .dynsym) and adds MiniDebugInfo
// (.gnu_debugdata). We supply the debug-file lookup ourselves (build-id, then
// .gnu_debuglink) so the debug root is configurable and nothing ever reaches the
// network (elfutils' standard lookup may call debuginfod when DEBUGINFOD_URLS is set).
#include "symbols/symbols.hpp"

#include <cxxabi.h>
#include <elfutils/libdwelf.h>
#include <elfutils/libdw.h>
#include <elfutils/libdwfl.h>
#include <fcntl.h>
#include <gelf.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bitset>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "arch/arch.hpp"
#include "common/unique_fd.hpp"
#include "common/paths.hpp"
#include "process/maps.hpp"

// libiberty's demangler knows both Rust manglings (legacy and v0); __cxa_demangle knows
// neither (it shows a legacy Rust path with its hash, and no v0 name at all).
// (libiberty.h would declare basename() again, clashing with glibc's C++ overloads.)
#define HAVE_DECL_BASENAME 1
#include <libiberty/demangle.h>

namespace hotfix {

const char* binding__name(Binding b) {
  switch (b) {
    case Binding::global: return "global";
    case Binding::weak: return "weak";
    case Binding::local: return "local";
  }
  return "?";
}

namespace {

std::string take(char* text, const std::string& otherwise) {
  if (!text) return otherwise;
  std::string out(text);
  std::free(text);
  return out;
}

std::string cxa_demangle(const std::string& symbol) {
  int status = 0;
  return take(abi::__cxa_demangle(symbol.c_str(), nullptr, nullptr, &status), symbol);
}

// "...17h" + 16 lowercase hex digits + "E": the hash rustc appends to a legacy path as its
// last component, then perhaps a compiler suffix (".llvm.1234"). Paths themselves may hold
// dots ("core..any..Any" spells `core::any::Any`).
bool legacy_rust_hash_at_end(std::string_view s) {
  for (size_t at = s.rfind("17h"); at != std::string_view::npos && at > 0; at = s.rfind("17h", at - 1)) {
    if (at + 20 > s.size() || s[at + 19] != 'E') continue;
    if (at + 20 != s.size() && s[at + 20] != '.') continue;
    auto hash = s.substr(at + 3, 16);
    if (std::all_of(hash.begin(), hash.end(), [](char c) { return std::isdigit((unsigned char)c) || (c >= 'a' && c <= 'f'); }))
      return true;
  }
  return false;
}

}  // namespace

bool symbols__is_rust(const std::string& symbol) {
  std::string_view s = symbol;
  if (s.starts_with("_R") && s.size() > 2 && std::isupper(static_cast<unsigned char>(s[2]))) return true;
  return s.starts_with("_ZN") && legacy_rust_hash_at_end(s);
}

std::string symbols__rust_hashed(const std::string& symbol) {
  if (!symbol.starts_with("_ZN") || !symbols__is_rust(symbol)) return {};
  std::string verbose = take(rust_demangle(symbol.c_str(), DMGL_VERBOSE), {});
  if (verbose.empty()) verbose = cxa_demangle(symbol);
  if (auto dot = verbose.find('.'); dot != std::string::npos && verbose.find("::h") < dot) verbose.resize(dot);
  return verbose;
}

std::string symbols__demangle(const std::string& symbol) {
  bool rust = symbols__is_rust(symbol);
  if (rust)
    if (char* text = rust_demangle(symbol.c_str(), 0)) return take(text, symbol);
  if (!symbol.starts_with("_Z")) return symbol;
  std::string out = cxa_demangle(symbol);
  // libiberty refuses a legacy hash that does not look random ("h1111111111111111"); the
  // path is still Rust's, so drop the hash as it would have.
  if (rust && out.size() > 19 && out.compare(out.size() - 19, 3, "::h") == 0) out.resize(out.size() - 19);
  return out;
}

std::string symbols__shorten(const std::string& name, size_t width) {
  // Columns, not bytes: a UTF-8 continuation byte starts no column.
  size_t columns = 0, cut = std::string::npos;
  for (size_t i = 0; i < name.size(); i++) {
    if ((static_cast<unsigned char>(name[i]) & 0xc0) == 0x80) continue;
    if (columns == width - 1) cut = i;
    if (++columns > width) return name.substr(0, cut) + "\u2026";
  }
  return name;
}

namespace {

// ---------------------------------------------------------------- one ELF file

// A symbol as the file defines it, before it is placed in a process.
struct RawSymbol {
  // Without a version suffix ("memcpy", not "memcpy@@GLIBC_2.14"). Points into the ELF
  // file's string table, which libelf keeps mapped while the symbols are grouped: no copy
  // per symbol (issue 11 §7: copies and sorts of strings were most of the resolution time).
  std::string_view name;
  uint64_t value = 0;
  uint64_t size = 0;
  Binding binding = Binding::global;
  bool exported = false;
  bool function = false;
  // A non-default version ("cfree@GLIBC_2.2.5", .gnu.version's hidden bit): kept for old
  // binaries, never what a user should be shown when a default name is at the same address.
  bool old_version = false;
  bool ifunc = false;
};

// A slot the dynamic loader fills with an IFUNC's implementation: IRELATIVE (r_addend is
// the resolver), file-relative.
struct IrelativeSlot {
  uint64_t slot = 0;
  uint64_t resolver = 0;
};

// The symbols of one ELF file with file-relative addresses (st_value) and file offsets.
// Where an ELF file's code goes when loaded, and which file it is.
struct ElfPlacement {
  bool position_independent = false;  // ET_DYN: loaded at a bias
  std::vector<GElf_Phdr> loads;       // PT_LOAD segments
  std::string build_id;
};

struct ElfSymbols : ElfPlacement {
  std::string debug_file;
  std::vector<Function> functions;  // address = st_value, object empty
  std::vector<Function> variables;
  std::vector<IrelativeSlot> irelative;  // only when `functions` has an IFUNC
};

// What our debug-file lookup needs to know about the module it is called for.
struct DebugLookup {
  std::string debug_root;
  std::string object_path;  // the object's real path: its directory is where debuglinks point
  std::string build_id;     // hex; a candidate must carry the same one
  std::string found;        // the debug file used, if any
};

std::string hex(const unsigned char* bytes, size_t n) {
  std::string s;
  for (size_t i = 0; i < n; i++) s += fmt::format("{:02x}", bytes[i]);
  return s;
}

std::string elf__build_id(Elf* elf) {
  const void* id = nullptr;
  ssize_t n = dwelf_elf_gnu_build_id(elf, &id);
  return n > 0 ? hex(static_cast<const unsigned char*>(id), static_cast<size_t>(n)) : "";
}

// An fd for `path` if it is an ELF file whose build-id is `want` (any, when `want` is empty).
int debug_candidate__open(const std::string& path, const std::string& object_path, const std::string& want) {
  struct stat a, b;
  // A debuglink naming the object itself (same directory, same name) is not a debug file.
  if (::stat(path.c_str(), &a) != 0) return -1;
  if (::stat(object_path.c_str(), &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino) return -1;
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return -1;
  Elf* elf = elf_begin(fd.get(), ELF_C_READ_MMAP, nullptr);
  if (!elf) return -1;
  bool ok = elf_kind(elf) == ELF_K_ELF && (want.empty() || elf__build_id(elf) == want);
  elf_end(elf);
  return ok ? fd.release() : -1;
}

std::string directory_of(const std::string& path) {
  auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

// An fd for the first debug file of the object (by build-id, then by debuglink); `found` names it.
int debug_file__open(const DebugLookup& lookup, const char* debuglink, std::string& found) {
  std::vector<std::string> candidates;
  if (lookup.build_id.size() > 2)
    candidates.push_back(fmt::format("{}/.build-id/{}/{}.debug", lookup.debug_root, lookup.build_id.substr(0, 2),
                                     lookup.build_id.substr(2)));
  if (debuglink && *debuglink) {
    // The places gdb and elfutils look: next to the object, in .debug/, under the debug root.
    std::string dir = directory_of(lookup.object_path);
    candidates.push_back(dir + "/" + debuglink);
    candidates.push_back(dir + "/.debug/" + debuglink);
    candidates.push_back(lookup.debug_root + dir + "/" + debuglink);
  }
  for (auto& path : candidates) {
    int fd = debug_candidate__open(path, lookup.object_path, lookup.build_id);
    if (fd < 0) continue;
    found = path;
    return fd;
  }
  return -1;
}

int find_debuginfo(Dwfl_Module*, void** userdata, const char*, Dwarf_Addr, const char*, const char* debuglink,
                   GElf_Word, char** debuginfo_file_name) {
  auto* lookup = static_cast<DebugLookup*>(*userdata);
  if (!lookup) return -1;
  int fd = debug_file__open(*lookup, debuglink, lookup->found);
  if (fd >= 0) *debuginfo_file_name = ::strdup(lookup->found.c_str());
  return fd;
}

const Dwfl_Callbacks& dwfl_callbacks() {
  static const Dwfl_Callbacks callbacks = {
      .find_elf = dwfl_build_id_find_elf,  // never called: we hand dwfl an open fd
      .find_debuginfo = find_debuginfo,
      .section_address = dwfl_offline_section_address,
      .debuginfo_path = nullptr,
  };
  return callbacks;
}

Binding binding_of(unsigned char st_bind) {
  if (st_bind == STB_LOCAL) return Binding::local;
  if (st_bind == STB_WEAK) return Binding::weak;
  return Binding::global;  // STB_GLOBAL, STB_GNU_UNIQUE
}

// A .dynsym definition, keyed by name and value (one name may have several versions at
// different addresses). The names point into the ELF file's string table.
struct ExportKey {
  std::string_view name;
  uint64_t value = 0;
  bool operator==(const ExportKey&) const = default;
};
struct ExportKeyHash {
  size_t operator()(const ExportKey& k) const {
    return std::hash<std::string_view>{}(k.name) ^ (std::hash<uint64_t>{}(k.value) * 0x9e3779b97f4a7c15ull);
  }
};

// Symbols the object defines in .dynsym with global or weak binding, and whether that
// definition has a non-default (hidden) version.
std::unordered_map<ExportKey, bool, ExportKeyHash> elf__exported(Elf* elf) {
  std::unordered_map<ExportKey, bool, ExportKeyHash> out;
  Elf_Scn* scn = nullptr;
  Elf_Data* versym = nullptr;
  while ((scn = elf_nextscn(elf, scn))) {
    GElf_Shdr shdr;
    if (gelf_getshdr(scn, &shdr) && shdr.sh_type == SHT_GNU_versym) versym = elf_getdata(scn, nullptr);
  }
  while ((scn = elf_nextscn(elf, scn))) {
    GElf_Shdr shdr;
    if (!gelf_getshdr(scn, &shdr) || shdr.sh_type != SHT_DYNSYM || shdr.sh_entsize == 0) continue;
    Elf_Data* data = elf_getdata(scn, nullptr);
    if (!data) continue;
    size_t count = shdr.sh_size / shdr.sh_entsize;
    out.reserve(count);
    for (size_t i = 1; i < count; i++) {
      GElf_Sym sym;
      if (!gelf_getsym(data, static_cast<int>(i), &sym) || sym.st_shndx == SHN_UNDEF) continue;
      if (GELF_ST_BIND(sym.st_info) == STB_LOCAL) continue;
      const char* name = elf_strptr(elf, shdr.sh_link, sym.st_name);
      GElf_Versym version = 0;
      bool hidden = versym && gelf_getversym(versym, static_cast<int>(i), &version) && (version & 0x8000);
      if (name && *name) {
        auto [it, added] = out.emplace(ExportKey{name, sym.st_value}, hidden);
        if (!added) it->second = it->second && hidden;  // default and old version at one address
      }
    }
  }
  return out;
}

// The IRELATIVE slots of the object's dynamic relocations.
std::vector<IrelativeSlot> elf__irelative(Elf* elf) {
  std::vector<IrelativeSlot> out;
  Elf_Scn* scn = nullptr;
  while ((scn = elf_nextscn(elf, scn))) {
    GElf_Shdr shdr;
    if (!gelf_getshdr(scn, &shdr) || shdr.sh_type != SHT_RELA || !(shdr.sh_flags & SHF_ALLOC) || !shdr.sh_entsize)
      continue;
    Elf_Data* data = elf_getdata(scn, nullptr);
    if (!data) continue;
    for (size_t i = 0; i < shdr.sh_size / shdr.sh_entsize; i++) {
      GElf_Rela rela;
      if (gelf_getrela(data, static_cast<int>(i), &rela) && arch::reloc_is_irelative(GELF_R_TYPE(rela.r_info)))
        out.push_back({rela.r_offset, static_cast<uint64_t>(rela.r_addend)});
    }
  }
  return out;
}

uint64_t file_offset_of(const std::vector<GElf_Phdr>& loads, uint64_t value) {
  for (auto& p : loads)
    if (value >= p.p_vaddr && value < p.p_vaddr + p.p_filesz) return value - p.p_vaddr + p.p_offset;
  return 0;  // not in the file (e.g. .bss)
}

int binding_rank(Binding b) { return b == Binding::global ? 0 : b == Binding::weak ? 1 : 2; }

size_t underscores(std::string_view name) { return name.find_first_not_of('_'); }

// One Function per address: several names there are aliases of one function. The primary
// name is the one a user calls: global, then a default version (`free`, not the compat
// `cfree@GLIBC_2.2.5`), then sized, then the fewest leading underscores (`malloc`, not
// `__libc_malloc`: reserved names are internal), then the shortest (`free`, not `cfree`).
bool primary_first(const RawSymbol& a, const RawSymbol& b) {
  if (binding_rank(a.binding) != binding_rank(b.binding)) return binding_rank(a.binding) < binding_rank(b.binding);
  if (a.old_version != b.old_version) return !a.old_version;
  if ((a.size != 0) != (b.size != 0)) return a.size != 0;
  if (underscores(a.name) != underscores(b.name)) return underscores(a.name) < underscores(b.name);
  if (a.name.size() != b.name.size()) return a.name.size() < b.name.size();
  return a.name < b.name;
}

std::vector<Function> group_by_address(std::vector<RawSymbol> raw, const std::vector<GElf_Phdr>& loads) {
  std::sort(raw.begin(), raw.end(), [](const RawSymbol& a, const RawSymbol& b) {
    if (a.value != b.value) return a.value < b.value;
    return primary_first(a, b);
  });
  std::vector<Function> out;
  out.reserve(raw.size());
  uint64_t sized_end = 0;  // end of the last sized symbol: zero-size ones inside it are labels
  for (size_t i = 0; i < raw.size();) {
    size_t j = i;
    uint64_t size = 0;
    bool exported = false;
    for (; j < raw.size() && raw[j].value == raw[i].value; j++) size = std::max(size, raw[j].size), exported |= raw[j].exported;
    if (raw[i].size) size = raw[i].size;
    if (size == 0 && raw[i].value < sized_end) {
      i = j;
      continue;
    }
    sized_end = std::max(sized_end, raw[i].value + size);
    Function& f = out.emplace_back();
    f.mangled = raw[i].name;
    f.name = symbols__demangle(f.mangled);
    f.address = raw[i].value;
    f.offset = file_offset_of(loads, raw[i].value);
    f.size = size;
    f.binding = raw[i].binding;
    f.ifunc = raw[i].ifunc;
    f.exported = exported;
    for (size_t k = i + 1; k < j; k++)
      if (raw[k].name != raw[i].name &&
          std::find(f.aliases.begin(), f.aliases.end(), raw[k].name) == f.aliases.end())
        f.aliases.emplace_back(raw[k].name);
    i = j;
  }
  return out;
}

struct DwflDeleter {
  void operator()(Dwfl* d) const { dwfl_end(d); }
};

// One ELF file in a dwfl session of its own, reported at 0: module addresses are st_value.
struct DwflFile {
  std::unique_ptr<Dwfl, DwflDeleter> dwfl;
  Dwfl_Module* mod = nullptr;
};

ElfPlacement elf__placement(Elf* elf, const GElf_Ehdr& ehdr) {
  ElfPlacement out;
  out.position_independent = ehdr.e_type == ET_DYN;
  size_t phnum = 0;
  elf_getphdrnum(elf, &phnum);
  for (size_t i = 0; i < phnum; i++) {
    GElf_Phdr ph;
    if (gelf_getphdr(elf, static_cast<int>(i), &ph) && ph.p_type == PT_LOAD) out.loads.push_back(ph);
  }
  out.build_id = elf__build_id(elf);
  return out;
}

// `fd` is consumed; `path` is the file's real path (for debuglinks and messages).
Result<DwflFile> dwfl_file__open(UniqueFd fd, const std::string& path) {
  DwflFile out;
  out.dwfl.reset(dwfl_begin(&dwfl_callbacks()));
  if (!out.dwfl) return fail(fmt::format("cannot start elfutils for {}: {}", path, dwfl_errmsg(-1)));
  dwfl_report_begin(out.dwfl.get());
  out.mod = dwfl_report_elf(out.dwfl.get(), path.c_str(), path.c_str(), fd.get(), 0, true);
  if (!out.mod) return fail(fmt::format("cannot read {} as ELF: {}", path, dwfl_errmsg(-1)));
  fd.release();  // dwfl owns it now
  dwfl_report_end(out.dwfl.get(), nullptr, nullptr);
  return out;
}

// Our debug-file lookup (find_debuginfo) for `file`, until it is called with nullptr.
void dwfl_file__set_lookup(const DwflFile& file, DebugLookup* lookup) {
  void** userdata = nullptr;
  dwfl_module_info(file.mod, &userdata, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
  *userdata = lookup;
}

// The symbols of the ELF file open on `fd` (consumed); `path` is its real path (for
// debuglinks and messages).
Result<ElfSymbols> elf_symbols__load(UniqueFd fd, const std::string& path, const std::string& debug_root) {
  auto file = HOTFIX_TRY(dwfl_file__open(std::move(fd), path));
  Dwfl_Module* mod = file.mod;

  GElf_Addr bias = 0;
  Elf* elf = dwfl_module_getelf(mod, &bias);
  GElf_Ehdr ehdr;
  if (!elf || !gelf_getehdr(elf, &ehdr)) return fail(fmt::format("cannot read the ELF header of {}", path));

  ElfSymbols out;
  static_cast<ElfPlacement&>(out) = elf__placement(elf, ehdr);

  DebugLookup lookup{debug_root, path, out.build_id, {}};
  dwfl_file__set_lookup(file, &lookup);

  auto exported = elf__exported(elf);
  std::vector<RawSymbol> functions, variables;
  bool any_ifunc = false;
  int count = dwfl_module_getsymtab(mod);  // -1: no symbols at all; an empty table is fine
  for (int i = 1; i < count; i++) {
    GElf_Sym sym;
    GElf_Addr addr = 0;
    GElf_Word shndx = 0;
    const char* name = dwfl_module_getsym_info(mod, i, &sym, &addr, &shndx, nullptr, nullptr);
    if (!name || !*name) continue;
    int type = GELF_ST_TYPE(sym.st_info);
    bool function = type == STT_FUNC || type == STT_GNU_IFUNC;
    bool ifunc = type == STT_GNU_IFUNC;
    if (!function && type != STT_OBJECT) continue;
    // Undefined, absolute and non-allocated symbols have no address in the loaded object.
    if (shndx == SHN_UNDEF || shndx == SHN_ABS || shndx == static_cast<GElf_Word>(-1)) continue;
    std::string_view plain = name;
    if (plain.ends_with("@plt")) continue;
    bool old_version = false;  // "name@VERSION" in .symtab; "name@@VERSION" is the default
    if (auto at = plain.find('@'); at != std::string_view::npos) {
      old_version = plain.substr(at, 2) != "@@";
      plain = plain.substr(0, at);
    }
    RawSymbol r{plain, addr - bias, sym.st_size, binding_of(GELF_ST_BIND(sym.st_info)), false, function};
    if (r.binding != Binding::local)
      if (auto it = exported.find(ExportKey{plain, r.value}); it != exported.end()) {
        r.exported = true;
        old_version = old_version || it->second;
      }
    r.old_version = old_version;
    r.ifunc = ifunc;
    any_ifunc = any_ifunc || ifunc;
    (function ? functions : variables).push_back(r);
  }
  if (any_ifunc) out.irelative = elf__irelative(elf);
  dwfl_file__set_lookup(file, nullptr);
  out.debug_file = lookup.found;
  out.functions = group_by_address(std::move(functions), out.loads);
  out.variables = group_by_address(std::move(variables), out.loads);
  return out;
}

bool is_elf(int fd) {
  static const bool libelf_ready = elf_version(EV_CURRENT) != EV_NONE;
  if (!libelf_ready) return false;
  Elf* elf = elf_begin(fd, ELF_C_READ_MMAP, nullptr);
  if (!elf) return false;
  bool ok = elf_kind(elf) == ELF_K_ELF;
  elf_end(elf);
  return ok;
}

std::string default_debug_root(const SymbolOptions& opts) {
  if (!opts.debug_root.empty()) return opts.debug_root;
  const char* env = std::getenv("HOTFIX_DEBUG_ROOT");
  return env && *env ? env : "/usr/lib/debug";
}

// ---------------------------------------------------------------- one process

// One load of one object: its mappings, in address order.
struct Load {
  std::string path;  // as in /proc/PID/maps
  std::vector<Mapping> mappings;
};

// File-backed mappings grouped into loads. A mapping at file offset 0 of a path already
// seen starts a second load of it (dlmopen); other mappings join the latest load.
std::vector<Load> group_loads(const std::vector<Mapping>& maps) {
  std::vector<Load> loads;
  std::map<std::string, size_t> latest;
  for (auto& m : maps) {
    if (!m.file_backed()) continue;
    auto it = latest.find(m.path);
    if (it == latest.end() || m.offset == 0) {
      latest[m.path] = loads.size();
      loads.push_back(Load{m.path, {m}});
    } else {
      loads[it->second].mappings.push_back(m);
    }
  }
  std::erase_if(loads, [](const Load& l) {
    return std::none_of(l.mappings.begin(), l.mappings.end(), [](const Mapping& m) { return m.executable(); });
  });
  return loads;
}

std::string without_deleted(std::string path) {
  const std::string tag = " (deleted)";
  if (path.ends_with(tag)) path.resize(path.size() - tag.size());
  return path;
}

// The file behind a mapping. /proc/PID/map_files is the inode actually mapped (right even
// when the file on disk was replaced or deleted, or lives in another mount namespace).
UniqueFd open_mapped(pid_t pid, const Mapping& m) {
  UniqueFd fd(::open(fmt::format("/proc/{}/map_files/{:x}-{:x}", pid, m.start, m.end).c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) fd.reset(::open(fmt::format("/proc/{}/root{}", pid, without_deleted(m.path)).c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) fd.reset(::open(without_deleted(m.path).c_str(), O_RDONLY | O_CLOEXEC));
  return fd;
}

// Load bias of an ET_DYN load: (mapping start - its file offset) - (p_vaddr - p_offset) of
// the PT_LOAD segment that mapping comes from.
std::optional<uint64_t> load_bias(const ElfPlacement& elf, const Load& load) {
  if (!elf.position_independent) return 0;
  for (auto& m : load.mappings)
    for (auto& p : elf.loads) {
      uint64_t page_start = p.p_offset & ~uint64_t{0xfff};
      if (m.offset >= page_start && m.offset < p.p_offset + std::max<uint64_t>(p.p_filesz, 1))
        return (m.start - m.offset) - (p.p_vaddr - p.p_offset);
    }
  return std::nullopt;
}

// ---------------------------------------------------------------- which objects a partial table reads

// The needs, as one map from each wanted spelling to what it stands for, and the lengths
// that occur: most of the ~10,000 names of libc are turned away by their length alone.
struct NeedSets {
  struct Roles {
    bool name = false, piece = false;
    std::vector<size_t> fallback_names, fallback_pieces;
  };
  std::unordered_map<std::string_view, Roles> wanted;
  std::bitset<256> lengths;  // wanted.size() of each key below 256
  bool any_piece = false;

  explicit NeedSets(const SymbolNeeds& n) {
    for (auto& x : n.names) add(x).name = true;
    for (auto& x : n.pieces)
      if (!x.empty()) add(x).piece = any_piece = true;
    for (size_t i = 0; i < n.fallbacks.size(); i++) {
      add(n.fallbacks[i].name).fallback_names.push_back(i);
      if (!n.fallbacks[i].piece.empty()) add(n.fallbacks[i].piece).fallback_pieces.push_back(i), any_piece = true;
    }
  }
  Roles& add(std::string_view key) {
    if (key.size() < lengths.size()) lengths.set(key.size());
    return wanted[key];
  }
  const Roles* find(std::string_view key) const {
    if (key.size() < lengths.size() && !lengths.test(key.size())) return nullptr;
    auto it = wanted.find(key);
    return it == wanted.end() ? nullptr : &it->second;
  }
};

// What one cheap pass over an ELF file's string tables learns: enough to place the object
// (ObjectInfo) and whether its names pass the needs.
struct ElfGlance : ElfPlacement {
  bool needed = false;
  std::set<size_t> defines;          // fallbacks whose name the file defines
  std::set<size_t> fallback_pieces;  // fallbacks whose piece one of its names holds
};

bool is_mangled(std::string_view n) { return n.starts_with("_Z") || n.starts_with("_R"); }

// Calls `use` with every <length><identifier> part of a mangled name. Any decimal run is
// tried as a length: a template argument (Li42E) yields a wrong part, never a missed one.
// Rust v0 puts '_' between the length and an identifier that starts with a digit or '_'.
template <class Use>
void for_each_source_name(std::string_view n, Use use) {
  for (size_t i = 2; i < n.size(); i++) {
    if (!std::isdigit(static_cast<unsigned char>(n[i])) || std::isdigit(static_cast<unsigned char>(n[i - 1]))) continue;
    size_t len = 0, j = i;
    while (j < n.size() && std::isdigit(static_cast<unsigned char>(n[j])) && len < n.size()) len = len * 10 + size_t(n[j++] - '0');
    if (n[1] == 'R' && j < n.size() && n[j] == '_') j++;
    if (len && j + len <= n.size()) use(n.substr(j, len));
  }
}

void glance__name(std::string_view raw, const NeedSets& sets, ElfGlance& g) {
  std::string_view n = raw.substr(0, raw.find('@'));
  auto as_piece = [&](const NeedSets::Roles& r) {
    if (r.piece) g.needed = true;
    g.fallback_pieces.insert(r.fallback_pieces.begin(), r.fallback_pieces.end());
  };
  if (const auto* r = sets.find(n)) {
    if (r->name) g.needed = true;
    g.defines.insert(r->fallback_names.begin(), r->fallback_names.end());
    if (!is_mangled(n)) as_piece(*r);  // a C name is its own identifier
  }
  if (sets.any_piece && is_mangled(n))
    for_each_source_name(n, [&](std::string_view id) {
      if (const auto* r = sets.find(id)) as_piece(*r);
    });
}

// The defined symbols of every SHT_SYMTAB (and SHT_DYNSYM, if `dynsym`) section of `elf`;
// true if it has a .symtab.
bool glance__symbols(Elf* elf, bool dynsym, const NeedSets& sets, ElfGlance& g) {
  bool has_symtab = false;
  for (Elf_Scn* scn = nullptr; (scn = elf_nextscn(elf, scn));) {
    GElf_Shdr shdr;
    if (!gelf_getshdr(scn, &shdr) || shdr.sh_entsize == 0) continue;
    if (shdr.sh_type != SHT_SYMTAB && !(dynsym && shdr.sh_type == SHT_DYNSYM)) continue;
    has_symtab = has_symtab || shdr.sh_type == SHT_SYMTAB;
    Elf_Data* data = elf_getdata(scn, nullptr);
    Elf_Scn* strscn = elf_getscn(elf, shdr.sh_link);
    Elf_Data* strings = strscn ? elf_getdata(strscn, nullptr) : nullptr;
    if (!data || !strings || !strings->d_buf) continue;
    const char* base = static_cast<const char*>(strings->d_buf);
    size_t count = shdr.sh_size / shdr.sh_entsize;
    for (size_t i = 1; i < count; i++) {
      GElf_Sym sym;
      if (!gelf_getsym(data, static_cast<int>(i), &sym) || sym.st_shndx == SHN_UNDEF || sym.st_name >= strings->d_size) continue;
      std::string_view name(base + sym.st_name, ::strnlen(base + sym.st_name, strings->d_size - sym.st_name));
      if (!name.empty()) glance__name(name, sets, g);
    }
  }
  return has_symtab;
}

bool has_section(Elf* elf, std::string_view wanted) {
  size_t names = 0;
  if (elf_getshdrstrndx(elf, &names) != 0) return false;
  for (Elf_Scn* scn = nullptr; (scn = elf_nextscn(elf, scn));) {
    GElf_Shdr shdr;
    const char* name = gelf_getshdr(scn, &shdr) ? elf_strptr(elf, names, shdr.sh_name) : nullptr;
    if (name && wanted == name) return true;
  }
  return false;
}

// The names dwfl would read for this file (elf_symbols__load), or more: .dynsym, .symtab,
// else the debug file's .symtab. MiniDebugInfo (.gnu_debugdata) is compressed: such a file
// is read in full rather than unpacked twice.
Result<ElfGlance> elf__glance(UniqueFd fd, const std::string& path, const std::string& debug_root, const NeedSets& sets) {
  Elf* elf = elf_begin(fd.get(), ELF_C_READ_MMAP, nullptr);
  if (!elf) return fail(fmt::format("cannot read {} as ELF: {}", path, elf_errmsg(-1)));
  ElfGlance g;
  GElf_Ehdr ehdr;
  if (!gelf_getehdr(elf, &ehdr)) {
    elf_end(elf);
    return fail(fmt::format("cannot read the ELF header of {}", path));
  }
  static_cast<ElfPlacement&>(g) = elf__placement(elf, ehdr);
  if (has_section(elf, ".gnu_debugdata")) g.needed = true;
  else if (!glance__symbols(elf, true, sets, g)) {
    GElf_Word crc = 0;
    const char* debuglink = dwelf_elf_gnu_debuglink(elf, &crc);
    DebugLookup lookup{debug_root, path, g.build_id, {}};
    std::string found;
    UniqueFd debug(debug_file__open(lookup, debuglink, found));
    if (Elf* d = debug ? elf_begin(debug.get(), ELF_C_READ_MMAP, nullptr) : nullptr) {
      glance__symbols(d, false, sets, g);
      elf_end(d);
    }
  }
  elf_end(elf);
  return g;
}

// ---------------------------------------------------------------- IFUNCs in a process

// The extent of the function containing file address `addr` per its .eh_frame FDE (a
// stripped libc has no symbol for `__memmove_avx_unaligned_erms`, but its FDE says where it
// ends), or 0.
uint64_t fde_size(Elf* elf, uint64_t addr) {
  Dwarf_CFI* cfi = elf ? dwarf_getcfi_elf(elf) : nullptr;
  Dwarf_Frame* frame = nullptr;
  if (!cfi || dwarf_cfi_addrframe(cfi, addr, &frame) != 0) return 0;
  Dwarf_Addr start = 0, end = 0;
  dwarf_frame_info(frame, &start, &end, nullptr);
  std::free(frame);
  return start == addr && end > start ? end - start : 0;
}

bool in_executable_mapping(const Load& load, uint64_t addr) {
  return std::any_of(load.mappings.begin(), load.mappings.end(),
                     [&](const Mapping& m) { return m.executable() && addr >= m.start && addr < m.end; });
}

// Point each IFUNC of one load (functions[first, last)) at the implementation the process
// uses: the value the loader stored in its IRELATIVE slot (IRELATIVE relocations are applied
// at load time, lazy binding or not). One that has none keeps the resolver's address.
void resolve_ifuncs(pid_t pid, const std::vector<GElf_Phdr>& segments, const std::vector<IrelativeSlot>& irelative,
                    const Load& load, uint64_t bias, std::vector<Function>& functions, size_t first, size_t last) {
  // The load's own functions (IFUNCs left out), by runtime address: the implementation's size.
  std::unordered_map<uint64_t, uint64_t> size_at;
  for (size_t i = first; i < last; i++)
    if (!functions[i].ifunc) size_at.emplace(functions[i].address, functions[i].size);
  std::map<uint64_t, uint64_t> slot_of;  // resolver -> slot, file-relative
  for (auto& r : irelative) slot_of.emplace(r.resolver, r.slot);
  Elf* file_elf = nullptr;
  UniqueFd fd;
  for (size_t i = first; i < last; i++) {
    Function& f = functions[i];
    if (!f.ifunc) continue;
    auto slot = slot_of.find(f.address - bias);
    if (slot == slot_of.end()) continue;
    uint64_t target = 0;
    iovec local{&target, sizeof target}, remote{reinterpret_cast<void*>(slot->second + bias), sizeof target};
    if (::process_vm_readv(pid, &local, 1, &remote, 1, 0) != static_cast<ssize_t>(sizeof target)) continue;
    if (target == f.address || !in_executable_mapping(load, target)) continue;
    uint64_t file_addr = target - bias;
    auto known = size_at.find(target);
    uint64_t size = known != size_at.end() ? known->second : 0;
    if (!size) {
      if (!fd) {
        fd = open_mapped(pid, load.mappings.front());
        if (fd) file_elf = elf_begin(fd.get(), ELF_C_READ_MMAP, nullptr);
      }
      size = fde_size(file_elf, file_addr);
    }
    f.resolver = f.address;
    f.address = target;
    f.offset = file_offset_of(segments, file_addr);
    f.size = size;
  }
  if (file_elf) elf_end(file_elf);
}

}  // namespace

std::string symbols__find_debug_file(const std::string& object_path, const std::string& build_id,
                                     const std::string& debuglink, const SymbolOptions& opts) {
  DebugLookup lookup{default_debug_root(opts), object_path, build_id, {}};
  std::string found;
  UniqueFd fd(debug_file__open(lookup, debuglink.c_str(), found));
  return fd ? found : "";
}

// ---------------------------------------------------------------- the table

struct SymbolTableBuilder {
  SymbolTable table;
  // One chunk per load, each in address order once its IFUNCs are resolved: `finish` joins
  // them, moving each record once.
  std::vector<std::vector<Function>> function_chunks, variable_chunks;

  std::vector<Function>& add(const ElfSymbols& elf, const std::string& path, uint64_t bias) {
    ElfSymbols copy = elf;
    return add(std::move(copy), path, bias);
  }

  // The symbols are moved, not copied: a file loaded once (nearly all) is placed once.
  // Returns the load's functions, for resolve_ifuncs.
  std::vector<Function>& add(ElfSymbols&& elf, const std::string& path, uint64_t bias) {
    ObjectInfo info{path, bias, elf.build_id, elf.debug_file, elf.functions.size()};
    table.objects_.push_back(std::move(info));
    for (auto* list : {&elf.functions, &elf.variables})
      for (Function& f : *list) {
        f.object = path;
        f.address += bias;
      }
    variable_chunks.push_back(std::move(elf.variables));
    function_chunks.push_back(std::move(elf.functions));
    return function_chunks.back();
  }

  SymbolTable finish() {
    function_chunks.push_back(std::move(table.functions_));  // from_records' (sorted below)
    variable_chunks.push_back(std::move(table.variables_));
    table.functions_ = join_by_address(std::move(function_chunks));
    table.variables_ = join_by_address(std::move(variable_chunks));
    return std::move(table);
  }

  static bool by_address(const Function& a, const Function& b) { return a.address < b.address; }

  // A stable sort by address that moves each record about once, in place: sorting the
  // records themselves (three strings and a vector each), or into a new vector (fresh pages
  // to fault in), cost more than reading them.
  static void sort_by_address(std::vector<Function>& records) {
    if (std::is_sorted(records.begin(), records.end(), by_address)) return;
    std::vector<std::pair<uint64_t, uint32_t>> order(records.size());
    for (uint32_t i = 0; i < records.size(); i++) order[i] = {records[i].address, i};
    std::sort(order.begin(), order.end());  // the index breaks ties: stable
    // records[k] becomes the old records[order[k].second]: follow each cycle once.
    std::vector<bool> done(records.size());
    for (size_t start = 0; start < records.size(); start++) {
      if (done[start] || order[start].second == start) continue;
      Function held = std::move(records[start]);
      size_t k = start;
      for (size_t from = order[k].second; from != start; k = from, from = order[k].second) {
        records[k] = std::move(records[from]);
        done[k] = true;
      }
      records[k] = std::move(held);
      done[k] = true;
    }
  }

  // Loads do not overlap, so sorted chunks in order of their first address are the sorted
  // whole; anything else (a test's records) falls back to one sort.
  static std::vector<Function> join_by_address(std::vector<std::vector<Function>> chunks) {
    std::erase_if(chunks, [](auto& c) { return c.empty(); });
    for (auto& c : chunks) sort_by_address(c);
    std::stable_sort(chunks.begin(), chunks.end(), [](auto& a, auto& b) { return a.front().address < b.front().address; });
    size_t total = 0;
    bool disjoint = true;
    for (size_t i = 0; i < chunks.size(); i++) {
      total += chunks[i].size();
      if (i && chunks[i].front().address < chunks[i - 1].back().address) disjoint = false;
    }
    std::vector<Function> out;
    if (chunks.size() == 1) out = std::move(chunks.front());
    else {
      out.reserve(total);
      for (auto& c : chunks) std::move(c.begin(), c.end(), std::back_inserter(out));
    }
    if (!disjoint) sort_by_address(out);
    return out;
  }
};

std::string SymbolTable::where() const {
  if (pid_) return fmt::format("pid {}", pid_);
  return file_.empty() ? "the symbol table" : fmt::format("file {}", file_);
}

SymbolTable SymbolTable::from_records(std::vector<Function> functions, std::vector<Function> variables) {
  SymbolTableBuilder builder;
  for (auto* list : {&functions, &variables})
    for (auto& f : *list) {
      auto& objects = builder.table.objects_;
      auto it = std::find_if(objects.begin(), objects.end(), [&](const ObjectInfo& o) { return o.path == f.object; });
      if (it == objects.end()) it = objects.insert(objects.end(), ObjectInfo{f.object, 0, {}, {}, 0});
      if (list == &functions) it->function_count++;
    }
  builder.table.functions_ = std::move(functions);
  builder.table.variables_ = std::move(variables);
  return builder.finish();
}

Result<SymbolTable> SymbolTable::for_file(const std::string& path, const SymbolOptions& opts) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail(fmt::format("cannot open {}: {}", path, errno_text(errno)), "check the path");
  if (!is_elf(fd.get())) return fail(fmt::format("{} is not an ELF file", path), "give an executable or a shared library");
  auto elf = HOTFIX_TRY(elf_symbols__load(std::move(fd), path, default_debug_root(opts)));
  SymbolTableBuilder builder;
  builder.table.file_ = path;
  builder.add(std::move(elf), path, 0);
  return builder.finish();
}

Result<SymbolTable> SymbolTable::for_image(std::span<const uint8_t> bytes, const std::string& name,
                                          const SymbolOptions& opts) {
  // elfutils reads from an fd: a private memfd holding exactly these bytes.
  UniqueFd fd(static_cast<int>(::syscall(SYS_memfd_create, "hotfix-image", MFD_CLOEXEC)));
  if (!fd) return fail(fmt::format("cannot create a memfd for {}: {}", name, errno_text(errno)));
  for (size_t done = 0; done < bytes.size();) {
    ssize_t n = ::pwrite(fd.get(), bytes.data() + done, bytes.size() - done, static_cast<off_t>(done));
    if (n <= 0) return fail(fmt::format("cannot copy {} into a memfd: {}", name, errno_text(errno)));
    done += static_cast<size_t>(n);
  }
  if (!is_elf(fd.get())) return fail(fmt::format("{} is not an ELF file", name), "give an executable or a shared library");
  auto elf = HOTFIX_TRY(elf_symbols__load(std::move(fd), name, default_debug_root(opts)));
  SymbolTableBuilder builder;
  builder.table.file_ = name;
  builder.add(std::move(elf), name, 0);
  return builder.finish();
}

// ---------------------------------------------------------------- one load of a process

namespace {

// The symbols of the file behind `load`; nullopt for files we cannot open or that are not ELF
// (a mapped data file): they contribute no symbols.
std::optional<ElfSymbols> load__read(pid_t pid, const Load& load, const std::string& debug_root) {
  UniqueFd fd = open_mapped(pid, load.mappings.front());
  if (!fd || !is_elf(fd.get())) return std::nullopt;
  auto elf = elf_symbols__load(std::move(fd), without_deleted(load.path), debug_root);
  return elf ? std::optional(std::move(*elf)) : std::nullopt;
}

// `elf` placed at `load` in `builder`, its IFUNCs pointed at what this process uses; moved from
// when `last` (the file's last load), copied otherwise. False if the loader did not map it
// (no segment matches): no code of it runs.
bool load__place(SymbolTableBuilder& builder, pid_t pid, const Load& load, ElfSymbols& elf, bool last) {
  auto bias = load_bias(elf, load);
  if (!bias) return false;
  std::vector<IrelativeSlot> irelative = elf.irelative;
  std::vector<GElf_Phdr> segments = elf.loads;
  auto& placed = last ? builder.add(std::move(elf), load.path, *bias) : builder.add(elf, load.path, *bias);
  if (!irelative.empty()) resolve_ifuncs(pid, segments, irelative, load, *bias, placed, 0, placed.size());
  return true;
}

}  // namespace

// ---------------------------------------------------------------- objects a partial table left out

struct SymbolTable::Lazy {
  struct Object {
    std::string path;
    std::vector<Mapping> mappings;
    std::once_flag once;
    std::atomic<bool> read{false};
    std::vector<Function> functions;  // read on first use
  };
  pid_t pid = 0;
  std::string debug_root;
  std::vector<std::unique_ptr<Object>> objects;
  std::vector<std::tuple<uint64_t, uint64_t, Object*>> ranges;  // [start, end) of each mapping, sorted
};

struct LazyAccess {
static void add(SymbolTable& table, pid_t pid, const std::string& debug_root, const Load& load) {
  if (!table.lazy_) {
    table.lazy_ = std::make_shared<SymbolTable::Lazy>();
    table.lazy_->pid = pid;
    table.lazy_->debug_root = debug_root;
  }
  auto& object = *table.lazy_->objects.emplace_back(std::make_unique<SymbolTable::Lazy::Object>());
  object.path = load.path;
  object.mappings = load.mappings;
  for (auto& m : load.mappings) table.lazy_->ranges.emplace_back(m.start, m.end, &object);
}

static void sort(SymbolTable& table) { std::sort(table.lazy_->ranges.begin(), table.lazy_->ranges.end()); }

static SymbolTable::Lazy::Object* object_at(const SymbolTable::Lazy& lazy, uint64_t addr) {
  auto r = std::upper_bound(lazy.ranges.begin(), lazy.ranges.end(), addr,
                            [](uint64_t a, const auto& range) { return a < std::get<0>(range); });
  if (r == lazy.ranges.begin() || addr >= std::get<1>(*std::prev(r))) return nullptr;
  return std::get<2>(*std::prev(r));
}

// The object's functions, read as for_pid reads them the first time they are asked for.
static const std::vector<Function>& functions(const SymbolTable::Lazy& lazy, SymbolTable::Lazy::Object& object) {
  std::call_once(object.once, [&] {
    object.read = true;
    Load load{object.path, object.mappings};
    auto elf = load__read(lazy.pid, load, lazy.debug_root);
    if (!elf) return;
    SymbolTableBuilder builder;
    if (load__place(builder, lazy.pid, load, *elf, true)) object.functions = builder.finish().functions_;
  });
  return object.functions;
}
};

namespace {

std::string executable_path(pid_t pid) {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink(fmt::format("/proc/{}/exe", pid), ec);
  return ec ? std::string() : without_deleted(exe.string());
}

// The paths of `loads` whose symbols a partial table reads: the executable, fix copies, and
// every object whose names pass (elf__glance).
std::set<std::string> paths_needed(pid_t pid, const std::vector<Load>& loads, const SymbolNeeds& needs,
                                   const std::string& debug_root, std::map<std::string, ElfGlance>& glances) {
  NeedSets sets(needs);
  std::set<std::string> out;
  std::string exe = executable_path(pid);
  for (auto& load : loads) {
    if (glances.count(load.path)) continue;
    UniqueFd fd = open_mapped(pid, load.mappings.front());
    if (!fd || !is_elf(fd.get())) continue;
    auto g = elf__glance(std::move(fd), without_deleted(load.path), debug_root, sets);
    if (!g) continue;
    if (g->needed || without_deleted(load.path) == exe || path__is_fix_copy(load.path)) out.insert(load.path);
    glances.emplace(load.path, std::move(*g));
  }
  // A fallback's piece counts only if no object defines its name; without a piece, every
  // object may hold the local it stands for.
  std::set<size_t> defined;
  for (auto& [path, g] : glances) defined.insert(g.defines.begin(), g.defines.end());
  for (size_t i = 0; i < needs.fallbacks.size(); i++)
    if (needs.fallbacks[i].piece.empty() && !defined.count(i))
      for (auto& [path, g] : glances) out.insert(path);
  for (auto& [path, g] : glances)
    for (size_t i : g.fallback_pieces)
      if (!defined.count(i)) out.insert(path);
  return out;
}

}  // namespace

// `needs` null: every object.
Result<SymbolTable> symbols__for_pid(pid_t pid, const SymbolOptions& opts, const SymbolNeeds* needs) {
  auto maps = HOTFIX_TRY(process__read_maps(pid));
  std::string debug_root = default_debug_root(opts);
  SymbolTableBuilder builder;
  builder.table.pid_ = pid;
  std::map<std::string, ElfSymbols> parsed;  // each file once, however often it is loaded
  auto loads = group_loads(maps);
  std::map<std::string, ElfGlance> glances;
  std::optional<std::set<std::string>> wanted;
  if (needs && !needs->everything) wanted = paths_needed(pid, loads, *needs, debug_root, glances);
  std::map<std::string, size_t> loads_left;  // the last load of a file takes its symbols, the others copy
  for (auto& load : loads) loads_left[load.path]++;
  for (auto& load : loads) {
    if (wanted && !wanted->count(load.path)) {
      auto g = glances.find(load.path);
      auto bias = g == glances.end() ? std::nullopt : load_bias(g->second, load);
      if (!bias) continue;
      builder.table.objects_.push_back(ObjectInfo{load.path, *bias, g->second.build_id, {}, 0, false});
      LazyAccess::add(builder.table, pid, debug_root, load);
      continue;
    }
    auto it = parsed.find(load.path);
    if (it == parsed.end()) {
      auto elf = load__read(pid, load, debug_root);
      if (!elf) continue;
      it = parsed.emplace(load.path, std::move(*elf)).first;
    }
    load__place(builder, pid, load, it->second, --loads_left[load.path] == 0);
  }
  if (builder.table.objects_.empty())
    return fail(fmt::format("found no ELF objects in pid {}", pid), "is it still starting up? try again");
  if (builder.table.lazy_) LazyAccess::sort(builder.table);
  return builder.finish();
}

Result<SymbolTable> SymbolTable::for_pid(pid_t pid, const SymbolOptions& opts) { return symbols__for_pid(pid, opts, nullptr); }

Result<SymbolTable> SymbolTable::for_pid_needing(pid_t pid, const SymbolNeeds& needs, const SymbolOptions& opts) {
  return symbols__for_pid(pid, opts, &needs);
}

// ---------------------------------------------------------------- DWARF of one object

struct ObjectDwarf::State {
  DwflFile file;
  DebugLookup lookup;
};

ObjectDwarf::ObjectDwarf(ObjectDwarf&&) noexcept = default;
ObjectDwarf& ObjectDwarf::operator=(ObjectDwarf&&) noexcept = default;
ObjectDwarf::~ObjectDwarf() = default;

const std::string& ObjectDwarf::debug_file() const {
  static const std::string none;
  return state_ ? state_->lookup.found : none;
}

Result<ObjectDwarf> ObjectDwarf::open(pid_t pid, const ObjectInfo& object, const SymbolOptions& opts) {
  auto maps = HOTFIX_TRY(process__read_maps(pid));
  auto it = std::find_if(maps.begin(), maps.end(), [&](const Mapping& m) { return m.path == object.path; });
  if (it == maps.end()) return fail(fmt::format("{} is no longer mapped in pid {}", object.path, pid));
  UniqueFd fd = open_mapped(pid, *it);
  if (!fd) return fail(fmt::format("cannot open {} of pid {}: {}", object.path, pid, errno_text(errno)));
  std::string path = without_deleted(object.path);
  ObjectDwarf out;
  out.state_ = std::make_unique<State>(State{HOTFIX_TRY(dwfl_file__open(std::move(fd), path)), {}});
  out.state_->lookup = DebugLookup{default_debug_root(opts), path, object.build_id, {}};
  dwfl_file__set_lookup(out.state_->file, &out.state_->lookup);  // stays valid: the state owns both
  Dwarf_Addr bias = 0;
  out.dwarf_ = dwfl_module_getdwarf(out.state_->file.mod, &bias);
  out.load_bias_ = object.load_bias;
  out.dwarf_bias_ = bias;
  return out;
}

namespace {

// The function of `functions` (in address order) containing `addr`, or nullptr.
const Function* function_in(const std::vector<Function>& functions, uint64_t addr) {
  auto it = std::upper_bound(functions.begin(), functions.end(), addr,
                             [](uint64_t a, const Function& f) { return a < f.address; });
  // Walk back a little: a zero-size symbol may sit between a function's entry and `addr`.
  for (int steps = 0; it != functions.begin() && steps < 8; steps++) {
    --it;
    if (addr < it->address + std::max<uint64_t>(it->size, 1)) return &*it;
  }
  return nullptr;
}

}  // namespace

size_t SymbolTable::objects_read_later() const {
  if (!lazy_) return 0;
  return static_cast<size_t>(std::count_if(lazy_->objects.begin(), lazy_->objects.end(), [](auto& o) { return o->read.load(); }));
}

const Function* SymbolTable::function_at(uint64_t addr) const {
  if (lazy_)
    if (auto* object = LazyAccess::object_at(*lazy_, addr)) return function_in(LazyAccess::functions(*lazy_, *object), addr);
  return function_in(functions_, addr);
}

}  // namespace hotfix
