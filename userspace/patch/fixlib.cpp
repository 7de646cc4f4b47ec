#include "patch/fixlib.hpp"

#include <cxxabi.h>
#include <fcntl.h>
#include <gelf.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <memory>

namespace hotfix {

namespace {

constexpr const char* build_hint = "build it with `g++ -g -O2 -shared -fPIC fix.cpp -o fix.so`";

std::string elf_text() { return elf_errmsg(-1); }

const char* machine_name(unsigned machine) {
  switch (machine) {
    case EM_X86_64: return "x86-64";
    case EM_386: return "i386";
    case EM_AARCH64: return "aarch64";
    case EM_ARM: return "arm";
    case EM_RISCV: return "riscv";
    case EM_PPC64: return "ppc64";
    case EM_S390: return "s390";
    default: return "an unknown machine";
  }
}

const char* type_name(unsigned type) {
  switch (type) {
    case ET_REL: return "a relocatable object file (.o)";
    case ET_EXEC: return "an executable";
    case ET_CORE: return "a core dump";
    default: return "not a shared object";
  }
}

Result<GElf_Ehdr> read_ehdr(const ElfHandle& elf, const std::string& path) {
  GElf_Ehdr ehdr;
  if (!gelf_getehdr(elf.get(), &ehdr)) return fail(fmt::format("{} has no valid ELF header: {}", path, elf_text()));
  return ehdr;
}

// A PIE is ET_DYN too, but dlopen refuses it; DF_1_PIE tells them apart.
bool is_pie_executable(Elf* elf) {
  for (Elf_Scn* scn = nullptr; (scn = elf_nextscn(elf, scn));) {
    GElf_Shdr shdr;
    if (!gelf_getshdr(scn, &shdr) || shdr.sh_type != SHT_DYNAMIC) continue;
    Elf_Data* data = elf_getdata(scn, nullptr);
    for (size_t i = 0; data && shdr.sh_entsize && i < shdr.sh_size / shdr.sh_entsize; ++i) {
      GElf_Dyn dyn;
      if (gelf_getdyn(data, static_cast<int>(i), &dyn) && dyn.d_tag == DT_FLAGS_1 && (dyn.d_un.d_val & DF_1_PIE))
        return true;
    }
  }
  return false;
}

FixSymbol to_fix_symbol(Elf* elf, const GElf_Shdr& shdr, const GElf_Sym& sym, size_t index) {
  FixSymbol s;
  const char* name = elf_strptr(elf, shdr.sh_link, sym.st_name);
  s.name = name ? name : "";
  s.value = sym.st_value;
  s.size = sym.st_size;
  s.type = GELF_ST_TYPE(sym.st_info);
  s.bind = GELF_ST_BIND(sym.st_info);
  s.index = index;
  s.defined = sym.st_shndx != SHN_UNDEF;
  return s;
}

std::vector<FixSymbol> read_symbols(Elf* elf, Elf_Scn* scn) {
  std::vector<FixSymbol> out;
  GElf_Shdr shdr;
  if (!gelf_getshdr(scn, &shdr) || shdr.sh_entsize == 0) return out;
  Elf_Data* data = elf_getdata(scn, nullptr);
  size_t count = shdr.sh_size / shdr.sh_entsize;
  for (size_t i = 0; data && i < count; ++i) {
    GElf_Sym sym;
    if (!gelf_getsym(data, static_cast<int>(i), &sym)) continue;
    out.push_back(to_fix_symbol(elf, shdr, sym, i));
  }
  return out;
}

std::vector<FixReloc> read_relocs(Elf_Scn* scn, const GElf_Shdr& shdr) {
  std::vector<FixReloc> out;
  Elf_Data* data = elf_getdata(scn, nullptr);
  size_t count = shdr.sh_entsize ? shdr.sh_size / shdr.sh_entsize : 0;
  for (size_t i = 0; data && i < count; ++i) {
    GElf_Rela rela;
    if (!gelf_getrela(data, static_cast<int>(i), &rela)) continue;
    out.push_back({rela.r_offset, static_cast<uint32_t>(GELF_R_TYPE(rela.r_info)),
                   static_cast<size_t>(GELF_R_SYM(rela.r_info)), rela.r_addend});
  }
  return out;
}

std::vector<std::string> read_needed(Elf* elf, Elf_Scn* scn, const GElf_Shdr& shdr) {
  std::vector<std::string> out;
  Elf_Data* data = elf_getdata(scn, nullptr);
  size_t count = shdr.sh_entsize ? shdr.sh_size / shdr.sh_entsize : 0;
  for (size_t i = 0; data && i < count; ++i) {
    GElf_Dyn dyn;
    if (!gelf_getdyn(data, static_cast<int>(i), &dyn) || dyn.d_tag != DT_NEEDED) continue;
    if (const char* name = elf_strptr(elf, shdr.sh_link, dyn.d_un.d_val)) out.push_back(name);
  }
  return out;
}

std::vector<FixSymbol> defined_of_type(const std::vector<FixSymbol>& symbols, std::initializer_list<int> types) {
  std::vector<FixSymbol> out;
  for (auto& s : symbols)
    if (s.defined && !s.name.empty() && std::find(types.begin(), types.end(), s.type) != types.end())
      out.push_back(s);
  return out;
}

}  // namespace

Result<ElfHandle> ElfHandle::open(const std::string& path, bool writable) {
  elf_version(EV_CURRENT);
  // O_NONBLOCK: a FIFO (or a device) given as fix.so must not block us; fixlib__validate
  // refuses anything but a regular file before reading a byte.
  UniqueFd fd(::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
  if (!fd) {
    int err = errno;
    if (err == ENOENT) return fail(fmt::format("{} does not exist", path), build_hint);
    return fail(fmt::format("cannot open {}: {}", path, errno_text(err)), "check the path and its permissions");
  }
  Elf* elf = elf_begin(fd.get(), writable ? ELF_C_RDWR : ELF_C_READ, nullptr);
  if (!elf) return fail(fmt::format("cannot read {} as ELF: {}", path, elf_text()));
  if (elf_kind(elf) != ELF_K_ELF) {
    elf_end(elf);
    return fail(fmt::format("{} is not an ELF file", path), build_hint);
  }
  return ElfHandle(std::move(fd), elf);
}

Result<ElfHandle> ElfHandle::open_memory(std::span<const uint8_t> bytes, const std::string& name) {
  elf_version(EV_CURRENT);
  ElfHandle h(UniqueFd(), nullptr);
  h.image_.assign(bytes.begin(), bytes.end());
  h.elf_ = elf_memory(h.image_.data(), h.image_.size());
  if (!h.elf_) return fail(fmt::format("cannot read {} as ELF: {}", name, elf_text()));
  if (elf_kind(h.elf_) != ELF_K_ELF) return fail(fmt::format("{} is not an ELF file", name), build_hint);
  return h;
}

ElfHandle::ElfHandle(ElfHandle&& o) noexcept
    : fd_(std::move(o.fd_)), image_(std::move(o.image_)), elf_(std::exchange(o.elf_, nullptr)) {}

ElfHandle::~ElfHandle() {
  if (elf_) elf_end(elf_);
}

namespace {

const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  if (S_ISSOCK(mode)) return "a socket";
  return "not a regular file";
}

// Every table the header points to lies inside the file: a truncated copy (a build cut
// short, a partial scp) is named as such instead of "defines no functions".
Result<void> check_complete(Elf* elf, const GElf_Ehdr& ehdr, off_t size, const std::string& path) {
  auto beyond = [&](uint64_t off, uint64_t count, uint64_t entsize) {
    return count && (off > static_cast<uint64_t>(size) || count * entsize > static_cast<uint64_t>(size) - off);
  };
  size_t shnum = ehdr.e_shnum;  // libelf answers 0 for a table it could not read
  if ((shnum == 0 && elf_getshdrnum(elf, &shnum) != 0) || beyond(ehdr.e_shoff, shnum, ehdr.e_shentsize) ||
      beyond(ehdr.e_phoff, ehdr.e_phnum, ehdr.e_phentsize) || ehdr.e_phnum == 0)
    return fail(fmt::format("{} is truncated or damaged: its ELF header points past its end ({} bytes)", path, size),
                "copy or rebuild it completely");
  for (Elf_Scn* scn = nullptr; (scn = elf_nextscn(elf, scn));) {
    GElf_Shdr shdr;
    if (!gelf_getshdr(scn, &shdr)) return fail(fmt::format("{} has a damaged section header: {}", path, elf_text()));
    if (shdr.sh_type != SHT_NOBITS && beyond(shdr.sh_offset, 1, shdr.sh_size))
      return fail(fmt::format("{} is truncated: a section ends past the end of the file ({} bytes)", path, size),
                  "copy or rebuild it completely");
  }
  return {};
}

}  // namespace

const char* fixlib__file_kind(unsigned mode) { return file_kind(static_cast<mode_t>(mode)); }

Result<FixImage> fixlib__load(const std::string& path) {
  struct stat st;
  UniqueFd probe(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY));
  if (!probe || ::fstat(probe.get(), &st) != 0) {
    if (errno == ENOENT) return fail(fmt::format("fix library {} does not exist", path), build_hint);
    return fail(fmt::format("cannot open fix library {}: {}", path, errno_text(errno)), "check the path and its permissions");
  }
  if (!S_ISREG(st.st_mode)) return fail(fmt::format("fix library {} is {}, not a shared library", path, file_kind(st.st_mode)), build_hint);
  FixImage image{path, std::vector<uint8_t>(static_cast<size_t>(st.st_size))};
  if (::pread(probe.get(), image.bytes.data(), image.bytes.size(), 0) != static_cast<ssize_t>(image.bytes.size()))
    return fail(fmt::format("cannot read {}: {}", path, errno_text(errno)));
  return image;
}

