#include "observe/patchcount.hpp"

#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "arch/arch.hpp"
#include "observe/uprobe_multi.hpp"
#include "patchcount.h"
#include "patchcount.skel.h"
#include "process/maps.hpp"

namespace hotfix {

namespace fs = std::filesystem;

namespace {

constexpr unsigned long kBpffsMagic = 0xcafe4a11;  // BPF_FS_MAGIC

int libbpf_quiet(enum libbpf_print_level, const char* fmt, va_list args) {
  // libbpf's chatter would break the one-line error rule; HOTFIX_DEBUG_LIBBPF=1 shows it.
  static const bool debug = std::getenv("HOTFIX_DEBUG_LIBBPF") != nullptr;
  return debug ? std::vfprintf(stderr, fmt, args) : 0;
}

std::string pid_dir(pid_t pid) { return fmt::format("{}/{}", kPinRoot, pid); }

// Field 22 of /proc/PID/stat: when the process started. 0 if it is gone.
uint64_t process_start_time(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string line;
  if (!std::getline(in, line)) return 0;
  auto paren = line.rfind(')');  // the command name may contain spaces and parentheses
  if (paren == std::string::npos) return 0;
  std::istringstream rest(line.substr(paren + 2));
  std::string field;
  for (int i = 3; i <= 22 && rest >> field; ++i)
    if (i == 22) return std::strtoull(field.c_str(), nullptr, 10);
  return 0;
}

uint64_t realtime_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

// A root-only directory: created 0700, or made so (an older build created them 0755).
Result<void> make_dir(const std::string& path, mode_t mode) {
  if (::mkdir(path.c_str(), mode) != 0 && errno != EEXIST)
    return fail(fmt::format("cannot create {}: {}", path, errno_text(errno)), "is the BPF filesystem mounted read-write?");
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != ::geteuid())
    return fail(fmt::format("{} is not a directory of ours", path), "remove it (`hotfix-ctl gc` cannot)");
  if ((st.st_mode & 07777) != mode && ::chmod(path.c_str(), mode) != 0)
    return fail(fmt::format("cannot make {} mode {:o}: {}", path, mode, errno_text(errno)));
  return {};
}

// Unpin every object of a pin directory and remove it (unpinning a link detaches it).
Result<void> remove_pin_dir(const std::string& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) return {};
  for (auto& entry : fs::directory_iterator(dir, ec)) {
    // Unpinning alone releases a link from a kernel work item, later: the old-code probes'
    // int3 bytes would linger in the target for a while. Holding our own reference across the
    // unlink makes the close below the last one, and closing a link detaches it synchronously.
    UniqueFd last(bpf_obj_get(entry.path().c_str()));
    if (::unlink(entry.path().c_str()) != 0 && errno != ENOENT)
      return fail(fmt::format("cannot unpin {}: {}", entry.path().string(), errno_text(errno)));
  }
  if (::rmdir(dir.c_str()) != 0 && errno != ENOENT)
    return fail(fmt::format("cannot remove {}: {}", dir, errno_text(errno)));
  return {};
}

void remove_if_empty(const std::string& dir) { ::rmdir(dir.c_str()); }

std::optional<patchcount_meta> read_meta(const std::string& dir) {
  UniqueFd fd(bpf_obj_get((dir + "/meta").c_str()));
  if (!fd) return std::nullopt;
  uint32_t zero = 0;
  patchcount_meta m{};
  if (bpf_map_lookup_elem(fd.get(), &zero, &m) != 0) return std::nullopt;
  return m;
}

// Do the counters in `dir` belong to the process that has `pid` now?
bool belongs_to_live_process(pid_t pid, const std::string& dir) {
  if (!process__alive(pid)) return false;
  auto m = read_meta(dir);
  return !m || m->start_time == process_start_time(pid);  // no meta: being created, keep
}

