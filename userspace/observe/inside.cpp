#include "observe/inside.hpp"

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <map>
#include <sstream>

#include "arch/arch.hpp"
#include "observe/watch.hpp"
#include "patch/consistency.hpp"
#include "process/maps.hpp"
#include "process/ptrace.hpp"

namespace hotfix {
namespace {

using Clock = std::chrono::steady_clock;

// A /proc file's first line, or nullopt if it cannot be read (the thread is gone).
std::optional<std::string> first_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  if (!in || !std::getline(in, line)) return std::nullopt;
  return line;
}

// What /proc/PID/task/TID/syscall says: "running", or blocked with the user pc and stack
// pointer ("NR ARG1..ARG6 SP PC" in a system call, "-1 SP PC" blocked elsewhere).
struct KernelView {
  bool running = true;
  uint64_t sp = 0, pc = 0;
  std::string raw;                 // the whole line, to tell later whether it moved
  std::optional<std::string> ran;  // /proc/TID/schedstat: time on CPU so far
};

std::optional<KernelView> kernel_view(pid_t pid, pid_t tid) {
  auto task = fmt::format("/proc/{}/task/{}/", pid, tid);
  KernelView v;
  v.ran = first_line(task + "schedstat");
  auto line = first_line(task + "syscall");
  if (!line) return std::nullopt;
  v.raw = *line;
  if (line->rfind("running", 0) == 0) return v;
  std::istringstream in(*line);
  std::vector<std::string> words;
  for (std::string w; in >> w;) words.push_back(w);
  if (words.size() < 3) return v;  // not a format we know: treat it as running
  v.sp = std::stoull(words[words.size() - 2], nullptr, 16);
  v.pc = std::stoull(words.back(), nullptr, 16);
  v.running = v.pc == 0;
  return v;
}

// The thread has not run since `before` was read: same system call, same place, no CPU time.
bool held_still(pid_t pid, pid_t tid, const KernelView& before) {
  auto now = kernel_view(pid, tid);
  return now && now->raw == before.raw && now->ran == before.ran;
}

struct Notes {
  std::map<std::string, size_t> count;  // reason -> threads
  std::vector<std::string> order;
  void add(const std::string& reason) {
    if (count[reason]++ == 0) order.push_back(reason);
  }
  std::vector<std::string> lines() const {
    std::vector<std::string> out;
    for (auto& r : order)
      out.push_back(fmt::format("{} thread{} unknown: {}", count.at(r), count.at(r) == 1 ? "" : "s", r));
    return out;
  }
};

}  // namespace

struct InsideLook::State {
  pid_t pid = 0;
  std::vector<Function> functions;
  std::optional<ConsistencyChecker> checker;  // none when no function has a size

  bool in(size_t i, uint64_t lookup) const {
    const Function& f = functions[i];
    return f.size && lookup >= f.address && lookup < f.address + f.size;
  }
  // A word the scan found, unproven: a return address (one past the call, possibly one past a
  // function's end) or a saved pc.
  bool word_in(size_t i, uint64_t w) const { return in(i, w) || (w && in(i, w - 1)); }

  InsideThread count(const ConsistencyChecker::StackView& v) const {
    InsideThread t{v.tid, std::vector<uint32_t>(functions.size(), 0), std::vector<bool>(functions.size(), false)};
    for (size_t i = 0; i < functions.size(); ++i) {
      if (!functions[i].size) {
        t.unknown[i] = true;
        continue;
      }
      for (uint64_t f : v.frames) t.frames[i] += in(i, f);
      if (t.frames[i] || v.complete) continue;
      t.unknown[i] = v.unread || std::any_of(v.unproven.begin(), v.unproven.end(), [&](uint64_t w) { return word_in(i, w); });
    }
    return t;
  }
  InsideThread all_unknown(pid_t tid) const {
    return {tid, std::vector<uint32_t>(functions.size(), 0), std::vector<bool>(functions.size(), true)};
  }
  static bool anything(const InsideThread& t) {
    return std::any_of(t.frames.begin(), t.frames.end(), [](uint32_t n) { return n > 0; }) ||
           std::any_of(t.unknown.begin(), t.unknown.end(), [](bool u) { return u; });
  }
  static bool incomplete(const InsideThread& t) { return std::any_of(t.unknown.begin(), t.unknown.end(), [](bool u) { return u; }); }

  Result<InsideSnapshot> look(const InsideOptions& opts, const std::vector<pid_t>* only);
  std::optional<InsideThread> look_stopped(pid_t tid, const InsideOptions& opts, InsideSnapshot& out, Notes& notes);
};