Result<void> fixlib__validate(const std::string& path, const std::string& target_executable) {
  return fixlib__validate(HOTFIX_TRY(fixlib__load(path)), target_executable);
}

Result<void> fixlib__validate(const FixImage& image, const std::string& target_executable) {
  const std::string& path = image.path;
  const off_t size = static_cast<off_t>(image.bytes.size());
  if (size < 64) return fail(fmt::format("{} is not an ELF file (only {} bytes)", path, size), build_hint);
  auto fix = HOTFIX_TRY(ElfHandle::open_memory(image.bytes, path));
  auto fix_ehdr = HOTFIX_TRY(read_ehdr(fix, path));
  auto target = ElfHandle::open(target_executable);
  if (!target)
    return fail(fmt::format("cannot read the target executable {}: {}", target_executable, target.error().what));
  auto target_ehdr = HOTFIX_TRY(read_ehdr(*target, target_executable));
  // Comparing e_machine is the whole check: the target's own header says what it runs on.
  if (fix_ehdr.e_machine != target_ehdr.e_machine || gelf_getclass(fix.get()) != gelf_getclass(target->get()))
    return fail(fmt::format("{} is built for {} ({}-bit) but the target runs {} ({}-bit)", path,
                            machine_name(fix_ehdr.e_machine), gelf_getclass(fix.get()) == ELFCLASS64 ? 64 : 32,
                            machine_name(target_ehdr.e_machine), gelf_getclass(target->get()) == ELFCLASS64 ? 64 : 32),
                "rebuild fix.so with the same compiler and target as the service");
  if (fix_ehdr.e_type != ET_DYN)
    return fail(fmt::format("{} is {}, not a shared library", path, type_name(fix_ehdr.e_type)),
                "link it with `-shared -fPIC`");
  HOTFIX_CHECK(check_complete(fix.get(), fix_ehdr, size, path));
  if (is_pie_executable(fix.get()))
    return fail(fmt::format("{} is a position-independent executable, not a shared library", path),
                "link it with `-shared -fPIC` instead of building a program");
  return {};
}

