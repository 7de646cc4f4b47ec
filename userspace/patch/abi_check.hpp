// Does a replacement keep the promises the original's callers may rely on beyond the ABI?
//
// GCC at -O2 (-fipa-ra) lets a caller keep values in call-clobbered registers across a
// direct call when it sees that the callee (same translation unit, binding locally) never
// writes them. Only direct calls in the function's own object can carry that assumption:
// calls through the PLT, the GOT or a pointer rely on the ABI alone. So for each patched
// function:
//   1. the excess: call-clobbered registers the replacement may write (following its calls,
//      PLT calls resolved as RTLD_NOW binds them) that the original never does (following
//      its calls as its callers' compiler saw them: anything outside the object clobbers all);
//   2. its direct callers: every call/jmp rel32 (and rel8) to its entry in its object's
//      executable segments (a byte pre-filter, then decoding from the caller's start);
//   3. at each call site, whether an excess register is live after the return (read before
//      written on some path), over the caller's control flow, into the caller's own callers
//      when a register reaches its return (to a bounded depth). An indirect jump or bytes
//      that do not decode count as live.
// None live: accepted, with a plan note. Some live: a preserving island (patch/preserve.hpp)
// when it can be built, else refused, naming the caller, the site and the registers.
#pragma once
#include "common/error.hpp"

namespace hotfix {

class ProcessMemory;
struct PreparedPatch;

// Every switch of `p`: refuse (or set PlannedSwitch::preserve), and add the plan's "abi" notes.
Result<void> abi__check_call_sites(PreparedPatch& p, const ProcessMemory& memory);

}  // namespace hotfix
