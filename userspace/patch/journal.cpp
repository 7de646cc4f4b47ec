// The journal (see journal.hpp).
#include "patch/journal.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "common/json.hpp"

namespace hotfix {

namespace {

// FNV-1a, 32 bits: enough to tell a torn or garbled line from a complete one.
uint32_t checksum(std::string_view s) {
  uint32_t h = 2166136261u;
  for (unsigned char c : s) h = (h ^ c) * 16777619u;
  return h;
}

constexpr std::string_view kSumKey = ",\"sum\":\"";

// A JSON string literal starting at s[i] == '"'; advances i past it. Only the escapes
// json__escape writes are understood (\uXXXX only below 0x80); anything else fails.
std::optional<std::string> parse_string(std::string_view s, size_t& i) {
  if (i >= s.size() || s[i] != '"') return std::nullopt;
  std::string out;
  for (++i; i < s.size(); ++i) {
    char c = s[i];
    if (c == '"') return ++i, out;
    if (c != '\\') {
      out += c;
      continue;
    }
    if (++i >= s.size()) return std::nullopt;
    switch (s[i]) {
      case '"': out += '"'; break;
      case '\\': out += '\\'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'u': {
        if (i + 4 >= s.size()) return std::nullopt;
        unsigned v = 0;
        auto [p, ec] = std::from_chars(s.data() + i + 1, s.data() + i + 5, v, 16);
        if (ec != std::errc() || p != s.data() + i + 5 || v >= 0x80) return std::nullopt;
        out += static_cast<char>(v);
        i += 4;
        break;
      }
      default: return std::nullopt;
    }
  }
  return std::nullopt;
}

// An unsigned decimal number starting at s[i]; advances i past it.
std::optional<uint64_t> parse_number(std::string_view s, size_t& i) {
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data() + i, s.data() + s.size(), v, 10);
  if (ec != std::errc() || p == s.data() + i) return std::nullopt;
  i = static_cast<size_t>(p - s.data());
  return v;
}

// A flat object of string and unsigned members, as journal__encode writes it.
std::optional<std::map<std::string, std::string>> parse_flat_object(std::string_view s) {
  std::map<std::string, std::string> out;
  size_t i = 0;
  if (s.empty() || s[i++] != '{') return std::nullopt;
  if (i < s.size() && s[i] == '}') return i + 1 == s.size() ? std::optional(out) : std::nullopt;
  for (;;) {
    auto key = parse_string(s, i);
    if (!key || i >= s.size() || s[i++] != ':') return std::nullopt;
    if (i >= s.size()) return std::nullopt;
    if (s[i] == '"') {
      auto v = parse_string(s, i);
      if (!v) return std::nullopt;
      out[*key] = *v;
    } else {
      auto v = parse_number(s, i);
      if (!v) return std::nullopt;
      out[*key] = std::to_string(*v);
    }
    if (i >= s.size()) return std::nullopt;
    if (s[i] == '}') return i + 1 == s.size() ? std::optional(out) : std::nullopt;
    if (s[i++] != ',') return std::nullopt;
  }
}

std::optional<uint64_t> to_number(const std::string& s) {
  if (s.empty()) return std::nullopt;
  uint64_t v = 0;
  int base = 10;
  size_t skip = 0;
  if (s.size() > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) base = 16, skip = 2;
  auto [p, ec] = std::from_chars(s.data() + skip, s.data() + s.size(), v, base);
  if (ec != std::errc() || p != s.data() + s.size()) return std::nullopt;
  return v;
}

}  // namespace

JournalRecord& JournalRecord::set(const std::string& key, const std::string& value) {
  fields[key] = value;
  return *this;
}
JournalRecord& JournalRecord::set(const std::string& key, uint64_t value) {
  fields[key] = fmt::format("{:#x}", value);
  return *this;
}
std::string JournalRecord::get(const std::string& key) const {
  auto it = fields.find(key);
  return it == fields.end() ? std::string() : it->second;
}
uint64_t JournalRecord::number(const std::string& key) const { return to_number(get(key)).value_or(0); }

JournalRecord journal__record(const std::string& op, uint32_t id, const std::string& step) {
  JournalRecord r;
  r.op = op;
  r.id = id;
  r.step = step;
  return r;
}

std::string journal__encode(const JournalRecord& r) {
  std::string body = fmt::format("{{\"seq\":{},\"op\":{},\"id\":{},\"step\":{}", r.seq, json__quote(r.op), r.id,
                                 json__quote(r.step));
  for (auto& [k, v] : r.fields)
    if (k != "seq" && k != "op" && k != "id" && k != "step" && k != "sum")
      body += fmt::format(",{}:{}", json__quote(k), json__quote(v));
  return fmt::format("{}{}{:08x}\"}}\n", body, kSumKey, checksum(body));
}

std::optional<JournalRecord> journal__decode(const std::string& line_in) {
  std::string_view line(line_in);
  while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.remove_suffix(1);
  // The checksum covers everything before `,"sum":"XXXXXXXX"}`.
  constexpr size_t tail = 8 + 2;  // 8 hex digits, then "}
  if (line.size() < kSumKey.size() + tail + 1) return std::nullopt;
  size_t at = line.size() - tail - kSumKey.size();
  if (line.substr(at, kSumKey.size()) != kSumKey || line.substr(line.size() - 2) != "\"}") return std::nullopt;
  uint32_t sum = 0;
  auto hex = line.substr(at + kSumKey.size(), 8);
  auto [p, ec] = std::from_chars(hex.data(), hex.data() + hex.size(), sum, 16);
  if (ec != std::errc() || p != hex.data() + hex.size() || sum != checksum(line.substr(0, at))) return std::nullopt;
  auto fields = parse_flat_object(line);
  if (!fields) return std::nullopt;
  JournalRecord r;
  auto seq = to_number((*fields)["seq"]), id = to_number((*fields)["id"]);
  if (!seq || !id || *id > UINT32_MAX) return std::nullopt;
  r.seq = *seq;
  r.id = static_cast<uint32_t>(*id);
  r.op = (*fields)["op"];
  r.step = (*fields)["step"];
  if (r.op.empty() || r.step.empty()) return std::nullopt;
  for (auto k : {"seq", "op", "id", "step", "sum"}) fields->erase(k);
  r.fields = std::move(*fields);
  return r;
}

