"""The properties and the driver: verdicts on correct and wrong implementations, designed examples, controls, evidence."""
