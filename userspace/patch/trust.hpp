// Who may provide a fix, and reading it exactly once.
//
// hotfix-ctl runs as root and loads fix.so into other users' processes, so the file is code
// run with the target's privileges: it must come from someone who could do that anyway.
// Trusted are root and the invoking user (SUDO_UID when run through sudo, else the real uid).
// A fix library is accepted only if nobody else can change what its path names:
//   - the file is a regular file owned by a trusted user and writable by neither group nor
//     others;
//   - every directory on the path, from /, and every directory of every symlink's target, is
//     owned by a trusted user and writable by neither group nor others -- except a sticky
//     directory (like /tmp, mode 1777), where others cannot rename or remove entries they do
//     not own: there the entry we pass through must itself be owned by a trusted user;
//   - every symlink on the way is owned by a trusted user (its target is then walked the same).
// This is the rule of sudo's and OpenSSH's secure-path checks. ACLs show through the group
// bits (the mask); a library that fails it is loaded only with --allow-untrusted-lib.
//
// The walk opens every component relative to the directory fd it checked (O_PATH, no symlink
// followed by the kernel), the file last with O_NOFOLLOW, and checks owner and mode on that
// fd: what is read is what was checked. The bytes are read once; everything later (ELF
// checks, planning, binding, delivery to the target) works on those bytes, never on the path.
#pragma once
#include <sys/types.h>

#include <string>

#include "common/error.hpp"
#include "patch/fixlib.hpp"

namespace hotfix {

// The user besides root whose files may be loaded: SUDO_UID if set (a number), else getuid().
uid_t trust__invoker();
// "uid 1000 (alice)".
std::string trust__describe_uid(uid_t uid);

struct TrustedFix {
  FixImage image;
  std::string untrusted;  // what failed the rule when --allow-untrusted-lib let it through; empty if trusted
};

// Walk `path` by the rule above and read the file once. A failure names the path and the
// owner or mode at fault, with the hint --allow-untrusted-lib; with `allow_untrusted` the
// problem is returned in `untrusted` instead.
Result<TrustedFix> trust__read_fix(const std::string& path, bool allow_untrusted);

// For an unprivileged user: fails with "cannot read the hotfix state of pid N: permission
// denied; run as root" when /proc/PID/maps or /proc/PID/mem cannot be read (so that "no
// patches" is never said of a process we cannot look into), or, with `pins`, when the
// pinned counters under /sys/fs/bpf/hotfix cannot be.
Result<void> hotfix_state__readable(pid_t pid, bool pins = false);

}  // namespace hotfix
