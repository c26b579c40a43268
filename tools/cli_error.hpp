// softce CLI — the two ways a command stops early.
//
// input_error: the user's input (a file, an argument, the output location) is unusable. The
// program prints the one message, leaves no output behind and exits with code 2. Messages
// name the file and, for content, where in it: "data.csv:7: ..." (1-based line) for text,
// "data.npy: record 6: ..." (0-based index along the first axis) for binary arrays.
// interrupted: a signal arrived while the outputs were being committed and the command is
// to stop (signals at any other time end the program from the handler: outputs.hpp).
#pragma once

#include <stdexcept>
#include <string>

namespace softce::cli {

class input_error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class interrupted : public std::runtime_error {
 public:
  interrupted() : std::runtime_error("interrupted") {}
};

}  // namespace softce::cli
