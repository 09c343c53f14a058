// Umbrella header of the pregated C++ core: #include <pregated/pregated.h>, link pregated::core.
#pragma once

#include "pregated/backend.h"
#include "pregated/expert_cache.h"
#include "pregated/expert_store.h"
#include "pregated/moe_plan.h"
#include "pregated/runtime.h"
#include "pregated/status.h"
#include "pregated/types.h"
#include "pregated/version.h"
