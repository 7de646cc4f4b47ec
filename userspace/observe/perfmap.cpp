#include "observe/perfmap.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <optional>
#include <fmt/format.h>

#include "common/unique_fd.hpp"

namespace hotfix {

namespace {

constexpr const char* kTmp = "/tmp";
// Set on a map file hotfix-ctl created (only root can set trusted.*): such a file may be
// removed once nothing is left in it; a file the target made is never removed.
constexpr const char* kCreatedXattr = "trusted.hotfix.created";

std::string file_name(pid_t pid) { return fmt::format("perf-{}.map", pid); }

// The uid the target runs as (the owner of /proc/PID), or root's when it is gone.
uid_t target_uid(pid_t pid) {
  struct stat st {};
  return ::stat(fmt::format("/proc/{}", pid).c_str(), &st) == 0 ? st.st_uid : 0;
}

struct MapFile {
  UniqueFd dir, fd;
  std::string name;
  bool created_by_us = false;
};

Result<void> check_opened(const MapFile& f, pid_t pid, const std::string& path) {
  struct stat st {};
  if (::fstat(f.fd.get(), &st) != 0) return fail(fmt::format("cannot stat {}: {}", path, errno_text(errno)));
  auto refuse = [&](const std::string& why) {
    return fail(fmt::format("{} is {}: left alone, perf will not name hotfix's code in pid {}", path, why, pid),
                "remove it if it is not the target's own perf map (see docs/safety.md)");
  };
  if (!S_ISREG(st.st_mode)) return refuse("not a regular file");
  if (st.st_nlink != 1) return refuse(fmt::format("a file with {} hard links", st.st_nlink));
  if (st.st_uid != 0 && st.st_uid != target_uid(pid))
    return refuse(fmt::format("owned by uid {}, neither root nor the target's user", st.st_uid));
  return {};
}

// Open /tmp/perf-PID.map for reading and writing (creating it if `create`), locked against
// other hotfix-ctl; an absent file without `create` gives an empty MapFile.
Result<MapFile> open_map(pid_t pid, bool create) {
  MapFile f;
  f.name = file_name(pid);
  std::string path = perfmap__path(pid);
  f.dir = UniqueFd(::open(kTmp, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!f.dir) return fail(fmt::format("cannot open {}: {}", kTmp, errno_text(errno)));
  // O_APPEND: a JIT appending at the same time never has its line overwritten by ours.
  const int flags = O_RDWR | O_APPEND | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC;
  f.fd = UniqueFd(::openat(f.dir.get(), f.name.c_str(), flags));
  if (!f.fd && errno == ENOENT && create) {
    // O_EXCL: never open, as root, a file someone else put here in between.
    f.fd = UniqueFd(::openat(f.dir.get(), f.name.c_str(), flags | O_CREAT | O_EXCL, 0644));
    if (f.fd) {
      f.created_by_us = true;
      (void)::fchmod(f.fd.get(), 0644);  // perf runs as any user; the umask may be tighter
      (void)::fsetxattr(f.fd.get(), kCreatedXattr, "1", 1, 0);
    } else if (errno == EEXIST) {
      f.fd = UniqueFd(::openat(f.dir.get(), f.name.c_str(), flags));
    }
  }
  if (!f.fd) {
    if (errno == ENOENT) return f;
    if (errno == ELOOP) return fail(fmt::format("{} is a symbolic link: left alone, perf will not name hotfix's code in pid {}", path, pid),
                                    "remove the link (see docs/safety.md)");
    return fail(fmt::format("cannot open {}: {}", path, errno_text(errno)));
  }
  HOTFIX_CHECK(check_opened(f, pid, path));
  if (::flock(f.fd.get(), LOCK_EX) != 0) return fail(fmt::format("cannot lock {}: {}", path, errno_text(errno)));
  if (!f.created_by_us) f.created_by_us = ::fgetxattr(f.fd.get(), kCreatedXattr, nullptr, 0) >= 0;
  return f;
}

Result<std::string> read_all(int fd, const std::string& path) {
  std::string text;
  char buf[65536];
  for (off_t at = 0;;) {
    ssize_t n = ::pread(fd, buf, sizeof buf, at);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail(fmt::format("cannot read {}: {}", path, errno_text(errno)));
    if (n == 0) return text;
    text.append(buf, static_cast<size_t>(n));
    at += n;
  }
}

Result<void> write_all(int fd, std::string_view text, const std::string& path) {
  while (!text.empty()) {
    ssize_t n = ::write(fd, text.data(), text.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail(fmt::format("cannot write {}: {}", path, errno_text(errno)));
    text.remove_prefix(static_cast<size_t>(n));
  }
  return {};
}

std::string_view name_of_line(std::string_view line) {
  for (int field = 0; field < 2; ++field) {
    size_t sp = line.find(' ');
    if (sp == std::string_view::npos) return {};
    line.remove_prefix(sp + 1);
  }
  return line;
}

std::string format_line(const PerfMapEntry& e) {
  std::string name = e.name.starts_with(kPerfMapOurs) ? e.name : std::string(kPerfMapOurs) + e.name;
  std::replace_if(name.begin(), name.end(), [](char c) { return c == '\n' || c == '\r'; }, ' ');
  return fmt::format("{:x} {:x} {}\n", e.start, e.size, name);
}

// Rewrite the file keeping the lines `keep` accepts, then append `extra`. The text is read
// again until its size holds still, so a JIT line appended meanwhile is kept (a line written
// in the instant between the last read and the truncation could still be lost: JIT runtimes
// do not lock the file).
Result<void> rewrite(MapFile& f, pid_t pid, auto keep, const std::vector<PerfMapEntry>& extra) {
  std::string path = perfmap__path(pid);
  std::string text;
  for (int tries = 0;; ++tries) {
    text = HOTFIX_TRY(read_all(f.fd.get(), path));
    struct stat st {};
    if (::fstat(f.fd.get(), &st) != 0 || static_cast<size_t>(st.st_size) == text.size() || tries == 5) break;
  }
  std::string kept;
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find('\n', at);
    std::string_view line(text.data() + at, (end == std::string::npos ? text.size() : end) - at);
    at = end == std::string::npos ? text.size() : end + 1;
    if (keep(line)) kept.append(line).push_back('\n');
  }
  for (auto& e : extra) kept += format_line(e);
  if (kept == text) return {};
  if (kept.empty() && f.created_by_us) {
    if (::unlinkat(f.dir.get(), f.name.c_str(), 0) != 0 && errno != ENOENT)
      return fail(fmt::format("cannot remove {}: {}", path, errno_text(errno)));
    return {};
  }
  if (::ftruncate(f.fd.get(), 0) != 0) return fail(fmt::format("cannot truncate {}: {}", path, errno_text(errno)));
  return write_all(f.fd.get(), kept, path);
}

std::optional<uint64_t> hex_field(std::string_view s) {
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v, 16);
  if (ec != std::errc() || p != s.data() + s.size() || s.empty()) return std::nullopt;
  return v;
}

std::optional<uint64_t> start_of_line(std::string_view line) {
  return hex_field(line.substr(0, line.find(' ')));
}

bool ours(std::string_view line) { return name_of_line(line).starts_with(kPerfMapOurs); }

}  // namespace

std::string perfmap__path(pid_t pid) { return fmt::format("{}/{}", kTmp, file_name(pid)); }

Result<void> perfmap__add(pid_t pid, uint64_t start, uint64_t size, const std::string& name) {
  auto f = HOTFIX_TRY(open_map(pid, true));
  std::string path = perfmap__path(pid);
  std::string line = format_line({start, size, name});
  // A JIT's last line without its newline would swallow ours.
  struct stat st {};
  if (::fstat(f.fd.get(), &st) == 0 && st.st_size > 0) {
    char last = '\n';
    if (::pread(f.fd.get(), &last, 1, st.st_size - 1) == 1 && last != '\n') line.insert(line.begin(), '\n');
  }
  return write_all(f.fd.get(), line, path);
}

Result<void> perfmap__remove(pid_t pid, uint64_t start) {
  auto f = HOTFIX_TRY(open_map(pid, false));
  if (!f.fd) return {};
  return rewrite(f, pid, [&](std::string_view line) { return !(ours(line) && start_of_line(line) == start); }, {});
}

Result<void> perfmap__sync(pid_t pid, std::string_view owned, const std::vector<PerfMapEntry>& entries) {
  auto f = HOTFIX_TRY(open_map(pid, !entries.empty()));
  if (!f.fd) return {};
  return rewrite(f, pid, [&](std::string_view line) { return !name_of_line(line).starts_with(owned); }, entries);
}

Result<void> perfmap__forget(pid_t pid) {
  auto f = HOTFIX_TRY(open_map(pid, false));
  if (!f.fd) return {};
  return rewrite(f, pid, [](std::string_view line) { return !ours(line); }, {});
}

std::vector<PerfMapEntry> perfmap__read(pid_t pid) {
  std::vector<PerfMapEntry> out;
  UniqueFd fd(::open(perfmap__path(pid).c_str(), O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC));
  if (!fd) return out;
  auto text = read_all(fd.get(), perfmap__path(pid));
  if (!text) return out;
  size_t at = 0;
  while (at < text->size()) {
    size_t end = text->find('\n', at);
    std::string_view line(text->data() + at, (end == std::string::npos ? text->size() : end) - at);
    at = end == std::string::npos ? text->size() : end + 1;
    size_t sp1 = line.find(' ');
    if (sp1 == std::string_view::npos) continue;
    size_t sp2 = line.find(' ', sp1 + 1);
    if (sp2 == std::string_view::npos) continue;
    auto start = hex_field(line.substr(0, sp1));
    auto size = hex_field(line.substr(sp1 + 1, sp2 - sp1 - 1));
    if (start && size) out.push_back({*start, *size, std::string(line.substr(sp2 + 1))});
  }
  return out;
}

std::vector<pid_t> perfmap__pids() {
  std::vector<pid_t> out;
  DIR* d = ::opendir(kTmp);
  if (!d) return out;
  while (auto* e = ::readdir(d)) {
    std::string_view n(e->d_name);
    if (!n.starts_with("perf-") || !n.ends_with(".map")) continue;
    n.remove_prefix(5);
    n.remove_suffix(4);
    pid_t pid = 0;
    auto [p, ec] = std::from_chars(n.data(), n.data() + n.size(), pid);
    if (ec == std::errc() && p == n.data() + n.size() && pid > 0) out.push_back(pid);
  }
  ::closedir(d);
  return out;
}

}  // namespace hotfix
