#include "observe/watch.hpp"
#include "observe/probe_safety.hpp"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
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


// Reports progress of a long attach or detach: silent for the first second, then a line about
// once a second, and a closing line if anything was said.
class Progress {
 public:
  Progress(const std::function<void(const std::string&)>& sink, const char* verb, const char* unit, size_t total)
      : sink_(sink), verb_(verb), unit_(unit), total_(total) {}
  void tick(size_t done) {
    if (!sink_) return;
    auto now = std::chrono::steady_clock::now();
    if (now - began_ < std::chrono::seconds(1) || now - said_ < std::chrono::seconds(1)) return;
    said_ = now;
    sink_(fmt::format("{}: {} of {} {} ({:.1f} s)", verb_, done, total_, unit_, ms_since(began_) / 1e3));
  }
  void finish() {
    if (sink_ && said_ != std::chrono::steady_clock::time_point{})
      sink_(fmt::format("{}: all {} {} in {:.1f} s", verb_, total_, unit_, ms_since(began_) / 1e3));
  }

 private:
  const std::function<void(const std::string&)>& sink_;
  const char* verb_;
  const char* unit_;
  size_t total_;
  std::chrono::steady_clock::time_point began_ = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point said_{};
};

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
// threads do not help them.) `progress` hears from this thread while the others work.
template <typename T, typename Release>
void release_in_parallel(std::vector<T>& items, Release release, Progress& progress, std::atomic<size_t>& done) {
  constexpr size_t kMaxThreads = 64;
  size_t threads = std::min(items.size(), kMaxThreads);
  if (threads <= 1) {
    for (auto& item : items) release(item), progress.tick(++done);
  } else {
    size_t base = done;  // before the threads start counting
    std::vector<std::thread> pool;
    for (size_t t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        for (size_t i = t; i < items.size(); i += threads) release(items[i]), ++done;
      });
    while (done < base + items.size()) {
      progress.tick(done);
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    for (auto& th : pool) th.join();
  }
  items.clear();
}

}  // namespace

