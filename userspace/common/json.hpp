// JSON output helpers shared by every verb with --json: we emit JSON with fmt, so the
// only thing that needs care is string escaping (names, paths and messages may hold
// quotes, backslashes, control characters; non-ASCII UTF-8 passes through unchanged).
#pragma once
#include <string>
#include <string_view>

#include <fmt/format.h>

namespace hotfix {

// The contents of a JSON string literal for `s`, without the surrounding quotes.
inline std::string json__escape(std::string_view s) {
  std::string out;
  out.reserve(s.size() + 2);
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) out += fmt::format("\\u{:04x}", c);
        else out += static_cast<char>(c);
    }
  }
  return out;
}

// `s` as a complete JSON string literal, quotes included.
inline std::string json__quote(std::string_view s) { return "\"" + json__escape(s) + "\""; }

}  // namespace hotfix
