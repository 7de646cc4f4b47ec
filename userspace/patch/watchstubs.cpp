// Counting trampolines for watch (see watchstubs.hpp for the rules).
#include "patch/watchstubs.hpp"

#include <bpf/bpf.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <set>
#include <thread>

#include "arch/arch.hpp"
#include "common/crashpoint.hpp"
#include "observe/patchcount.hpp"
#include "observe/probe_safety.hpp"
#include "patch/consistency.hpp"
#include "patch/counting.hpp"
#include "patch/adopt.hpp"
#include "patch/island_names.hpp"
#include "patch/journal.hpp"
#include "patch/recover.hpp"
#include "patch/switch.hpp"
#include "process/fdpass.hpp"
#include "process/maps.hpp"
#include "process/memory.hpp"
#include "process/ptrace.hpp"
#include "process/remote.hpp"

namespace hotfix {

namespace {

using namespace std::chrono;

const uint64_t kPage = static_cast<uint64_t>(::getpagesize());
constexpr const char* kMapName = "hotfix_watch";
constexpr size_t kCompareBytes = 32;  // live vs file: more than any jump covers

uint64_t round_up(uint64_t n, uint64_t to) { return (n + to - 1) / to * to; }

JournalRecord jr(uint32_t id, const char* step) { return journal__record("watch", id, step); }

Result<std::vector<uint8_t>> function_code(const ProcessMemory& mem, const Function& fn) {
  size_t len = std::max<size_t>(1, std::min<uint64_t>(fn.size, 1 << 16));
  return mem.read(fn.address, len);
}

bool patched_by_hotfix(const Registry& r, const Function& fn) {
  if (fn.object.starts_with(kFixCopyPrefix) || fn.object.find("/memfd:hotfix") != std::string::npos) return true;
  for (auto& p : r.patches)
    if (p.state == PatchState::active || !p.released)
      for (auto& f : p.functions)
        if (f.old_address == fn.address || f.new_address == fn.address) return true;
  return false;
}

// The counter map: one u64 per function, mmapable so the target's stubs add to it directly.
Result<UniqueFd> create_counter_map(uint32_t n) {
  LIBBPF_OPTS(bpf_map_create_opts, opts, .map_flags = BPF_F_MMAPABLE);
  int fd = bpf_map_create(BPF_MAP_TYPE_ARRAY, kMapName, sizeof(uint32_t), sizeof(uint64_t), std::max<uint32_t>(n, 1), &opts);
  if (fd < 0)
    return fail(fmt::format("cannot create the watch counters (a BPF array map): {}", errno_text(errno)),
                "check that the kernel has BPF (root, or CAP_BPF), or watch with --count uprobe");
  return UniqueFd(fd);
}

// The target's fd of our map: pinned for a moment where only the target's user can open it.
// A target without bpffs (a container) is handed our fd over a socketpair instead, as the
// patch counters are (process/fdpass.hpp).
Result<int> target_open_map(Tracee& t, pid_t tid, int map_fd, const FdpassNote& note) {
  HOTFIX_CHECK(bpffs__ensure_mounted());
  if (fdpass__target_lacks_bpffs(t.pid(), kBpffsMount)) return fdpass__send_to_target(t, tid, map_fd, note);
  std::string path = fmt::format("{}/hotfix-watch-{}-{}", kBpffsMount, t.pid(), ::getpid());
  ::unlink(path.c_str());
  if (bpf_obj_pin(map_fd, path.c_str()) != 0)
    return fail(fmt::format("cannot pin the watch counters at {}: {}", path, errno_text(errno)));
  auto [uid, gid] = [&] {
    struct stat st {};
    ::stat(fmt::format("/proc/{}", t.pid()).c_str(), &st);
    return std::pair{st.st_uid, st.st_gid};
  }();
  (void)::chown(path.c_str(), uid, gid);
  (void)::chmod(path.c_str(), 0600);
  auto fd = counting__remote_obj_get(t, tid, path);
  ::unlink(path.c_str());
  return fd;
}

// What one stop must put back, and what memory to give back afterwards.
struct TakeDown {
  std::vector<WatchStubRecord> sites;
  std::vector<std::pair<uint64_t, uint64_t>> pages;
  std::pair<uint64_t, uint64_t> counters{0, 0};
  HandoffLeftovers handoff;  // fds and scratch page a killed counters' handoff left
  uint64_t registry = 0;     // the registry this watch mapped, unmapped again once it records nothing
};

Result<void> update_registry(Tracee& t, const std::function<void(Registry&)>& change) {
  auto at = registry__locate(t.pid());
  if (!at) return {};
  auto registry = HOTFIX_TRY(registry__read(t.pid()));
  change(registry);
  return registry__write(t.memory(), *at, registry);
}

// perf names the trampolines whose entry jumps the registry records (observe/perfmap.hpp).
void sync_perfmap(pid_t pid, const std::function<void(const std::string&)>& note) {
  auto r = registry__read(pid);
  if (r && r->authentic) watch__sync_perfmap(pid, *r, note);
}

void forget_watch(Registry& r, uint32_t owner) {
  std::erase_if(r.watches, [&](auto& w) { return static_cast<uint32_t>(w.owner) == owner; });
}

// Stop-the-world checks, retried until `wait`: is any thread inside (pc or return address) `code`?
Result<std::string> still_inside(Tracee& t, const std::vector<AddressRange>& code, milliseconds wait,
                                 const std::function<void(const std::string&)>& progress) {
  if (code.empty()) return std::string();
  auto checker = HOTFIX_TRY(ConsistencyChecker::create(t.pid(), code));
  auto deadline = steady_clock::now() + wait;
  auto next_note = steady_clock::now() + seconds(1);
  std::string why;
  for (auto backoff = milliseconds(2);; backoff = std::min(backoff * 2, milliseconds(100))) {
    HOTFIX_CHECK(t.stop_all());
    auto blockers = checker.check(stopped_threads(t));
    HOTFIX_CHECK(t.resume_all());
    if (!blockers) return std::unexpected(blockers.error());
    if (blockers->empty()) return std::string();
    consistency__name_threads(*blockers);
    why = blocker__describe(blockers->front());
    if (steady_clock::now() >= deadline) return why;
    if (progress && steady_clock::now() >= next_note) {
      progress(fmt::format("waiting to free the trampolines: {}", why));
      next_note = steady_clock::now() + seconds(1);
    }
    std::this_thread::sleep_for(backoff);
  }
}

// A registry the watch mapped goes with it once it records nothing: a patch whose observe
// window made it, refused afterwards, must leave the target's mappings as they were. Only the
// mapping at the address we made is touched, and only while it holds no patch and no watch.
Result<void> unmap_made_registry(Tracee& t, pid_t tid, Journal& j, uint32_t id, uint64_t made) {
  if (!made || registry__locate(t.pid()) != made) return {};
  auto r = registry__read(t.pid());
  if (r && (!r->patches.empty() || !r->watches.empty() || r->pruned.count || r->next_id != 1)) return {};
  HOTFIX_CHECK(j.append(jr(id, "registry-removing").set("address", made)));
  crashpoint("watch: before registry munmap");
  HOTFIX_CHECK(remote__munmap(t, tid, made, kRegistrySize));
  crashpoint("watch: registry unmapped");
  return j.append(jr(id, "registry-removed"));
}

// Entries back in one stop, then the memory once no thread can be inside it. Shared by removal,
// a failed install and recovery; idempotent (it looks at the bytes and the mappings).
Result<std::vector<std::string>> take_down(Tracee& t, Journal& j, uint32_t id, const TakeDown& d, milliseconds wait,
                                           const std::function<void(const std::string&)>& progress) {
  std::vector<std::string> notes;
  HOTFIX_CHECK(j.append(jr(id, "removing")));
  std::vector<TextWrite> writes;
  std::vector<AddressRange> overwritten;
  bool foreign = false;
  for (auto& s : d.sites) {
    auto live = t.memory().read(s.address, s.written.size());
    if (!live || *live == s.original) continue;  // never written, or put back already
    if (*live != s.written) {  // a breakpoint or someone's patch on top of the jump: its trampoline must stay
      foreign = true;
      notes.push_back(fmt::format("the entry of {} was changed since the watch began ({}): its trampoline stays "
                                  "mapped; remove that tool's change, then run `hotfix-ctl recover --pid {}`",
                                  s.name, hex_bytes(*live), t.pid()));
      continue;
    }
    writes.push_back({s.address, s.written, s.original, s.name});
    overwritten.push_back(overwritten_range(s.address, s.written.size(), s.name));
  }
  auto restored = [&]() -> Result<void> {
    crashpoint("watch: in the stop, entries restored");
    HOTFIX_CHECK(update_registry(t, [&](Registry& r) {
      for (auto& w : r.watches)
        if (static_cast<uint32_t>(w.owner) == id) std::erase_if(w.stubs, [&](auto& st) {
            return std::any_of(writes.begin(), writes.end(), [&](auto& wr) { return wr.address == st.address; });
          });
    }));
    // Which entries are the file's again: recovery must not take a later patch's jump there
    // for a foreign change (the observe window restores its entries before the patch writes).
    std::string restored_at;
    for (auto& w : writes) restored_at += fmt::format("{}{:#x}", restored_at.empty() ? "" : ",", w.address);
    return j.append(jr(id, "restored").set("sites", writes.size()).set("addresses", restored_at));
  };
  if (!writes.empty()) {
    auto guard = HOTFIX_TRY(make_guard(t.pid(), Consistency::entry, overwritten, {}));
    HOTFIX_TRY(switch_when_quiet(t, guard, writes, restored, seconds(10), [](const ProgressEvent&) {}));
  } else {
    HOTFIX_CHECK(restored());
  }
  crashpoint("watch: entries restored");
  sync_perfmap(t.pid(), [&](const std::string& n) { notes.push_back(n); });
  if (foreign) {
    HOTFIX_CHECK(j.append(jr(id, "held")));
    return notes;
  }
  std::vector<AddressRange> code;
  for (auto& [a, len] : d.pages) code.push_back({a, a + len, "a watch trampoline"});
  auto inside = HOTFIX_TRY(still_inside(t, code, wait, progress));
  if (!inside.empty()) {
    HOTFIX_CHECK(j.append(jr(id, "held")));
    notes.push_back(fmt::format("the trampolines' memory stays mapped: {}; the next hotfix-ctl on pid {} frees it",
                                inside, t.pid()));
    return notes;
  }
  pid_t tid = t.threads().front().tid;
  HOTFIX_CHECK(t.stop_thread(tid));
  auto freed = [&]() -> Result<void> {
    crashpoint("watch: before freeing trampolines");
    for (auto& [a, len] : d.pages)
      if (recover__still_ours(t.pid(), a, len, false)) HOTFIX_CHECK(remote__munmap(t, tid, a, len));
    if (d.counters.first && recover__still_ours(t.pid(), d.counters.first, d.counters.second, true))
      HOTFIX_CHECK(remote__munmap(t, tid, d.counters.first, d.counters.second));
    recover__release_handoff(t, tid, d.handoff);
    crashpoint("watch: trampolines freed");
    HOTFIX_CHECK(j.append(jr(id, "released")));
    HOTFIX_CHECK(update_registry(t, [&](Registry& r) { forget_watch(r, id); }));
    HOTFIX_CHECK(unmap_made_registry(t, tid, j, id, d.registry));
    return j.append(jr(id, "done"));
  }();
  HOTFIX_CHECK(t.resume_thread(tid));
  HOTFIX_CHECK(std::move(freed));
  return notes;
}

// The registry mapping of the target, created if missing (as a patch does); `made` says where
// when this watch created it.
Result<uint64_t> ensure_registry(Tracee& t, pid_t tid, Journal& j, uint32_t id, uint64_t& made) {
  if (auto at = registry__locate(t.pid())) return *at;
  HOTFIX_CHECK(j.append(jr(id, "registry-creating")));
  crashpoint("watch: before registry mmap");
  auto memfd = HOTFIX_TRY(remote__map_memfd(t, tid, kRegistryName, kRegistrySize, PROT_READ | PROT_WRITE));
  made = memfd.address;
  crashpoint("watch: after registry mmap");
  HOTFIX_CHECK(j.append(jr(id, "registry-created").set("address", memfd.address).set("length", memfd.size)));
  HOTFIX_CHECK(remote__close(t, tid, memfd.fd));
  return memfd.address;
}

struct Candidate {
  Function fn;
  std::vector<uint8_t> code;
};

// A page of stubs within a jump's reach of `near`, from those mapped already or a new one.
Result<uint64_t> stub_slot(Tracee& t, pid_t tid, Journal& j, uint32_t id, WatchRecord& rec,
                           std::vector<uint64_t>& used, uint64_t near) {
  const uint64_t size = round_up(arch::counting_trampoline_max_size(), 16);
  auto reachable = [&](uint64_t a) {
    int64_t d = static_cast<int64_t>(a - near);
    int64_t reach = arch::near_jump_reach() - static_cast<int64_t>(kPage);
    return d > -reach && d < reach;
  };
  for (size_t i = 0; i < rec.pages.size(); ++i)
    if (used[i] + size <= rec.pages[i].second && reachable(rec.pages[i].first)) {
      uint64_t at = rec.pages[i].first + used[i];
      used[i] += size;
      return at;
    }
  HOTFIX_CHECK(j.append(jr(id, "stub-mapping").set("near", near).set("known", recover__anonymous_pages(t.pid()))));
  crashpoint("watch: before trampoline mmap");
  uint64_t at = HOTFIX_TRY(remote__mmap_near(t, tid, near, kPage, PROT_READ | PROT_EXEC));
  HOTFIX_CHECK(j.append(jr(id, "stub").set("address", at).set("length", kPage)));
  crashpoint("watch: after trampoline mmap");
  rec.pages.push_back({at, kPage});
  used.push_back(size);
  return at;
}

// Code outside a function may branch into the bytes its jump would cover: glibc's mempcpy
// entries jump to the instruction after memmove's first. check_entry sees the function's own
// body only, so scan every executable mapping of the object for direct branch encodings that
// land there (the byte-level pre-filter: a false hit only costs a uprobe instead).
void refuse_branched_into(const ProcessMemory& mem, pid_t pid, std::vector<Candidate>& candidates,
                          std::vector<TrampolineRefusal>& refused) {
  auto maps = process__read_maps(pid);
  if (!maps) return;
  std::set<std::string> objects;
  for (auto& c : candidates) objects.insert(c.fn.object);
  std::map<uint64_t, std::pair<uint64_t, size_t>> windows;  // first guarded byte -> (end, candidate)
  for (size_t i = 0; i < candidates.size(); ++i) {
    auto check = arch::check_entry(candidates[i].code, candidates[i].fn.address);
    windows[candidates[i].fn.address + 1] = {candidates[i].fn.address + std::max<size_t>(check.covered, 1), i};
  }
  auto window_of = [&](uint64_t a) -> std::optional<size_t> {
    auto it = windows.upper_bound(a);
    if (it == windows.begin()) return std::nullopt;
    --it;
    return a < it->second.first ? std::optional<size_t>(it->second.second) : std::nullopt;
  };
  // A hit inside another candidate's body is confirmed by decoding that body (its real branches).
  std::map<uint64_t, size_t> bodies;  // start -> candidate
  for (size_t i = 0; i < candidates.size(); ++i) bodies[candidates[i].fn.address] = i;
  std::map<size_t, std::set<uint64_t>> decoded;  // candidate -> its direct branch sites, by target window
  auto really_branches = [&](uint64_t site, uint64_t target) {
    auto it = bodies.upper_bound(site);
    if (it == bodies.begin()) return true;
    const Candidate& c = candidates[(--it)->second];
    if (site >= c.fn.address + c.code.size()) return true;  // unknown code: assume it does
    auto [d, fresh] = decoded.try_emplace(it->second);
    if (fresh)
      for (auto& b : arch::direct_branches(c.code, c.fn.address).branches) d->second.insert(b.site ^ (b.target << 1));
    return d->second.count(site ^ (target << 1)) != 0;
  };
  std::map<size_t, uint64_t> branched;  // candidate -> a site outside it
  for (auto& m : *maps) {
    if (!m.executable() || !objects.count(m.path)) continue;
    std::vector<uint8_t> text(m.end - m.start);
    text.resize(mem.read_bulk(m.start, text));
    for (auto& b : arch::branch_candidates(text, m.start, [&](uint64_t to) { return window_of(to).has_value(); })) {
      size_t i = *window_of(b.target);
      const Function& fn = candidates[i].fn;
      if (b.site >= fn.address && b.site < fn.address + std::max<uint64_t>(fn.size, 1)) continue;  // check_entry's part
      if (really_branches(b.site, b.target)) branched.emplace(i, b.site);
    }
  }
  if (branched.empty()) return;
  std::vector<Candidate> kept;
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (auto it = branched.find(i); it != branched.end())
      refused.push_back({candidates[i].fn, fmt::format("code outside it (at {:#x}) may branch into its first bytes", it->second)});
    else
      kept.push_back(std::move(candidates[i]));
  }
  candidates = std::move(kept);
}

}  // namespace

