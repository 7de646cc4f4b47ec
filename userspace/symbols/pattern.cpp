// The pattern language (see pattern.hpp) and "did you mean" suggestions.
#include "symbols/pattern.hpp"
#include "symbols/stripped.hpp"

#include <algorithm>
#include <array>
#include <cctype>
#include <optional>
#include <set>

namespace hotfix {

namespace {

bool is_ident(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '$'; }

// Demangled names that are not "return-type name(params)": keep them whole, so that
// `Order::total` never selects the thunk that adjusts `this` before calling it.
constexpr std::array<std::string_view, 9> special_prefixes = {
    "non-virtual thunk to ", "virtual thunk to ", "covariant return thunk to ", "transaction clone for ",
    "construction vtable for ", "vtable for ", "typeinfo for ", "typeinfo name for ", "guard variable for "};

// Drop trailing " const", " &&", ... after a parameter list.
std::string_view without_qualifiers(std::string_view s) {
  constexpr std::array<std::string_view, 5> quals = {" const", " volatile", " &&", " &", " noexcept"};
  std::string_view out = s;
  for (bool again = true; again;) {
    again = false;
    for (auto q : quals)
      if (out.ends_with(q)) {
        out.remove_suffix(q.size());
        again = true;
      }
  }
  return out.ends_with(')') ? out : s;
}

// Index of the '(' opening the parameter list that ends `s`, or npos.
size_t parameter_list_start(std::string_view s) {
  if (!s.ends_with(')')) return std::string_view::npos;
  int depth = 0;
  for (size_t i = s.size(); i-- > 0;) {
    if (s[i] == ')') depth++;
    if (s[i] == '(' && --depth == 0) return i;
  }
  return std::string_view::npos;
}

bool keyword_at(std::string_view s, size_t i, std::string_view word) {
  return s.substr(i).starts_with(word) && (i == 0 || !is_ident(s[i - 1])) &&
         (i + word.size() == s.size() || !is_ident(s[i + word.size()]));
}

// Where the name starts after a return type ("int max_of<int>" -> 4): past the last space
// outside brackets. Everything from an `operator` keyword on is name ("operator new[]").
size_t name_start(std::string_view head) {
  int depth = 0;
  size_t cut = 0;
  for (size_t i = 0; i < head.size(); i++) {
    if (depth == 0 && head[i] == 'o' && keyword_at(head, i, "operator")) break;
    char c = head[i];
    if (c == '(' || c == '<' || c == '[' || c == '{') depth++;
    if ((c == ')' || c == '>' || c == ']' || c == '}') && depth > 0) depth--;
    if (c == ' ' && depth == 0) cut = i + 1;
  }
  return cut;
}

std::string without_abi_tags(std::string s) {
  for (size_t at; (at = s.find("[abi:")) != std::string::npos;) {
    size_t end = s.find(']', at);
    if (end == std::string::npos) break;
    s.erase(at, end - at + 1);
  }
  return s;
}

// Spaces only matter between two identifier characters ("unsigned int").
std::string normalize(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); i++) {
    if (s[i] == ' ') {
      if (!out.empty() && i + 1 < s.size() && is_ident(out.back()) && is_ident(s[i + 1])) out += ' ';
      continue;
    }
    out += s[i];
  }
  return out;
}

// `*` any run of characters (also "::"), `?` one character.
bool glob_match(std::string_view pat, std::string_view text) {
  size_t p = 0, t = 0, star = std::string_view::npos, resume = 0;
  while (t < text.size()) {
    if (p < pat.size() && (pat[p] == '?' || pat[p] == text[t])) {
      p++, t++;
    } else if (p < pat.size() && pat[p] == '*') {
      star = p++;
      resume = t;
    } else if (star != std::string_view::npos) {
      p = star + 1;
      t = ++resume;
    } else {
      return false;
    }
  }
  while (p < pat.size() && pat[p] == '*') p++;
  return p == pat.size();
}

// One name of a function as patterns see it.
struct NameKeys {
  std::string mangled;
  std::string demangled;
  NameParts parts;
  std::string signature_norm;
};

NameKeys keys_of(const std::string& mangled, const std::string& demangled) {
  NameKeys k{mangled, demangled, symbols__split_name(demangled), {}};
  k.signature_norm = normalize(k.parts.signature);
  return k;
}

// Index just past the '>' closing the '<' at `open`, or npos.
size_t closing_angle(std::string_view s, size_t open) {
  int depth = 0;
  for (size_t i = open; i < s.size(); i++) {
    if (s[i] == '<') depth++;
    if (s[i] == '>' && --depth == 0) return i + 1;
  }
  return std::string_view::npos;
}

