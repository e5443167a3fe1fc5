"""Regression jobs (JobService): a matrix of runs executed by a run engine, the server's own
workers (``local``) or a Ray cluster (``ray``)."""
