"""The job queue, the worker that runs jobs, and the runner that executes one job in a child process."""
