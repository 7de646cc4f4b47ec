// One source for the help text, the usage lines, the man page and the shell completion: the
// options_description each verb really parses. parse() (cli/common.cpp) turns it into the
// usage line and --help; in describe mode it records it instead, so that `hotfix-ctl --man`
// and `hotfix-ctl --complete` list what the verbs accept without a second table to keep up.
#pragma once
#include <boost/program_options.hpp>
#include <string>
#include <vector>

namespace hotfix::cli {

struct OptionDoc {
  std::string name;         // long name: "pid"
  char short_name = 0;      // 'p', or 0
  std::string value;        // "PID" for an option with an argument, "" for a switch
  std::string description;  // as --help shows it
  bool required = false;
  bool positional = false;  // the verb's operands (PATTERN...), given without the option name
};

struct VerbDoc {
  std::string verb, summary;
  std::string synopsis;  // the usage line after "hotfix-ctl VERB"
  std::string extra;     // what the verb prints after its --help (output formats, costs)
  std::vector<OptionDoc> options;
};

// The options of `desc` (`positional`: the option name that takes operands, or nullptr).
std::vector<OptionDoc> describe__options(const boost::program_options::options_description& desc,
                                         const char* positional);

// `hand` (the verb's hand-written synopsis, which says what goes together: "(--id N | --all)")
// followed by every option of `options` it does not mention, so that no usage line can leave
// out an option: "[--observe OBSERVE] [--no-count]".
std::string describe__synopsis(const std::string& hand, const std::vector<OptionDoc>& options);

// Does `text` mention "--name" (not as the start of a longer option name)?
bool describe__mentions(const std::string& text, const std::string& name);

// Describe mode: while a VerbDoc is being captured, parse() stores the verb's options and
// synopsis there and returns 0 without printing (the verb's extra help text goes to stdout,
// which describe__verb captures).
VerbDoc* describe__capture();
VerbDoc describe__verb(const std::string& verb, const std::string& summary, int (*run)(const std::vector<std::string>&));

// The generated part of the man page (roff): SYNOPSIS and one subsection per verb with its
// options. `head` and `tail` are the hand-written parts around it.
std::string describe__man(const std::vector<VerbDoc>& verbs);

}  // namespace hotfix::cli
