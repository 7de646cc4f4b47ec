// The journal: what hotfix-ctl is about to do to a target, and what it did, kept on the host
// so that a controller killed at any point (OOM, closed SSH session) can be finished or undone
// by the next one (patch/recover.hpp).
//
// One journal per target *process*, not pid: /run/hotfix/state/<pid>-<starttime>/journal
// (<starttime>: field 22 of /proc/PID/stat, so a reused pid never matches), directory 0700,
// file 0600, owned by root. Append-only, one record per line, each a flat JSON object with a
// checksum of its own text as the last member:
//   {"seq":7,"op":"patch","id":3,"step":"loaded","handle":"0x5581...","base":"0x7f...","sum":"9a0c13f2"}
// A torn last line (killed inside write()) fails its checksum and is ignored. Every step that
// changes the target writes its intent before ("loading", "island-mapping", "switching" with
// the bytes of every address) and its completion after ("loaded", "island", "committed").
// The commit record of a switch is written inside the stop that writes the text, after the
// in-target registry (patch/registry.hpp): the registry is the mirror `list` reads, the
// journal is what recovery trusts.
//
// Records are input when read back: parsing never throws; anything malformed is skipped.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "common/error.hpp"
#include "common/unique_fd.hpp"

namespace hotfix {

constexpr const char* kStateDir = "/run/hotfix/state/";

struct JournalRecord {
  uint64_t seq = 0;
  std::string op;    // "patch", "revert", "rollback", "release"
  uint32_t id = 0;   // the patch id
  std::string step;  // "begin", "loading", "loaded", ..., "committed"
  std::map<std::string, std::string> fields;  // every other member, as strings

  JournalRecord& set(const std::string& key, const std::string& value);
  JournalRecord& set(const std::string& key, uint64_t value);  // stored as "0x..." hex
  std::string get(const std::string& key) const;                // "" if absent
  uint64_t number(const std::string& key) const;                 // 0 if absent or malformed
};

JournalRecord journal__record(const std::string& op, uint32_t id, const std::string& step);

// One line (with the trailing newline) and back; decode returns nullopt for anything that
// is not a complete record with a matching checksum.
std::string journal__encode(const JournalRecord& r);
std::optional<JournalRecord> journal__decode(const std::string& line);

// The start time of `pid` (clock ticks since boot), nullopt if it is gone.
std::optional<uint64_t> process__start_time(pid_t pid);
// /run/hotfix/state/<pid>-<starttime>, nullopt if the process is gone.
std::optional<std::string> journal__dir(pid_t pid);

class Journal {
 public:
  // Open (creating with 0700 / 0600) the journal of `pid`, and take its lock: one hotfix-ctl
  // at a time works on a process (the lock goes with the process that holds it, so a killed
  // controller never leaves it taken). `wait`: block for the lock instead of failing.
  static Result<Journal> open(pid_t pid, bool wait = true);
  // The journal of `pid` only if it exists (nullopt: nothing was ever recorded).
  static Result<std::optional<Journal>> open_existing(pid_t pid, bool wait = true);

  pid_t pid() const { return pid_; }
  const std::string& path() const { return path_; }

  // Append one record (a single write(); the kernel has it once write() returns, which is all
  // a SIGKILL of this process needs -- the host crashing takes the target with it).
  Result<void> append(JournalRecord r);
  // Every intact record, in order.
  std::vector<JournalRecord> read() const;
  // Nothing of this process is left to recover or revert: delete the journal and its directory.
  void remove();

 private:
  pid_t pid_ = 0;
  std::string dir_, path_;
  UniqueFd fd_;
  uint64_t next_seq_ = 1;
};

// Values recorded in journal fields: a comma list of hex addresses ("0x7f..,0x7f..", as the
// "known" pages are written; zeros and bad words are skipped), and hex_bytes' "e9 12 34 56 78"
// (nullopt unless 1-64 whole bytes).
std::vector<uint64_t> journal__parse_addresses(const std::string& list);
std::optional<std::vector<uint8_t>> journal__parse_bytes(const std::string& s);

}  // namespace hotfix
