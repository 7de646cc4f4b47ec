// What a user finds without reading the code: every option in --help, in the usage line and in
// the man page; --version; bash completion; the symbols table fitted to the terminal.
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "support/harness.hpp"

using namespace hotfix::test;
namespace fs = std::filesystem;

namespace {

// The build directory: hotfix-ctl is build/userspace/hotfix-ctl.
fs::path build_dir() { return fs::path(ctl()).parent_path().parent_path(); }

std::vector<std::string> verbs() {
  auto r = run({ctl(), "--complete"});
  REQUIRE(r.exit_code == 0);
  return lines_of(r.out);
}

// The long names of the options `verb` parses ("pid", "lib", ...), as hotfix-ctl reports them
// from the very options_description it parses with (cli/describe.hpp).
struct Option {
  std::string name;   // "output"
  std::string short_form;  // "-o", or ""
};
std::vector<Option> options_of(const std::string& verb) {
  auto r = run({ctl(), "--complete", verb});
  REQUIRE(r.exit_code == 0);
  std::vector<Option> out;
  for (auto& line : lines_of(r.out)) {
    std::string word = line.substr(0, line.find(' '));
    if (word.rfind("--", 0) != 0) {
      REQUIRE(!out.empty());
      out.back().short_form = word;  // "-o" follows "--output"
    } else if (word != "--help") {
      out.push_back({word.substr(2), ""});
    }
  }
  return out;
}

// "--name" in `text`, not as the start of a longer option ("--all" in "--allow-uncovered").
bool mentions(const std::string& text, const std::string& option) {
  for (size_t at = text.find(option); at != std::string::npos; at = text.find(option, at + 1)) {
    size_t end = at + option.size();
    if (end == text.size() || !(std::isalnum(static_cast<unsigned char>(text[end])) || text[end] == '-')) return true;
  }
  return false;
}

std::string roff_option(const std::string& name) {
  std::string out = "\\-\\-";
  for (char c : name) out += c == '-' ? std::string("\\-") : std::string(1, c);
  return out;
}

// Columns of a UTF-8 line (continuation bytes start no column).
size_t columns_of(const std::string& line) {
  size_t n = 0;
  for (unsigned char c : line) n += (c & 0xc0) != 0x80;
  return n;
}

}  // namespace