Result<FixLibrary> fixlib__read(const std::string& path) { return fixlib__read(HOTFIX_TRY(fixlib__load(path))); }

Result<FixLibrary> fixlib__read(const FixImage& image) {
  const std::string& path = image.path;
  auto elf = HOTFIX_TRY(ElfHandle::open_memory(image.bytes, path));
  FixLibrary lib;
  lib.path = path;
  std::vector<FixSymbol> symtab;
  size_t dynsym_index = 0;
  for (Elf_Scn* scn = nullptr; (scn = elf_nextscn(elf.get(), scn));) {
    GElf_Shdr shdr;
    if (gelf_getshdr(scn, &shdr) && shdr.sh_type == SHT_DYNSYM) dynsym_index = elf_ndxscn(scn);
  }
  for (Elf_Scn* scn = nullptr; (scn = elf_nextscn(elf.get(), scn));) {
    GElf_Shdr shdr;
    if (!gelf_getshdr(scn, &shdr)) continue;
    if (shdr.sh_type == SHT_SYMTAB) {
      symtab = read_symbols(elf.get(), scn);
      lib.has_symtab = true;
    }
    if (shdr.sh_type == SHT_DYNSYM) lib.dynsyms = read_symbols(elf.get(), scn);
    if (shdr.sh_type == SHT_DYNAMIC) lib.needed = read_needed(elf.get(), scn, shdr);
    // Only relocations the dynamic linker applies (against .dynsym) matter to the binder.
    if (shdr.sh_type == SHT_RELA && dynsym_index && shdr.sh_link == dynsym_index) {
      auto relocs = read_relocs(scn, shdr);
      lib.relocs.insert(lib.relocs.end(), relocs.begin(), relocs.end());
    }
  }
  // .symtab also has static functions; a stripped fix.so still has its exported ones.
  lib.functions = defined_of_type(lib.has_symtab ? symtab : lib.dynsyms, {STT_FUNC, STT_GNU_IFUNC});
  lib.variables = defined_of_type(lib.has_symtab ? symtab : lib.dynsyms, {STT_OBJECT});
  return lib;
}

// One demangler for every verb: Rust paths without their hash, so that a fix's
// `main::pricing::discount` (any hash) is the target's local `main::pricing::discount`.
std::string symbol__demangle(const std::string& mangled) { return symbols__demangle(mangled); }

namespace {
// "helper" for "helper(int)", "x" for "ns::x", "max_of" for "int max_of<int>(int, int)";
// empty (no filter) for operators, whose mangled names spell them differently.
std::string key_identifier(const std::string& demangled) {
  std::string head = demangled.substr(0, demangled.find_first_of("(<"));
  size_t begin = head.size();
  while (begin > 0 && (std::isalnum(static_cast<unsigned char>(head[begin - 1])) || head[begin - 1] == '_')) --begin;
  std::string id = head.substr(begin);
  return id == "operator" ? std::string() : id;
}
}  // namespace

LocalNameMatcher::LocalNameMatcher(const std::string& name)
    : demangled_(symbol__demangle(name)), key_(key_identifier(demangled_)) {}

bool LocalNameMatcher::operator()(const Function& f) const {
  if (f.binding != Binding::local) return false;
  if (!key_.empty() && f.mangled.find(key_) == std::string::npos) return false;
  return symbol__demangle(f.mangled) == demangled_;
}

}  // namespace hotfix
