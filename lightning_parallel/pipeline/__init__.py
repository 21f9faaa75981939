"""The pipeline engine: schedules, a point-to-point runtime, partitioning and timelines. Imports no Lightning."""
