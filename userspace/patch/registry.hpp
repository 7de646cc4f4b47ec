// The record of applied patches, kept INSIDE the target process so that any later
// hotfix-ctl (after the first one exited or was killed) can list and revert.
//
// It lives in a small shared memfd mapping named "hotfix-registry" that the engine creates
// in the target (/proc/PID/maps shows "/memfd:hotfix-registry (deleted)"). Its content is
// a checksummed header followed by plain text, one record per line, so that an operator can
// read it with `cat /proc/PID/map_files/<range>` when everything else fails.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "common/paths.hpp"

namespace hotfix {

class ProcessMemory;

enum class PatchState { active, reverted };
const char* patch_state__name(PatchState s);

struct FunctionRecord {
  std::string mangled;            // the target function's symbol
  uint64_t old_address = 0;       // its entry in the target
  uint64_t new_address = 0;       // the replacement's entry
  uint64_t island = 0;            // the island used for an out-of-reach jump, 0 if none
  std::vector<uint8_t> original;  // bytes at old_address before this patch (restored by revert)
  std::vector<uint8_t> written;   // bytes this patch wrote there
  // A preserving island (patch/preserve.hpp) at `island`: the registers it saves (ClobberSet
  // bits), and where its unwind information was registered with the target's __register_frame
  // (0: not registered). Release deregisters it before the island page is unmapped.
  uint64_t preserve = 0;
  uint64_t frame = 0;
  // A counting trampoline at the replacement's own entry (patch/counting.hpp): the first
  // `trampoline_covered` bytes of the replacement jump to `trampoline`, which counts and runs
  // them moved. Every entry into the replacement counts there, also calls from other
  // replacements and through pointers taken inside fix.so. 0: none (the island counts, and
  // calls from inside fix.so are not counted).
  uint64_t trampoline = 0;
  uint64_t trampoline_covered = 0;
  // Where a uprobe on the replacement may go: its entry, or the first byte after the moved
  // instructions when a trampoline's jump sits on the entry.
  uint64_t probe_address() const { return new_address + (trampoline ? trampoline_covered : 0); }
};

// A place that runs a patched function's code which the entry jump does not reach (an
// inlined copy, a clone) or that the jump changes too (an alias), kept with a patch applied
// under --allow-uncovered so that list and stats can say so (patch/coverage.hpp).
struct UncoveredPlace {
  std::string function;  // the patched function (demangled)
  std::string kind;      // "inlined", "clone" or "alias"
  std::string in;        // the function holding the inlined copy; the clone's or the alias's name
  std::string file;      // source file (base name) where DWARF has it, else empty
  uint32_t line = 0;     // 0 when unknown
  bool operator==(const UncoveredPlace&) const = default;
};
// A patch keeps at most this many places in the registry; the rest are counted.
constexpr size_t kMaxRecordedUncovered = 200;

struct PatchRecord {
  uint32_t id = 0;
  PatchState state = PatchState::active;
  uint64_t applied_ns = 0;  // CLOCK_REALTIME
  uint64_t reverted_ns = 0;
  std::string library;      // fix.so as the user gave it
  std::string loaded_copy;  // the bound copy the target dlopen()ed
  uint64_t handle = 0;      // dlopen handle in the target
  uint64_t load_base = 0;
  bool released = false;    // reverted and its memory given back (dlclose, islands unmapped)
  std::string consistency;  // "strict" or "entry"
  uint64_t counters = 0;    // where the hit counters are mapped in the target, 0 if not counted
  uint64_t counters_len = 0;
  std::vector<FunctionRecord> functions;
  std::vector<UncoveredPlace> uncovered;  // at most kMaxRecordedUncovered
  uint64_t uncovered_more = 0;            // places beyond those, not recorded one by one
  // sha256 of fix.so as the user gave it (what `sha256sum fix.so` prints), "" in records
  // written before it was kept: a fleet tool sees that the same fix is applied already.
  std::string sha256;
};

// Released patches beyond the newest kKeptReleased, folded into one line (registry__compact):
// nothing refers to them any more (their code is unloaded, their bytes restored).
struct PrunedSummary {
  uint64_t count = 0;
  uint32_t first_id = 0, last_id = 0;  // the oldest and newest id summarised
  uint64_t last_reverted_ns = 0;
};

// Counting trampolines of a `hotfix-ctl watch` (patch/watchstubs.hpp): whose they are, where
// their memory is, and what each entry held before. A record whose owner is gone (a SIGKILLed
// watch) is removed by the next hotfix-ctl on the pid. Registries older than these records
// simply have none; a build older than them refuses a registry that has one ("damaged").
struct WatchStubRecord {
  std::string name;               // the function's symbol (mangled)
  uint64_t address = 0;           // its entry in the target
  uint64_t stub = 0;              // its trampoline
  std::vector<uint8_t> original;  // the file's bytes under the jump (restored on removal)
  std::vector<uint8_t> written;   // the jump
};
struct WatchRecord {
  pid_t owner = 0;               // the hotfix-ctl watch that installed them
  uint64_t owner_start = 0;      // its start time (field 22 of /proc/PID/stat): a reused pid is not it
  uint64_t counters = 0;         // the counter map's mapping in the target
  uint64_t counters_len = 0;
  std::vector<std::pair<uint64_t, uint64_t>> pages;  // trampoline pages (address, length)
  std::vector<WatchStubRecord> stubs;                // empty once every entry is restored
};

struct Registry {
  uint32_t next_id = 1;  // never decreases: ids are never reused, pruned or not
  // The registry lives in the target, so its user can rewrite it. Every registry root's
  // hotfix-ctl writes ends in an HMAC under a root-only key (/run/hotfix/key); decoding checks
  // it. `authentic` is false when the MAC is missing or wrong (or the key cannot be read, which
  // only root can), and `authenticity` then says why. Nothing may act on such a registry.
  bool authentic = true;
  std::string authenticity;
  std::vector<PatchRecord> patches;  // in id order
  PrunedSummary pruned;
  std::vector<WatchRecord> watches;  // counting trampolines of live (or killed) watches
  // The process whose registry this is (registry__write records it). A forked child shares
  // its parent's mapping (MAP_SHARED): an owner other than the reader means the record was
  // inherited and must be adopted (patch/adopt.hpp) before the child's own use. 0: written by
  // a hotfix-ctl before owners were recorded (taken as the reader's own).
  pid_t owner = 0;

