"""Co-simulation: several sessions run as one system in lock-step quanta of virtual time.

- :mod:`.model`: the records (topology, sync policy, state) and their validation;
- :mod:`.links`: what happens at a barrier (shared memory, doorbell interrupts, serial
  bytes), a pure function of the members' quantum results: deterministic by construction;
- :mod:`.coordinator`: the quantum loop over the members' ``LockStep`` parts, the exact
  cross-member halt (checkpoint, roll back, replay), pause and cancellation;
- :mod:`.manager`: the service (create/get/list/delete, membership rules for sessions,
  events, persistence);
- :mod:`.snapshots`: coordinated snapshots (every member plus the link state, one artifact).
"""
