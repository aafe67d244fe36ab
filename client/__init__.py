"""The `trellis` command line (run, controllers, eval, up), the demo and the local process launcher: a thin
shell over the Python client library (trellis_client), as any other Python program would use it."""
