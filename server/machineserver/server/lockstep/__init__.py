"""Lock-step co-simulation's engine, below the core: the barrier's rules (:mod:`.links`)
and the quantum loop with the exact cross-member halt (:mod:`.runner`). It speaks the
driver interface only (``LockStep`` parts, plain data), so it runs in the server over
remote parts or inside the worker process that hosts every member."""
