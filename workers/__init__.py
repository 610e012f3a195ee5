"""mfsweep workers: the particle engine (``workers.engine``) and the Ray actor around it (``workers.actor``)."""
