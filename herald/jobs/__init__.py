"""The job service: enqueue, schedule, cancel, requeue and views of jobs; retry policy; capacity."""
