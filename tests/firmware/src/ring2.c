/* ring2: node 2 of the token ring (see ring.h). */
#define NODE 2
#include "ring.h"