std::optional<uint64_t> process__start_time(pid_t pid) {
  std::ifstream in(fmt::format("/proc/{}/stat", pid));
  std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto paren = stat.rfind(')');  // the command name may hold spaces and parentheses
  if (paren == std::string::npos) return std::nullopt;
  std::istringstream rest(stat.substr(paren + 1));
  std::string field;
  for (int i = 3; i <= 22; ++i)  // fields 3.. follow the name; the start time is field 22
    if (!(rest >> field)) return std::nullopt;
  return to_number(field);
}

std::optional<std::string> journal__dir(pid_t pid) {
  auto start = process__start_time(pid);
  if (!start) return std::nullopt;
  return fmt::format("{}{}-{}", kStateDir, pid, *start);
}

namespace {

Result<void> make_private_dir(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(dir).parent_path(), ec);
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
    return fail(fmt::format("cannot create the journal directory {}: {}", dir, errno_text(errno)),
                "hotfix-ctl needs a writable /run (run it as root)");
  struct stat st;
  if (::lstat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode) || st.st_uid != 0)
    return fail(fmt::format("the journal directory {} is not a directory owned by root", dir),
                "remove it; nothing but hotfix-ctl may write there");
  ::chmod(dir.c_str(), 0700);
  return {};
}

Result<void> take_lock(int fd, pid_t pid, bool wait) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(wait ? 30 : 0);
  while (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno != EWOULDBLOCK) return fail(fmt::format("cannot lock the journal of pid {}: {}", pid, errno_text(errno)));
    if (std::chrono::steady_clock::now() >= deadline)
      return fail(fmt::format("another hotfix-ctl is working on pid {}", pid), "wait for it to finish and retry");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return {};
}

}  // namespace

Result<Journal> Journal::open(pid_t pid, bool wait) {
  auto dir = journal__dir(pid);
  if (!dir) return fail(fmt::format("process {} is gone", pid), "check the pid with `ps`");
  HOTFIX_CHECK(make_private_dir(*dir));
  Journal j;
  j.pid_ = pid;
  j.dir_ = *dir;
  j.path_ = *dir + "/journal";
  j.fd_ = UniqueFd(::open(j.path_.c_str(), O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW, 0600));
  if (!j.fd_) return fail(fmt::format("cannot open the journal {}: {}", j.path_, errno_text(errno)));
  HOTFIX_CHECK(take_lock(j.fd_.get(), pid, wait));
  for (auto& r : j.read()) j.next_seq_ = std::max(j.next_seq_, r.seq + 1);
  return j;
}

Result<std::optional<Journal>> Journal::open_existing(pid_t pid, bool wait) {
  auto dir = journal__dir(pid);
  if (!dir || ::access((*dir + "/journal").c_str(), F_OK) != 0) return std::optional<Journal>{};
  return std::optional<Journal>{HOTFIX_TRY(open(pid, wait))};
}

Result<void> Journal::append(JournalRecord r) {
  r.seq = next_seq_++;
  std::string line = journal__encode(r);
  // A torn write would leave a partial line that the next record would be glued to: start
  // each record on a fresh line if the file does not end with one.
  off_t end = ::lseek(fd_.get(), 0, SEEK_END);
  if (end > 0) {
    char last = '\n';
    if (::pread(fd_.get(), &last, 1, end - 1) == 1 && last != '\n') line = "\n" + line;
  }
  ssize_t n = ::write(fd_.get(), line.data(), line.size());
  if (n != static_cast<ssize_t>(line.size()))
    return fail(fmt::format("cannot write the journal {}: {}", path_, n < 0 ? errno_text(errno) : "short write"),
                "free space in /run; nothing was changed by this step");
  return {};
}

std::vector<JournalRecord> Journal::read() const {
  std::vector<JournalRecord> out;
  std::ifstream in(path_);
  for (std::string line; std::getline(in, line);)
    if (auto r = journal__decode(line)) out.push_back(std::move(*r));
  return out;
}

void Journal::remove() {
  ::unlink(path_.c_str());
  ::rmdir(dir_.c_str());
}

std::vector<uint64_t> journal__parse_addresses(const std::string& list) {
  std::vector<uint64_t> out;
  for (size_t i = 0; i < list.size();) {
    size_t comma = std::min(list.find(',', i), list.size());
    JournalRecord r;
    r.set("v", list.substr(i, comma - i));
    if (uint64_t v = r.number("v")) out.push_back(v);
    i = comma + 1;
  }
  return out;
}

std::optional<std::vector<uint8_t>> journal__parse_bytes(const std::string& s) {
  std::vector<uint8_t> out;
  for (size_t i = 0; i < s.size();) {
    if (s[i] == ' ') {
      ++i;
      continue;
    }
    if (i + 1 >= s.size() || !std::isxdigit(static_cast<unsigned char>(s[i])) ||
        !std::isxdigit(static_cast<unsigned char>(s[i + 1])))
      return std::nullopt;
    out.push_back(static_cast<uint8_t>(std::stoul(s.substr(i, 2), nullptr, 16)));
    i += 2;
  }
  if (out.empty() || out.size() > 64) return std::nullopt;
  return out;
}

}  // namespace hotfix
