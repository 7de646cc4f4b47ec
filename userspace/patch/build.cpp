#include "patch/build.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "common/spawn.hpp"
#include "patch/fixlib.hpp"
#include "patch/stamp.hpp"
#include "process/maps.hpp"
#include "symbols/pattern.hpp"
#include "symbols/symbols.hpp"

extern char** environ;

namespace hotfix {

SourceLanguage build__language_of(const std::string& source) {
  auto dot = source.rfind('.');
  if (dot == std::string::npos) return SourceLanguage::unknown;
  std::string ext = source.substr(dot + 1);
  if (ext == "c") return SourceLanguage::c;
  if (ext == "cc" || ext == "cpp" || ext == "cxx" || ext == "c++" || ext == "C" || ext == "cp" || ext == "CPP")
    return SourceLanguage::cxx;
  return SourceLanguage::unknown;
}

// ---------------------------------------------------------------- the flag filter

namespace {

bool starts(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

// Why a -f/-m switch of the target's build is not given to the fix ("" = it is kept).
std::string why_dropped(const std::string& s) {
  static const char* position[] = {"-fPIE", "-fpie", "-fPIC", "-fpic", "-fno-PIE", "-fno-pie", "-fno-PIC", "-fno-pic"};
  if (std::any_of(std::begin(position), std::end(position), [&](const char* p) { return s == p; }))
    return "fix.so is a shared object: -fPIC";
  if (starts(s, "-flto") || starts(s, "-ffat-lto") || starts(s, "-fno-fat-lto") || starts(s, "-fuse-linker-plugin") ||
      starts(s, "-fwhole-program") || starts(s, "-fltrans") || starts(s, "-fwpa") || starts(s, "-fresolution") ||
      starts(s, "-fno-lto"))
    return "link-time optimization belongs to the target's own link, not to a library loaded beside it";
  if (starts(s, "-fprofile-") || starts(s, "-fauto-profile") || s == "-fbranch-probabilities" ||
      s == "-ftest-coverage" || starts(s, "-fcoverage"))
    return "profiling and coverage need the target's own profile data and runtime";
  if (starts(s, "-fdebug-prefix-map") || starts(s, "-ffile-prefix-map") || starts(s, "-fmacro-prefix-map") ||
      starts(s, "-fdebug-compilation-dir") || starts(s, "-fplugin") || s == "-fworking-directory" ||
      s == "-fpreprocessed")
    return "names a path or a stage of the target's build";
  if (starts(s, "-fvisibility")) return "the replacements must stay visible symbols";
  if (starts(s, "-fdump-") || starts(s, "-fdiagnostics") || starts(s, "-fmessage-length") || starts(s, "-fopt-info") ||
      s == "-fstack-usage" || starts(s, "-fcallgraph-info") || starts(s, "-fcolor-diagnostics") ||
      starts(s, "-fno-color-diagnostics") || s == "-fsyntax-only")
    return "diagnostics or dumps only";
  return "";
}

bool standard_is_cxx(const std::string& std_switch) { return std_switch.find("++") != std::string::npos; }

}  // namespace

FlagChoice build__select_flags(const Producer& producer, SourceLanguage language) {
  FlagChoice out;
  auto keep = [&](const std::string& s) {
    if (std::find(out.kept.begin(), out.kept.end(), s) == out.kept.end()) out.kept.push_back(s);
  };
  for (auto& s : producer.switches) {
    if (starts(s, "-std=")) {
      bool cxx = standard_is_cxx(s);
      if (cxx == (language == SourceLanguage::cxx)) keep(s);
      else out.dropped.emplace_back(s, fmt::format("a standard for {}, the fix is {}", cxx ? "C++" : "C",
                                                   source_language__name(language)));
    } else if (starts(s, "-O") || starts(s, "-D") || starts(s, "-U") || starts(s, "--param")) {
      keep(s);
    } else if (starts(s, "-f") || starts(s, "-m")) {
      auto why = why_dropped(s);
      if (why.empty()) keep(s);
      else out.dropped.emplace_back(s, why);
    }
    // Everything else (-g*, -W*, -I, -c, -o, -M*, -pie ...) does not shape the code or is ours to set.
  }
  return out;
}

// ---------------------------------------------------------------- the target object

namespace {

struct TargetObject {
  std::string path;       // as mapped / as given
  std::string open_path;  // how we can open it
  std::string build_id;
  std::string debug_file;
};

std::string read_exe(pid_t pid) {
  std::error_code ec;
  auto exe = std::filesystem::read_symlink(fmt::format("/proc/{}/exe", pid), ec).string();
  const std::string deleted = " (deleted)";
  if (exe.ends_with(deleted)) exe.resize(exe.size() - deleted.size());
  return exe;
}

Result<TargetObject> target_of_pid(pid_t pid, const std::string& object) {
  HOTFIX_CHECK(process__check_alive(pid));
  auto table = HOTFIX_TRY(SymbolTable::for_pid(pid));
  std::string exe = read_exe(pid);
  const ObjectInfo* found = nullptr;
  for (auto& o : table.objects()) {
    bool match = object.empty() ? o.path == exe : symbols__object_matches(o.path, object);
    if (match) {
      found = &o;
      break;
    }
  }
  if (!found) {
    if (object.empty()) return fail(fmt::format("cannot find the executable {} among the objects of pid {}", exe, pid),
                                    "name the object with --object");
    std::string names;
    for (auto& o : table.objects())
      names += (names.empty() ? "" : ", ") + std::filesystem::path(o.path).filename().string();
    return fail(fmt::format("no object '{}' is loaded in pid {}", object, pid), "the objects are: " + names);
  }
  return TargetObject{found->path, fmt::format("/proc/{}/root{}", pid, found->path), found->build_id,
                      found->debug_file};
}

Result<TargetObject> target_of_file(const std::string& given) {
  std::error_code ec;
  auto absolute = std::filesystem::weakly_canonical(given, ec);
  std::string path = ec ? given : absolute.string();  // the stamp names it as patch will see it mapped
  auto table = HOTFIX_TRY(SymbolTable::for_file(path));
  auto& o = table.objects().front();
  return TargetObject{path, path, o.build_id, o.debug_file};
}

// `name` in $PATH (a name with a '/' as is), or "".
std::string find_program(const std::string& name) {
  if (name.find('/') != std::string::npos) return ::access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = std::getenv("PATH");
  std::string dirs = path && *path ? path : "/usr/local/bin:/usr/bin:/bin";
  for (size_t at = 0; at <= dirs.size();) {
    size_t colon = dirs.find(':', at);
    if (colon == std::string::npos) colon = dirs.size();
    std::string candidate = dirs.substr(at, colon - at) + "/" + name;
    if (colon > at && ::access(candidate.c_str(), X_OK) == 0) return name;
    at = colon + 1;
  }
  return "";
}

// Run argv, return its stdout without trailing blanks (empty on any failure).
std::string capture(const std::vector<std::string>& argv) {
  std::string out = spawn__capture(argv).out;
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

// The compiler the producer names, preferring the same major version ("g++-12"), and what
// to say when the one found is another version.
std::string choose_compiler(const Producer& p, SourceLanguage language, std::vector<std::string>& notes) {
  bool clang = p.family == "clang";
  std::string base = clang ? (language == SourceLanguage::cxx ? "clang++" : "clang")
                           : (language == SourceLanguage::cxx ? "g++" : "gcc");
  if (p.family != "GCC" && !clang) return base;
  std::string chosen;
  if (p.major > 0) chosen = find_program(fmt::format("{}-{}", base, p.major));
  if (chosen.empty()) chosen = find_program(base);
  if (chosen.empty()) {
    notes.push_back(fmt::format("{} is not installed; install the target's compiler ({})", base,
                                producer__compiler(p)));
    return base;
  }
  std::string local = capture({chosen, "-dumpversion"});
  if (p.major > 0 && std::atoi(local.c_str()) != p.major)
    notes.push_back(fmt::format("the target was compiled by {} but {} is version {}: patch refuses a fix from "
                                "another major version; install {}-{}",
                                producer__compiler(p), chosen, local.empty() ? "unknown" : local, base, p.major));
  return chosen;
}

std::string shell_quote(const std::string& s) {
  if (!s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=+./:,%@") ==
                        std::string::npos)
    return s;
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

Result<void> write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  out.close();
  if (!out) return fail(fmt::format("cannot write {}: {}", path, errno_text(errno)), "check the directory");
  return {};
}

}  // namespace

Result<BuildPlan> build__plan(const BuildOptions& opts) {
  if ((opts.pid != 0) == !opts.binary.empty())
    return usage_error("give the target with either --pid PID [--object NAME] or --binary PATH");
  if (opts.sources.empty()) return usage_error("give the fix's sources (fix.c, fix.cpp ...)");
  if (opts.output.empty()) return usage_error("give the output with -o fix.so");
  BuildPlan plan;
  bool any_cxx = false, any_c = false;
  for (auto& s : opts.sources) {
    auto l = build__language_of(s);
    if (l == SourceLanguage::unknown)
      return usage_error(fmt::format("cannot tell the language of {}", s), "name C sources *.c and C++ sources *.cpp");
    (l == SourceLanguage::cxx ? any_cxx : any_c) = true;
  }
  plan.language = any_cxx ? SourceLanguage::cxx : SourceLanguage::c;

  auto target = opts.pid ? HOTFIX_TRY(target_of_pid(opts.pid, opts.object)) : HOTFIX_TRY(target_of_file(opts.binary));
  plan.object = target.path;
  plan.build_id = target.build_id;
  auto dwarf = producer__read_file(target.path, target.open_path, target.build_id, target.debug_file);
  const Producer* producer = dwarf.dominant(plan.language);
  Producer none;
  if (!producer) {
    plan.notes.push_back(fmt::format("no DW_AT_producer for {}: {}; building with plain defaults (-O2)", target.path,
                                     dwarf.why_none.empty() ? "its DWARF names no compiler" : dwarf.why_none));
    producer = &none;
  } else if (!producer->switches_recorded) {
    plan.notes.push_back(fmt::format("{} compiled {} without recording its switches ({}); building with plain "
                                     "defaults (-O2)",
                                     producer__compiler(*producer), target.path,
                                     producer->family == "clang" ? "clang needs -grecord-command-line"
                                                                 : "-gno-record-gcc-switches"));
  }
  plan.producer = producer->text;
  plan.flags = build__select_flags(*producer, plan.language);
  if (!std::any_of(plan.flags.kept.begin(), plan.flags.kept.end(), [](auto& s) { return starts(s, "-O"); }))
    plan.flags.kept.insert(plan.flags.kept.begin(), "-O2");
  if (producer->language != SourceLanguage::unknown && producer->language != plan.language)
    plan.notes.push_back(fmt::format("the target's code is {} and the fix is {}: only flags that mean the same in "
                                     "both are taken",
                                     source_language__name(producer->language), source_language__name(plan.language)));
  plan.compiler = opts.compiler.empty() ? choose_compiler(*producer, plan.language, plan.notes) : opts.compiler;

  if (plan.build_id.empty()) {
    plan.notes.push_back(fmt::format("{} has no build-id: fix.so is not stamped, so patch cannot check that it "
                                     "was built for this binary", target.path));
  } else {
    std::string ext = plan.language == SourceLanguage::cxx ? "cpp" : "c";
    plan.stamp_source = opts.stamp_source;
    if (plan.stamp_source.empty()) {
      char dir[] = "/tmp/hotfix-build-XXXXXX";
      if (!::mkdtemp(dir)) return fail(fmt::format("cannot create a temporary directory: {}", errno_text(errno)),
                                       "check that /tmp is writable");
      plan.temp_dir = dir;
      plan.stamp_source = plan.temp_dir + "/hotfix-stamp." + ext;
    }
    HOTFIX_CHECK(write_file(plan.stamp_source, stamp__source(Stamp{plan.build_id, plan.object})));
  }

  plan.command.push_back(plan.compiler);
  for (auto& f : plan.flags.kept) plan.command.push_back(f);
  for (auto& f : {"-shared", "-fPIC", "-g"}) plan.command.push_back(f);
  bool mixed = any_c && any_cxx;  // one C++ driver: C sources are named as such
  for (auto& s : opts.sources) {
    if (mixed && build__language_of(s) == SourceLanguage::c) {
      for (auto& a : {std::string("-x"), std::string("c"), s, std::string("-x"), std::string("none")})
        plan.command.push_back(a);
    } else {
      plan.command.push_back(s);
    }
  }
  if (!plan.stamp_source.empty()) plan.command.push_back(plan.stamp_source);
  plan.output = opts.output;
  plan.command.push_back("-o");
  plan.command.push_back(opts.output);
  for (auto& e : opts.extra) plan.command.push_back(e);
  return plan;
}

std::string build__command_line(const BuildPlan& plan) {
  std::string out;
  for (auto& a : plan.command) out += (out.empty() ? "" : " ") + shell_quote(a);
  return out;
}

Result<void> build__write_flags_file(const BuildPlan& plan, const std::string& path) {
  std::string text;
  for (auto& f : plan.flags.kept) {
    for (char c : f) {
      if (std::isspace(static_cast<unsigned char>(c)) || c == '\\' || c == '\'' || c == '"') text += '\\';
      text += c;
    }
    text += '\n';
  }
  return write_file(path, text);
}

void build__cleanup(const BuildPlan& plan) {
  if (plan.temp_dir.empty()) return;
  std::error_code ec;
  std::filesystem::remove_all(plan.temp_dir, ec);
}

Result<void> build__run(const BuildPlan& plan) {
  std::vector<char*> args;
  for (auto& a : plan.command) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  int rc = posix_spawnp(&pid, args[0], nullptr, nullptr, args.data(), environ);
  if (rc != 0) {
    build__cleanup(plan);
    return fail(fmt::format("cannot run {}: {}", plan.compiler, errno_text(rc)),
                "install it, or name another with --compiler");
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  build__cleanup(plan);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return fail(fmt::format("{} failed ({})", plan.compiler,
                            WIFEXITED(status) ? fmt::format("exit {}", WEXITSTATUS(status))
                                              : fmt::format("signal {}", WTERMSIG(status))),
                "fix the errors it printed above and run hotfix-ctl build again");
  if (plan.stamp_source.empty()) return {};
  const std::string& output = plan.output;
  auto image = HOTFIX_TRY(fixlib__load(output));
  auto stamps = HOTFIX_TRY(stamp__read(image.bytes));
  if (stamps.empty() || stamps.front().build_id != plan.build_id)
    return fail(fmt::format("{} was built but carries no stamp for build-id {}", output, plan.build_id),
                "an argument after `--` may have removed it (a linker script, -Wl,--gc-sections with a custom "
                "script); build without it");
  return {};
}

}  // namespace hotfix