// The other spellings a Rust path answers to, besides rustfilt's ("main::pricing::discount"):
//  - without the crate ("pricing::discount"): a Rust user thinks in module paths, so that
//    `pricing::*` selects the module in whichever crate it lives;
//  - an inherent method as a path ("<main::pricing::Order>::total" -> "main::pricing::Order::total");
//  - a generic instance without its arguments ("main::max::<u8>" -> "main::max"), so one
//    name selects every instance, as a C++ name selects every overload.
std::vector<std::string> rust_spellings(const std::string& path) {
  std::vector<std::string> forms{path};
  if (path.starts_with('<')) {
    size_t close = closing_angle(path, 0);
    std::string_view inner = std::string_view(path).substr(1, close == std::string::npos ? 0 : close - 2);
    if (close != std::string::npos && path.compare(close, 2, "::") == 0 && inner.find(" as ") == std::string_view::npos &&
        inner.find('<') == std::string_view::npos)
      forms.push_back(std::string(inner) + path.substr(close));
  }
  for (size_t i = 0, n = forms.size(); i < n; i++)
    if (forms[i].ends_with('>'))
      if (auto at = forms[i].rfind("::<"); at != std::string::npos && closing_angle(forms[i], at + 2) == forms[i].size())
        forms.push_back(forms[i].substr(0, at));
  for (size_t i = 0, n = forms.size(); i < n; i++) {
    auto sep = forms[i].find("::");
    if (forms[i].starts_with('<') || sep == std::string::npos || sep == 0) continue;
    if (std::all_of(forms[i].begin(), forms[i].begin() + static_cast<long>(sep), is_ident))
      forms.push_back(forms[i].substr(sep + 2));
  }
  return forms;
}

void add_keys(std::vector<NameKeys>& keys, const std::string& mangled, const std::string& demangled) {
  keys.push_back(keys_of(mangled, demangled));
  if (!symbols__is_rust(mangled)) return;
  auto forms = rust_spellings(demangled);
  for (size_t i = 1; i < forms.size(); i++) keys.push_back(keys_of(mangled, forms[i]));
  if (auto hashed = symbols__rust_hashed(mangled); !hashed.empty()) keys.push_back(keys_of(mangled, hashed));
}

std::vector<NameKeys> keys_of(const Function& f) {
  std::vector<NameKeys> keys;
  add_keys(keys, f.mangled, f.name);
  for (auto& alias : f.aliases) add_keys(keys, alias, symbols__demangle(alias));
  return keys;
}

}  // namespace

// Text that the ELF spelling (mangled name or alias) of every function an exact pattern
// selects contains: the pattern's last identifier ("discount" for "pricing::discount(double)").
// Manglings spell identifiers as they are (C++ once per name, Rust legacy and v0 too), except
// operators, std's abbreviations (St, Sa, Ss, ...) and Rust v0's Punycode for non-ASCII ones:
// those patterns, and globs, get none (every name is compared).
std::string symbols__pattern_needle(std::string_view text) {
  if (text.find_first_of("*?") != std::string_view::npos || text.find("operator") != std::string_view::npos)
    return {};
  if (std::any_of(text.begin(), text.end(), [](char c) { return static_cast<unsigned char>(c) >= 0x80; })) return {};
  std::string_view head = text.substr(0, text.find_first_of("(<"));
  size_t begin = head.size();
  while (begin > 0 && is_ident(head[begin - 1]) && head[begin - 1] != '$') --begin;
  std::string_view id = head.substr(begin);
  static const std::set<std::string_view> abbreviated = {
      "std", "allocator", "basic_string", "string", "char_traits", "istream", "ostream", "iostream",
      "basic_istream", "basic_ostream", "basic_iostream"};
  if (id.empty() || abbreviated.count(id)) return {};
  return std::string(id);
}

namespace {

// A pattern, prepared once for many comparisons.
struct Compiled {
  std::string text;
  bool glob = false;
  bool has_params = false;
  std::string signature_norm;  // of the pattern, when it has a parameter list

  explicit Compiled(const std::string& t) : text(t) {
    glob = t.find_first_of("*?") != std::string::npos;
    has_params = t.find('(') != std::string::npos;
    if (has_params) signature_norm = normalize(glob ? t : symbols__split_name(t).signature);
  }