// A running thread (or one that moved while read): stop it alone, read and unwind its stack,
// let it go. Returns nullopt if the thread is gone.
std::optional<InsideThread> InsideLook::State::look_stopped(pid_t tid, const InsideOptions& opts, InsideSnapshot& out,
                                                            Notes& notes) {
  if (!opts.stop_running) {
    notes.add("running, and not stopped (stop_running is off)");
    return all_unknown(tid);
  }
  auto began = Clock::now();
  auto hold = ThreadHold::stop(pid, tid, opts.stop_timeout);
  if (!hold) {
    if (!kernel_view(pid, tid)) return std::nullopt;  // it exited
    notes.add(hold.error().what);
    return all_unknown(tid);
  }
  ++out.stopped;
  std::vector<StoppedThread> one{StoppedThread{tid, hold->regs(), false}};
  auto views = checker->survey(one);
  InsideThread t = views ? count(views->front()) : all_unknown(tid);
  if (!views) notes.add(views.error().what);
  else if (incomplete(t)) notes.add("the unwinder could not reach the end of the stack");
  if (opts.tracked && anything(t))  // while it is held: the probes' table cannot move
    for (size_t i = 0; i < functions.size(); ++i) t.tracked.push_back(opts.tracked(tid, i));
  { auto released = std::move(*hold); }
  out.longest_stop = std::max<std::chrono::nanoseconds>(out.longest_stop, Clock::now() - began);
  return t;
}

Result<InsideSnapshot> InsideLook::State::look(const InsideOptions& opts, const std::vector<pid_t>* only) {
  InsideSnapshot out;
  out.functions.resize(functions.size());
  std::vector<pid_t> tids = only ? *only : HOTFIX_TRY(process__list_threads(pid));
  Notes notes;
  std::vector<InsideThread> found;
  if (!checker) {  // no function with a size: nothing can be placed
    for (pid_t tid : tids) found.push_back(all_unknown(tid));
    notes.add("no watched function has a size (asm without .size)");
  } else {
    // Threads blocked in the kernel first, all in one read; then the others one by one.
    std::vector<StoppedThread> blocked;
    std::vector<KernelView> seen;
    std::vector<pid_t> running;
    for (pid_t tid : tids) {
      auto v = kernel_view(pid, tid);
      if (!v) continue;  // gone
      if (v->running) {
        running.push_back(tid);
        continue;
      }
      StoppedThread t{tid, {}, true};
      arch::regs__set_pc(t.regs, v->pc);
      arch::regs__set_sp(t.regs, v->sp);
      blocked.push_back(t);
      seen.push_back(*v);
    }
    out.looked_at = blocked.size() + running.size();
    auto views = HOTFIX_TRY(checker->survey(blocked));
    for (size_t k = 0; k < views.size(); ++k) {
      InsideThread t = count(views[k]);
      pid_t tid = blocked[k].tid;
      if (opts.tracked && anything(t))
        for (size_t i = 0; i < functions.size(); ++i) t.tracked.push_back(opts.tracked(tid, i));
      if (!held_still(pid, tid, seen[k])) {  // it ran while we read: its stack may be torn
        if (kernel_view(pid, tid)) running.push_back(tid);
        continue;
      }
      if (incomplete(t) && opts.stop_blocked_if_needed) {
        running.push_back(tid);  // for all its registers
        continue;
      }
      if (incomplete(t)) notes.add("blocked, and its stack cannot be unwound from its pc and stack pointer alone");
      ++out.read_blocked;
      found.push_back(std::move(t));
    }
    for (pid_t tid : running)
      if (auto t = look_stopped(tid, opts, out, notes)) found.push_back(std::move(*t));
  }
  for (auto& t : found) {
    for (size_t i = 0; i < functions.size(); ++i) {
      out.functions[i].threads += t.frames[i] > 0;
      out.functions[i].activations += t.frames[i];
      out.functions[i].unknown += t.unknown[i];
    }
    if (anything(t)) out.threads.push_back(std::move(t));
  }
  out.notes = notes.lines();
  ThreadHold::release_late();
  return out;
}

InsideLook::InsideLook(std::unique_ptr<State> s) : s_(std::move(s)) {}
InsideLook::InsideLook(InsideLook&&) noexcept = default;
InsideLook& InsideLook::operator=(InsideLook&&) noexcept = default;
InsideLook::~InsideLook() = default;

