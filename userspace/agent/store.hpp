// Persistent patch sets: what `patch --persist` records so that the agent (agent/agent.hpp)
// can apply the same fix to every future process of the same binary.
//
// Layout, under the state root ($HOTFIX_STATE_DIR, default /var/lib/hotfix):
//   persisted/                      0700 root
//     generation                    a counter bumped by every change (the agent polls it)
//     lock                          flock: one writer at a time
//     <build-id>/<id>/              0700 root: one set, keyed by the executable's GNU build-id
//       fix.so                      0600 root: the exact bytes `patch` read and checked
//       set                         one checksummed JSON line (journal format): binary,
//                                   build-id, sha256 of fix.so, patterns, options
// Everything is read with the hostile-input rules of docs/safety.md: no symlink is followed
// (every component opened with O_NOFOLLOW relative to a checked directory fd), every
// directory and file must be root's and writable by nobody else, and fix.so's sha256 is
// compared with the recorded one on the very bytes that are loaded (PatchOptions::expected_sha256).
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/error.hpp"

namespace hotfix {

constexpr const char* kDefaultStateRoot = "/var/lib/hotfix";
constexpr const char* kStateRootEnv = "HOTFIX_STATE_DIR";

// $HOTFIX_STATE_DIR if set (tests), else /var/lib/hotfix.
std::string persist__root();
// <root>/persisted
std::string persist__dir();

struct PersistedSet {
  uint32_t id = 0;
  std::string build_id;     // of the executable the set is for (hex)
  std::string binary;       // its path when recorded (the agent probes the file there)
  std::string library;      // fix.so as the user gave it to `patch --persist`
  std::string sha256;       // of fix.so's bytes (the copy must still have them)
  std::string object;       // --object, if given
  std::vector<std::string> patterns;
  std::string consistency = "strict";
  uint64_t timeout_ms = 10000;
  bool abi_check = true;
  bool count = true;
  bool allow_uncovered = false;
  uint64_t created_ns = 0;  // CLOCK_REALTIME
  // Filled in by persist__list:
  std::string dir;      // <root>/persisted/<build-id>/<id>
  std::string problem;  // why this set cannot be used (unreadable, not root's, tampered...), "" if fine
  // Filled in by persist__record: an identical set (same build-id, binary, fix bytes, patterns,
  // object and options) was recorded already and is returned instead of a second one.
  bool existing = false;

  std::string fix_path() const { return dir + "/fix.so"; }
};

// Record `set` (id and dir are assigned) with a root-owned copy of `fix_bytes`. When an
// identical set is recorded already (and its copy is intact), that one is returned with
// `existing` set and nothing is written: `patch --persist --exe`, which records once per
// process, and a repeated `patch --persist` keep one set per fix and binary.
Result<PersistedSet> persist__record(PersistedSet set, std::span<const uint8_t> fix_bytes);

// Every set under the root, in id order. A set that fails a check is listed with `problem`
// set (its fields as far as they could be read). No root directory: an empty list.
Result<std::vector<PersistedSet>> persist__list();

// Check a listed set's copy now: owner, mode, no symlink, and its sha256. The error is one line.
Result<void> persist__verify(const PersistedSet& set);

// Remove set `id` (its directory, and the build-id directory once empty).
Result<void> persist__remove(uint32_t id);

// A number that changes whenever a set is recorded or removed (0 when there is none).
uint64_t persist__generation();

}  // namespace hotfix
