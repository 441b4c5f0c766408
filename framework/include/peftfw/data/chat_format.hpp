// A role-token chat format: how an architecture's chat template writes a turn.
// Architecture plugins supply them (ArchitecturePlugin::chat_formats); a recipe
// picks one by name with [data] template.
#pragma once

#include <string>

namespace peftfw::data {

struct ChatFormat {
  std::string name;        // [data] template value
  std::string role_start;  // written before the role name
  std::string role_end;    // between the role name and the content
  std::string turn_end;    // after the content (the end-of-text token and a newline, say)
  std::string description; // one line for `peftfw plugins` and error messages

  // role_start + role + role_end: the header a model continues after.
  std::string header(const std::string& role) const { return role_start + role + role_end; }
  std::string turn(const std::string& role, const std::string& content) const {
    return header(role) + content + turn_end;
  }
};

}  // namespace peftfw::data
