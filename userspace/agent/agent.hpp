// hotfix-ctl agent: every persisted patch set (agent/store.hpp) applied to every process of
// its binary -- new ones before they run their own code, running ones when the agent starts.
//
// For each binary with sets, a uprobe on its ELF entry point (agent/trigger.hpp) stops each
// new process with SIGSTOP; the agent parks it (process/park.hpp: a sleep that ends by itself
// after the hold timeout), applies the sets through the same patch__prepare/patch__apply as
// `hotfix-ctl patch` (every check included; a refused set is logged and the process runs
// unpatched, unharmed), and releases it. A watchdog process (forked before any BPF object
// exists, so it holds none) continues any process still stopped at an entry point when the
// agent dies. See docs/design.md "The agent".
#pragma once
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <string>

#include "agent/store.hpp"
#include "common/error.hpp"

namespace hotfix {

struct PreparedPatch;

struct AgentOptions {
  std::chrono::milliseconds hold = std::chrono::seconds(10);   // longest a new process waits for its patch
  std::chrono::milliseconds rescan = std::chrono::seconds(1);  // how often the store is checked for changes
  bool watchdog = true;
};

// One line per action ("pid 42 (prog): applied set 3 as patch 1 ...").
using AgentLog = std::function<void(const std::string&)>;

// Run until `stop` is set (the CLI's SIGTERM/SIGINT handler). Fails only at start (no BPF,
// no privileges); everything later is logged and survived.
Result<void> agent__run(const AgentOptions& opts, const AgentLog& log, const std::atomic<bool>& stop);

// `patch --persist`: the set to record for a prepared patch, or why it cannot be persisted
// (functions outside the executable, no build-id, an untrusted library).
Result<PersistedSet> persist__plan(const PreparedPatch& p);

// Does `pid` carry (an active patch of) the fix library with this sha256?
bool agent__carries(pid_t pid, const std::string& sha256);

// The watchdog's job, also run by `agent --release-stopped`: continue every process of a
// persisted binary that is stopped at its entry point (by an agent that is gone). Returns
// how many; each is logged.
int agent__release_stopped(const AgentLog& log);

}  // namespace hotfix
