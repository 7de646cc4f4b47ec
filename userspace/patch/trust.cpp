#include "patch/trust.hpp"

#include <fcntl.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <deque>
#include <limits>

#include "common/unique_fd.hpp"
#include "observe/patchcount.hpp"

namespace hotfix {

namespace {

constexpr size_t kMaxLibrary = size_t{1} << 30;  // a fix library is kilobytes; refuse absurd files
constexpr int kMaxSymlinks = 40;                  // as the kernel's ELOOP limit

std::string mode_text(mode_t m) { return fmt::format("{:04o}", m & 07777); }

std::string join(const std::string& dir, const std::string& name) { return dir == "/" ? "/" + name : dir + "/" + name; }

std::string parent_of(const std::string& dir) {
  auto slash = dir.rfind('/');
  return slash == 0 || slash == std::string::npos ? "/" : dir.substr(0, slash);
}

std::deque<std::string> components(const std::string& path) {
  std::deque<std::string> out;
  size_t at = 0;
  while (at <= path.size()) {
    size_t next = path.find('/', at);
    if (next == std::string::npos) next = path.size();
    if (next > at) out.push_back(path.substr(at, next - at));
    at = next + 1;
  }
  return out;
}

// The walk: each directory is checked on the fd it is looked up through.
class Walker {
 public:
  explicit Walker(uid_t invoker) : invoker_(invoker) {}

  Result<UniqueFd> open(const std::string& absolute) {
    auto todo = components(absolute);
    HOTFIX_CHECK(enter_root());
    int hops = 0;
    while (!todo.empty()) {
      std::string name = todo.front();
      todo.pop_front();
      if (name == ".") continue;
      if (name == "..") {
        HOTFIX_CHECK(enter(UniqueFd(::openat(dir_.get(), "..", O_PATH | O_DIRECTORY | O_CLOEXEC)), parent_of(dir_name_)));
        continue;
      }
      std::string path = join(dir_name_, name);
      struct stat st;
      if (::fstatat(dir_.get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0) return missing(path, errno);
      if (entries_need_owner_ && !trusted(st.st_uid))
        note(fmt::format("{} is owned by {} in the sticky directory {}, which others may write", path,
                         trust__describe_uid(st.st_uid), dir_name_));
      if (S_ISLNK(st.st_mode)) {
        if (++hops > kMaxSymlinks) return fail(fmt::format("too many symlinks on the way to {}", absolute));
        auto target = HOTFIX_TRY(read_link(name, path));
        auto more = components(target);
        todo.insert(todo.begin(), more.begin(), more.end());
        if (target.starts_with("/")) HOTFIX_CHECK(enter_root());
        continue;
      }
      if (todo.empty()) return open_file(name, path);
      HOTFIX_CHECK(enter(UniqueFd(::openat(dir_.get(), name.c_str(), O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)), path));
    }
    return fail(fmt::format("{} names a directory, not a fix library", absolute), "give the path of the .so file");
  }

  const std::string& problem() const { return problem_; }

 private:
  bool trusted(uid_t uid) const { return uid == 0 || uid == invoker_; }
  void note(std::string problem) {
    if (problem_.empty()) problem_ = std::move(problem);
  }

  Result<UniqueFd> missing(const std::string& path, int err) {
    if (err == ENOENT) return fail(fmt::format("fix library {} does not exist", path), "check the path (built with `g++ -g -O2 -shared -fPIC fix.cpp -o fix.so`?)");
    return fail(fmt::format("cannot look up {}: {}", path, errno_text(err)));
  }

  Result<void> enter_root() { return enter(UniqueFd(::open("/", O_PATH | O_DIRECTORY | O_CLOEXEC)), "/"); }

  // Make `fd` (just opened, never through a symlink) the current directory, checking it.
  Result<void> enter(UniqueFd fd, const std::string& path) {
    if (!fd) return fail(fmt::format("cannot open the directory {}: {}", path, errno_text(errno)));
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) return fail(fmt::format("cannot stat {}: {}", path, errno_text(errno)));
    if (!trusted(st.st_uid)) note(fmt::format("the directory {} is owned by {}", path, trust__describe_uid(st.st_uid)));
    bool writable = st.st_mode & (S_IWGRP | S_IWOTH);
    entries_need_owner_ = writable && (st.st_mode & S_ISVTX);
    if (writable && !(st.st_mode & S_ISVTX))
      note(fmt::format("the directory {} is writable by {} (mode {})", path, st.st_mode & S_IWOTH ? "others" : "its group",
                       mode_text(st.st_mode)));
    dir_ = std::move(fd);
    dir_name_ = path;
    return {};
  }

  // The symlink's own owner, and what it points to, both from one fd of the link itself.
  Result<std::string> read_link(const std::string& name, const std::string& path) {
    UniqueFd link(::openat(dir_.get(), name.c_str(), O_PATH | O_NOFOLLOW | O_CLOEXEC));
    struct stat st;
    if (!link || ::fstat(link.get(), &st) != 0 || !S_ISLNK(st.st_mode))
      return fail(fmt::format("{} changed while it was checked", path), "retry");
    if (!trusted(st.st_uid)) note(fmt::format("the symlink {} is owned by {}", path, trust__describe_uid(st.st_uid)));
    std::string target(4096, '\0');
    ssize_t n = ::readlinkat(link.get(), "", target.data(), target.size());
    if (n < 0) return fail(fmt::format("cannot read the symlink {}: {}", path, errno_text(errno)));
    target.resize(static_cast<size_t>(n));
    return target;
  }

