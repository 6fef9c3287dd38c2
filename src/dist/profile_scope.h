#pragma once
// Communication as named scopes of operator profiles (pipeline/op_profile.h counts them as the class
// "communication"): each backend opens one at the start of every collective, point-to-point call and wait.
#include <ATen/record_function.h>

#include <vector>

#define PARDIT_PROFILE_COMMUNICATION(name) RECORD_FUNCTION("pardit::" name, std::vector<c10::IValue>())
