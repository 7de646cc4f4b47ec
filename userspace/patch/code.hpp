// The code a patch added to its target: what a thread may be running, or return into, once
// that patch's jumps are gone. Revert gives this memory back only when no thread can (see
// revert.cpp); a stacked patch treats the code of the patch below as old code (apply.cpp).
#pragma once
#include <sys/types.h>

#include <vector>

#include "common/error.hpp"
#include "patch/consistency.hpp"
#include "patch/registry.hpp"

namespace hotfix {

class SymbolTable;

// One function's new code in patch `p`: its replacement's whole body and its island (all of
// its bytes: a counting island is longer than a plain jump).
std::vector<AddressRange> patch_code__function(const SymbolTable& table, const PatchRecord& p,
                                               const FunctionRecord& f);

// Everything of `p` a thread could execute: every island page the patch mapped (whole pages),
// every replacement's body, and every executable mapping of the loaded fix copy (its other
// functions, PLT and init code: a replacement may call them).
Result<std::vector<AddressRange>> patch_code__all(pid_t pid, const SymbolTable& table, const PatchRecord& p);

// The island pages `p` mapped (page-aligned addresses), what release unmaps.
std::vector<uint64_t> patch_code__island_pages(const PatchRecord& p);

}  // namespace hotfix