  // "Order::total()" also selects "Order::total() const": what is left is only qualifiers.
  bool same_signature(const std::string& sig) const {
    if (!sig.starts_with(signature_norm) || !signature_norm.ends_with(')')) return false;
    std::string_view rest = std::string_view(sig).substr(signature_norm.size());
    return rest.find_first_of("()[") == std::string_view::npos;
  }

  bool matches(const NameKeys& k) const {
    if (glob)
      return glob_match(text, k.parts.base) || (has_params && glob_match(signature_norm, k.signature_norm)) ||
             ((text.starts_with("_Z") || text.starts_with("_R")) && glob_match(text, k.mangled));
    if (text == k.mangled || text == k.parts.base || text == k.demangled) return true;
    return has_params && same_signature(k.signature_norm);
  }

  bool matches(const std::vector<NameKeys>& keys) const {
    return std::any_of(keys.begin(), keys.end(), [&](const NameKeys& k) { return matches(k); });
  }

  // Can `f` match at all? Cheap, on the ELF spellings alone, so that the keys (demangling,
  // splitting) are built only for the few functions that can (issue 11 §7).
  bool could_match(const Function& f) const {
    if (needle.empty()) return true;
    if (f.mangled.find(needle) != std::string::npos) return true;
    return std::any_of(f.aliases.begin(), f.aliases.end(),
                       [&](const std::string& a) { return a.find(needle) != std::string::npos; });
  }

  std::string needle = symbols__pattern_needle(text);
};

std::string basename_of(std::string_view path) {
  auto slash = path.rfind('/');
  return std::string(slash == std::string_view::npos ? path : path.substr(slash + 1));
}

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); j++) row[j] = j;
  for (size_t i = 1; i <= a.size(); i++) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); j++) {
      size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

// Up to `max` of `names` nearest to `wanted`: close in edit distance, or containing it.
// Without "::" in `wanted`, the last component of each name counts too ("discont" ->
// "pricing::discount").
std::vector<std::string> nearest_names(const std::set<std::string>& names, const std::string& wanted, size_t max) {
  std::string w = lower(wanted);
  std::erase_if(w, [](char c) { return c == '*' || c == '?'; });
  if (w.empty()) return {};
  size_t threshold = std::max<size_t>(2, w.size() / 3);
  bool qualified = w.find("::") != std::string::npos;
  std::vector<std::pair<size_t, std::string>> scored;
  for (auto& name : names) {
    std::string n = lower(name);
    std::vector<std::string_view> forms{n};
    if (!qualified) {
      auto colon = n.rfind("::");
      if (colon != std::string::npos) forms.push_back(std::string_view(n).substr(colon + 2));
    }
    size_t best = SIZE_MAX;
    for (auto form : forms) {
      size_t diff = form.size() > w.size() ? form.size() - w.size() : w.size() - form.size();
      if (diff <= threshold) best = std::min(best, edit_distance(w, form));
      if (w.size() >= 3 && form.find(w) != std::string_view::npos) best = std::min(best, threshold);
    }
    if (best <= threshold) scored.emplace_back(best, name);
  }
  std::sort(scored.begin(), scored.end(), [](auto& a, auto& b) {
    if (a.first != b.first) return a.first < b.first;
    if (a.second.size() != b.second.size()) return a.second.size() < b.second.size();
    return a.second < b.second;
  });
  std::vector<std::string> out;
  for (auto& [score, name] : scored) {
    if (out.size() == max) break;
    out.push_back(name);
  }
  return out;
}

bool in_scope(const Function& f, const SelectOptions& opts) {
  return opts.object.empty() || symbols__object_matches(f.object, opts.object);
}

std::vector<std::string> nearest(const SymbolTable& table, const std::string& wanted, size_t max,
                                 const SelectOptions& opts) {
  // A parameter list that fits no overload: offer the overloads.
  if (wanted.find('(') != std::string::npos && wanted.find_first_of("*?") == std::string::npos) {
    std::string base = symbols__base_name(wanted);
    std::set<std::string> overloads;
    for (auto& f : table.functions())
      if (in_scope(f, opts) && symbols__base_name(f.name) == base) overloads.insert(symbols__split_name(f.name).signature);
    if (!overloads.empty()) return {overloads.begin(), std::next(overloads.begin(), std::min(max, overloads.size()))};
  }
  std::set<std::string> names;
  for (auto& f : table.functions()) {
    if (!in_scope(f, opts)) continue;
    names.insert(symbols__base_name(f.name));
    for (auto& alias : f.aliases) names.insert(symbols__base_name(symbols__demangle(alias)));
  }
  std::string base = wanted.find('(') != std::string::npos ? symbols__base_name(wanted) : wanted;
  return nearest_names(names, base, max);
}

std::string quoted_list(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size(); i++)
    out += (i == 0 ? "" : i + 1 == names.size() ? " or " : ", ") + fmt::format("'{}'", names[i]);
  return out;
}

