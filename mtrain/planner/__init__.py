"""Planning a run before it starts: the layout plan, a cost model of every
pipeline op on a hardware profile, the step it predicts through the schedule
simulator, a search over layouts, and calibration from a recorded step."""
