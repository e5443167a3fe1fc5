/* ring1: node 1 of the token ring (see ring.h). */
#define NODE 1
#include "ring.h"