// The skeleton for the pins (no program) or for the old-code probes (count_old_exit, on the
// pinned maps of `reuse`), maps sized for `n` functions.
Result<patchcount_bpf*> open_skeleton(uint32_t n, bool old_exit_program, const std::string& reuse) {
  libbpf_set_print(libbpf_quiet);
  patchcount_bpf* skel = patchcount_bpf__open();
  if (!skel) return fail(fmt::format("cannot open the patchcount BPF object: {}", errno_text(errno)));
  bpf_program__set_autoload(skel->progs.count_old_exit, old_exit_program);
  bpf_program__set_autoload(skel->progs.sample_caller, false);
  uprobe_multi__prepare(skel->progs.count_old_exit);
  bpf_map__set_max_entries(skel->maps.new_hits, n);
  bpf_map__set_max_entries(skel->maps.old_hits, n);
  bpf_map__set_max_entries(skel->maps.callers, 1);  // --callers only (observe/callers.cpp)
  if (!reuse.empty()) {
    for (auto [map, name] : {std::pair{skel->maps.new_hits, "new_hits"}, {skel->maps.old_hits, "old_hits"}, {skel->maps.meta, "meta"}}) {
      UniqueFd fd(bpf_obj_get(fmt::format("{}/{}", reuse, name).c_str()));
      if (!fd || bpf_map__reuse_fd(map, fd.get()) != 0) {
        int err = errno;
        patchcount_bpf__destroy(skel);
        return fail(fmt::format("cannot open the pinned map {}/{}: {}", reuse, name, errno_text(err)),
                    "the patch has no counters (see `hotfix-ctl stats`)");
      }
    }
  }
  if (int err = patchcount_bpf__load(skel); err != 0) {
    patchcount_bpf__destroy(skel);
    return fail(fmt::format("cannot load the patchcount BPF object: {}", errno_text(-err)),
                "check that the kernel has BPF and uprobes; HOTFIX_DEBUG_LIBBPF=1 shows libbpf's details");
  }
  return skel;
}

struct SkelGuard {
  patchcount_bpf* skel;
  ~SkelGuard() { patchcount_bpf__destroy(skel); }
};

Result<void> pin(int fd, const std::string& path) {
  if (bpf_obj_pin(fd, path.c_str()) != 0)
    return fail(fmt::format("cannot pin {}: {}", path, errno_text(errno)), "is the BPF filesystem mounted at /sys/fs/bpf?");
  if (::chmod(path.c_str(), 0600) != 0) {  // root's alone, whatever the umask
    ::unlink(path.c_str());
    return fail(fmt::format("cannot make {} 0600: {}", path, errno_text(errno)));
  }
  return {};
}

Result<void> create_pins(const PatchCounters& c, const patchcount_bpf* skel, pid_t pid) {
  uint32_t zero = 0;
  patchcount_meta m{process_start_time(pid), realtime_ns(), static_cast<unsigned>(pid), c.id, c.nfunctions, 0};
  if (bpf_map_update_elem(bpf_map__fd(skel->maps.meta), &zero, &m, BPF_ANY) != 0)
    return fail(fmt::format("cannot write the counters' identity: {}", errno_text(errno)));
  HOTFIX_CHECK(pin(bpf_map__fd(skel->maps.meta), c.dir + "/meta"));
  HOTFIX_CHECK(pin(bpf_map__fd(skel->maps.old_hits), c.old_hits_path));
  HOTFIX_CHECK(pin(bpf_map__fd(skel->maps.new_hits), c.new_hits_path));
  return {};  // a target that is not root opens new_hits through patchcount__handoff
}

UniqueFd dup_fd(int fd) { return UniqueFd(::fcntl(fd, F_DUPFD_CLOEXEC, 3)); }

}  // namespace

Result<void> bpffs__ensure_mounted() {
  struct statfs st;
  if (::statfs(kBpffsMount, &st) == 0 && static_cast<unsigned long>(st.f_type) == kBpffsMagic) return {};
  ::mkdir(kBpffsMount, 0755);
  if (::mount("bpf", kBpffsMount, "bpf", 0, nullptr) != 0)
    return fail(fmt::format("cannot mount the BPF filesystem at {}: {}", kBpffsMount, errno_text(errno)),
                "run as root, or mount it: mount -t bpf bpf /sys/fs/bpf");
  return {};
}

std::string patchcount__dir(pid_t pid, uint32_t id) { return fmt::format("{}/{}/{}", kPinRoot, pid, id); }

size_t PatchCounters::mmap_size() const {
  size_t page = static_cast<size_t>(::getpagesize());
  return (std::max<size_t>(nfunctions, 1) * value_stride + page - 1) / page * page;
}

Result<PatchCounters> patchcount__create(pid_t pid, uint32_t id, uint32_t nfunctions) {
  if (nfunctions == 0) return fail("a patch without functions has nothing to count");
  HOTFIX_CHECK(process__check_alive(pid));
  HOTFIX_CHECK(bpffs__ensure_mounted());
  patchcount__gc();  // leftovers of processes that are gone, a reused pid's included
  PatchCounters c;
  c.pid = pid;
  c.id = id;
  c.nfunctions = nfunctions;
  c.dir = patchcount__dir(pid, id);
  c.new_hits_path = c.dir + "/new_hits";
  c.old_hits_path = c.dir + "/old_hits";
  HOTFIX_CHECK(make_dir(kPinRoot, 0700));
  HOTFIX_CHECK(make_dir(pid_dir(pid), 0700));
  if (::mkdir(c.dir.c_str(), 0700) != 0) {
    if (errno == EEXIST)
      return fail(fmt::format("patch {} of pid {} already has counters in {}", id, pid, c.dir),
                  "remove them with patchcount__remove first");
    return fail(fmt::format("cannot create {}: {}", c.dir, errno_text(errno)));
  }
  auto skel = open_skeleton(nfunctions, false, "");
  if (!skel) {
    remove_pin_dir(c.dir);
    return std::unexpected(skel.error());
  }
  SkelGuard guard{*skel};
  if (auto pinned = create_pins(c, *skel, pid); !pinned) {
    remove_pin_dir(c.dir);
    remove_if_empty(pid_dir(pid));
    return std::unexpected(pinned.error());
  }
  c.new_hits = dup_fd(bpf_map__fd((*skel)->maps.new_hits));
  c.old_hits = dup_fd(bpf_map__fd((*skel)->maps.old_hits));
  return c;
}

