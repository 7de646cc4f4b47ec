#include "common/audit.hpp"

#include <elfutils/libdwelf.h>
#include <fcntl.h>
#include <libelf.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <syslog.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <ctime>
#include <fstream>

#include "common/error.hpp"
#include "common/json.hpp"
#include "common/unique_fd.hpp"

namespace hotfix {

namespace {

std::string hex(const void* data, size_t len) {
  std::string out;
  for (size_t i = 0; i < len; ++i) out += fmt::format("{:02x}", static_cast<const unsigned char*>(data)[i]);
  return out;
}

std::string build_id_of(int fd) {
  elf_version(EV_CURRENT);
  Elf* elf = elf_begin(fd, ELF_C_READ, nullptr);
  if (!elf) return "";
  const void* id = nullptr;
  ssize_t len = dwelf_elf_gnu_build_id(elf, &id);
  std::string out = len > 0 ? hex(id, static_cast<size_t>(len)) : "";
  elf_end(elf);
  return out;
}

std::string strings_json(const std::vector<std::string>& v) {
  std::string out;
  for (auto& s : v) out += (out.empty() ? "" : ",") + json__quote(s);
  return "[" + out + "]";
}

std::string optional_string(const std::string& s) { return s.empty() ? "null" : json__quote(s); }

// The login uid the kernel keeps across su/sudo (4294967295: not set, e.g. a daemon's).
std::string login_uid() {
  std::ifstream in("/proc/self/loginuid");
  std::string v;
  return in >> v && v.find_first_not_of("0123456789") == std::string::npos ? v : "null";
}

std::string sudo_uid() {
  const char* s = std::getenv("SUDO_UID");
  std::string v = s ? s : "";
  return !v.empty() && v.find_first_not_of("0123456789") == std::string::npos ? v : "null";
}

std::string utc_now(int64_t ns) {
  std::time_t secs = static_cast<std::time_t>(ns / 1000000000);
  std::tm tm{};
  ::gmtime_r(&secs, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  return fmt::format("{}.{:03}Z", buf, (ns / 1000000) % 1000);
}

// The directory exactly as it must be: ours, a real directory, 0700.
Result<UniqueFd> open_dir() {
  if (::mkdir(kAuditDir, 0700) != 0 && errno != EEXIST)
    return fail(fmt::format("cannot create {}: {}", kAuditDir, errno_text(errno)));
  UniqueFd dir(::open(kAuditDir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  struct stat st;
  if (!dir || ::fstat(dir.get(), &st) != 0) return fail(fmt::format("cannot open {}: {}", kAuditDir, errno_text(errno)));
  if (st.st_uid != ::geteuid()) return fail(fmt::format("{} is owned by uid {}, not by us", kAuditDir, st.st_uid));
  if ((st.st_mode & 07777) != 0700 && ::fchmod(dir.get(), 0700) != 0)
    return fail(fmt::format("cannot make {} 0700: {}", kAuditDir, errno_text(errno)));
  return dir;
}

Result<void> append(const std::string& line) {
  auto dir = HOTFIX_TRY(open_dir());
  UniqueFd fd(::openat(dir.get(), "audit.log", O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0600));
  struct stat st;
  if (!fd || ::fstat(fd.get(), &st) != 0) return fail(fmt::format("cannot open {}: {}", kAuditLog, errno_text(errno)));
  if (!S_ISREG(st.st_mode) || st.st_uid != ::geteuid())
    return fail(fmt::format("{} is not a regular file of ours", kAuditLog));
  if ((st.st_mode & 07777) != 0600) (void)::fchmod(fd.get(), 0600);
  std::string text = line + "\n";
  ssize_t n = ::write(fd.get(), text.data(), text.size());  // O_APPEND: one write, one whole line
  if (n != static_cast<ssize_t>(text.size()))
    return fail(fmt::format("cannot write {}: {}", kAuditLog, n < 0 ? errno_text(errno) : "short write"));
  return {};
}

// syslog(3) says nothing when nobody listens: ask /dev/log first.
Result<void> send_syslog(const AuditEntry& e, const std::string& line) {
  UniqueFd probe(::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "/dev/log");
  if (!probe || ::connect(probe.get(), reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0)
    return fail(fmt::format("syslog is not available (/dev/log: {}): this entry is only in {}", errno_text(errno), kAuditLog));
  bool warn = e.result != "ok" || !e.untrusted.empty();
  ::openlog("hotfix-ctl", LOG_PID | LOG_NDELAY, LOG_AUTHPRIV);
  ::syslog((warn ? LOG_WARNING : LOG_NOTICE) | LOG_AUTHPRIV, "audit %s", line.c_str());
  ::closelog();
  return {};
}

}  // namespace

AuditTarget audit__target(pid_t pid) {
  AuditTarget t;
  char buf[4096];
  ssize_t n = ::readlink(fmt::format("/proc/{}/exe", pid).c_str(), buf, sizeof buf - 1);
  if (n > 0) t.exe.assign(buf, static_cast<size_t>(n));
  // The inode the process runs, even if the file was replaced or deleted since.
  UniqueFd fd(::open(fmt::format("/proc/{}/exe", pid).c_str(), O_RDONLY | O_CLOEXEC));
  if (fd) t.build_id = build_id_of(fd.get());
  return t;
}

std::string audit__line(const AuditEntry& e) {
  int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::string ids;
  for (auto id : e.ids) ids += fmt::format("{}{}", ids.empty() ? "" : ",", id);
  return fmt::format(
      R"({{"time":"{}","time_ns":{},"verb":{},"ctl_pid":{},"uid":{},"euid":{},"sudo_uid":{},"loginuid":{},"pid":{},)"
      R"("exe":{},"build_id":{},"library":{},"sha256":{},"loaded_sha256":{},"functions":{},"ids":[{}],"result":{},)"
      R"("pause_us":{},"allow_untrusted_lib":{},"untrusted":{},"uncovered":{},"removed":{}}})",
      utc_now(ns), ns, json__quote(e.verb), ::getpid(), ::getuid(), ::geteuid(), sudo_uid(), login_uid(),
      e.pid ? std::to_string(e.pid) : "null", optional_string(e.target.exe), optional_string(e.target.build_id),
      optional_string(e.library), optional_string(e.sha256), optional_string(e.loaded_sha256), strings_json(e.functions),
      ids, json__quote(e.result), e.pause_us ? fmt::format("{:.1f}", *e.pause_us) : "null", e.allow_untrusted_lib,
      optional_string(e.untrusted), e.uncovered, strings_json(e.removed));
}

std::vector<std::string> audit__record(const AuditEntry& e) {
  std::vector<std::string> notes;
  std::string line = audit__line(e);
  if (auto ok = append(line); !ok) notes.push_back(ok.error().line());
  if (auto ok = send_syslog(e, line); !ok) notes.push_back(ok.error().line());
  return notes;
}

}  // namespace hotfix
