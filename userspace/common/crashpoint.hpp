// Test-only crash points (after SQLite's crash tests): every step that changes a target calls
// crashpoint("name") right before and after it. With HOTFIX_CRASH_AT=k in the environment, the
// k-th crash point reached kills hotfix-ctl with SIGKILL, as an OOM kill or a closed SSH
// session would. HOTFIX_CRASH_LIST=1 prints "crashpoint K NAME" to stderr at each point
// instead, so a test can count the steps and then walk every k. Without either variable a
// crash point costs one branch on a cached flag.
#pragma once

namespace hotfix {

void crashpoint(const char* name);

}  // namespace hotfix
