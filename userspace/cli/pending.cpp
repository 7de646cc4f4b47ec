// Verbs whose issue is not done yet say so instead of pretending. (None left: every verb in
// main.cpp has its own file. A new unfinished verb returns report(Error{"'VERB' is not
// implemented in this build yet", "see the open issues", 1}) from here.)
#include "cli/cli.hpp"
