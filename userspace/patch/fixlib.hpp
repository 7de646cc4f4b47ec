// A fix library (fix.so) as the planner and the binder see it: validated, and read with
// libelf/gelf into its defined functions, its dynamic symbols and its dynamic relocations.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <libelf.h>

#include "common/error.hpp"
#include "common/unique_fd.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

// An open ELF file (libelf descriptor + its fd), closed once.
class ElfHandle {
 public:
  // Read-only, or read-write for editing in place (ELF_C_RDWR).
  static Result<ElfHandle> open(const std::string& path, bool writable = false);
  // Read-only, over a private copy of `bytes` (`name` is for messages).
  static Result<ElfHandle> open_memory(std::span<const uint8_t> bytes, const std::string& name);
  ElfHandle(ElfHandle&& o) noexcept;
  ElfHandle& operator=(ElfHandle&&) = delete;
  ~ElfHandle();
  Elf* get() const { return elf_; }

 private:
  ElfHandle(UniqueFd fd, Elf* elf) : fd_(std::move(fd)), elf_(elf) {}
  UniqueFd fd_;
  std::vector<char> image_;  // open_memory: the bytes libelf reads (moving keeps their address)
  Elf* elf_ = nullptr;
};

// The bytes of a fix library, read once (see patch/trust.hpp): every check, the plan, the
// binding and what the target loads are these bytes, never the file again.
struct FixImage {
  std::string path;            // as the user gave it, for messages
  std::vector<uint8_t> bytes;
};

// Read `path` as it is, without the trust rule (tests, offline tools; the engine uses
// trust__read_fix).
Result<FixImage> fixlib__load(const std::string& path);

struct FixSymbol {
  std::string name;         // as in the ELF file (mangled for C++)
  uint64_t value = 0;       // st_value: offset from fix.so's load base once loaded
  uint64_t size = 0;
  unsigned char type = 0;   // STT_*
  unsigned char bind = 0;   // STB_*
  size_t index = 0;         // index in the table it came from
  bool defined = false;
};

struct FixReloc {
  uint64_t offset = 0;      // r_offset: relative to the load base
  uint32_t type = 0;        // R_<arch>_*, interpreted by arch::reloc_kind
  size_t symbol = 0;        // index into FixLibrary::dynsyms
  int64_t addend = 0;
};

struct FixLibrary {
  std::string path;
  std::vector<FixSymbol> functions;    // defined functions (.symtab, else .dynsym)
  std::vector<FixSymbol> variables;    // defined data symbols (.symtab, else .dynsym)
  std::vector<FixSymbol> dynsyms;      // .dynsym, by index (undefined ones included)
  std::vector<FixReloc> relocs;        // every dynamic relocation (.rela.dyn, .rela.plt)
  std::vector<std::string> needed;     // DT_NEEDED
  bool has_symtab = false;             // not stripped
};

// One clear error unless `path` is an ELF shared library for the machine of `target_executable`
// (missing file, not ELF, wrong architecture, not a shared object, a PIE executable).
Result<void> fixlib__validate(const FixImage& fix, const std::string& target_executable);
Result<void> fixlib__validate(const std::string& path, const std::string& target_executable);

// "a directory", "a FIFO", ... for a file that is not regular (st_mode).
const char* fixlib__file_kind(unsigned mode);

// Read a validated fix library.
Result<FixLibrary> fixlib__read(const FixImage& fix);
Result<FixLibrary> fixlib__read(const std::string& path);

// The demangled form of an ELF symbol name (the name itself when it is not mangled).
std::string symbol__demangle(const std::string& mangled);

// Does fix.so's `name` mean the target's LOCAL symbol `f`? C++ marks internal linkage with an
// `L` in the mangled name (`static int helper(int)` is `_ZL6helperi`, `static int g_calls`
// is `_ZL7g_calls`) which fix.cpp cannot reproduce without also being `static`; the
// demangled names agree ("helper(int)", "g_calls").
class LocalNameMatcher {
 public:
  explicit LocalNameMatcher(const std::string& name);
  bool operator()(const Function& f) const;

 private:
  std::string demangled_;
  std::string key_;  // an identifier every matching mangled name contains: skips most demangling
};

}  // namespace hotfix
