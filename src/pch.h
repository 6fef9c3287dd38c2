// Precompiled header for all pardit translation units: ATen is by far the most expensive include.
#pragma once
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <map>
#include <memory>
#include <string>
#include <vector>
