#include "observe/watch.hpp"
#include "observe/probe_safety.hpp"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <thread>

#include "common/unique_fd.hpp"
#include "observe/uprobe_multi.hpp"
#include "process/maps.hpp"
#include "watch.h"
#include "watch.skel.h"

namespace hotfix {

namespace {

// Functions of one object, grouped: one uprobe_multi link per direction.
using ObjectProbes = UprobeMultiSpec;

int libbpf_print(enum libbpf_print_level, const char* fmt, va_list args) {
  // libbpf's own chatter would break the one-line error rule; keep it for debugging.
  static const bool debug = std::getenv("HOTFIX_DEBUG_LIBBPF") != nullptr;
  return debug ? std::vfprintf(stderr, fmt, args) : 0;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}


bool perf_forced() {
  const char* v = std::getenv("HOTFIX_FORCE_PERF_UPROBES");
  return v && *v && std::string(v) != "0";
}


std::vector<ObjectProbes> group_by_object(pid_t pid, const std::vector<Function>& functions) {
  std::map<std::string, ObjectProbes> by_path;
  for (size_t i = 0; i < functions.size(); ++i) {
    auto& group = by_path[functions[i].object];
    group.path = uprobe__target_path(pid, functions[i].object);
    group.offsets.push_back(functions[i].offset);
    group.cookies.push_back(i);
  }
  std::vector<ObjectProbes> groups;
  for (auto& [_, g] : by_path) groups.push_back(std::move(g));
  return groups;
}

}  // namespace

const char* probe_mechanism__name(ProbeMechanism m) {
  switch (m) {
    case ProbeMechanism::uprobe_multi: return "uprobe_multi";
    case ProbeMechanism::perf: return "perf uprobes";
    case ProbeMechanism::automatic: break;
  }
  return "automatic";
}

CallCounts& CallCounts::operator-=(const CallCounts& o) {
  calls -= o.calls;
  returns -= o.returns;
  latency_ns -= o.latency_ns;
  latency_samples -= o.latency_samples;
  untracked -= o.untracked;
  return *this;
}

namespace {

// Releasing a uprobe_multi link waits for RCU grace periods (the kernel's
// uprobe_unregister_sync, ~30 ms here). Released from parallel threads, those waits overlap
// instead of adding up. (Perf uprobes, ~100 ms each, are serialized inside the kernel:
// threads do not help them.)
template <typename T, typename Release>
void release_in_parallel(std::vector<T>& items, Release release) {
  constexpr size_t kMaxThreads = 64;
  size_t threads = std::min(items.size(), kMaxThreads);
  if (threads <= 1) {
    for (auto& item : items) release(item);
  } else {
    std::vector<std::thread> pool;
    for (size_t t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        for (size_t i = t; i < items.size(); i += threads) release(items[i]);
      });
    for (auto& th : pool) th.join();
  }
  items.clear();
}

}  // namespace

struct Watch::Links {
  std::vector<UniqueFd> multi;      // uprobe_multi links
  std::vector<bpf_link*> perf;      // perf-event uprobes (libbpf links)
  ~Links() {
    release_in_parallel(multi, [](UniqueFd& fd) { fd.reset(); });
    for (auto* l : perf) bpf_link__destroy(l);
  }
};