  PatchRecord* find(uint32_t id);
  // The watch trampoline whose jump sits at `address`, if any.
  const WatchStubRecord* watch_stub_at(uint64_t address) const;
  // True when `id` was issued, reverted, released and summarised (ids < next_id are issued
  // without gaps: only a committed patch takes one).
  bool was_pruned(uint32_t id) const;
  // The active patch whose jump currently sits at `old_address` (the top of the stack), if any.
  const PatchRecord* top_at(uint64_t old_address) const;
  // The function record of the active patch right above patch `below` at `old_address` (whose
  // saved bytes are `below`'s jump), if any: what a revert of `below` must rewire.
  FunctionRecord* record_above(uint32_t below, uint64_t old_address);
};

constexpr const char* kRegistryName = "hotfix-registry";
constexpr size_t kRegistrySize = 1 << 20;  // memfd size; pages are only used as written
// How many released patches keep their full record (the recent history `list --all` shows).
constexpr size_t kKeptReleased = 8;

// Fold all but the newest `keep` released records into `r.pruned`. Active patches and
// reverted ones whose memory is still held (a later revert releases them) always stay, so
// the registry's size depends on what is in the target, not on how many patches it has had.
void registry__compact(Registry& r, size_t keep = kKeptReleased);

// Serialised form (header + text) and back. decode never throws: a bad magic, checksum,
// length or field is an error naming it (the text is input from the target).
std::vector<uint8_t> registry__encode(const Registry& r);
Result<Registry> registry__decode(const std::vector<uint8_t>& bytes);

// Refuse to act on a registry that root's hotfix-ctl did not write (see Registry::authentic):
// "tampering" with what was found; nothing is done.
Result<void> registry__require_authentic(const Registry& r, pid_t pid);

// Where the registry is mapped in `pid`, if it has one.
std::optional<uint64_t> registry__locate(pid_t pid);
// Read the registry of `pid` without stopping it; an empty registry if there is none.
Result<Registry> registry__read(pid_t pid);
// Overwrite the registry mapped at `address` (the caller holds the target with ptrace, which
// is what keeps two hotfix-ctl from writing at once: a second one cannot seize it). What is
// written is `r` compacted (registry__compact).
Result<void> registry__write(const ProcessMemory& mem, uint64_t address, const Registry& r);

}  // namespace hotfix

namespace hotfix {

class SymbolTable;
struct Function;

// The functions that really run when `functions` of `pid` are called: a patched function is
// replaced by its replacement in the loaded fix copy (keeping the original's name), and the
// fix copies' own symbols are dropped (they are reached through the originals). Probing the
// original entry of a patched function would crash the target (see observe/probe_safety.hpp).
// The objects of `table` (paths as it spells them) that are loaded fix copies rather than the
// target's own code: everything under `patch_dir` (a copy a killed hotfix-ctl left loaded has
// no record), memfds named "hotfix*", and every copy the registry records as not released,
// by its path and by its load base (whatever the path looks like).
std::set<std::string> registry__fix_copies(const Registry& r, const SymbolTable& table, const std::string& patch_dir);

std::vector<Function> registry__live_functions(const Registry& r, const SymbolTable& table,
                                               std::vector<Function> functions, const std::string& patch_dir,
                                               std::vector<std::string>* notes);

}  // namespace hotfix
