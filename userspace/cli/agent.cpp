// hotfix-ctl agent: a foreground daemon applying the persisted patch sets to every new process
// of their binaries (agent/agent.hpp). One line on stdout per action; SIGTERM or SIGINT stops it.
#include <fmt/core.h>
#include <signal.h>

#include <atomic>
#include <cstdio>

#include "agent/agent.hpp"
#include "cli/cli.hpp"
#include "process/environment.hpp"
#include "process/maps.hpp"

namespace hotfix::cli {

namespace {

std::atomic<bool> g_stop{false};
void on_stop(int) { g_stop = true; }

void say(const std::string& line) {
  fmt::print("{}\n", one_line(line));
  std::fflush(stdout);
}

}  // namespace

int verb_agent(const Args& args) {
  po::options_description desc("agent options");
  double hold_s = 10;
  desc.add_options()("hold", po::value<double>(&hold_s),
                     "seconds a new process may wait at its entry point for its patch; it then runs on by itself (default 10)")(
      "no-watchdog", "do not start the watchdog that continues processes left stopped if the agent is killed")(
      "release-stopped", "only continue processes left stopped at their entry point by a killed agent, then exit");
  po::variables_map vm;
  if (auto code = parse("agent", args, desc, nullptr, vm, "[--hold SEC] [--no-watchdog] | --release-stopped")) return *code;
  if (hold_s <= 0) return report(Error{"--hold must be positive", "", 2});
  if (auto ok = process__check_privileges(true, true); !ok) return report(ok.error());
  if (vm.count("release-stopped")) {
    int n = agent__release_stopped(say);
    say(fmt::format("continued {} process(es)", n));
    return 0;
  }
  AgentOptions opts;
  opts.hold = std::chrono::milliseconds(static_cast<long>(hold_s * 1000));
  opts.watchdog = !vm.count("no-watchdog");
  struct sigaction sa {};
  sa.sa_handler = on_stop;
  sigemptyset(&sa.sa_mask);
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
  say(fmt::format("agent: pid {}, state {}, hold {:.1f} s", ::getpid(), persist__dir(), hold_s));
  auto r = agent__run(opts, say, g_stop);
  if (!r) return report(r.error());
  say("agent: stopped");
  return 0;
}

}  // namespace hotfix::cli