Result<InsideLook> InsideLook::create(pid_t pid, std::vector<Function> functions) {
  auto s = std::make_unique<State>();
  s->pid = pid;
  std::vector<AddressRange> ranges;
  for (const auto& f : functions)
    if (f.size) ranges.push_back(AddressRange{f.address, f.address + f.size, f.name});
  s->functions = std::move(functions);
  if (!ranges.empty()) s->checker.emplace(HOTFIX_TRY(ConsistencyChecker::create(pid, std::move(ranges))));
  return InsideLook(std::move(s));
}

Result<InsideSnapshot> InsideLook::look(const InsideOptions& opts, const std::vector<pid_t>* only) {
  return s_->look(opts, only);
}

const std::vector<Function>& InsideLook::functions() const { return s_->functions; }

Result<InsideSnapshot> inside__snapshot(pid_t pid, const std::vector<Function>& functions, const InsideOptions& opts) {
  auto look = HOTFIX_TRY(InsideLook::create(pid, functions));
  return look.look(opts);
}

std::string inside__describe(const InsideCount& c) {
  if (c.known()) return fmt::format("{}", c.threads);
  std::string unknown = fmt::format("{} thread{} unknown", c.unknown, c.unknown == 1 ? "" : "s");
  if (c.threads) return fmt::format("≥{} ({})", c.threads, unknown);
  return fmt::format("unknown ({})", unknown);
}

// ---------------------------------------------------------------- InflightSeed

Result<InflightSeed> InflightSeed::take(pid_t pid, const Watch& watch, const InsideOptions& opts) {
  auto look = HOTFIX_TRY(InsideLook::create(pid, watch.functions()));
  InflightSeed seed(std::move(look), opts);
  seed.opts_.tracked = [&watch](pid_t tid, size_t i) { return static_cast<uint32_t>(watch.tracked_frames(tid, i)); };
  auto first = HOTFIX_TRY(seed.look_.look(seed.opts_));
  seed.apply(first, watch, true);
  seed.first_ = std::move(first);
  seed.notes_ = seed.first_.notes;
  seed.opts_.tracked = nullptr;  // `watch` may move: refresh() sets it again
  return seed;
}

// Frames from before the probes = frames on the stack - calls the probes track. A later look
// can only lower them (a frame from before never comes back; a new call is tracked).
void InflightSeed::apply(const InsideSnapshot& s, const Watch& watch, bool first) {
  const size_t n = watch.functions().size();
  std::map<pid_t, const InsideThread*> by_tid;
  for (auto& t : s.threads) by_tid[t.tid] = &t;
  auto untracked = [&](const InsideThread& t, size_t i) -> std::optional<uint32_t> {
    if (t.unknown[i]) return std::nullopt;
    uint32_t tracked = i < t.tracked.size() ? t.tracked[i] : 0;
    return t.frames[i] > tracked ? t.frames[i] - tracked : 0;
  };
  if (first) {
    for (auto& t : s.threads) {
      Seeded st{t.tid, std::vector<std::optional<uint32_t>>(n, 0)};
      for (size_t i = 0; i < n; ++i)
        if (watch.return_probes(i) == ReturnProbes::on) st.frames[i] = untracked(t, i);
      threads_.push_back(std::move(st));
    }
  } else {
    for (auto& st : threads_) {
      auto it = by_tid.find(st.tid);
      for (size_t i = 0; i < n; ++i) {
        if (st.frames[i] == 0u) continue;
        if (it == by_tid.end()) {  // gone, or inside none of the functions any more
          st.frames[i] = 0;
          continue;
        }
        auto now = untracked(*it->second, i);
        if (!now) continue;  // still cannot tell: keep what we had
        st.frames[i] = st.frames[i] ? std::min(*st.frames[i], *now) : *now;
      }
    }
  }
  std::erase_if(threads_, [](const Seeded& st) {
    return std::all_of(st.frames.begin(), st.frames.end(), [](auto& f) { return f == 0u; });
  });
  seeded_.assign(n, 0);
  unknown_.assign(n, 0);
  for (auto& st : threads_)
    for (size_t i = 0; i < n; ++i) {
      if (!st.frames[i]) ++unknown_[i];
      else seeded_[i] += *st.frames[i];
    }
}

Result<void> InflightSeed::refresh(const Watch& watch) {
  if (threads_.empty()) return {};
  std::vector<pid_t> tids;
  for (auto& st : threads_) tids.push_back(st.tid);
  opts_.tracked = [&watch](pid_t tid, size_t i) { return static_cast<uint32_t>(watch.tracked_frames(tid, i)); };
  auto s = look_.look(opts_, &tids);
  opts_.tracked = nullptr;
  if (!s) return std::unexpected(s.error());
  apply(*s, watch, false);
  return {};
}

}  // namespace hotfix