Result<std::string> patchcount__handoff(const PatchCounters& c, uid_t uid, gid_t gid) {
  // No dots: bpffs reserves names with dots (EPERM).
  std::string dir = fmt::format("{}/hotfix-handoff-{}-{}", kBpffsMount, c.pid, c.id);
  (void)remove_pin_dir(dir);  // a crashed hotfix-ctl's
  if (::mkdir(dir.c_str(), 0700) != 0) return fail(fmt::format("cannot create {}: {}", dir, errno_text(errno)));
  std::string path = dir + "/new_hits";
  // Everything is in place before the target's user owns anything here.
  auto made = [&]() -> Result<void> {
    HOTFIX_CHECK(pin(c.new_hits.get(), path));
    if (::chown(path.c_str(), uid, gid) != 0 || ::chown(dir.c_str(), uid, gid) != 0)
      return fail(fmt::format("cannot give {} to the target's user: {}", path, errno_text(errno)));
    return {};
  }();
  if (!made) {
    (void)remove_pin_dir(dir);
    return std::unexpected(made.error());
  }
  return path;
}

void patchcount__handoff_done(const std::string& path) {
  ::unlink(path.c_str());
  ::rmdir(fs::path(path).parent_path().c_str());
}

Result<OldCodeExits> patchcount__old_exits(pid_t pid, const Function& old_fn, uint32_t index) {
  if (old_fn.size == 0)
    return fail(fmt::format("{} has no size in its symbol table: its exits cannot be found", old_fn.name));
  // The file holds the function as it was before any jump was written over its entry.
  auto path = uprobe__target_path(pid, old_fn.object);
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fail(fmt::format("cannot open {}: {}", path, errno_text(errno)));
  std::vector<uint8_t> code(old_fn.size);
  if (::pread(fd.get(), code.data(), code.size(), static_cast<off_t>(old_fn.offset)) != static_cast<ssize_t>(code.size()))
    return fail(fmt::format("cannot read {} bytes of {} at offset {:#x} of {}", code.size(), old_fn.name, old_fn.offset, path));
  auto exits = arch::exit_points(code, old_fn.address);
  OldCodeExits out;
  out.index = index;
  out.object = old_fn.object;
  out.unresolved = exits.unresolved + (exits.decoded_all ? 0 : 1);
  for (uint64_t off : exits.offsets)
    if (off >= arch::entry_jump_size())  // the entry jump covers these bytes: never executed again
      out.offsets.push_back(old_fn.offset + off);
  return out;
}

Result<size_t> patchcount__attach_old(pid_t pid, uint32_t id, const std::vector<OldCodeExits>& functions,
                                      std::vector<std::string>* skipped) {
  HOTFIX_CHECK(process__check_alive(pid));
  std::string dir = patchcount__dir(pid, id);
  auto meta = read_meta(dir);
  if (!meta) return fail(fmt::format("patch {} of pid {} has no counters in {}", id, pid, dir), "create them first (patchcount__create)");
  std::map<std::string, UprobeMultiSpec> by_object;
  size_t probes = 0;
  for (auto& f : functions) {
    if (f.index >= meta->nfunctions)
      return fail(fmt::format("function index {} is out of the patch's {} counters", f.index, meta->nfunctions));
    auto& spec = by_object[f.object];
    spec.path = uprobe__target_path(pid, f.object);
    for (uint64_t off : f.offsets) {
      spec.offsets.push_back(off);
      spec.cookies.push_back(f.index);
      ++probes;
    }
  }
  if (probes == 0) return size_t{0};
  auto skel = HOTFIX_TRY(open_skeleton(meta->nfunctions, true, dir));
  SkelGuard guard{skel};
  std::vector<std::string> pinned;
  auto undo = [&] {
    for (auto& p : pinned) ::unlink(p.c_str());
  };
  for (auto& [object, spec] : by_object) {
    if (spec.offsets.empty()) continue;
    // An offset the kernel refuses is left out (and named), not a reason to count nothing.
    std::vector<UniqueFd> links;
    std::vector<RefusedOffset> refused;
    auto linked = uprobe_multi__link_skipping(bpf_program__fd(skel->progs.count_old_exit), spec, pid, false, links, refused);
    if (!linked) {
      undo();
      Error e = linked.error();
      e.exit_code = 1;
      if (!process__alive(pid)) e = Error{fmt::format("pid {} exited while attaching", pid), "nothing is left attached", 1};
      return std::unexpected(e);
    }
    for (auto& r : refused) {
      if (skipped) skipped->push_back(fmt::format("{}+{:#x} ({})", object, spec.offsets[r.index], uprobe__refusal_text(r.err)));
      --probes;
    }
    for (auto& link : links) {
      std::string path = pinned.empty() ? dir + "/old_exits" : fmt::format("{}/old_exits.{}", dir, pinned.size());
      if (auto ok = pin(link.get(), path); !ok) {
        undo();
        return std::unexpected(ok.error());
      }
      pinned.push_back(path);
    }
  }
  meta->exit_probes += static_cast<unsigned>(probes);
  uint32_t zero = 0;
  bpf_map_update_elem(bpf_map__fd(skel->maps.meta), &zero, &*meta, BPF_ANY);
  return probes;
}