  Result<UniqueFd> open_file(const std::string& name, const std::string& path) {
    // O_NONBLOCK: a FIFO put there must not hang us; it is refused below as not regular.
    UniqueFd fd(::openat(dir_.get(), name.c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
    if (!fd) return fail(fmt::format("cannot open the fix library {}: {}", path, errno_text(errno)));
    struct stat st;
    if (::fstat(fd.get(), &st) != 0) return fail(fmt::format("cannot stat {}: {}", path, errno_text(errno)));
    if (!S_ISREG(st.st_mode))
      return fail(fmt::format("fix library {} is {}, not a shared library", path, fixlib__file_kind(st.st_mode)),
                  "give the path of the .so file");
    if (!trusted(st.st_uid)) note(fmt::format("{} is owned by {}", path, trust__describe_uid(st.st_uid)));
    if (st.st_mode & (S_IWGRP | S_IWOTH))
      note(fmt::format("{} is writable by {} (mode {})", path, st.st_mode & S_IWOTH ? "others" : "its group", mode_text(st.st_mode)));
    return fd;
  }

  uid_t invoker_;
  UniqueFd dir_;
  std::string dir_name_;
  bool entries_need_owner_ = false;
  std::string problem_;
};

bool same_file_state(const struct stat& a, const struct stat& b) {
  return a.st_size == b.st_size && a.st_mtim.tv_sec == b.st_mtim.tv_sec && a.st_mtim.tv_nsec == b.st_mtim.tv_nsec &&
         a.st_ino == b.st_ino && a.st_dev == b.st_dev;
}

Result<std::vector<uint8_t>> read_all(int fd, const std::string& path) {
  struct stat before, after;
  if (::fstat(fd, &before) != 0) return fail(fmt::format("cannot stat {}: {}", path, errno_text(errno)));
  if (static_cast<uint64_t>(before.st_size) > kMaxLibrary)
    return fail(fmt::format("fix library {} is {} bytes: too large for a fix", path, before.st_size));
  std::vector<uint8_t> bytes(static_cast<size_t>(before.st_size));
  size_t got = 0;
  while (got < bytes.size()) {
    ssize_t n = ::pread(fd, bytes.data() + got, bytes.size() - got, static_cast<off_t>(got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(fmt::format("cannot read {}: {}", path, errno_text(errno)));
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  if (::fstat(fd, &after) != 0 || got != bytes.size() || !same_file_state(before, after))
    return fail(fmt::format("fix library {} changed while it was read", path), "retry once nothing writes it");
  return bytes;
}

std::string absolute_of(const std::string& path) {
  if (path.starts_with("/")) return path;
  char cwd[4096];
  if (!::getcwd(cwd, sizeof cwd)) return path;
  return join(cwd, path);
}

}  // namespace

uid_t trust__invoker() {
  if (const char* sudo = std::getenv("SUDO_UID"); sudo && *sudo) {
    char* end = nullptr;
    unsigned long v = std::strtoul(sudo, &end, 10);
    if (*end == '\0' && v < std::numeric_limits<uid_t>::max()) return static_cast<uid_t>(v);
  }
  return ::getuid();
}

std::string trust__describe_uid(uid_t uid) {
  struct passwd pw, *found = nullptr;
  char buf[4096];
  if (::getpwuid_r(uid, &pw, buf, sizeof buf, &found) == 0 && found) return fmt::format("uid {} ({})", uid, pw.pw_name);
  return fmt::format("uid {}", uid);
}

Result<TrustedFix> trust__read_fix(const std::string& path, bool allow_untrusted) {
  if (path.empty()) return usage_error("the fix library path is empty", "give --lib fix.so");
  uid_t invoker = trust__invoker();
  Walker walker(invoker);
  auto fd = HOTFIX_TRY(walker.open(absolute_of(path)));
  TrustedFix out;
  if (!walker.problem().empty()) {
    if (!allow_untrusted)
      return fail(fmt::format("refusing the fix library {}: {}", path, walker.problem()),
                  fmt::format("only {} may be able to change a fix library and every directory and symlink on its "
                              "path; fix the owner or mode, or pass --allow-untrusted-lib to load it anyway (the audit "
                              "log records that)",
                              invoker == 0 ? std::string("root")
                                           : fmt::format("root and the invoking user ({})", trust__describe_uid(invoker))));
    out.untrusted = walker.problem();
  }
  out.image.path = path;
  out.image.bytes = HOTFIX_TRY(read_all(fd.get(), path));
  return out;
}

Result<void> hotfix_state__readable(pid_t pid, bool pins) {
  auto denied = [&](int err) -> Result<void> {
    if (err == EACCES || err == EPERM)
      return fail(fmt::format("cannot read the hotfix state of pid {}: permission denied", pid), "run as root");
    return {};
  };
  for (const char* leaf : {"maps", "mem"}) {
    UniqueFd fd(::open(fmt::format("/proc/{}/{}", pid, leaf).c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) HOTFIX_CHECK(denied(errno));
  }
  if (pins) {
    UniqueFd fd(::open(kPinRoot, O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!fd) HOTFIX_CHECK(denied(errno));
  }
  return {};
}

}  // namespace hotfix