struct Watch::Links {
  std::vector<UniqueFd> multi;      // uprobe_multi links
  std::vector<std::string> multi_object;  // by multi index: the object its probes are in
  std::vector<bpf_link*> perf;      // perf-event uprobes (libbpf links)
  std::vector<uint32_t> perf_slot;  // by perf index: the counter slot of its function
  void release(const std::function<void(const std::string&)>& sink) {
    Progress progress(sink, "detaching", "links", multi.size() + perf.size());
    std::atomic<size_t> done = 0;
    release_in_parallel(multi, [](UniqueFd& fd) { fd.reset(); }, progress, done);
    for (auto* l : perf) bpf_link__destroy(l), progress.tick(++done);
    perf.clear();
    multi_object.clear(), perf_slot.clear();
    progress.finish();
  }
  // Take out the links of these objects (multi) or of these slots (perf), to release them.
  Links take(const std::set<std::string>& objects, const std::set<uint32_t>& slots) {
    Links out, kept;
    for (size_t i = 0; i < multi.size(); ++i) {
      Links& to = objects.count(multi_object[i]) ? out : kept;
      to.multi.push_back(std::move(multi[i])), to.multi_object.push_back(multi_object[i]);
    }
    for (size_t i = 0; i < perf.size(); ++i) {
      Links& to = slots.count(perf_slot[i]) ? out : kept;
      to.perf.push_back(perf[i]), to.perf_slot.push_back(perf_slot[i]);
    }
    perf.clear();  // now owned by out or kept
    std::swap(multi, kept.multi), std::swap(multi_object, kept.multi_object);
    std::swap(perf, kept.perf), std::swap(perf_slot, kept.perf_slot);
    return out;
  }
  Links() = default;
  Links(Links&&) = default;
  ~Links() { release({}); }
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

// What one attach pass works on: the functions still in the watch and their return probes.
struct AttachPlan {
  pid_t pid = 0;
  const std::vector<Function>* functions = nullptr;
  const std::vector<ReturnProbes>* returns = nullptr;
  std::vector<int> refused;  // by function index: the errno of the kernel's refusal, 0 if none
  size_t probes = 0, done = 0;
  const std::vector<uint32_t>* slots = nullptr;  // function index -> counter slot; nullptr: the index
  uint64_t slot(size_t i) const { return slots ? (*slots)[i] : i; }
  uint64_t cookie(size_t i) const { return slot(i) | ((*returns)[i] == ReturnProbes::on ? 0 : WATCH_COOKIE_NO_RETURN); }
};

// The probes of one direction, grouped by object (one uprobe_multi link covers one object).
struct ObjectGroup {
  std::string object;
  ObjectProbes probes;
  std::vector<size_t> index;  // by probe: the plan's function index
};

std::vector<ObjectGroup> group_by_object(const AttachPlan& plan, bool retprobe) {
  std::map<std::string, ObjectGroup> by_path;
  for (size_t i = 0; i < plan.functions->size(); ++i) {
    if (plan.refused[i] || (retprobe && (*plan.returns)[i] != ReturnProbes::on)) continue;
    auto& f = (*plan.functions)[i];
    auto& group = by_path[f.object];
    group.object = f.object;
    group.probes.path = uprobe__target_path(plan.pid, f.object);
    group.probes.offsets.push_back(f.offset);
    group.probes.cookies.push_back(retprobe ? plan.slot(i) : plan.cookie(i));
    group.index.push_back(i);
  }
  std::vector<ObjectGroup> groups;
  for (auto& [_, g] : by_path) groups.push_back(std::move(g));
  return groups;
}

// Probes per uprobe_multi link. One link of 20,000 probes would attach in one silent system
// call, and an offset the kernel refuses would send the whole of it back through bisection;
// links of a few thousand keep both short and let progress be shown between them.
constexpr size_t kProbesPerLink = 2048;

Result<void> attach_multi_pass(const watch_bpf* skel, AttachPlan& plan, bool retprobe, Watch::Links& out,
                               Progress& progress) {
  int prog = bpf_program__fd(retprobe ? skel->progs.watch_return : skel->progs.watch_entry);
  for (auto& group : group_by_object(plan, retprobe)) {
    auto& g = group.probes;
    for (size_t lo = 0; lo < g.offsets.size(); lo += kProbesPerLink) {
      size_t hi = std::min(g.offsets.size(), lo + kProbesPerLink);
      ObjectProbes chunk{g.path, {g.offsets.begin() + lo, g.offsets.begin() + hi}, {g.cookies.begin() + lo, g.cookies.begin() + hi}};
      std::vector<RefusedOffset> refused;
      size_t before = out.multi.size();
      auto linked = uprobe_multi__link_skipping(prog, chunk, plan.pid, retprobe, out.multi, refused);
      out.multi_object.resize(out.multi.size(), group.object);
      if (out.multi.size() < before) out.multi_object.resize(out.multi.size());
      HOTFIX_CHECK(linked);
      for (auto& r : refused) plan.refused[group.index[lo + r.index]] = r.err;
      progress.tick(plan.done += hi - lo);
    }
  }
  return {};
}

Result<void> attach_multi(const watch_bpf* skel, AttachPlan& plan, Watch::Links& out, Progress& progress) {
  // Return probes first: a call that enters between the two attachments then has no entry
  // frame, and its return is ignored instead of making in-flight negative. A function whose
  // return probe is refused gets no entry probe either.
  HOTFIX_CHECK(attach_multi_pass(skel, plan, true, out, progress));
  return attach_multi_pass(skel, plan, false, out, progress);
}

Result<void> attach_perf(const watch_bpf* skel, AttachPlan& plan, Watch::Links& out, Progress& progress) {
  const auto& fns = *plan.functions;
  for (bool retprobe : {true, false}) {
    for (size_t i = 0; i < fns.size(); ++i) {
      if (plan.refused[i] || (retprobe && (*plan.returns)[i] != ReturnProbes::on)) continue;
      LIBBPF_OPTS(bpf_uprobe_opts, opts, .bpf_cookie = retprobe ? plan.slot(i) : plan.cookie(i), .retprobe = retprobe);
      auto path = uprobe__target_path(plan.pid, fns[i].object);
      bpf_link* link = bpf_program__attach_uprobe_opts(retprobe ? skel->progs.watch_return : skel->progs.watch_entry,
                                                       plan.pid, path.c_str(), fns[i].offset, &opts);
      progress.tick(++plan.done);
      if (link) {
        out.perf.push_back(link);
        out.perf_slot.push_back(static_cast<uint32_t>(plan.slot(i)));
        continue;
      }
      int err = errno;
      if (uprobe__refuses_offset(err) && process__alive(plan.pid)) {
        plan.refused[i] = err;  // this function only: the others go on
        continue;
      }
      return std::unexpected(Error{fmt::format("cannot attach a {} uprobe to {} ({}+{:#x}): {}", retprobe ? "return" : "entry",
                                               fns[i].name, fns[i].object, fns[i].offset, errno_text(err)),
                                   "", err});
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

// uprobe_multi unless this kernel truly has none: a refused offset is no reason to fall back.
Result<ProbeMechanism> choose_mechanism(ProbeMechanism asked) {
  if (asked == ProbeMechanism::automatic && perf_forced()) return ProbeMechanism::perf;
  if (asked == ProbeMechanism::perf) return asked;
  bool available = HOTFIX_TRY(uprobe_multi__available());
  if (available) return ProbeMechanism::uprobe_multi;
  if (asked == ProbeMechanism::uprobe_multi)
    return fail("this kernel has no uprobe_multi links (Linux 6.6+)", "use the automatic choice (perf uprobes)");
  return ProbeMechanism::perf;
}

// Return probes per function: asked for, except on Go code (never; observe/probe_safety.hpp)
// and past a replacement's entry (a return probe needs the return address on top of the stack).
std::vector<ReturnProbes> plan_returns(const std::vector<Function>& functions, bool wanted) {
  std::vector<ReturnProbes> out;
  for (auto& f : functions)
    out.push_back(probe__return_risk(f.object) == ReturnProbeRisk::go ? ReturnProbes::go
                  : wanted && !f.past_entry                            ? ReturnProbes::on
                                                                       : ReturnProbes::off);
  return out;
}

}  // namespace

Result<Watch> Watch::attach(pid_t pid, std::vector<Function> functions, const WatchOptions& opts) {
  HOTFIX_CHECK(process__check_alive(pid));
  if (functions.empty()) return fail("no functions to watch", "give at least one pattern that matches");
  HOTFIX_CHECK(probe__check_entries(pid, functions));
  auto t0 = std::chrono::steady_clock::now();
  Watch w;
  w.pid_ = pid;
  w.progress_ = opts.progress;
  w.links_ = std::make_unique<Links>();
  auto returns = plan_returns(functions, opts.returns);
  w.returns_ = std::find(returns.begin(), returns.end(), ReturnProbes::on) != returns.end();
  w.mechanism_ = HOTFIX_TRY(choose_mechanism(opts.mechanism));

  auto skel = load_skeleton(pid, functions.size(), w.returns_, w.mechanism_);
  if (!skel) return std::unexpected(explain_attach_failure(pid, skel.error()));
  w.skel_ = *skel;
  AttachPlan plan{pid, &functions, &returns, std::vector<int>(functions.size(), 0)};
  for (auto r : returns) plan.probes += r == ReturnProbes::on ? 2 : 1;
  Progress progress(opts.progress, "attaching", "probes", plan.probes);
  auto attached = w.mechanism_ == ProbeMechanism::uprobe_multi ? attach_multi(w.skel_, plan, *w.links_, progress)
                                                               : attach_perf(w.skel_, plan, *w.links_, progress);
  if (!attached) return std::unexpected(explain_attach_failure(pid, attached.error()));
  progress.finish();

  // Keep the functions that have their probes; each still counts in its own slot.
  for (size_t i = 0; i < functions.size(); ++i) {
    if (plan.refused[i]) {
      w.skipped_.push_back({functions[i], plan.refused[i], uprobe__refusal_text(plan.refused[i])});
      continue;
    }
    w.slots_.push_back(static_cast<uint32_t>(i));
    w.return_probes_.push_back(returns[i]);
    w.observed_.push_back(true);
    w.functions_.push_back(std::move(functions[i]));
  }
  if (w.functions_.empty())
    return fail(fmt::format("the kernel refused to probe every function asked for ({}: {})", w.skipped_.front().function.name,
                            w.skipped_.front().reason),
                "watch other functions");
  w.attach_ms_ = ms_since(t0);
  return w;
}

Watch::Watch(Watch&& o) noexcept
    : pid_(o.pid_),
      functions_(std::move(o.functions_)),
      return_probes_(std::move(o.return_probes_)),
      slots_(std::move(o.slots_)),
      observed_(std::move(o.observed_)),
      skipped_(std::move(o.skipped_)),
      progress_(std::move(o.progress_)),
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
    return_probes_ = std::move(o.return_probes_);
    slots_ = std::move(o.slots_);
    observed_ = std::move(o.observed_);
    skipped_ = std::move(o.skipped_);
    progress_ = std::move(o.progress_);
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
  if (links_) links_->release(progress_);
  links_.reset();  // links first: no probe may fire into a freed program
  if (skel_) watch_bpf__destroy(std::exchange(skel_, nullptr));
}

Result<void> Watch::reduce(const std::vector<ProbeCut>& cuts) {
  if (!skel_ || !links_) return fail("the watch is detached");
  // Which functions change, and so which links must be replaced: with uprobe_multi every link
  // of the function's object (a link holds many functions), with perf uprobes its own links.
  // The entry probe changes too when only the return probe goes: its cookie must then say
  // "no return probe", or every call would leave a frame in the in-flight table.
  std::set<std::string> objects;
  std::set<uint32_t> slots;
  for (size_t i = 0; i < cuts.size() && i < functions_.size(); ++i) {
    bool changes = observed_[i] && (cuts[i] == ProbeCut::drop ||
                                    (cuts[i] == ProbeCut::drop_return && return_probes_[i] == ReturnProbes::on));
    if (!changes) continue;
    if (cuts[i] == ProbeCut::drop) observed_[i] = false;
    if (return_probes_[i] == ReturnProbes::on) return_probes_[i] = ReturnProbes::budget;
    objects.insert(functions_[i].object);
    slots.insert(slots_[i]);
  }
  if (objects.empty()) return {};
  // What the new links cover: every still-observed function of the objects concerned (multi),
  // or the changed functions themselves (perf).
  std::vector<Function> relink;
  std::vector<ReturnProbes> returns;
  std::vector<uint32_t> relink_slots;
  bool multi = mechanism_ == ProbeMechanism::uprobe_multi;
  for (size_t i = 0; i < functions_.size(); ++i) {
    bool concerned = multi ? objects.count(functions_[i].object) > 0 : slots.count(slots_[i]) > 0;
    if (!concerned || !observed_[i]) continue;
    relink.push_back(functions_[i]), returns.push_back(return_probes_[i]), relink_slots.push_back(slots_[i]);
  }
  // Old links first: for a moment nothing counts, rather than both counting twice.
  links_->take(objects, slots).release(progress_);
  if (relink.empty()) return {};
  AttachPlan plan{pid_, &relink, &returns, std::vector<int>(relink.size(), 0)};
  plan.slots = &relink_slots;
  Progress progress(progress_, "re-attaching", "probes", relink.size());
  auto attached = multi ? attach_multi(skel_, plan, *links_, progress) : attach_perf(skel_, plan, *links_, progress);
  if (!attached) return std::unexpected(explain_attach_failure(pid_, attached.error()));
  return {};
}

size_t Watch::link_count() const { return links_ ? links_->multi.size() + links_->perf.size() : 0; }

Result<std::vector<CallCounts>> Watch::read() const {
  if (!skel_) return fail("the watch is detached");
  int ncpus = libbpf_num_possible_cpus();
  if (ncpus <= 0) return fail("cannot count the possible CPUs", "check /sys/devices/system/cpu/possible");
  std::vector<watch_counters> per_cpu(static_cast<size_t>(ncpus));
  std::vector<CallCounts> out(functions_.size());
  int fd = bpf_map__fd(skel_->maps.counters);
  for (size_t i = 0; i < out.size(); ++i) {
    uint32_t slot = slots_[i];
    if (bpf_map_lookup_elem(fd, &slot, per_cpu.data()) != 0)
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

uint64_t Watch::tracked_frames(pid_t tid, size_t i) const {
  if (!skel_ || i >= slots_.size()) return 0;
  watch_frame_key key{(static_cast<uint64_t>(pid_) << 32) | static_cast<uint32_t>(tid), slots_[i]};
  watch_frame frame{};
  if (bpf_map_lookup_elem(bpf_map__fd(skel_->maps.frames), &key, &frame) != 0) return 0;
  return frame.depth;
}

std::vector<uint32_t> bpf__link_ids() {
  std::vector<uint32_t> ids;
  uint32_t id = 0;
  while (bpf_link_get_next_id(id, &id) == 0) ids.push_back(id);
  return ids;
}

}  // namespace hotfix
