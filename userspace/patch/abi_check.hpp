// Does a replacement keep the promises the original's callers may rely on beyond the ABI?
// GCC at -O2 (-fipa-ra) lets a caller in the same translation unit keep values in
// call-clobbered registers the callee is seen never to write. A replacement that writes
// more of them would corrupt those callers silently, so such a patch is refused, with the
// compiler flags that make the replacement preserve them.
#pragma once
#include <cstdint>
#include <span>
#include <string>

#include "common/error.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

class ProcessMemory;
struct PreparedPatch;

struct AbiCheckInput {
  const SymbolTable& target;      // the live process
  const ProcessMemory& memory;    // its memory
  const Function& original;       // the function to be replaced
  const SymbolTable& fix;         // fix.so read as a file (addresses = st_value)
  const std::string& replacement; // its symbol in fix.so
  std::span<const uint8_t> fix_bytes = {};  // fix.so's bytes (read once); empty: read `fix`'s object file
};

Result<void> abi__check_replacement(const AbiCheckInput& in);

// Every switch of `p`: refuse (or set PlannedSwitch::preserve), and add the plan's "abi" note.
Result<void> abi__check_call_sites(PreparedPatch& p, const ProcessMemory& memory);

}  // namespace hotfix