namespace {

// Open and load the skeleton for `mechanism`. The uprobe_multi programs must be loaded with
// that expected attach type (their cookie helper reads a different context), perf ones without.
Result<watch_bpf*> load_skeleton(pid_t pid, size_t n, bool returns, ProbeMechanism mechanism) {
  libbpf_set_print(libbpf_print);
  watch_bpf* skel = watch_bpf__open();
  if (!skel) return fail(fmt::format("cannot open the watch BPF object: {}", errno_text(errno)));
  skel->rodata->target_tgid = static_cast<unsigned>(pid);
  skel->rodata->track_frames = returns ? 1 : 0;
  bpf_map__set_max_entries(skel->maps.counters, static_cast<uint32_t>(n));
  if (!returns) {
    bpf_program__set_autoload(skel->progs.watch_return, false);
    bpf_map__set_max_entries(skel->maps.frames, 1);  // unused: keep it small
  }
  if (mechanism == ProbeMechanism::uprobe_multi) {
    uprobe_multi__prepare(skel->progs.watch_entry);
    uprobe_multi__prepare(skel->progs.watch_return);
  }
  if (int err = watch_bpf__load(skel); err != 0) {
    watch_bpf__destroy(skel);
    return std::unexpected(Error{fmt::format("cannot load the watch BPF programs: {}", errno_text(-err)),
                                 "check that the kernel has BPF and uprobes (CONFIG_UPROBE_EVENTS)", -err});
  }
  return skel;
}

Result<void> attach_multi(const watch_bpf* skel, Watch& w, std::vector<UniqueFd>& out, const std::vector<ObjectProbes>& groups) {
  // Return probes first: a call that enters between the two attachments then has no entry
  // frame, and its return is ignored instead of making in-flight negative.
  if (w.returns())
    for (auto& g : groups) out.push_back(HOTFIX_TRY(uprobe_multi__link(bpf_program__fd(skel->progs.watch_return), g, w.pid(), true)));
  for (auto& g : groups) out.push_back(HOTFIX_TRY(uprobe_multi__link(bpf_program__fd(skel->progs.watch_entry), g, w.pid(), false)));
  return {};
}

Result<void> attach_perf(const watch_bpf* skel, Watch& w, std::vector<bpf_link*>& out) {
  const auto& fns = w.functions();
  for (int pass = w.returns() ? 0 : 1; pass < 2; ++pass) {
    bool retprobe = pass == 0;
    for (size_t i = 0; i < fns.size(); ++i) {
      LIBBPF_OPTS(bpf_uprobe_opts, opts, .bpf_cookie = i, .retprobe = retprobe);
      auto path = uprobe__target_path(w.pid(), fns[i].object);
      bpf_link* link = bpf_program__attach_uprobe_opts(retprobe ? skel->progs.watch_return : skel->progs.watch_entry,
                                                       w.pid(), path.c_str(), fns[i].offset, &opts);
      if (!link) {
        int err = errno;
        return std::unexpected(Error{fmt::format("cannot attach a {} uprobe to {} ({}+{:#x}): {}", retprobe ? "return" : "entry",
                                                 fns[i].name, fns[i].object, fns[i].offset, errno_text(err)),
                                     "", err});
      }
      out.push_back(link);
    }
  }
  return {};
}

// Turn an attach failure into the message the user needs: the target's exit explains most.
// Inside this file an attach Error carries the errno in exit_code; this puts back exit 1.
Error explain_attach_failure(pid_t pid, Error e) {
  int err = e.exit_code;
  e.exit_code = 1;
  if (!process__alive(pid)) return Error{fmt::format("pid {} exited while attaching", pid), "nothing is left attached", 1};
  if (err == EPERM || err == EACCES)
    e.hint = "run hotfix-ctl as root (it needs CAP_BPF and CAP_PERFMON)";
  else if (err == ENOENT)
    e.hint = "the object is gone from disk; restart the target or watch another function";
  else if (e.hint.empty())
    e.hint = "run with HOTFIX_DEBUG_LIBBPF=1 for libbpf's details";
  return e;
}

}  // namespace

