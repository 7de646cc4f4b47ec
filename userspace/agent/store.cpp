#include "agent/store.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "common/sha256.hpp"
#include "common/unique_fd.hpp"
#include "patch/journal.hpp"

namespace hotfix {

namespace {

constexpr size_t kMaxSetFile = 1 << 20;
constexpr size_t kMaxFix = size_t{1} << 30;

std::string mode_text(mode_t m) { return fmt::format("{:04o}", m & 07777); }

// The owner and mode rule for everything under the root: root's, writable by nobody else.
Result<void> check_owned(int fd, const std::string& path, bool directory) {
  struct stat st;
  if (::fstat(fd, &st) != 0) return fail(fmt::format("cannot stat {}: {}", path, errno_text(errno)));
  if (directory ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode))
    return fail(fmt::format("{} is not a {}", path, directory ? "directory" : "regular file"),
                "remove it; only hotfix-ctl writes the persisted state");
  if (st.st_uid != 0)
    return fail(fmt::format("{} is owned by uid {}, not root", path, st.st_uid),
                "persisted patch sets must be root's: remove it and record the set again");
  if (st.st_mode & (S_IWGRP | S_IWOTH))
    return fail(fmt::format("{} is writable by {} (mode {})", path, st.st_mode & S_IWOTH ? "others" : "its group",
                            mode_text(st.st_mode)),
                "persisted patch sets must be writable by root only: remove it and record the set again");
  if (!directory && st.st_nlink != 1)
    return fail(fmt::format("{} has {} hard links", path, st.st_nlink), "remove it and record the set again");
  return {};
}

// `name` under the checked directory `dir`, never through a symlink, checked the same way.
Result<UniqueFd> open_dir_at(int dir, const std::string& name, const std::string& path, bool create) {
  if (create && ::mkdirat(dir, name.c_str(), 0700) != 0 && errno != EEXIST)
    return fail(fmt::format("cannot create {}: {}", path, errno_text(errno)), "check that the disk is writable");
  UniqueFd fd(::openat(dir, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return fail(fmt::format("{} does not exist", path));
    if (errno == ELOOP || errno == ENOTDIR)
      return fail(fmt::format("{} is a symlink or not a directory", path), "remove it; hotfix follows no symlink there");
    return fail(fmt::format("cannot open {}: {}", path, errno_text(errno)));
  }
  HOTFIX_CHECK(check_owned(fd.get(), path, true));
  return fd;
}

// The root directory itself (created 0755 with its parents when `create`): its last
// component must not be a symlink, and it must be root's and not writable by others.
Result<UniqueFd> open_root(bool create) {
  std::string root = persist__root();
  if (create) {
    for (size_t at = 1; at != std::string::npos && at <= root.size();) {
      size_t next = root.find('/', at);
      std::string prefix = root.substr(0, next);
      if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST)
        return fail(fmt::format("cannot create {}: {}", prefix, errno_text(errno)));
      at = next == std::string::npos ? next : next + 1;
    }
  }
  UniqueFd fd(::open(root.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return fail(fmt::format("{} does not exist", root));
    return fail(fmt::format("cannot open the state directory {}: {}", root, errno_text(errno)),
                fmt::format("it must be a directory (not a symlink) owned by root; set {} to use another", kStateRootEnv));
  }
  HOTFIX_CHECK(check_owned(fd.get(), root, true));
  return fd;
}

Result<UniqueFd> open_persisted(bool create) {
  if (::geteuid() != 0)
    return fail("persisted patch sets are root's", "run hotfix-ctl as root");
  auto root = HOTFIX_TRY(open_root(create));
  return open_dir_at(root.get(), "persisted", persist__dir(), create);
}

Result<std::vector<uint8_t>> read_checked(int dir, const std::string& name, const std::string& path, size_t limit) {
  UniqueFd fd(::openat(dir, name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (!fd) {
    if (errno == ELOOP) return fail(fmt::format("{} is a symlink", path), "remove the set and record it again");
    return fail(fmt::format("cannot open {}: {}", path, errno_text(errno)));
  }
  HOTFIX_CHECK(check_owned(fd.get(), path, false));
  struct stat st;
  ::fstat(fd.get(), &st);
  if (static_cast<uint64_t>(st.st_size) > limit) return fail(fmt::format("{} is too large ({} bytes)", path, st.st_size));
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  size_t got = 0;
  while (got < bytes.size()) {
    ssize_t n = ::pread(fd.get(), bytes.data() + got, bytes.size() - got, static_cast<off_t>(got));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail(fmt::format("cannot read {}: {}", path, n < 0 ? errno_text(errno) : "short read"));
    got += static_cast<size_t>(n);
  }
  return bytes;
}

// Write `bytes` as `name` in `dir`, whole or not at all (a temporary name, then rename).
Result<void> write_atomically(int dir, const std::string& name, std::span<const uint8_t> bytes, mode_t mode,
                              const std::string& path) {
  std::string tmp = name + ".tmp";
  ::unlinkat(dir, tmp.c_str(), 0);
  UniqueFd fd(::openat(dir, tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode));
  if (!fd) return fail(fmt::format("cannot create {}: {}", path, errno_text(errno)));
  ::fchmod(fd.get(), mode);  // whatever the umask
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd.get(), bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail(fmt::format("cannot write {}: {}", path, errno_text(errno)), "check free disk space");
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0 || ::renameat(dir, tmp.c_str(), dir, name.c_str()) != 0)
    return fail(fmt::format("cannot write {}: {}", path, errno_text(errno)), "check free disk space");
  return {};
}

std::optional<uint64_t> number_of(const std::string& s) {
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

uint64_t read_counter(int dir, const char* name) {
  auto bytes = read_checked(dir, name, name, 64);
  if (!bytes) return 0;
  std::string s(bytes->begin(), bytes->end());
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return number_of(s).value_or(0);
}

Result<void> write_counter(int dir, const char* name, uint64_t value) {
  std::string s = fmt::format("{}\n", value);
  return write_atomically(dir, name, std::span(reinterpret_cast<const uint8_t*>(s.data()), s.size()), 0600,
                          persist__dir() + "/" + name);
}

// The exclusive lock of the persisted directory, held while the returned fd lives.
Result<UniqueFd> lock_store(int dir) {
  UniqueFd fd(::openat(dir, "lock", O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600));
  if (!fd) return fail(fmt::format("cannot open {}/lock: {}", persist__dir(), errno_text(errno)));
  if (::flock(fd.get(), LOCK_EX) != 0) return fail(fmt::format("cannot lock {}/lock: {}", persist__dir(), errno_text(errno)));
  return fd;
}

std::vector<std::string> entries_of(int dir) {
  std::vector<std::string> out;
  int copy = ::dup(dir);
  if (copy < 0) return out;
  DIR* d = ::fdopendir(copy);
  if (!d) {
    ::close(copy);
    return out;
  }
  ::rewinddir(d);
  while (auto* e = ::readdir(d)) {
    std::string name = e->d_name;
    if (name != "." && name != "..") out.push_back(name);
  }
  ::closedir(d);
  std::sort(out.begin(), out.end());
  return out;
}

bool is_hex(const std::string& s) {
  return !s.empty() && s.size() <= 128 && std::all_of(s.begin(), s.end(), [](char c) { return std::isxdigit(static_cast<unsigned char>(c)); });
}

std::string join_lines(const std::vector<std::string>& v) {
  std::string out;
  for (auto& s : v) out += (out.empty() ? "" : "\n") + s;
  return out;
}

std::vector<std::string> split_lines(const std::string& s) {
  std::vector<std::string> out;
  if (s.empty()) return out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

std::string encode_set(const PersistedSet& s) {
  auto r = journal__record("persist", s.id, "set");
  r.set("build_id", s.build_id).set("binary", s.binary).set("library", s.library).set("sha256", s.sha256);
  r.set("object", s.object).set("patterns", join_lines(s.patterns)).set("consistency", s.consistency);
  r.set("timeout_ms", s.timeout_ms).set("created_ns", s.created_ns);
  r.set("abi_check", s.abi_check ? "1" : "0").set("count", s.count ? "1" : "0");
  r.set("allow_uncovered", s.allow_uncovered ? "1" : "0");
  return journal__encode(r);
}

Result<void> decode_set(const std::string& text, PersistedSet& s) {
  auto r = journal__decode(text);
  if (!r || r->op != "persist" || r->step != "set") return fail("its record is damaged (bad checksum or format)");
  if (r->id != s.id) return fail(fmt::format("its record says set {}", r->id));
  s.build_id = r->get("build_id"), s.binary = r->get("binary"), s.library = r->get("library");
  s.sha256 = r->get("sha256"), s.object = r->get("object"), s.patterns = split_lines(r->get("patterns"));
  s.consistency = r->get("consistency");
  s.timeout_ms = r->number("timeout_ms"), s.created_ns = r->number("created_ns");
  s.abi_check = r->get("abi_check") != "0", s.count = r->get("count") != "0";
  s.allow_uncovered = r->get("allow_uncovered") == "1";
  if (s.sha256.size() != 64 || !is_hex(s.sha256) || s.binary.empty() || (s.consistency != "strict" && s.consistency != "entry"))
    return fail("its record is incomplete");
  return {};
}

PersistedSet read_set(int bid_dir, const std::string& build_id, uint32_t id, const std::string& dir_path) {
  PersistedSet s;
  s.id = id;
  s.build_id = build_id;
  s.dir = dir_path;
  auto problem = [&](const Error& e) { s.problem = e.line(); };
  auto dir = open_dir_at(bid_dir, std::to_string(id), dir_path, false);
  if (!dir) return problem(dir.error()), s;
  auto text = read_checked(dir->get(), "set", dir_path + "/set", kMaxSetFile);
  if (!text) return problem(text.error()), s;
  if (auto ok = decode_set(std::string(text->begin(), text->end()), s); !ok)
    return s.problem = fmt::format("{}/set: {}", dir_path, ok.error().what), s;
  if (s.build_id != build_id) s.problem = fmt::format("{}/set is for build-id {}, but lies under {}", dir_path, s.build_id, build_id);
  return s;
}

// Would `a` (recorded) patch a new process exactly as `b` (to record) does?
bool same_set(const PersistedSet& a, const PersistedSet& b) {
  return a.problem.empty() && a.build_id == b.build_id && a.binary == b.binary && a.sha256 == b.sha256 &&
         a.object == b.object && a.patterns == b.patterns && a.consistency == b.consistency &&
         a.abi_check == b.abi_check && a.count == b.count && a.allow_uncovered == b.allow_uncovered;
}

uint64_t realtime_ns() {
  timespec ts{};
  ::clock_gettime(CLOCK_REALTIME, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

}  // namespace

std::string persist__root() {
  const char* env = std::getenv(kStateRootEnv);
  std::string root = env && *env ? env : kDefaultStateRoot;
  while (root.size() > 1 && root.back() == '/') root.pop_back();
  return root;
}

std::string persist__dir() { return persist__root() + "/persisted"; }

Result<PersistedSet> persist__record(PersistedSet set, std::span<const uint8_t> fix_bytes) {
  if (!is_hex(set.build_id))
    return fail(fmt::format("{} has no build-id, by which persisted sets are keyed", set.binary),
                "link it with --build-id (GCC and clang on Debian do by default)");
  if (fix_bytes.size() > kMaxFix) return fail("the fix library is too large to persist");
  for (auto& p : set.patterns)
    if (p.find('\n') != std::string::npos) return usage_error("a pattern holds a newline");
  auto top = HOTFIX_TRY(open_persisted(true));
  auto lock = HOTFIX_TRY(lock_store(top.get()));
  set.sha256 = sha256__hex(fix_bytes);
  // Under the lock: parallel `patch --persist` runs of one --exe find each other's set.
  std::string bid_path = persist__dir() + "/" + set.build_id;
  if (auto d = open_dir_at(top.get(), set.build_id, bid_path, false))
    for (auto& name : entries_of(d->get()))
      if (auto n = number_of(name); n && *n < UINT32_MAX) {
        PersistedSet there = read_set(d->get(), set.build_id, static_cast<uint32_t>(*n), bid_path + "/" + name);
        if (same_set(there, set) && persist__verify(there)) {
          there.existing = true;
          return there;
        }
      }
  uint64_t next = std::max<uint64_t>(read_counter(top.get(), "next-id"), 1);
  for (auto& bid : entries_of(top.get()))  // never reuse an id, even if next-id was lost
    if (is_hex(bid))
      if (auto d = open_dir_at(top.get(), bid, persist__dir() + "/" + bid, false))
        for (auto& name : entries_of(d->get()))
          if (auto n = number_of(name)) next = std::max(next, *n + 1);
  set.id = static_cast<uint32_t>(next);
  if (!set.created_ns) set.created_ns = realtime_ns();
  auto bid = HOTFIX_TRY(open_dir_at(top.get(), set.build_id, bid_path, true));
  set.dir = bid_path + "/" + std::to_string(set.id);
  auto dir = HOTFIX_TRY(open_dir_at(bid.get(), std::to_string(set.id), set.dir, true));
  HOTFIX_CHECK(write_atomically(dir.get(), "fix.so", fix_bytes, 0600, set.fix_path()));
  std::string line = encode_set(set);
  HOTFIX_CHECK(write_atomically(dir.get(), "set", std::span(reinterpret_cast<const uint8_t*>(line.data()), line.size()),
                                0600, set.dir + "/set"));
  HOTFIX_CHECK(write_counter(top.get(), "next-id", next + 1));
  HOTFIX_CHECK(write_counter(top.get(), "generation", read_counter(top.get(), "generation") + 1));
  return set;
}

Result<std::vector<PersistedSet>> persist__list() {
  std::vector<PersistedSet> out;
  struct stat st;
  if (::lstat(persist__dir().c_str(), &st) != 0 && errno == ENOENT) return out;
  auto top = HOTFIX_TRY(open_persisted(false));
  for (auto& bid : entries_of(top.get())) {
    if (!is_hex(bid)) continue;  // lock, generation, next-id, temporaries
    std::string bid_path = persist__dir() + "/" + bid;
    auto d = open_dir_at(top.get(), bid, bid_path, false);
    if (!d) {
      PersistedSet broken;
      broken.build_id = bid, broken.dir = bid_path, broken.problem = d.error().line();
      out.push_back(broken);
      continue;
    }
    for (auto& name : entries_of(d->get()))
      if (auto id = number_of(name); id && *id < UINT32_MAX)
        out.push_back(read_set(d->get(), bid, static_cast<uint32_t>(*id), bid_path + "/" + name));
  }
  std::sort(out.begin(), out.end(), [](auto& a, auto& b) { return a.id < b.id; });
  return out;
}

Result<void> persist__verify(const PersistedSet& set) {
  if (!set.problem.empty()) return fail(fmt::format("persisted set {}: {}", set.id, set.problem));
  auto top = HOTFIX_TRY(open_persisted(false));
  auto bid = HOTFIX_TRY(open_dir_at(top.get(), set.build_id, persist__dir() + "/" + set.build_id, false));
  auto dir = HOTFIX_TRY(open_dir_at(bid.get(), std::to_string(set.id), set.dir, false));
  auto bytes = read_checked(dir.get(), "fix.so", set.fix_path(), kMaxFix);
  if (!bytes) return fail(fmt::format("persisted set {}: {}", set.id, bytes.error().what), bytes.error().hint);
  if (auto digest = sha256__hex(*bytes); digest != set.sha256)
    return fail(fmt::format("persisted set {}: {} was changed since it was recorded (sha256 {}, recorded {})", set.id,
                            set.fix_path(), digest.substr(0, 16), set.sha256.substr(0, 16)),
                fmt::format("refusing it; remove it with `hotfix-ctl revert --persist --id {}` and record the fix again "
                            "with `patch --persist`", set.id));
  return {};
}

Result<void> persist__remove(uint32_t id) {
  auto top = HOTFIX_TRY(open_persisted(false));
  auto lock = HOTFIX_TRY(lock_store(top.get()));
  for (auto& bid : entries_of(top.get())) {
    if (!is_hex(bid)) continue;
    auto d = open_dir_at(top.get(), bid, persist__dir() + "/" + bid, false);
    if (!d) continue;
    std::string name = std::to_string(id);
    auto dir = open_dir_at(d->get(), name, persist__dir() + "/" + bid + "/" + name, false);
    if (!dir) continue;
    for (auto& entry : entries_of(dir->get())) ::unlinkat(dir->get(), entry.c_str(), 0);
    if (::unlinkat(d->get(), name.c_str(), AT_REMOVEDIR) != 0)
      return fail(fmt::format("cannot remove {}/{}/{}: {}", persist__dir(), bid, name, errno_text(errno)));
    ::unlinkat(top.get(), bid.c_str(), AT_REMOVEDIR);  // fails (and stays) while other sets are there
    HOTFIX_CHECK(write_counter(top.get(), "generation", read_counter(top.get(), "generation") + 1));
    return {};
  }
  return fail(fmt::format("there is no persisted patch set {}", id), "see `hotfix-ctl persisted`");
}

uint64_t persist__generation() {
  auto top = open_persisted(false);
  if (!top) return 0;
  return read_counter(top->get(), "generation");
}

}  // namespace hotfix
