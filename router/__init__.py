"""The router: serves the public Router API, runs controllers, dispatches their tasks to workers."""
