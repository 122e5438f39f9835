"""Client work: jobs (:mod:`.jobs`), the training loop (:mod:`.train`), executors that run
jobs one by one or many in lock-step (:mod:`.executors`, :mod:`.engine`)."""
