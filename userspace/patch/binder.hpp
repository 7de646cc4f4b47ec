// The binder: makes code in fix.so use the LIVE functions and variables of the target,
// including `static` ones the dynamic linker cannot see.
//
// Why by hand: fix.cpp says `extern int g_calls; int helper(int);` while the target has
// the file statics `_ZL7g_calls` and `_ZL6helperi`, which are in no .dynsym, so dlopen
// would fail ("undefined symbol") or, worse, bind to a different copy. The binder
//   1. resolves every undefined symbol of fix.so that no target object exports against the
//      target's own symbols: same mangled name first, else a LOCAL target symbol with the
//      same demangled name (`_ZL7g_calls` is `g_calls`, `_ZL6helperi` is `helper(int)`),
//      preferring the main executable, refusing ambiguity;
//   2. makes a private copy of fix.so's bytes in which exactly those symbols are WEAK (only
//      st_info bytes of .dynsym change, layout is kept), so dlopen(RTLD_NOW) succeeds and
//      leaves their GOT slots / data words at 0 (+ addend);
//   3. returns one fixup per dynamic relocation against them: the patch engine writes the
//      target's address there after dlopen, while the target is stopped, before any jump
//      to fix.so exists, so no code of fix.so can run with an unbound slot.
//      (Constructors of fix.so run inside dlopen, before the fixups: they must not use bound
//      symbols.)
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "arch/arch.hpp"
#include "common/error.hpp"
#include "patch/fixlib.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

struct SymbolBinding {
  std::string symbol;   // fix.so's undefined symbol: "g_calls", "_Z6helperi"
  Function target;      // the target symbol it now means (function or variable)
};

struct Fixup {
  uint64_t offset = 0;  // r_offset: where, relative to fix.so's load base
  uint64_t value = 0;   // what: the target's runtime address (+ r_addend for absolute64)
  uint64_t loader_value = 0;  // what dlopen(RTLD_NOW) leaves there for a weak undefined symbol
  arch::RelocKind kind = arch::RelocKind::got;
  std::string symbol;   // for messages
};

struct BoundLibrary {
  std::vector<uint8_t> bytes;           // the rewritten copy: what the target loads
  std::string path;                     // binder__prepare only: where the copy was written
  std::vector<SymbolBinding> bindings;  // empty when the dynamic linker can bind everything
  std::vector<Fixup> fixups;
};

// One 8-byte store in the target.
struct MemoryWrite {
  uint64_t address = 0;
  std::vector<uint8_t> bytes;
  uint64_t expected = 0;  // Fixup::loader_value: what must be there before the store
};

// What binder__bind needs of a partial symbol table (SymbolTable::for_pid_needing): the
// objects defining a name fix.so leaves undefined (else holding a local of that demangled
// name), and those that may hold a variable fix.so would privately copy.
void binder__add_needs(const FixLibrary& fix, SymbolNeeds& needs);

// Resolve fix.so's undefined symbols against `target` (the main executable is preferred) and
// return the rewritten copy's bytes and the fixups. `fix` must have passed fixlib__validate.
// `fix_copies` are objects of `target` (paths as the table spells them) that are loaded fix
// copies, not the target (see registry__fix_copies): their symbols are neither bound to nor
// taken for target variables fix.so would shadow. An earlier copy of the same fix defines
// the same file-static `fsink` and the same replacement functions; they are not the service's.
Result<BoundLibrary> binder__bind(const SymbolTable& target, const std::string& executable, const FixImage& fix,
                                  const std::set<std::string>& fix_copies = {});

// binder__bind on the file `fix_path`, with the copy written to `out_path` (0600; parent
// directories are created 0700; the file appears atomically). For tests and offline use.
Result<BoundLibrary> binder__prepare(const SymbolTable& target, const std::string& executable,
                                     const std::string& fix_path, const std::string& out_path,
                                     const std::set<std::string>& fix_copies = {});

// Where to write the bound copy for patch `id` of `pid`: `<patch_dir><pid>/<id>-<name>`, or
// `<id>.<n>-<name>` with the first n for which that name is neither on disk nor mapped in the
// target. A copy left loaded by a killed hotfix-ctl has the same id (its patch was never
// recorded); glibc's dlopen returns an object it has loaded under the same name instead of
// loading the file, so every copy must have a name no loaded object has.
std::string binder__copy_path(pid_t pid, const std::string& patch_dir, uint32_t id, const std::string& library);

// The stores that finish the binding once the copy is loaded at `load_base` (its l_addr:
// runtime address = load_base + st_value).
std::vector<MemoryWrite> binder__writes(const std::vector<Fixup>& fixups, uint64_t load_base);

// Apply `binder__writes` to `pid` through /proc/PID/mem (works on RELRO-protected GOTs as
// root). Every slot is checked first to hold what the dynamic linker leaves for a weak
// undefined symbol; on any mismatch nothing is written. Read back afterwards.
Result<void> binder__apply(pid_t pid, uint64_t load_base, const std::vector<Fixup>& fixups);

// The load base (l_addr) of the ELF object `mapped` (as /proc/PID/maps names it, " (deleted)"
// or not) in `pid`, whose bytes are `elf`.
Result<uint64_t> binder__load_base(pid_t pid, const std::string& mapped, std::span<const uint8_t> elf);
// The load base (l_addr) of the ELF file `path` mapped into `pid`, from /proc/PID/maps. The
// mapping is found by the file's identity (device and inode, as stat(path) sees them), not by
// its name: this works for a copy delivered by a memfd (/proc/PID/fd/N) as well, and it tells
// "dlopen mapped our copy" from "dlopen returned an object it already had" (same name, or the
// same file): the latter fails here, so the caller dlcloses (dropping the reference dlopen
// took) and nothing of another copy is ever bound or jumped to.
Result<uint64_t> binder__load_base(pid_t pid, const std::string& path);

}  // namespace hotfix
