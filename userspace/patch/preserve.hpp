// The preserving island: when a direct caller of a patched function keeps a call-clobbered
// register live across the call (GCC -fipa-ra) and the replacement may change it, the jump
// goes to an island that saves exactly those registers, calls the replacement, restores them
// and returns. PlannedSwitch::preserve holds the registers.
#pragma once
#include <cstdint>
#include <string>

namespace hotfix {

struct PlannedSwitch;

// Can `s` be made safe by a preserving island? false with `why` (one line) when not, e.g. a
// function that takes arguments on the stack, or one an exception could unwind through.
bool preserve__supported(const PlannedSwitch& s, std::string& why);

}  // namespace hotfix
