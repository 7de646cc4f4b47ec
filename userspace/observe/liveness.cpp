#include "observe/liveness.hpp"

#include <thread>

#include "observe/probe_safety.hpp"

namespace hotfix {

using namespace std::chrono;

Result<std::vector<Liveness>> liveness__observe(pid_t pid, const std::vector<Function>& functions,
                                                milliseconds window) {
  bool returns = probe__objects_with_exceptions(functions).empty();
  auto watch = HOTFIX_TRY(Watch::attach(pid, functions, WatchOptions{.returns = returns}));
  auto began = steady_clock::now();
  std::this_thread::sleep_for(window);
  auto counts = HOTFIX_TRY(watch.read());
  double seconds = duration<double>(steady_clock::now() - began).count();
  std::vector<Liveness> out;
  for (size_t i = 0; i < functions.size(); ++i)
    out.push_back({functions[i], counts[i].calls, counts[i].calls / seconds, returns ? counts[i].inflight() : -1});
  return out;
}

Result<QuietWaiter> QuietWaiter::attach(pid_t pid, std::vector<Function> functions) {
  QuietWaiter w(pid, std::move(functions));
  HOTFIX_CHECK(w.reattach());
  return w;
}

Result<void> QuietWaiter::reattach() {
  if (!watch_) watch_.emplace(HOTFIX_TRY(Watch::attach(pid_, functions_)));
  return {};
}

void QuietWaiter::detach() { watch_.reset(); }

bool QuietWaiter::wait_quiet(steady_clock::time_point deadline) {
  if (!watch_) return true;
  for (;;) {
    auto counts = watch_->read();
    if (!counts) return true;  // cannot tell: let the stop-the-world check decide
    bool quiet = true;
    for (auto& c : *counts) quiet = quiet && c.inflight() <= 0;
    if (quiet) return true;
    if (steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(microseconds(100));
  }
}

}  // namespace hotfix