std::string watchstubs__refusal(const ProcessMemory& mem, const Registry& registry, const Function& fn, bool go) {
  if (go) return "Go code (the Go runtime's tracebacks do not know a trampoline's pc)";
  if (patched_by_hotfix(registry, fn)) return "patched by hotfix (its entry jump is the patch's)";
  if (registry.watch_stub_at(fn.address)) return "another hotfix-ctl watch counts it with a trampoline";
  auto code = function_code(mem, fn);
  if (!code) return fmt::format("its code cannot be read: {}", code.error().what);
  auto file = probe__file_bytes(mem.pid(), fn, std::min(kCompareBytes, code->size()));
  if (!file) return fmt::format("its bytes in {} cannot be read to compare", fn.object);
  std::span<const uint8_t> live(code->data(), file->size());
  if (!std::equal(file->begin(), file->end(), live.begin())) {
    auto at = probe__breakpoint_offset(live, *file);
    if (!at) return "its entry differs from the file (another tool changed it)";
    return *at == 0 ? "a breakpoint sits on its entry (someone else's uprobe, bpftrace or a debugger)"
                    : fmt::format("a breakpoint sits at +{:#x}, among its first bytes (someone else's uprobe, bpftrace or "
                                  "a debugger)", *at);
  }
  auto trial = arch::encode_counting_trampoline(*code, fn.address, fn.address, fn.address);
  if (!trial) return trial.error().what;
  return "";
}

