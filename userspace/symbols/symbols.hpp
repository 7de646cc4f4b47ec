// Functions of a running process (or of one ELF file), from .symtab/.dynsym and
// separate debug files, read with elfutils.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "common/error.hpp"

struct Dwarf;  // libdw's

namespace hotfix {

enum class Binding { global, weak, local };
const char* binding__name(Binding b);
// The demangled form of a C++ or Rust symbol, the way c++filt and rustfilt show it:
//   "_ZN7pricing8discountEd"                        -> "pricing::discount(double)"
//   "_ZN4main7pricing8discount17h5702c7547b8d1236E" -> "main::pricing::discount" (legacy Rust: no hash)
//   "_RNvNtCs1234_4main7pricing8discount"            -> "main::pricing::discount" (Rust v0)
// other names unchanged.
std::string symbols__demangle(const std::string& symbol);
// Is `symbol` a Rust symbol (legacy `_ZN...17h<16 hex>E` or v0 `_R...`)?
bool symbols__is_rust(const std::string& symbol);
// A legacy Rust symbol's path with its hash ("main::pricing::discount::h5702c7547b8d1236"),
// empty for anything else: a name users may have copied from older tools.
std::string symbols__rust_hashed(const std::string& symbol);
// `name` cut to `width` columns for a table, ending in "…" when cut (width >= 2).
std::string symbols__shorten(const std::string& name, size_t width);
// Where tables (watch, stats, symbols) cut names: a C++ signature or a Rust generic path
// can be hundreds of characters; JSON and `symbols --wide` keep them whole.
inline constexpr size_t kTableNameWidth = 60;

struct Function {
  std::string name;                  // demangled (C++), or the plain C name
  std::string mangled;               // the symbol as in the ELF file (== name for C)
  std::vector<std::string> aliases;  // other symbol names at the same address, as in the ELF file (mangled)
  std::string object;                // path of the ELF object (as mapped)
  uint64_t address = 0;              // runtime address in the target (st_value for a file not loaded)
  uint64_t offset = 0;               // file offset of the entry: what uprobes need
  uint64_t size = 0;                 // 0 only for asm symbols without .size (kept when nothing else is there)
  Binding binding = Binding::global;
  bool exported = false;             // defined in .dynsym: the dynamic linker can bind to it
  // STT_GNU_IFUNC (memcpy): in a process, address, offset and size are those of the
  // implementation the process uses (read from the resolved IRELATIVE/GOT slot), and
  // `resolver` is the symbol's own address. resolver == 0 with ifunc: not resolved (a file,
  // or no resolved slot found): address is then the resolver's.
  bool ifunc = false;
  uint64_t resolver = 0;
  // Set on a patched function's live replacement (registry__live_functions) whose entry holds
  // the jump to its counting trampoline: address and offset are then past the moved
  // instructions, where a uprobe is safe, and a return probe is not (the return address is no
  // longer on top of the stack there).
  bool past_entry = false;
};

struct ObjectInfo {
  std::string path;        // as in /proc/PID/maps
  uint64_t load_bias = 0;  // runtime address = st_value + load_bias
  std::string build_id;    // hex, may be empty
  std::string debug_file;  // separate debug file used, if any (only known once its symbols are read)
  size_t function_count = 0;
  bool symbols_read = true;  // false: left out of a partial table (SymbolTable::for_pid_needing)
};

// Which objects of a process a partial table reads (SymbolTable::for_pid_needing). An object
// is read when one of its symbol names (.dynsym, .symtab or its debug file's, version cut)
// passes; the test reads only the string tables: no record, no demangling.
struct SymbolNeeds {
  std::vector<std::string> names;   // defines a symbol of exactly this name
  // Has a name holding this identifier: the whole name of a C symbol, or a <length><identifier>
  // part of a mangled one (C++, Rust legacy and v0 spell identifiers that way).
  std::vector<std::string> pieces;
  // `piece` counts only when no object defines `name` itself (the binder looks for a local
  // symbol of the same demangled name only then).
  struct Fallback {
    std::string name, piece;
  };
  std::vector<Fallback> fallbacks;
  bool everything = false;  // a need no name test expresses: read every object
};

struct SymbolOptions {
  // Where separate debug files live (DIR/.build-id/xx/yyyy.debug, DIR/<dir of object>/<debuglink>).
  // Empty: $HOTFIX_DEBUG_ROOT if set, else /usr/lib/debug.
  std::string debug_root;
};

// The separate debug file of an ELF object, found the way SymbolTable finds it
// (DIR/.build-id/xx/yyyy.debug with the same build-id, then `debuglink` next to the object,
// in its .debug/, under DIR), or "" when there is none.
std::string symbols__find_debug_file(const std::string& object_path, const std::string& build_id,
                                     const std::string& debuglink, const SymbolOptions& opts = {});

class SymbolTable {
 public:
  // Every mapped ELF object of `pid`: the executable and its shared libraries ([vdso] and
  // non-ELF or never-executable mappings are skipped). A library loaded twice (dlmopen)
  // appears once per load.
  static Result<SymbolTable> for_pid(pid_t pid, const SymbolOptions& opts = {});
  // Like for_pid, but only the objects `needs` asks for are read (the executable and loaded
  // fix copies always); the others are listed in objects() with symbols_read false, their
  // functions not in functions(). See partial().
  static Result<SymbolTable> for_pid_needing(pid_t pid, const SymbolNeeds& needs, const SymbolOptions& opts = {});
  // One ELF file on disk, not loaded anywhere (addresses are st_value, load_bias 0).
  static Result<SymbolTable> for_file(const std::string& path, const SymbolOptions& opts = {});
  // ELF bytes held in memory (a fix library read once), named `name` (objects' path).
  static Result<SymbolTable> for_image(std::span<const uint8_t> bytes, const std::string& name,
                                       const SymbolOptions& opts = {});