Result<Watch> Watch::attach(pid_t pid, std::vector<Function> functions, const WatchOptions& opts) {
  HOTFIX_CHECK(process__check_alive(pid));
  if (functions.empty()) return fail("no functions to watch", "give at least one pattern that matches");
  HOTFIX_CHECK(probe__check_entries(pid, functions));
  auto t0 = std::chrono::steady_clock::now();
  Watch w;
  w.pid_ = pid;
  w.functions_ = std::move(functions);
  w.returns_ = opts.returns;
  w.links_ = std::make_unique<Links>();

  ProbeMechanism mechanism = opts.mechanism;
  if (mechanism == ProbeMechanism::automatic) mechanism = perf_forced() ? ProbeMechanism::perf : ProbeMechanism::uprobe_multi;
  bool may_fall_back = opts.mechanism == ProbeMechanism::automatic;

  if (mechanism == ProbeMechanism::uprobe_multi) {
    auto skel = load_skeleton(pid, w.functions_.size(), w.returns_, mechanism);
    Result<void> attached;
    if (skel) {
      w.skel_ = *skel;
      w.mechanism_ = mechanism;
      attached = attach_multi(w.skel_, w, w.links_->multi, group_by_object(pid, w.functions_));
    } else {
      attached = std::unexpected(skel.error());
    }
    if (!attached) {
      if (!(may_fall_back && uprobe_multi__unsupported(attached.error().exit_code) && process__alive(pid)))
        return std::unexpected(explain_attach_failure(pid, attached.error()));
      w.detach();  // this kernel has no uprobe_multi: start over with perf uprobes
      w.links_ = std::make_unique<Links>();
      mechanism = ProbeMechanism::perf;
    }
  }
  if (mechanism == ProbeMechanism::perf) {
    auto skel = load_skeleton(pid, w.functions_.size(), w.returns_, mechanism);
    if (!skel) return std::unexpected(explain_attach_failure(pid, skel.error()));
    w.skel_ = *skel;
    w.mechanism_ = mechanism;
    if (auto attached = attach_perf(w.skel_, w, w.links_->perf); !attached)
      return std::unexpected(explain_attach_failure(pid, attached.error()));
  }
  w.attach_ms_ = ms_since(t0);
  return w;
}

Watch::Watch(Watch&& o) noexcept
    : pid_(o.pid_),
      functions_(std::move(o.functions_)),
      mechanism_(o.mechanism_),
      returns_(o.returns_),
      attach_ms_(o.attach_ms_),
      skel_(std::exchange(o.skel_, nullptr)),
      links_(std::move(o.links_)) {}

Watch& Watch::operator=(Watch&& o) noexcept {
  if (this != &o) {
    detach();
    pid_ = o.pid_;
    functions_ = std::move(o.functions_);
    mechanism_ = o.mechanism_;
    returns_ = o.returns_;
    attach_ms_ = o.attach_ms_;
    skel_ = std::exchange(o.skel_, nullptr);
    links_ = std::move(o.links_);
  }
  return *this;
}

Watch::~Watch() { detach(); }

void Watch::detach() {
  links_.reset();  // links first: no probe may fire into a freed program
  if (skel_) watch_bpf__destroy(std::exchange(skel_, nullptr));
}

size_t Watch::link_count() const { return links_ ? links_->multi.size() + links_->perf.size() : 0; }

Result<std::vector<CallCounts>> Watch::read() const {
  if (!skel_) return fail("the watch is detached");
  int ncpus = libbpf_num_possible_cpus();
  if (ncpus <= 0) return fail("cannot count the possible CPUs", "check /sys/devices/system/cpu/possible");
  std::vector<watch_counters> per_cpu(static_cast<size_t>(ncpus));
  std::vector<CallCounts> out(functions_.size());
  int fd = bpf_map__fd(skel_->maps.counters);
  for (uint32_t i = 0; i < out.size(); ++i) {
    if (bpf_map_lookup_elem(fd, &i, per_cpu.data()) != 0)
      return fail(fmt::format("cannot read the call counters: {}", errno_text(errno)));
    for (auto& c : per_cpu) {
      out[i].calls += c.calls;
      out[i].returns += c.returns;
      out[i].latency_ns += c.latency_ns;
      out[i].latency_samples += c.latency_samples;
      out[i].untracked += c.untracked;
    }
  }
  return out;
}

std::vector<uint32_t> bpf__link_ids() {
  std::vector<uint32_t> ids;
  uint32_t id = 0;
  while (bpf_link_get_next_id(id, &id) == 0) ids.push_back(id);
  return ids;
}

}  // namespace hotfix