TEST_CASE("every verb's --help, usage line and the man page list every option the verb parses", "[cli]") {
  std::ifstream in(build_dir() / "hotfix-ctl.8");
  REQUIRE(in);
  std::string man((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  auto all = verbs();
  REQUIRE(all.size() >= 9);
  for (auto& verb : all) {
    INFO("verb " << verb);
    auto help = run({ctl(), verb, "--help"});
    REQUIRE(help.exit_code == 0);
    std::string usage = help.out.substr(0, help.out.find('\n'));
    CHECK(usage.rfind("usage: hotfix-ctl " + verb, 0) == 0);
    auto options = options_of(verb);
    CHECK(!options.empty());
    CHECK(man.find(".SS " + verb + "\n") != std::string::npos);
    for (auto& o : options) {
      INFO("option --" << o.name);
      CHECK(mentions(help.out.substr(usage.size()), "--" + o.name));  // the option table of --help
      // and the usage line (by its long or its short form: "-o fix.so")
      CHECK((mentions(usage, "--" + o.name) || (!o.short_form.empty() && usage.find(" " + o.short_form + " ") != std::string::npos)));
      CHECK(man.find(roff_option(o.name)) != std::string::npos);
    }
    // A usage error repeats the usage line.
    auto bad = run({ctl(), verb, "--no-such-option"});
    CHECK(bad.exit_code == 2);
    CHECK(bad.err.find(usage.substr(7)) != std::string::npos);
  }
  // The ones issue 13 found missing.
  auto patch = run({ctl(), "patch", "--help"});
  for (auto o : {"--observe", "--no-count", "--no-abi-check", "--blind-retry"})
    CHECK(mentions(patch.out.substr(0, patch.out.find('\n')), o));
  auto watch = run({ctl(), "watch", "--help"});
  CHECK(mentions(watch.out.substr(0, watch.out.find('\n')), "--inflight"));
  // The hand-written sections.
  for (auto s : {".SH EXIT STATUS", ".SH FILES", "/run/hotfix", "/sys/fs/bpf/hotfix", "/var/lib/hotfix",
                 ".SH ENVIRONMENT", "HOTFIX_DEBUG_ROOT", ".SH EXAMPLES", ".SH SEE ALSO"})
    CHECK(man.find(s) != std::string::npos);
  // man renders it without a warning (where man-db is installed).
  if (!fs::exists("/usr/bin/man")) return;
  auto rendered = run({"/bin/sh", "-c", "LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -l '" +
                                            (build_dir() / "hotfix-ctl.8").string() + "' 2>&1 >/dev/null"});
  CHECK(rendered.out == "");
}

TEST_CASE("hotfix-ctl --version names the build, the libraries and the kernel's features", "[cli]") {
  auto r = run({ctl(), "--version"});
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  CHECK(r.out.rfind("hotfix-ctl 0.", 0) == 0);
  CHECK(r.out.find("(git ") != std::string::npos);
  for (auto s : {"libbpf 1.", "elfutils 0.", "Capstone 4.", "uprobe_multi ", "BTF "})
    CHECK(r.out.find(s) != std::string::npos);
  CHECK(run({ctl(), "-V"}).out == r.out);
  // The top-level help points at it and at the manual.
  auto help = run({ctl(), "--help"});
  CHECK(help.out.find("--version") != std::string::npos);
  CHECK(help.out.find("man hotfix-ctl") != std::string::npos);
}

TEST_CASE("bash completion completes verbs, options, pids and function names in an interactive bash", "[cli]") {
  require_root();
  Child app({fixture("libc_names")});
  REQUIRE(app.request("ready").rfind("ok", 0) == 0);
  std::string pid = std::to_string(app.pid());
  fs::path script = fs::path(HOTFIX_SOURCE_DIR) / "tools/completion/hotfix-ctl";
  // One completion per line: "words|cword" -> the candidates, joined by spaces.
  std::string session =
      "PATH=" + fs::path(ctl()).parent_path().string() + ":$PATH\n"
      "source '" + script.string() + "'\n"
      "complete -p hotfix-ctl\n"
      "ask() { COMP_WORDS=(\"$@\"); COMP_CWORD=$(($# - 1)); COMP_LINE=\"$*\"; COMP_POINT=${#COMP_LINE};\n"
      "  COMPREPLY=(); _hotfix_ctl hotfix-ctl \"${COMP_WORDS[COMP_CWORD]}\" \"${COMP_WORDS[COMP_CWORD-1]}\";\n"
      "  printf 'R[%s]' \"$*\"; printf ' %s' \"${COMPREPLY[@]}\"; printf '\\n'; }\n"
      "ask hotfix-ctl pa\n"
      "ask hotfix-ctl ''\n"
      "ask hotfix-ctl patch --no-\n"
      "ask hotfix-ctl watch --in\n"
      "ask hotfix-ctl patch --consistency ''\n"
      "ask hotfix-ctl symbols --pid " + pid.substr(0, pid.size() - 1) + "\n"
      "ask hotfix-ctl symbols --pid " + pid + " a_function_with\n"
      "exit\n";
  fs::path file = fs::temp_directory_path() / ("hotfix-completion-" + pid + ".sh");
  std::ofstream(file) << session;
  auto r = run({"/bin/bash", "--norc", "--noprofile", "-i", file.string()});
  fs::remove(file);
  INFO(r.out << r.err);
  REQUIRE(r.exit_code == 0);
  auto reply = [&](const std::string& words) {
    auto at = r.out.find("R[" + words + "]");
    REQUIRE(at != std::string::npos);
    return r.out.substr(at, r.out.find('\n', at) - at);
  };
  CHECK(r.out.find("complete -F _hotfix_ctl hotfix-ctl") != std::string::npos);
  CHECK(reply("hotfix-ctl pa") == "R[hotfix-ctl pa] patch");
  for (auto verb : {"symbols", "watch", "patch", "list", "revert", "stats", "recover", "gc", "build", "--version"})
    CHECK(mentions(reply("hotfix-ctl "), verb));
  auto no = reply("hotfix-ctl patch --no-");
  CHECK(mentions(no, "--no-count"));
  CHECK(mentions(no, "--no-abi-check"));
  CHECK(reply("hotfix-ctl watch --in") == "R[hotfix-ctl watch --in] --interval --inflight");
  CHECK(reply("hotfix-ctl patch --consistency ") == "R[hotfix-ctl patch --consistency ] strict entry");
  CHECK(mentions(reply("hotfix-ctl symbols --pid " + pid.substr(0, pid.size() - 1)), pid));
  auto names = reply("hotfix-ctl symbols --pid " + pid + " a_function_with");
  CHECK(names.find(" a_function_with_a_name_so_long_that_no_table_column_should_ever_have_to_show_it_whole_one") !=
        std::string::npos);
  CHECK(names.find("_two") != std::string::npos);
}

TEST_CASE("symbols fits its table to the terminal (or $COLUMNS) with …, --names-only lists names whole", "[cli]") {
  require_root();
  Child app({fixture("libc_names")});
  REQUIRE(app.request("ready").rfind("ok", 0) == 0);
  std::string pid = std::to_string(app.pid());
  const std::string name = "a_function_with_a_name_so_long_that_no_table_column_should_ever_have_to_show_it_whole_one";

  auto narrow = run({"/usr/bin/env", "COLUMNS=100", ctl(), "symbols", "--pid", pid, "a_function_*"});
  INFO(narrow.out << narrow.err);
  REQUIRE(narrow.exit_code == 0);
  auto lines = lines_of(narrow.out);
  REQUIRE(lines.size() == 3);  // header and two functions
  for (auto& l : lines) CHECK(columns_of(l) <= 100);
  CHECK(narrow.out.find(name) == std::string::npos);
  CHECK(narrow.out.find("\u2026") != std::string::npos);

  // A real terminal (script(1) gives it a pty), 90 columns wide.
  auto tty = run({"/usr/bin/script", "-qec",
                  "stty cols 90; '" + ctl() + "' symbols --pid " + pid + " 'a_function_*'", "/dev/null"});
  INFO(tty.out);
  REQUIRE(tty.exit_code == 0);
  size_t rows = 0;
  for (auto& l : lines_of(tty.out)) {
    std::string row = l;
    if (!row.empty() && row.back() == '\r') row.pop_back();
    if (row.find("a_function") == std::string::npos) continue;
    rows++;
    CHECK(columns_of(row) <= 90);
    CHECK(row.find("\u2026") != std::string::npos);
  }
  CHECK(rows == 2);

  // --wide and --json keep them whole, whatever the width.
  CHECK(run({"/usr/bin/env", "COLUMNS=100", ctl(), "symbols", "--pid", pid, name, "--wide"}).out.find(name) !=
        std::string::npos);
  CHECK(run({"/usr/bin/env", "COLUMNS=100", ctl(), "symbols", "--pid", pid, name, "--json"}).out.find(name) !=
        std::string::npos);
  auto names = run({ctl(), "symbols", "--pid", pid, "a_function_*", "--names-only"});
  CHECK(names.exit_code == 0);
  CHECK(lines_of(names.out) == std::vector<std::string>{name, name.substr(0, name.size() - 3) + "two"});
}
