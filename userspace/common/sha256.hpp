// SHA-256 (FIPS 180-4), for naming the exact bytes of a fix library in the audit log and in
// the target's memfd name: the same digest `sha256sum fix.so` prints.
#pragma once
#include <cstdint>
#include <span>
#include <string>

namespace hotfix {

// Lower-case hex digest of `bytes`.
std::string sha256__hex(std::span<const uint8_t> bytes);

}  // namespace hotfix
