// See describe.hpp: the verbs' option tables as usage lines, man page and completion lists.
#include "cli/describe.hpp"

#include <fmt/core.h>
#include <unistd.h>

#include <cctype>
#include <cstdio>

namespace hotfix::cli {

namespace po = boost::program_options;

namespace {

VerbDoc* g_capture = nullptr;

std::string upper_name(const std::string& name) {
  std::string out;
  for (char c : name) out += c == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out;
}

// roff: a backslash is an escape, a line starting with . or ' a request, - a hyphen.
std::string roff(const std::string& text) {
  std::string out;
  bool line_start = true;
  for (char c : text) {
    if (line_start && (c == '.' || c == '\'')) out += "\\&";
    if (c == '\\') out += "\\e";
    else if (c == '-') out += "\\-";
    else out += c;
    line_start = c == '\n';
  }
  return out;
}

std::string option_label(const OptionDoc& o) {
  if (o.positional) return fmt::format("\\fI{}\\fR...", upper_name(o.name));
  std::string label = fmt::format("\\fB\\-\\-{}\\fR", roff(o.name));
  if (o.short_name) label += fmt::format(", \\fB\\-{}\\fR", o.short_name);
  if (!o.value.empty()) label += fmt::format(" \\fI{}\\fR", o.value);
  return label;
}

// "-o fix.so": the short form counts as mentioned too.
bool mentions_short(const std::string& text, char short_name) {
  std::string needle = std::string(" -") + short_name;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) {
    size_t end = at + needle.size();
    if (end == text.size() || text[end] == ' ') return true;
  }
  return text.rfind(needle.substr(1) + " ", 0) == 0;
}

}  // namespace

std::vector<OptionDoc> describe__options(const po::options_description& desc, const char* positional) {
  std::vector<OptionDoc> out;
  for (auto& d : desc.options()) {
    OptionDoc o;
    o.name = d->long_name();
    std::string shown = d->format_name();  // "-p [ --pid ]" when there is a short name
    if (shown.size() > 1 && shown[0] == '-' && shown[1] != '-') o.short_name = shown[1];
    o.description = d->description();
    auto semantic = d->semantic();
    o.required = semantic->is_required();
    o.positional = positional && o.name == positional;
    if (semantic->max_tokens() > 0) {
      std::string name = semantic->name();  // "arg", "arg (=1)", or a value_name()
      o.value = name.rfind("arg", 0) == 0 ? upper_name(o.name) : name;
    }
    out.push_back(std::move(o));
  }
  return out;
}

bool describe__mentions(const std::string& text, const std::string& name) {
  std::string needle = "--" + name;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) {
    size_t end = at + needle.size();
    if (end == text.size() || !(std::isalnum(static_cast<unsigned char>(text[end])) || text[end] == '-')) return true;
  }
  return false;
}

std::string describe__synopsis(const std::string& hand, const std::vector<OptionDoc>& options) {
  std::string out = hand;
  auto add = [&](const std::string& part) { out += (out.empty() ? "" : " ") + part; };
  for (auto& o : options) {
    if (o.positional) {
      std::string operand = upper_name(o.name);
      if (out.find(operand) == std::string::npos) add(fmt::format("[{}...]", operand));
      continue;
    }
    if (describe__mentions(out, o.name) || (o.short_name && mentions_short(out, o.short_name))) continue;
    std::string part = "--" + o.name + (o.value.empty() ? "" : " " + o.value);
    add(o.required ? part : "[" + part + "]");
  }
  return out;
}

VerbDoc* describe__capture() { return g_capture; }

VerbDoc describe__verb(const std::string& verb, const std::string& summary, int (*run)(const std::vector<std::string>&)) {
  VerbDoc doc;
  doc.verb = verb;
  doc.summary = summary;
  // The verb runs as for --help; parse() fills `doc` and returns 0, and whatever the verb then
  // prints (its output formats) lands in a temporary file instead of our stdout.
  std::fflush(stdout);
  FILE* extra = std::tmpfile();
  int saved = ::dup(STDOUT_FILENO);
  if (extra && saved >= 0) ::dup2(::fileno(extra), STDOUT_FILENO);
  g_capture = &doc;
  (void)run({"--help"});
  g_capture = nullptr;
  std::fflush(stdout);
  if (saved >= 0) ::dup2(saved, STDOUT_FILENO), ::close(saved);
  if (extra) {
    std::rewind(extra);
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, extra)) > 0;) doc.extra.append(buf, n);
    std::fclose(extra);
  }
  while (!doc.extra.empty() && (doc.extra.front() == '\n')) doc.extra.erase(0, 1);
  return doc;
}

std::string describe__man(const std::vector<VerbDoc>& verbs) {
  std::string out = ".SH SYNOPSIS\n";
  for (auto& v : verbs) out += fmt::format(".B hotfix\\-ctl {}\n{}\n.br\n", v.verb, roff(v.synopsis));
  out += ".B hotfix\\-ctl \\-\\-version\n.br\n.B hotfix\\-ctl \\-\\-help\n";
  out += ".SH VERBS\n";
  for (auto& v : verbs) {
    out += fmt::format(".SS {}\n{}.\n.PP\n\\fBhotfix\\-ctl {}\\fR {}\n", v.verb, roff(v.summary), v.verb, roff(v.synopsis));
    for (auto& o : v.options)
      out += fmt::format(".TP\n{}{}\n{}\n", option_label(o), o.required ? " (required)" : "", roff(o.description));
    out += ".TP\n\\fB\\-\\-help\\fR, \\fB\\-h\\fR\nshow this verb's options\n";
    if (!v.extra.empty()) out += fmt::format(".PP\n{}", roff(v.extra));
    if (!out.empty() && out.back() != '\n') out += '\n';
  }
  return out;
}

}  // namespace hotfix::cli