Result<WatchStubs> WatchStubs::install(pid_t pid, const std::vector<Function>& functions, const WatchStubOptions& opts,
                                       std::vector<TrampolineRefusal>& refused) {
  WatchStubs out;
  out.pid_ = pid;
  // The registry gets our record: it must be this process's alone (patch/adopt.hpp).
  for (auto& line : HOTFIX_TRY(adopt__before_write(pid)))
    if (opts.progress) opts.progress(line);
  auto journal = HOTFIX_TRY(Journal::open(pid));
  auto registry = HOTFIX_TRY(registry__read(pid));
  HOTFIX_CHECK(registry__require_authentic(registry, pid));
  auto mem = HOTFIX_TRY(ProcessMemory::open(pid));
  std::vector<Candidate> candidates;
  auto go_objects = probe__go_objects(functions);
  for (auto& fn : functions) {
    bool go = std::find(go_objects.begin(), go_objects.end(), fn.object) != go_objects.end();
    std::string why = watchstubs__refusal(mem, registry, fn, go);
    if (!why.empty()) {
      refused.push_back({fn, why});
      continue;
    }
    candidates.push_back({fn, HOTFIX_TRY(function_code(mem, fn))});
  }
  refuse_branched_into(mem, pid, candidates, refused);
  if (candidates.empty()) return out;

  const uint32_t id = static_cast<uint32_t>(::getpid());
  WatchRecord& rec = out.record_;
  rec.owner = ::getpid();
  rec.owner_start = process__start_time(::getpid()).value_or(0);
  HOTFIX_CHECK(journal.append(jr(id, "begin").set("owner_start", rec.owner_start)));
  auto tracee = HOTFIX_TRY(Tracee::seize(pid));
  auto undo = [&](Error e) -> Result<WatchStubs> {
    TakeDown d{rec.stubs, rec.pages, {rec.counters, rec.counters_len}, {}, out.made_registry_};
    if (auto r = take_down(tracee, journal, id, d, seconds(3), nullptr); !r)
      e.what += fmt::format("; undoing it failed too: {} (the next hotfix-ctl on pid {} retries)", r.error().what, pid);
    return std::unexpected(std::move(e));
  };

  out.map_ = HOTFIX_TRY(create_counter_map(static_cast<uint32_t>(candidates.size())));
  out.view_len_ = round_up(candidates.size() * sizeof(uint64_t), kPage);
  void* view = ::mmap(nullptr, out.view_len_, PROT_READ, MAP_SHARED, out.map_.get(), 0);
  if (view == MAP_FAILED) return fail(fmt::format("cannot map the watch counters: {}", errno_text(errno)));
  out.view_ = view;

  pid_t tid = tracee.threads().front().tid;
  HOTFIX_CHECK(tracee.stop_thread(tid));
  std::vector<TextWrite> writes;
  std::vector<AddressRange> overwritten;
  auto prepared = [&]() -> Result<uint64_t> {
    HOTFIX_CHECK(journal.append(jr(id, "counters-mapping").set("known", recover__bpf_map_pages(pid))));
    crashpoint("watch: before counters");
    // Each fd and page the handoff makes in the target is journaled (recover.hpp), so that a
    // kill midway leaves none of them behind.
    CountingLeftovers left;
    bpf_map_info info{};
    uint32_t info_len = sizeof info;
    if (bpf_obj_get_info_by_fd(out.map_.get(), &info, &info_len) == 0) left.map_id = info.id;
    auto note = [&](const FdpassLeftovers& h) {
      left.handoff = h;
      auto r = jr(id, "counters-handoff");
      (void)journal.append(recover__note_handoff(r, left));
    };
    note(left.handoff);
    int fd = HOTFIX_TRY(target_open_map(tracee, tid, out.map_.get(), note));
    auto at = remote__mmap(tracee, tid, 0, out.view_len_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    (void)remote__close(tracee, tid, fd);  // the mapping keeps the map alive
    rec.counters = HOTFIX_TRY(std::move(at));
    rec.counters_len = out.view_len_;
    HOTFIX_CHECK(journal.append(jr(id, "counters-mapped").set("address", rec.counters).set("length", rec.counters_len)));
    crashpoint("watch: after counters");
    std::vector<uint64_t> used;
    for (auto& c : candidates) {
      uint64_t slot = rec.counters + out.functions_.size() * sizeof(uint64_t);
      uint64_t at_stub = HOTFIX_TRY(stub_slot(tracee, tid, journal, id, rec, used, c.fn.address));
      auto tramp = arch::encode_counting_trampoline(c.code, c.fn.address, at_stub, slot);
      auto jump = arch::encode_entry_jump(c.fn.address, at_stub);
      if (!tramp || !jump) {
        refused.push_back({c.fn, tramp ? "its trampoline is out of a jump's reach" : tramp.error().what});
        continue;
      }
      HOTFIX_CHECK(tracee.memory().write(at_stub, tramp->code));
      std::vector<uint8_t> original(c.code.begin(), c.code.begin() + arch::entry_jump_size());
      rec.stubs.push_back({c.fn.mangled, c.fn.address, at_stub, original, *jump});
      out.functions_.push_back(c.fn);
      writes.push_back({c.fn.address, original, *jump, c.fn.name});
      overwritten.push_back(overwritten_range(c.fn.address, tramp->covered, c.fn.name));
    }
    crashpoint("watch: trampolines written");
    return ensure_registry(tracee, tid, journal, id, out.made_registry_);
  }();
  HOTFIX_CHECK(tracee.resume_thread(tid));
  if (!prepared) return undo(prepared.error());
  if (writes.empty()) {  // every candidate was refused at its real address
    (void)undo(Error{"none", ""});
    out.functions_.clear();
    return out;
  }
  for (auto& w : writes)
    HOTFIX_CHECK(journal.append(
        jr(id, "switching").set("address", w.address).set("expected", hex_bytes(w.expected)).set("bytes", hex_bytes(w.bytes))));
  auto guard = make_guard(pid, Consistency::entry, overwritten, {});
  if (!guard) return undo(guard.error());
  uint64_t registry_at = *prepared;
  auto commit = [&]() -> Result<void> {
    crashpoint("watch: in the stop, jumps written");
    auto r = HOTFIX_TRY(registry__read(pid));
    r.watches.push_back(rec);
    HOTFIX_CHECK(registry__write(tracee.memory(), registry_at, r));
    return journal.append(jr(id, "committed"));
  };
  auto progress = [&](const ProgressEvent& e) {
    if (opts.progress) opts.progress(e.text);
  };
  crashpoint("watch: before the switch");
  if (auto sw = switch_when_quiet(tracee, *guard, writes, commit, opts.timeout, progress); !sw) return undo(sw.error());
  crashpoint("watch: after the switch");
  out.installed_ = true;
  sync_perfmap(pid, [&](const std::string& n) { out.notes_.push_back(n); });
  return out;
}

WatchStubs::WatchStubs(WatchStubs&& o) noexcept
    : pid_(o.pid_), functions_(std::move(o.functions_)), record_(std::move(o.record_)), map_(std::move(o.map_)),
      view_(o.view_), view_len_(o.view_len_), installed_(o.installed_), made_registry_(o.made_registry_),
      notes_(std::move(o.notes_)) {
  o.view_ = nullptr;
  o.installed_ = false;
}

WatchStubs& WatchStubs::operator=(WatchStubs&& o) noexcept {
  if (this != &o) {
    this->~WatchStubs();
    new (this) WatchStubs(std::move(o));
  }
  return *this;
}

WatchStubs::~WatchStubs() {
  if (installed_) (void)remove(seconds(3));
  if (view_) ::munmap(view_, view_len_);
}

std::vector<uint64_t> WatchStubs::read() const {
  std::vector<uint64_t> out(functions_.size());
  auto* slots = static_cast<const uint64_t*>(view_);
  for (size_t i = 0; i < out.size(); ++i) out[i] = __atomic_load_n(&slots[i], __ATOMIC_RELAXED);
  return out;
}

Result<std::vector<std::string>> WatchStubs::remove(milliseconds wait,
                                                    const std::function<void(const std::string&)>& progress) {
  if (!installed_) return std::vector<std::string>{};
  installed_ = false;
  if (!process__alive(pid_)) return std::vector<std::string>{};
  // Forks made while we watched keep their trampolines and must keep their record of them.
  for (auto& line : HOTFIX_TRY(adopt__before_write(pid_)))
    if (progress) progress(line);
  auto journal = HOTFIX_TRY(Journal::open(pid_));
  auto tracee = HOTFIX_TRY(Tracee::seize(pid_));
  TakeDown d{record_.stubs, record_.pages, {record_.counters, record_.counters_len}, {}, made_registry_};
  auto r = take_down(tracee, journal, static_cast<uint32_t>(record_.owner), d, wait, progress);
  return or_target_gone(tracee, std::move(r));
}

std::string watchstubs__refused_line(const std::vector<TrampolineRefusal>& refused) {
  std::vector<std::pair<std::string, std::vector<std::string>>> by_reason;
  for (auto& r : refused) {
    auto it = std::find_if(by_reason.begin(), by_reason.end(), [&](auto& b) { return b.first == r.reason; });
    if (it == by_reason.end()) by_reason.push_back({r.reason, {}}), it = by_reason.end() - 1;
    it->second.push_back(r.function.name);
  }
  std::string line = fmt::format("{} function{} counted by uprobe, not by a trampoline:", refused.size(),
                                 refused.size() == 1 ? "" : "s");
  size_t shown = 0;
  for (auto& [reason, names] : by_reason) {
    std::string list;
    for (auto& n : names)
      if (shown++ < 16) list += (list.empty() ? "" : ", ") + n;
    if (!list.empty()) line += fmt::format(" {} ({});", list, reason);
  }
  if (shown > 16) line += fmt::format(" and {} more;", shown - 16);
  line.pop_back();
  return line;
}

bool watchstubs__owner_alive(const std::vector<JournalRecord>& records) {
  if (records.empty()) return false;
  auto* begin = &records.front();
  pid_t owner = static_cast<pid_t>(begin->id);
  if (owner == ::getpid()) return true;  // this process: a live watch of ours
  auto start = process__start_time(owner);
  return start && *start == begin->number("owner_start");
}

Result<std::string> watchstubs__recover(Tracee& t, Journal& j, uint32_t id, const std::vector<JournalRecord>& records) {
  TakeDown d;
  std::set<uint64_t> known_anon;
  bool unrecorded_page = false, unrecorded_counters = false;
  std::string known_bpf;
  std::set<uint64_t> restored;  // entries an earlier take-down put back already
  for (auto& r : records)
    if (r.step == "restored")
      for (auto a : journal__parse_addresses(r.get("addresses"))) restored.insert(a);
  for (auto& r : records) {
    if (r.step == "switching" && restored.count(r.number("address"))) continue;
    if (r.step == "switching") {
      auto expected = journal__parse_bytes(r.get("expected")), bytes = journal__parse_bytes(r.get("bytes"));
      if (expected && bytes && expected->size() == bytes->size() && !expected->empty())
        d.sites.push_back({fmt::format("the function at {:#x}", r.number("address")), r.number("address"), 0, *expected, *bytes});
    } else if (r.step == "stub-mapping") {
      unrecorded_page = true;
      for (auto a : journal__parse_addresses(r.get("known"))) known_anon.insert(a);
    } else if (r.step == "stub") {
      unrecorded_page = false;
      d.pages.push_back({r.number("address"), r.number("length")});
    } else if (r.step == "counters-mapping") {
      unrecorded_counters = true;
      known_bpf = r.get("known");
    } else if (r.step == "counters-mapped") {
      unrecorded_counters = false;
      d.counters = {r.number("address"), r.number("length")};
    } else if (r.step == "counters-handoff") {
      d.handoff = recover__handoff_leftovers(t, r);  // the last snapshot counts
    } else if (r.step == "registry-created") {
      d.registry = r.number("address");
    } else if (r.step == "registry-creating") {  // killed right after the mmap: the one there is ours
      d.registry = registry__locate(t.pid()).value_or(0);
    }
  }
  // Killed right after a mmap, before its record: the one new mapping of that kind, still empty.
  if (auto maps = process__read_maps(t.pid()); maps && (unrecorded_page || unrecorded_counters)) {
    auto bpf_known = journal__parse_addresses(known_bpf);
    for (auto& m : *maps) {
      bool anon_x = m.path.empty() && m.perms == "r-xp" && m.end - m.start == kPage;
      if (unrecorded_page && anon_x && !known_anon.count(m.start) &&
          std::none_of(d.pages.begin(), d.pages.end(), [&](auto& p) { return p.first == m.start; })) {
        auto bytes = t.memory().read(m.start, kPage);
        if (bytes && std::all_of(bytes->begin(), bytes->end(), [](uint8_t b) { return b == 0; }))
          d.pages.push_back({m.start, kPage});
      }
      if (unrecorded_counters && m.path.find("bpf-map") != std::string::npos &&
          std::find(bpf_known.begin(), bpf_known.end(), m.start) == bpf_known.end())
        d.counters = {m.start, m.end - m.start};
    }
  }
  auto notes = HOTFIX_TRY(take_down(t, j, id, d, seconds(3), nullptr));
  std::string what = fmt::format("its {} trampoline{} removed, the file's bytes back", d.sites.size(),
                                 d.sites.size() == 1 ? "" : "s");
  for (auto& n : notes) what += "; " + n;
  return what;
}

}  // namespace hotfix