  // A table of given records (sorted here; one ObjectInfo per distinct object): for tests
  // and for callers that already hold Function records.
  static SymbolTable from_records(std::vector<Function> functions, std::vector<Function> variables = {});

  pid_t pid() const { return pid_; }  // 0 for for_file and from_records
  // "pid 1234" or "file /path": where the symbols came from, for messages.
  std::string where() const;

  const std::vector<Function>& functions() const { return functions_; }
  // Data symbols (STT_OBJECT), same fields; a fix library binds to these (file statics too).
  const std::vector<Function>& variables() const { return variables_; }
  const std::vector<ObjectInfo>& objects() const { return objects_; }
  // The function containing `addr` (runtime address), or nullptr.
  const Function* function_at(uint64_t addr) const;

  // Objects were left out (for_pid_needing). function_at still answers for their code: it
  // reads such an object the first time an address of it is asked about (functions() and
  // variables() never list them).
  bool partial() const { return lazy_ != nullptr; }
  // How many of the objects left out function_at has read since.
  size_t objects_read_later() const;

 private:
  struct Lazy;
  std::shared_ptr<Lazy> lazy_;  // the objects left out, shared by copies (one process snapshot)
  std::vector<Function> functions_;  // sorted by address
  std::vector<Function> variables_;  // sorted by address
  std::vector<ObjectInfo> objects_;
  pid_t pid_ = 0;
  std::string file_;
  friend struct SymbolTableBuilder;
  friend Result<SymbolTable> symbols__for_pid(pid_t, const SymbolOptions&, const SymbolNeeds*);
  friend struct LazyAccess;
};

// The DWARF of one mapped object of a process, found where the symbol tables find debug
// files: the object itself, else a separate debug file by build-id or .gnu_debuglink under
// the debug root (never debuginfod). Only headers are read on open; libdw reads a CU when it
// is asked for one, so the cost grows with what is looked at, not with the object's size.
class ObjectDwarf {
 public:
  // `object` as SymbolTable::objects() names it.
  static Result<ObjectDwarf> open(pid_t pid, const ObjectInfo& object, const SymbolOptions& opts = {});
  ObjectDwarf(ObjectDwarf&&) noexcept;
  ObjectDwarf& operator=(ObjectDwarf&&) noexcept;
  ~ObjectDwarf();

  Dwarf* dwarf() const { return dwarf_; }  // nullptr: the object has no DWARF (only .gnu_debugdata, or stripped)
  // The DWARF address of a runtime address of this load.
  uint64_t dwarf_address(uint64_t runtime) const { return runtime - load_bias_ - dwarf_bias_; }
  const std::string& debug_file() const;  // the separate debug file used, or empty

 private:
  struct State;
  ObjectDwarf() = default;
  std::unique_ptr<State> state_;
  Dwarf* dwarf_ = nullptr;
  uint64_t load_bias_ = 0, dwarf_bias_ = 0;
};

}  // namespace hotfix