Result<std::optional<PatchHits>> patchcount__read(pid_t pid, uint32_t id) {
  std::string dir = patchcount__dir(pid, id);
  auto meta = read_meta(dir);
  if (!meta) return std::optional<PatchHits>{};
  UniqueFd new_fd(bpf_obj_get((dir + "/new_hits").c_str()));
  UniqueFd old_fd(bpf_obj_get((dir + "/old_hits").c_str()));
  if (!new_fd || !old_fd) return fail(fmt::format("the counters in {} are incomplete: {}", dir, errno_text(errno)),
                                      "remove them with `hotfix-ctl gc` or revert the patch");
  PatchHits h;
  h.pid = pid;
  h.id = id;
  h.created_ns = meta->created_ns;
  h.exit_probes = meta->exit_probes;
  h.functions.resize(meta->nfunctions);
  for (uint32_t i = 0; i < meta->nfunctions; ++i) {
    if (bpf_map_lookup_elem(new_fd.get(), &i, &h.functions[i].new_hits) != 0 ||
        bpf_map_lookup_elem(old_fd.get(), &i, &h.functions[i].old_hits) != 0)
      return fail(fmt::format("cannot read the counters in {}: {}", dir, errno_text(errno)));
  }
  return std::optional<PatchHits>{std::move(h)};
}

std::vector<uint32_t> patchcount__ids(pid_t pid) {
  std::vector<uint32_t> ids;
  std::error_code ec;
  for (auto& entry : fs::directory_iterator(pid_dir(pid), ec)) {
    auto name = entry.path().filename().string();
    if (!name.empty() && name.find_first_not_of("0123456789") == std::string::npos)
      ids.push_back(static_cast<uint32_t>(std::stoul(name)));
  }
  std::sort(ids.begin(), ids.end());
  return ids;
}

Result<void> patchcount__remove(pid_t pid, uint32_t id) {
  HOTFIX_CHECK(remove_pin_dir(patchcount__dir(pid, id)));
  remove_if_empty(pid_dir(pid));
  return {};
}

namespace {

std::optional<pid_t> pid_of(const fs::path& p) {
  auto name = p.filename().string();
  if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
  return static_cast<pid_t>(std::stol(name));
}

void gc_pins(bool dry_run, GcReport& report) {
  std::error_code ec;
  for (auto& pid_entry : fs::directory_iterator(kPinRoot, ec)) {
    auto pid = pid_of(pid_entry.path());
    if (!pid) continue;
    for (auto& id_entry : fs::directory_iterator(pid_entry.path(), ec)) {
      std::string dir = id_entry.path().string();
      if (belongs_to_live_process(*pid, dir)) continue;
      if (!dry_run)
        if (auto ok = remove_pin_dir(dir); !ok) {
          report.errors.push_back(ok.error().line());
          continue;
        }
      report.removed.push_back(dir);
    }
    if (!dry_run) remove_if_empty(pid_entry.path().string());
  }
}

void gc_patch_files(bool dry_run, GcReport& report) {
  std::error_code ec;
  for (auto& entry : fs::directory_iterator(kPatchDir, ec)) {
    auto pid = pid_of(entry.path());
    if (!pid || process__alive(*pid)) continue;
    if (!dry_run) {
      std::error_code rm;
      fs::remove_all(entry.path(), rm);
      if (rm) {
        report.errors.push_back(fmt::format("cannot remove {}: {}", entry.path().string(), rm.message()));
        continue;
      }
    }
    report.removed.push_back(entry.path().string());
  }
}

}  // namespace

GcReport patchcount__gc(bool dry_run) {
  GcReport report;
  gc_pins(dry_run, report);
  gc_patch_files(dry_run, report);
  return report;
}

}  // namespace hotfix
