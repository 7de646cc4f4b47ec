// Delivering the exact bytes of a fix library to the target: a memfd created INSIDE the
// target, filled and sealed by us, opened by the target's own dlopen as /proc/self/fd/N.
//
// Why: a path can be swapped between our checks and the target's open, names a file in
// OUR mount namespace (not necessarily the target's), and a copy on disk can be read or
// replaced by others. A sealed memfd (F_SEAL_WRITE|GROW|SHRINK|SEAL) cannot change after we
// wrote it; we read it back before dlopen, so the target maps what was checked, byte for
// byte. /proc/PID/maps then names it "/memfd:hotfix:<id>:<sha256>:<name> (deleted)"
// (kFixCopyPrefix): unique per patch, and it says which bytes are loaded.
#pragma once
#include <cstdint>
#include <span>
#include <string>

#include "common/error.hpp"
#include "process/ptrace.hpp"
#include "symbols/symbols.hpp"

namespace hotfix {

struct DeliveredFix {
  int fd = -1;              // the memfd in the target, until deliver__close
  std::string dlopen_path;  // "/proc/self/fd/N", unique among the names the target's loader has loaded
  std::string mapped;       // "/memfd:hotfix:<id>:<sha256>:<name>", as maps shows it (before " (deleted)")
  std::string sha256;       // of the bytes delivered
};

// The memfd name for patch `id` of the library `library` whose file bytes have this digest.
std::string deliver__memfd_name(uint32_t id, const std::string& sha256, const std::string& library);

// The sha256 a maps name made by deliver__memfd_name records ("" when it is not one).
std::string deliver__sha256_of(const std::string& mapped);

// Create the memfd in the target (one thread stopped briefly; the others run), write and seal
// `bytes`, and check them back. `table` (the target's symbols) finds the loader's list of
// loaded objects, so that the /proc/self/fd/N name never equals one the loader already has
// (dlopen would return that object instead of opening ours).
Result<DeliveredFix> deliver__into(Tracee& t, const SymbolTable& table, const std::string& memfd_name,
                                   std::span<const uint8_t> bytes);

// Close the target's fd (after dlopen: the mapping keeps the memory). Idempotent.
Result<void> deliver__close(Tracee& t, DeliveredFix& d);

}  // namespace hotfix
