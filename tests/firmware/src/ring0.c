/* ring0: node 0 of the token ring (see ring.h). */
#define NODE 0
#include "ring.h"