Result<void> check_object_exists(const SymbolTable& table, const SelectOptions& opts) {
  if (opts.object.empty()) return {};
  std::set<std::string> basenames;
  for (auto& o : table.objects()) {
    if (symbols__object_matches(o.path, opts.object)) return {};
    basenames.insert(basename_of(o.path));
  }
  auto near = nearest_names(basenames, opts.object, 3);
  std::string hint = near.empty() ? fmt::format("the objects are: {}", quoted_list({basenames.begin(), basenames.end()}))
                                  : fmt::format("did you mean {}?", quoted_list(near));
  return fail(fmt::format("no object '{}' is loaded in {}", opts.object, table.where()), hint);
}

}  // namespace

NameParts symbols__split_name(std::string_view name) {
  for (auto prefix : special_prefixes)
    if (name.starts_with(prefix)) return {std::string(name), std::string(name)};
  std::string clones;  // " [clone .cold]": a part or specialisation, not the function itself
  if (auto at = name.find(" [clone "); at != std::string_view::npos && name.ends_with(']')) {
    clones = name.substr(at);
    name = name.substr(0, at);
  }
  std::string_view head = name;
  if (size_t open = parameter_list_start(without_qualifiers(name)); open != std::string_view::npos)
    head = name.substr(0, open);
  size_t start = name_start(head);
  return {without_abi_tags(std::string(head.substr(start))) + clones, std::string(name.substr(start)) + clones};
}

bool symbols__object_matches(const std::string& path, const std::string& wanted) {
  std::string p = path;
  if (p.ends_with(" (deleted)")) p.resize(p.size() - 10);
  if (wanted.find('/') != std::string::npos) return p == wanted;
  std::string base = basename_of(p);
  return base == wanted || (base.starts_with(wanted) && base[wanted.size()] == '.');
}

bool Pattern::is_glob() const { return text.find_first_of("*?") != std::string::npos; }

bool Pattern::matches(const Function& f) const { return Compiled(text).matches(keys_of(f)); }

std::vector<std::string> symbols__nearest(const SymbolTable& table, const std::string& wanted, size_t max) {
  return nearest(table, wanted, max, {});
}

Result<std::vector<Function>> symbols__select(const SymbolTable& table, const std::vector<std::string>& patterns,
                                              const SelectOptions& opts) {
  HOTFIX_CHECK(check_object_exists(table, opts));
  const auto& functions = table.functions();
  // Built when a pattern could match, once, shared by all patterns.
  std::vector<std::optional<std::vector<NameKeys>>> keys(functions.size());
  std::vector<bool> chosen(functions.size(), false), scope(functions.size());
  size_t searched = 0;
  for (size_t i = 0; i < functions.size(); i++) searched += (scope[i] = in_scope(functions[i], opts));

  for (auto& text : patterns) {
    if (text.empty()) return usage_error("an empty pattern matches nothing", "give a function name or a glob like 'pricing::*'");
    Compiled pattern(text);
    bool any = false;
    for (size_t i = 0; i < functions.size(); i++) {
      if (!scope[i] || !pattern.could_match(functions[i])) continue;
      if (!keys[i]) keys[i] = keys_of(functions[i]);
      if (!pattern.matches(*keys[i])) continue;
      chosen[i] = true;
      any = true;
    }
    if (any) continue;
    std::string scope = opts.object.empty() ? table.where() : fmt::format("{} of {}", opts.object, table.where());
    auto near = nearest(table, text, 3, opts);
    std::string hint = !near.empty()   ? fmt::format("did you mean {}?", quoted_list(near))
                       : table.pid() ? fmt::format("list the functions with `hotfix-ctl symbols --pid {}`", table.pid())
                                     : "check the name; globs like 'pricing::*' select by prefix";
    if (auto stripped = symbols__stripped_hint(table); !stripped.empty())  // the likeliest reason of all
      hint = near.empty() ? stripped : hint + "; " + stripped;
    return fail(fmt::format("no function matches '{}' in {} (searched {} functions)", text, scope, searched), hint);
  }
  std::vector<Function> out;
  for (size_t i = 0; i < functions.size(); i++)
    if (chosen[i]) out.push_back(functions[i]);
  return out;
}

}  // namespace hotfix
