// The audit log: who changed which process with which code, and how it went.
//
// Every patch, revert, recover and gc appends ONE JSON line to /var/log/hotfix/audit.log
// (directory 0700, file 0600, root's; O_APPEND, one write per line, so concurrent hotfix-ctl
// never interleave) and sends the same line to syslog (LOG_AUTHPRIV; journald collects it).
// A failure to log never fails or crashes the command: it comes back as notes the verb prints.
#pragma once
#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace hotfix {

constexpr const char* kAuditDir = "/var/log/hotfix";
constexpr const char* kAuditLog = "/var/log/hotfix/audit.log";

// The target as it was when the verb started (it may be gone when the line is written).
struct AuditTarget {
  std::string exe;       // /proc/PID/exe
  std::string build_id;  // hex GNU build-id of that executable, "" if it has none
};
AuditTarget audit__target(pid_t pid);

struct AuditEntry {
  std::string verb;                   // patch, revert, recover, gc
  pid_t pid = 0;                      // the target; 0 for none (gc)
  AuditTarget target;
  std::string library;                // fix.so as given
  std::string sha256;                 // of fix.so's bytes as read and checked ("" if not read)
  std::string loaded_sha256;          // of the bytes the target loaded (hand-bound symbols made weak)
  std::vector<std::string> functions; // demangled names of the functions patched or restored
  std::vector<uint32_t> ids;          // patch ids
  std::string result = "ok";          // "ok" or the error line
  std::optional<double> pause_us;     // longest stop of the target
  bool allow_untrusted_lib = false;
  std::string untrusted;              // why fix.so failed the trust rule, if it was let in anyway
  size_t uncovered = 0;               // places applied uncovered under --allow-uncovered (patch/coverage.hpp)
  std::vector<std::string> removed;   // gc: what was removed
};

// The JSON line for `e` (who and when are filled in here: time, uid, euid, SUDO_UID, login uid,
// our pid).
std::string audit__line(const AuditEntry& e);

// Append the line to the log and send it to syslog. Returns what could not be done, one
// note each ("cannot write /var/log/hotfix/audit.log: ..."); empty when both worked.
std::vector<std::string> audit__record(const AuditEntry& e);

}  // namespace hotfix
