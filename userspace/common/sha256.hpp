// SHA-256 (FIPS 180-4), for naming the exact bytes of a fix library in the audit log and in
// the target's memfd name: the same digest `sha256sum fix.so` prints.
#pragma once
#include <array>
#include <cstdint>
#include <span>
#include <string>

namespace hotfix {

// The digest of `bytes`, raw and as lower-case hex.
std::array<uint8_t, 32> sha256__digest(std::span<const uint8_t> bytes);
std::string sha256__hex(std::span<const uint8_t> bytes);
// HMAC-SHA256 (RFC 2104) of `message` under `key`, lower-case hex: what authenticates the
// in-target registry (patch/registry.hpp) as written by root's hotfix-ctl.
std::string hmac_sha256__hex(std::span<const uint8_t> key, std::span<const uint8_t> message);

}  // namespace hotfix
